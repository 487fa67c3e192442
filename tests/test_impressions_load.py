"""split_impressions: landing files -> split.impressions through real Dagster runs and a real DuckDB file."""

from __future__ import annotations

import datetime as dt
import gzip
import os
import shutil
import subprocess
import sys

import dagster as dg
import orjson
import pytest

from mixsync.definitions import resources as RESOURCES
from mixsync.impressions.assets import split_impressions
from mixsync.impressions.landing import write_atomically
from mixsync.impressions.resources import ImpressionsResource
from mixsync.impressions.sensors import split_impression_files_sensor
from mixsync.impressions.settings import ImpressionsSettings
from mixsync.sandbox.impressions import ImpressionGenerator, encode


def drop(directory, name, batch, gzipped=True):
    body, _ = encode(batch, gzipped)
    return write_atomically(directory, name, body)


def load(instance, files=None, raise_on_error=True):
    config = {"ops": {"split_impressions": {"config": {"files": files or []}}}}
    result = dg.materialize([split_impressions], run_config=config, instance=instance, resources=RESOURCES,
                            raise_on_error=raise_on_error)
    meta = result.asset_materializations_for_node("split_impressions")[0].metadata if result.success else {}
    return result, {k: v.value for k, v in meta.items()}


@pytest.fixture
def settings(impressions_env) -> ImpressionsSettings:
    return ImpressionsSettings.from_env()


def count(warehouse, sql="SELECT count(*) FROM split.impressions", params=None):
    with warehouse.read() as con:
        return con.execute(sql, params or []).fetchone()[0]


def test_gzip_and_plain_files_land_with_every_field(settings, warehouse, instance):
    gen = ImpressionGenerator(seed=1)
    first, second = gen.batch(40), gen.batch(25)
    drop(settings.impressions_dir, "impressions-a.json.gz", first)
    drop(settings.impressions_dir, "impressions-b.json", second, gzipped=False)
    _, meta = load(instance, ["impressions-a.json.gz", "impressions-b.json"])
    assert meta["rows_inserted"] == 65 and meta["files_loaded"] == 2
    with warehouse.read() as con:
        row = con.execute("""SELECT environment_id, environment_name, split, key, bucketing_key, treatment, label,
                                    epoch_ms(time), split_version_number, sdk, sdk_version, machine_name, machine_ip,
                                    properties, typeof(time)
                             FROM split.impressions WHERE file_name = 'impressions-a.json.gz'
                             ORDER BY time, key, split LIMIT 1""").fetchone()
        ledger = con.execute("SELECT file_name, status, impressions, inserted, length(content_hash) "
                             "FROM split.impression_files ORDER BY file_name").fetchall()
    expected = min(first, key=lambda i: (i["time"], i["key"], i["split"]))
    assert row[:13] == (expected["environmentId"], expected["environmentName"], expected["split"], expected["key"],
                        expected["bucketingKey"], expected["treatment"], expected["label"], expected["time"],
                        expected["splitVersionNumber"], expected["sdk"], expected["sdkVersion"],
                        expected["machineName"], expected.get("machineIp"))
    assert row[14] == "TIMESTAMP WITH TIME ZONE"
    if expected["properties"] is not None:
        assert orjson.loads(row[13]) == orjson.loads(expected["properties"])
    assert ledger == [("impressions-a.json.gz", "loaded", 40, 40, 64), ("impressions-b.json", "loaded", 25, 25, 64)]
    # Loaded files leave the landing folder for a dated archive.
    assert os.listdir(settings.impressions_dir) == []
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    assert sorted(os.listdir(settings.archive_dir / day)) == ["impressions-a.json.gz", "impressions-b.json"]


@pytest.mark.both_backends
def test_the_same_file_dropped_twice_loads_once(settings, warehouse, instance):
    batch = ImpressionGenerator(seed=2).batch(30)
    original = drop(settings.impressions_dir, "impressions-1.json.gz", batch)
    landed_bytes = original.read_bytes()
    shutil.copy(original, settings.impressions_dir / "copy-of-impressions-1.json.gz")
    _, meta = load(instance, ["impressions-1.json.gz", "copy-of-impressions-1.json.gz"])
    assert (meta["files_loaded"], meta["files_duplicate"], meta["rows_inserted"]) == (1, 1, 30)
    # Again, later, under a third name: the ledger knows the bytes.
    write_atomically(settings.impressions_dir, "impressions-again.json.gz", landed_bytes)
    _, meta = load(instance, ["impressions-again.json.gz"])
    assert (meta["files_duplicate"], meta["rows_inserted"]) == (1, 0)
    # dagster/row_count is the table's rows, not what the run inserted.
    assert meta["dagster/row_count"] == 30 and meta["dagster/table_name"] == "split.impressions"
    # Split's retry with different bytes (plain this time), plus impressions overlapping an earlier file.
    drop(settings.impressions_dir, "impressions-retry.json", batch[:10] + ImpressionGenerator(seed=3).batch(5),
         gzipped=False)
    _, meta = load(instance, ["impressions-retry.json"])
    assert (meta["files_loaded"], meta["rows_inserted"], meta["duplicates_skipped"]) == (1, 5, 10)
    assert count(warehouse) == 35 == meta["dagster/row_count"]
    assert count(warehouse, "SELECT count(DISTINCT impression_id) FROM split.impressions") == 35
    assert os.listdir(settings.impressions_dir) == []


