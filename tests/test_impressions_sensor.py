"""split_impression_files_sensor: complete files only, bounded batches, each file once, even across restarts."""

from __future__ import annotations

import os
import time

import dagster as dg
import orjson

from mixsync.impressions import sensors
from mixsync.impressions.landing import write_atomically
from mixsync.impressions.resources import ImpressionsResource
from mixsync.impressions.sensors import CursorState, plan_file_batches, split_impression_files_sensor
from mixsync.sandbox.impressions import ImpressionGenerator, encode


def drop(directory, name, size=5, seed=1, gzipped=True):
    body, _ = encode(ImpressionGenerator(seed=seed).batch(size), gzipped)
    return write_atomically(directory, name, body)


def tick(instance, cursor=None):
    result = split_impression_files_sensor(dg.build_sensor_context(instance=instance, cursor=cursor,
                                                                    resources={"impressions": ImpressionsResource()}))
    return result


def requested_files(result) -> list[list[str]]:
    return [r.run_config["ops"]["split_impressions"]["config"]["files"] for r in result.run_requests or []]


def test_half_written_files_are_not_picked(impressions_env, instance, tmp_path):
    landing = tmp_path / "impressions"
    drop(landing, "impressions-a.json.gz")
    # What writers leave while a file is still being written, and a file a non-atomic writer is still filling.
    for partial in (".impressions-b.json.gz.1234.tmp", "impressions-c.json.gz.part", "impressions-d.json.tmp",
                    "impressions-e.json._COPYING_"):
        (landing / partial).write_bytes(b'[{"key": ')
    (landing / "archive").mkdir()
    result = tick(instance)
    assert requested_files(result) == [["impressions-a.json.gz"]]


