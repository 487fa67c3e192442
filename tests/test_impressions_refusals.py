"""What the impressions receiver refuses and what the loader sets aside agree: a 200 means the body loads, and a
bad file in the landing folder is quarantined with a reason while the rest of its run loads (real HTTP to the
receiver, real Dagster runs of split_impressions into a real DuckDB file)."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import dagster as dg
import loopback
import orjson
import pytest

from mixsync.definitions import resources as RESOURCES
from mixsync.impressions.assets import split_impressions
from mixsync.impressions.landing import write_atomically
from mixsync.impressions.receiver import build_app
from mixsync.impressions.resources import ImpressionsResource
from mixsync.impressions.sensors import split_impression_files_sensor
from mixsync.impressions.settings import ImpressionsSettings
from mixsync.sandbox.impressions import ImpressionGenerator, encode
from mixsync.sandbox.server import serve

MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, as the README says
IMPRESSION = {"key": '"u1"', "split": '"s"', "treatment": '"on"', "environmentId": '"e"', "time": "1767225600000"}


def body_with(**fields: str) -> bytes:
    """One impression with `fields` set or added, each given as raw JSON text (big numbers stay as written)."""
    members = {**IMPRESSION, **fields}
    return ("[{" + ",".join(f'"{name}":{value}' for name, value in members.items()) + "}]").encode()


def gzip_with_flags(data: bytes, flags: int) -> bytes:
    """One valid gzip member whose header sets `flags` (FTEXT 1, FHCRC 2, FCOMMENT 16), as zlib writes them."""
    header = b"\x1f\x8b\x08" + bytes([flags]) + b"\x00\x00\x00\x00\x00\xff"
    if flags & 16:
        header += b"made by some other tool\x00"
    if flags & 2:
        header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return header + compressor.compress(data) + compressor.flush() + struct.pack("<II", zlib.crc32(data), len(data))


def load(instance, files=None):
    config = {"ops": {"split_impressions": {"config": {"files": files or []}}}}
    result = dg.materialize([split_impressions], run_config=config, instance=instance, resources=RESOURCES)
    meta = result.asset_materializations_for_node("split_impressions")[0].metadata
    return {k: v.value for k, v in meta.items()}


def quarantine(warehouse) -> dict[str, tuple[str, str]]:
    with warehouse.read() as con:
        return {name: (reason, detail) for name, reason, detail in con.execute(
            "SELECT file_name, reason, detail FROM split.impression_quarantine").fetchall()}


@pytest.fixture
def settings(impressions_env) -> ImpressionsSettings:
    return ImpressionsSettings.from_env()


@pytest.fixture
def receiver(settings):
    running = serve("receiver", build_app(settings))
    yield running
    running.stop()


# Bodies the loader would quarantine (or could not even load), each refused with the field it is about.
REFUSED = {
    "time past int64 * 1000": (body_with(time="10000000000000000"), "time must be an integer of milliseconds from 0 to 253402300799999"),
    "time past int64": (body_with(time="9223372036854775808"), "time must be an integer of milliseconds from 0"),
    "time in year 10000": (body_with(time=str(MAX_TIME_MS + 1)), "time must be an integer of milliseconds from 0"),
    "empty environmentId": (body_with(environmentId='""'), "environmentId must be a non-empty string"),
    "splitVersionNumber text": (body_with(splitVersionNumber='"abc"'), "splitVersionNumber must be null or a 64-bit integer"),
    "splitVersionNumber past int64": (body_with(splitVersionNumber="9223372036854775808"), "splitVersionNumber must be null or a 64-bit integer"),
    "splitVersionNumber 1.5": (body_with(splitVersionNumber="1.5"), "splitVersionNumber must be null or a 64-bit integer"),
    "duplicate key": (b'[{"key":"","key":"u","split":"s","treatment":"on","environmentId":"e","time":1}]',
                      'element 0 names the key "key" more than once'),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_body_the_loader_would_not_load_gets_a_400_naming_the_field(receiver, settings, case):
    body, message = REFUSED[case]
    for encoded in (body, gzip.compress(body)):
        response = loopback.post(receiver.url + "/impressions", content=encoded)
        assert response.status_code == 400, (case, response.text)
        assert message in response.json()["error"]
    assert not settings.impressions_dir.exists() or os.listdir(settings.impressions_dir) == []


# At the edges of what the receiver takes: each of these gets a 200 and must then load, not be quarantined.
ACCEPTED = [
    body_with(time="0"),
    body_with(time=str(MAX_TIME_MS)),
    body_with(splitVersionNumber="-9223372036854775808"),
    body_with(splitVersionNumber="9223372036854775807"),
    body_with(splitVersionNumber="null", key='"ü-ключ-🙂"'),
    body_with(properties='{"plan":"free","plan":"pro"}', label="12"),  # nested duplicates: kept as text
]


def test_every_body_that_gets_a_200_loads(receiver, settings, warehouse, instance):
    # gzip whose header sets flags DuckDB's gzip reader refuses (zlib takes them): FTEXT, FHCRC, FCOMMENT.
    flagged = [gzip_with_flags(body_with(key=f'"flagged-{flags}"'), flags) for flags in (1, 2, 16, 1 | 2 | 16)]
    for body in ACCEPTED + flagged:
        response = loopback.post(receiver.url + "/impressions", content=body)
        assert response.status_code == 200, (body, response.text)
    bodies = len(ACCEPTED) + len(flagged)
    meta = load(instance)
    assert (meta["files_loaded"], meta["files_quarantined"], meta["rows_inserted"]) == (bodies, 0, bodies)
    with warehouse.read() as con:
        times = {t for (t,) in con.execute("SELECT epoch_ms(time) FROM split.impressions").fetchall()}
    assert {0, MAX_TIME_MS} <= times


def test_a_time_duckdb_cannot_hold_quarantines_its_file_and_the_rest_loads(settings, warehouse, instance):
    gen = ImpressionGenerator(seed=21)
    names = [write_atomically(settings.impressions_dir, f"good-{n}.json.gz", encode(gen.batch(20))[0]).name
             for n in range(2)]
    # Arrived by another way than the receiver (a copy, another tool): the loader is the last line.
    for name, time in (("overflow.json", 10_000_000_000_000_000), ("year-10000.json", MAX_TIME_MS + 1),
                       ("before-1970.json", -1)):
        write_atomically(settings.impressions_dir, name, body_with(time=str(time)))
        names.append(name)
    meta = load(instance, names)
    assert (meta["files_loaded"], meta["files_quarantined"], meta["rows_inserted"]) == (2, 3, 40)
    records = quarantine(warehouse)
    assert {name: reason for name, (reason, _) in records.items()} == {
        "overflow.json": "time out of range", "year-10000.json": "time out of range",
        "before-1970.json": "time out of range"}
    assert "1 of 1 impressions have a time outside 0..253402300799999 ms" in records["overflow.json"][1]
    assert os.listdir(settings.impressions_dir) == []


def test_a_number_that_is_not_an_integer_is_quarantined_not_rounded(settings, warehouse, instance):
    write_atomically(settings.impressions_dir, "good.json.gz", encode(ImpressionGenerator(seed=26).batch(5))[0])
    wrong = {"time-1.5.json": ("time", "1767225600000.5", "time is not an integer (1 of 1)"),
             "time-text.json": ("time", '"1767225600000"', "time is not an integer (1 of 1)"),
             "version-1.5.json": ("splitVersionNumber", "1.5", "splitVersionNumber is not null or a 64-bit integer"),
             "version-true.json": ("splitVersionNumber", "true", "splitVersionNumber is not null or a 64-bit integer"),
             "version-text.json": ("splitVersionNumber", '"12"', "splitVersionNumber is not null or a 64-bit integer"),
             "version-past-int64.json": ("splitVersionNumber", "9223372036854775808",
                                         "splitVersionNumber is not null or a 64-bit integer")}
    for name, (field, value, _) in wrong.items():
        write_atomically(settings.impressions_dir, name, body_with(**{field: value}))
    write_atomically(settings.impressions_dir, "time-past-int64.json", body_with(time="9223372036854775808"))
    meta = load(instance)
    assert (meta["files_loaded"], meta["files_quarantined"], meta["rows_inserted"]) == (1, len(wrong) + 1, 5)
    records = quarantine(warehouse)
    assert records.pop("time-past-int64.json")[0] == "time out of range"
    assert {name: reason for name, (reason, _) in records.items()} == dict.fromkeys(wrong, "a field has the wrong type")
    for name, (_, _, detail) in wrong.items():
        assert detail in records[name][1]


def test_a_file_that_is_not_utf8_is_quarantined_and_the_rest_loads(settings, warehouse, instance):
    gen = ImpressionGenerator(seed=22)
    names = [write_atomically(settings.impressions_dir, "good.json.gz", encode(gen.batch(20))[0]).name]
    utf16 = orjson.dumps(gen.batch(3)).decode().encode("utf-16")  # a valid array, saved as UTF-16 with a BOM
    # UTF-8, but DuckDB"s message about its duplicate key quotes it cut in the middle of an "é".
    cut = ('[{"key":"x' + "é" * 30 + '","key":"u","split":"s","treatment":"on","environmentId":"e","time":1}]').encode()
    duplicated = b'[{"key":"","key":"u","split":"s","treatment":"on","environmentId":"e","time":1}]'
    for name, body in (("utf16.json", utf16), ("utf16.json.gz", gzip.compress(utf16)), ("cut.json", cut),
                       ("duplicated.json", duplicated)):
        write_atomically(settings.impressions_dir, name, body)
        names.append(name)
    meta = load(instance, names)
    assert (meta["files_loaded"], meta["files_quarantined"], meta["rows_inserted"]) == (1, 4, 20)
    reasons = {name: reason for name, (reason, _) in quarantine(warehouse).items()}
    assert reasons == {"utf16.json": "not UTF-8", "utf16.json.gz": "not UTF-8", "cut.json": "not valid JSON",
                       "duplicated.json": "an object has a duplicate key"}
    assert os.listdir(settings.impressions_dir) == []


def test_a_gzip_file_duckdb_cannot_open_is_quarantined_saying_why(settings, warehouse, instance):
    write_atomically(settings.impressions_dir, "good.json.gz", encode(ImpressionGenerator(seed=25).batch(5))[0])
    write_atomically(settings.impressions_dir, "commented.json.gz", gzip_with_flags(body_with(), 16))
    meta = load(instance)
    assert (meta["files_loaded"], meta["files_quarantined"], meta["rows_inserted"]) == (1, 1, 5)
    [(reason, detail)] = quarantine(warehouse).values()
    assert reason == "unsupported gzip header" and "FCOMMENT" in detail


def test_an_empty_file_is_quarantined_as_holding_no_impressions(settings, warehouse, instance):
    for name, body in (("empty.json", b""), ("empty-array.json", b"[]"), ("empty-array.json.gz", gzip.compress(b"[ ]"))):
        write_atomically(settings.impressions_dir, name, body)
    meta = load(instance)
    assert (meta["files_loaded"], meta["files_quarantined"]) == (0, 3)
    assert set(quarantine(warehouse).values()) == {
        ("no impressions", "the file holds no impressions (it is empty, or an empty array)")}


def test_a_second_copy_of_a_bad_file_is_quarantined_too(settings, warehouse, instance):
    bad = write_atomically(settings.impressions_dir, "bad.json", b'[{"key": "u1", ')
    shutil.copy(bad, settings.impressions_dir / "copy-of-bad.json")
    meta = load(instance, ["bad.json", "copy-of-bad.json"])
    assert (meta["files_quarantined"], meta["files_duplicate"]) == (2, 0)
    assert {name: reason for name, (reason, _) in quarantine(warehouse).items()} == {
        "bad.json": "not valid JSON", "copy-of-bad.json": "not valid JSON"}
    with warehouse.read() as con:
        assert dict(con.execute("SELECT file_name, status FROM split.impression_files").fetchall()) == {
            "bad.json": "quarantined", "copy-of-bad.json": "quarantined"}
    assert sorted(os.listdir(settings.quarantine_dir))[0].endswith("-bad.json")
    assert len(os.listdir(settings.quarantine_dir)) == 2 and os.listdir(settings.impressions_dir) == []


def test_a_file_named_with_glob_characters_is_read_as_itself(settings, warehouse, instance):
    gen = ImpressionGenerator(seed=23)
    names = ["star*.json", "class[1].json", "what?.json.gz"]
    for n, name in enumerate(names):
        write_atomically(settings.impressions_dir, name, encode(gen.batch(5 + n))[0])
    # What those names would match as globs: not to be read with them (a broken file, and another good one).
    write_atomically(settings.impressions_dir, "starX.json", b"not json")
    write_atomically(settings.impressions_dir, "class1.json", encode(gen.batch(50))[0])
    meta = load(instance, names)
    assert (meta["files_loaded"], meta["files_quarantined"], meta["rows_inserted"]) == (3, 0, 18)
    with warehouse.read() as con:
        per_file = dict(con.execute("SELECT file_name, count(*) FROM split.impressions GROUP BY ALL").fetchall())
    assert per_file == {"star*.json": 5, "class[1].json": 6, "what?.json.gz": 7}
    assert sorted(os.listdir(settings.impressions_dir)) == ["class1.json", "starX.json"]



def test_a_file_whose_name_is_not_utf8_stops_neither_the_sensor_nor_the_others(settings, warehouse, instance):
    gen = ImpressionGenerator(seed=24)
    write_atomically(settings.impressions_dir, "good.json.gz", encode(gen.batch(5))[0])
    not_utf8 = os.path.join(os.fsencode(settings.impressions_dir), b"latin1-\xe9t\xe9.json.gz")
    with open(not_utf8, "wb") as handle:
        handle.write(encode(gen.batch(5))[0])
    context = dg.build_sensor_context(instance=instance, resources={"impressions": ImpressionsResource()})
    result = split_impression_files_sensor(context)
    assert [request.run_config["ops"]["split_impressions"]["config"]["files"] for request in result.run_requests] == [
        ["good.json.gz"]]
    assert load(instance, ["good.json.gz"])["rows_inserted"] == 5
    # Left where it is, for someone to rename; the next tick asks for nothing.
    assert os.listdir(os.fsencode(settings.impressions_dir)) == [b"latin1-\xe9t\xe9.json.gz"]
    assert not split_impression_files_sensor(dg.build_sensor_context(
        instance=instance, cursor=result.cursor, resources={"impressions": ImpressionsResource()})).run_requests
    assert load(instance)["files_requested"] == 0


def random_body(rng: random.Random, n: int) -> bytes:
    """An array of 1-3 impressions, each with 1-3 fields set to values at and past the edges of what loads, and
    now and then a key twice or a required field left out (raw JSON text, so nothing is normalised on the way)."""
    values = ['"u"', '""', '" "', '"\\u00e9\\u0000x"', '"\\ud83d\\ude00"', '"é"', "0", "1767225600000", "-1",
              str(MAX_TIME_MS), str(MAX_TIME_MS + 1), str(2**63 - 1), str(2**63), str(-(2**63)), str(-(2**63) - 1),
              str(2**64), "1.5", "1e3", "true", "null", '[1,"a"]', '{"a":1,"a":2}', '"1767225600000"', '"12"']
    names = ["key", "split", "treatment", "time", "environmentId", "splitVersionNumber", "label", "bucketingKey",
             "environmentName", "sdk", "sdkVersion", "machineName", "machineIp", "properties", "extra"]
    items = []
    for _ in range(rng.randint(1, 3)):
        members = list({**IMPRESSION, "key": f'"u{n}"',
                        **{rng.choice(names): rng.choice(values) for _ in range(rng.randint(1, 3))}}.items())
        if rng.random() < 0.05:
            members.append((rng.choice(names), rng.choice(values)))
        if rng.random() < 0.1:
            left_out = rng.choice(names)
            members = [(name, value) for name, value in members if name != left_out]
        items.append("{" + ",".join(f'"{name}":{value}' for name, value in members) + "}")
    return ("[" + ",".join(items) + "]").encode()


def test_of_300_seeded_random_bodies_each_200_loads_and_the_rest_get_a_400(receiver, settings, warehouse, instance):
    rng = random.Random(20261130)
    statuses = [loopback.post(receiver.url + "/impressions", content=random_body(rng, n)).status_code
                for n in range(300)]
    assert set(statuses) == {200, 400} and statuses.count(200) > 30
    meta = load(instance)
    assert (meta["files_loaded"], meta["files_quarantined"]) == (statuses.count(200), 0)


def test_a_bad_file_with_a_name_of_250_characters_is_quarantined(settings, warehouse, instance):
    long_name = "impressions-" + "x" * 233 + ".json.gz"
    assert len(long_name) == 253
    write_atomically(settings.impressions_dir, "good.json.gz", encode(ImpressionGenerator(seed=27).batch(5))[0])
    (settings.impressions_dir / long_name).write_bytes(b"not json")  # by another tool: too long for a .tmp name
    meta = load(instance)
    assert (meta["files_loaded"], meta["files_quarantined"], meta["rows_inserted"]) == (1, 1, 5)
    [moved] = os.listdir(settings.quarantine_dir)
    assert len(moved.encode()) <= 255 and moved.endswith(".json.gz")
    assert quarantine(warehouse)[long_name][0] == "not a JSON array"
    assert os.listdir(settings.impressions_dir) == []


def _writable_folder_on_another_file_system(than: Path) -> str | None:
    """tmpfs when the tests' files are on a disk; a disk folder when they are on tmpfs (as `make test` puts them)."""
    device = os.stat(than).st_dev
    for candidate in ("/dev/shm", "/var/tmp", "/tmp", str(Path(__file__).parent)):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK) and os.stat(candidate).st_dev != device:
            return candidate
    return None