MALFORMED = {
    "not-json.json": (b"[{\"key\": \"u1\", ", "not valid JSON"),
    "object.json": (b'{"key": "u1", "split": "s"}', "not a JSON array"),
    "numbers.json": (b"[1, 2, 3]", "an element is not an impression object"),
    "truncated.json.gz": (gzip.compress(orjson.dumps(ImpressionGenerator(seed=4).batch(50)))[:120], "corrupt gzip"),
    "no-key.json": (orjson.dumps([{"split": "s", "treatment": "on", "time": 1700000000000, "environmentId": "e"}]),
                    "missing key fields"),
    "bad-time.json": (orjson.dumps([{"key": "u", "split": "s", "treatment": "on", "time": "yesterday",
                                     "environmentId": "e"}]), "a field has the wrong type"),
}


def test_malformed_files_are_quarantined_and_the_rest_loads(settings, warehouse, instance):
    good = ImpressionGenerator(seed=5)
    names = []
    for n in range(3):
        names.append(drop(settings.impressions_dir, f"good-{n}.json.gz", good.batch(20)).name)
    for name, (body, _) in MALFORMED.items():
        write_atomically(settings.impressions_dir, name, body)
        names.append(name)
    result, meta = load(instance, names)
    assert result.success
    assert (meta["files_loaded"], meta["files_quarantined"], meta["rows_inserted"]) == (3, len(MALFORMED), 60)
    with warehouse.read() as con:
        records = {name: (reason, detail, moved_to) for name, reason, detail, moved_to in con.execute(
            "SELECT file_name, reason, detail, moved_to FROM split.impression_quarantine").fetchall()}
        statuses = dict(con.execute("SELECT file_name, status FROM split.impression_files").fetchall())
    assert {name: r[0] for name, r in records.items()} == {name: why for name, (_, why) in MALFORMED.items()}
    assert "key (1 of 1)" in records["no-key.json"][1]
    for name, (_, _, moved_to) in records.items():
        assert os.path.exists(moved_to) and os.path.dirname(moved_to) == str(settings.quarantine_dir)
        assert statuses[name] == "quarantined"
    assert os.listdir(settings.impressions_dir) == []


def test_delete_after_load_when_configured(settings, warehouse, instance, monkeypatch):
    monkeypatch.setenv("MIXSYNC_IMPRESSIONS_AFTER_LOAD", "delete")
    drop(settings.impressions_dir, "impressions-x.json.gz", ImpressionGenerator(seed=6).batch(10))
    _, meta = load(instance, ["impressions-x.json.gz"])
    assert meta["after_load"] == "deleted" and meta["rows_inserted"] == 10
    assert os.listdir(settings.impressions_dir) == [] and not settings.archive_dir.exists()


def test_empty_config_loads_every_complete_file_waiting(settings, warehouse, instance):
    gen = ImpressionGenerator(seed=7)
    for n in range(4):
        drop(settings.impressions_dir, f"impressions-{n}.json.gz", gen.batch(10))
    (settings.impressions_dir / ".impressions-5.json.gz.tmp").write_bytes(b"[")
    _, meta = load(instance)
    assert (meta["files_loaded"], meta["rows_inserted"]) == (4, 40)
    assert os.listdir(settings.impressions_dir) == [".impressions-5.json.gz.tmp"]


CRASH_AFTER_COMMIT = """
import os, sys, orjson, dagster as dg
from mixsync.definitions import resources
from mixsync.impressions import assets
# The process dies between the DuckDB commit and moving the files out of the landing folder.
assets._settle = lambda *args, **kwargs: os._exit(17)
dg.materialize([assets.split_impressions], run_config=orjson.loads(sys.argv[1]),
               instance=dg.DagsterInstance.ephemeral(), resources=resources)
"""


def test_a_run_retried_after_a_crash_loads_nothing_twice(settings, warehouse, instance):
    gen = ImpressionGenerator(seed=8)
    names = [drop(settings.impressions_dir, f"impressions-{n}.json.gz", gen.batch(25)).name for n in range(4)]
    config = {"ops": {"split_impressions": {"config": {"files": names}}}}
    crashed = subprocess.run([sys.executable, "-c", CRASH_AFTER_COMMIT, orjson.dumps(config).decode()],
                             env=os.environ.copy(), capture_output=True, timeout=120)
    assert crashed.returncode == 17, crashed.stderr.decode()[-2000:]
    assert count(warehouse) == 100
    assert sorted(os.listdir(settings.impressions_dir)) == names  # the crash left them in place
    # The retry (Dagster's "re-execute" with the same run config) finds the bytes in the ledger.
    _, meta = load(instance, names)
    assert (meta["files_duplicate"], meta["rows_inserted"]) == (4, 0)
    assert count(warehouse) == 100
    assert os.listdir(settings.impressions_dir) == []
    # And once more, now that the files are archived: nothing to do, nothing missing.
    _, meta = load(instance, names)
    assert (meta["files_already_handled"], meta["files_missing"], meta["rows_inserted"]) == (4, 0, 0)


def test_sensor_run_requests_materialize_end_to_end(settings, warehouse, instance, monkeypatch):
    monkeypatch.setenv("MIXSYNC_IMPRESSIONS_BATCH_FILES", "3")
    gen = ImpressionGenerator(seed=9)
    for n in range(7):
        drop(settings.impressions_dir, f"impressions-{n:02d}.json.gz", gen.batch(10))
    cursor = None
    runs = 0
    while True:
        result = split_impression_files_sensor(dg.build_sensor_context(instance=instance, cursor=cursor,
                                                                    resources={"impressions": ImpressionsResource()}))
        cursor = result.cursor
        if not result.run_requests:
            break
        for request in result.run_requests:
            outcome = dg.materialize([split_impressions], run_config=request.run_config, instance=instance,
                                     resources=RESOURCES, tags=request.tags)
            assert outcome.success
            runs += 1
    assert runs == 3
    assert count(warehouse) == 70
    assert count(warehouse, "SELECT count(*) FROM split.impression_files WHERE status = 'loaded'") == 7