def test_recently_modified_files_wait_for_the_settle_time(impressions_env, instance, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSYNC_IMPRESSIONS_SETTLE_SECONDS", "60")
    landing = tmp_path / "impressions"
    old = drop(landing, "impressions-old.json.gz")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    (landing / "impressions-being-copied.json").write_bytes(b'[{"key": "u1", "split"')
    first = tick(instance)
    assert requested_files(first) == [["impressions-old.json.gz"]]
    os.utime(landing / "impressions-being-copied.json", (an_hour_ago, an_hour_ago))
    second = tick(instance, first.cursor)
    assert requested_files(second) == [["impressions-being-copied.json"]]


def test_files_are_batched_up_to_the_bound_with_the_list_in_run_config(impressions_env, instance, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSYNC_IMPRESSIONS_BATCH_FILES", "4")
    monkeypatch.setenv("MIXSYNC_IMPRESSIONS_MAX_RUNS_PER_TICK", "2")
    landing = tmp_path / "impressions"
    names = [f"impressions-{n:03d}.json.gz" for n in range(11)]
    for name in names:
        drop(landing, name)
    first = tick(instance)
    assert requested_files(first) == [names[0:4], names[4:8]]
    assert len({r.run_key for r in first.run_requests}) == 2
    second = tick(instance, first.cursor)
    assert requested_files(second) == [names[8:11]]
    third = tick(instance, second.cursor)
    assert not third.run_requests and "no new complete files" in str(third.skip_reason)


def test_cursor_survives_a_restart_and_no_file_is_requested_twice(impressions_env, instance, tmp_path):
    landing = tmp_path / "impressions"
    drop(landing, "impressions-1.json.gz")
    drop(landing, "impressions-2.json", gzipped=False)
    first = tick(instance)
    assert requested_files(first) == [["impressions-1.json.gz", "impressions-2.json"]]
    saved = first.cursor
    # A restarted daemon only has what Dagster stored: the cursor string. The run has not happened yet.
    drop(landing, "impressions-3.json.gz", seed=3)
    with dg.instance_for_test() as restarted:
        second = tick(restarted, saved)
    assert requested_files(second) == [["impressions-3.json.gz"]]
    # The runs load and move the files away; the cursor forgets them, and stays as small as what is in flight.
    for name in ("impressions-1.json.gz", "impressions-2.json", "impressions-3.json.gz"):
        (landing / name).unlink()
    third = tick(instance, second.cursor)
    assert not third.run_requests
    assert CursorState.decode(third.cursor).requested == {}


def test_a_re_evaluated_tick_asks_for_the_same_run_keys(impressions_env, instance, tmp_path):
    landing = tmp_path / "impressions"
    for n in range(3):
        drop(landing, f"impressions-{n}.json.gz", seed=n)
    first = tick(instance)
    again = tick(instance)  # the same cursor, as if the first tick's cursor update was lost
    assert [r.run_key for r in first.run_requests] == [r.run_key for r in again.run_requests]
    # A later tick never reuses a key: a file that comes back under an old name (after its run archived the
    # first one) is a new request.
    (tmp_path / "archive").mkdir()
    for n in range(3):
        os.replace(landing / f"impressions-{n}.json.gz", tmp_path / "archive" / f"impressions-{n}.json.gz")
    drop(landing, "impressions-0.json.gz", seed=9)
    later = tick(instance, first.cursor)
    later_keys = {r.run_key for r in later.run_requests}
    assert later_keys and not later_keys & {r.run_key for r in first.run_requests}


def test_a_tick_with_tens_of_thousands_of_files_stats_only_what_it_needs(impressions_env, instance, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("MIXSYNC_IMPRESSIONS_SETTLE_SECONDS", "1")
    landing = tmp_path / "impressions"
    landing.mkdir()
    payload = orjson.dumps(ImpressionGenerator(seed=1).batch(1))
    names = [f"impressions-{n:06d}.json" for n in range(30_000)]
    for name in names:
        (landing / name).write_bytes(payload)
    an_hour_ago = time.time() - 3600
    for name in names:
        os.utime(landing / name, (an_hour_ago, an_hour_ago))
    # 29,990 of them are already requested (their runs are queued); 10 are new.
    keys = {n: sensors.run_key(1 + i // 500, names[i - i % 500:i - i % 500 + 500]) for i, n in enumerate(names)}
    state = CursorState(sequence=7, requested={n: (os.stat(landing / n).st_ino, keys[n]) for n in names[:29_990]})
    stats = []
    real_stat = os.stat
    # os.stat is the process's: count only the landing folder's files (another thread may stat something else).
    monkeypatch.setattr(sensors.os, "stat", lambda path, *a, **k: (
        stats.append(path) if str(path).startswith(str(landing)) else None) or real_stat(path, *a, **k))
    plan = plan_file_batches(landing, state, batch_files=500, max_batches=10, settle_seconds=1)
    assert plan.batches == [names[29_990:]]
    assert len(stats) == 10
    assert plan.in_flight == 29_990
    # The cursor for 30,000 in-flight names stays small: under 10 bytes a name with its inode and run key (a key
    # is shared by a batch's names, so it compresses away; about 7 bytes on ext4, tmpfs's inodes a little more).
    assert len(plan.state.encode()) < 10 * 29_990


def test_missing_folder_is_a_skip_not_a_failure(impressions_env, instance):
    result = tick(instance)
    assert not result.run_requests and "does not exist" in str(result.skip_reason)


def test_a_sensor_run_request_lands_and_forwards_in_one_run_of_the_real_job(impressions_env, instance, tmp_path,
                                                                            sandbox, warehouse):
    from mixsync.definitions import defs

    landing = tmp_path / "impressions"
    drop(landing, "impressions-1.json.gz", size=40, seed=11)
    drop(landing, "impressions-2.json", size=25, seed=12, gzipped=False)
    request = tick(instance).run_requests[0]
    job = defs.resolve_job_def(request.job_name or "split_impressions_job")
    assert job.name == "split_impressions_job"
    result = job.execute_in_process(run_config=request.run_config, instance=instance, tags=request.tags)
    assert result.success
    with warehouse.read() as con:
        landed = con.execute("SELECT count(*) FROM split.impressions").fetchone()[0]
        sent = con.execute("SELECT count(*) FROM sync.mixpanel_exposures WHERE status = 'sent'").fetchone()[0]
    assert landed == sent > 0
    held = sandbox.mixpanel.ingest.held()
    assert len(held) == landed and {event["event"] for event in held} == {"$experiment_started"}


def test_files_of_a_run_that_failed_are_requested_again_and_load_once(impressions_env, instance, tmp_path,
                                                                       sandbox, warehouse, monkeypatch):
    """A run of the real job fails (its warehouse cannot be opened): its files stay in the folder and the next tick
    asks for them again under a new run key; that run loads them, once."""
    from mixsync.definitions import defs

    landing = tmp_path / "impressions"
    drop(landing, "impressions-1.json.gz", size=30, seed=21)
    first = tick(instance)
    [request] = first.run_requests
    job = defs.resolve_job_def("split_impressions_job")
    # As the daemon launches a sensor's request: the run carries its run key.
    tags = {**request.tags, "dagster/run_key": request.run_key}
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MIXSYNC_DUCKDB_PATH", str(tmp_path / "a-file" / "warehouse.duckdb"))  # cannot be created
    failed = job.execute_in_process(run_config=request.run_config, instance=instance, tags=tags, raise_on_error=False)
    assert not failed.success
    monkeypatch.setenv("MIXSYNC_DUCKDB_PATH", impressions_env["MIXSYNC_DUCKDB_PATH"])

    again = tick(instance, first.cursor)
    [retry] = again.run_requests
    assert requested_files(again) == [["impressions-1.json.gz"]] and retry.run_key != request.run_key
    assert job.execute_in_process(run_config=retry.run_config, instance=instance,
                                  tags={**retry.tags, "dagster/run_key": retry.run_key}).success
    with warehouse.read() as con:
        assert con.execute("SELECT count(*) FROM split.impressions").fetchone()[0] == 30
    later = tick(instance, again.cursor)  # the file left the folder: nothing is asked for again
    assert not later.run_requests


def test_files_of_a_run_still_going_are_not_requested_again(impressions_env, instance, tmp_path):
    landing = tmp_path / "impressions"
    drop(landing, "impressions-1.json.gz")
    first = tick(instance)
    [request] = first.run_requests
    # A run for the key exists and has not ended: its files stay in flight.
    from mixsync.definitions import defs

    job = defs.resolve_job_def("split_impressions_job")
    instance.create_run_for_job(job, run_config=request.run_config,
                                tags={**request.tags, "dagster/run_key": request.run_key},
                                status=dg.DagsterRunStatus.STARTED)
    assert not tick(instance, first.cursor).run_requests