def test_a_quarantine_folder_on_another_file_system_takes_bad_files(settings, warehouse, instance, monkeypatch):
    elsewhere = _writable_folder_on_another_file_system(settings.impressions_dir.parent)
    if elsewhere is None:
        pytest.skip("no writable folder on another file system than the tests' files")
    other = tempfile.mkdtemp(prefix="mixsync-quarantine-", dir=elsewhere)
    try:
        monkeypatch.setenv("MIXSYNC_IMPRESSIONS_QUARANTINE_DIR", other)
        write_atomically(settings.impressions_dir, "good.json.gz", encode(ImpressionGenerator(seed=28).batch(5))[0])
        write_atomically(settings.impressions_dir, "bad.json", b"not json")
        meta = load(instance)
        assert (meta["files_loaded"], meta["files_quarantined"], meta["rows_inserted"]) == (1, 1, 5)
        [moved] = os.listdir(other)
        assert moved.endswith("-bad.json") and Path(other, moved).read_bytes() == b"not json"
        assert os.listdir(settings.impressions_dir) == []
    finally:
        shutil.rmtree(other)


def test_a_file_that_cannot_be_moved_keeps_no_other_in_place_and_the_run_says_which(settings, warehouse, instance,
                                                                                    monkeypatch, tmp_path):
    blocker = tmp_path / "a-file-not-a-folder"
    blocker.write_text("where the quarantine folder should be")
    monkeypatch.setenv("MIXSYNC_IMPRESSIONS_QUARANTINE_DIR", str(blocker / "quarantine"))
    write_atomically(settings.impressions_dir, "a-bad.json", b"not json")
    write_atomically(settings.impressions_dir, "b-good.json.gz", encode(ImpressionGenerator(seed=29).batch(5))[0])
    config = {"ops": {"split_impressions": {"config": {"files": []}}}}
    result = dg.materialize([split_impressions], run_config=config, instance=instance, resources=RESOURCES,
                            raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "could not leave the landing folder: a-bad.json (quarantined)" in failure
    # Committed, and the good file archived all the same; the bad one waits where it was.
    with warehouse.read() as con:
        assert con.execute("SELECT count(*) FROM split.impressions").fetchone()[0] == 5
    assert os.listdir(settings.impressions_dir) == ["a-bad.json"]
