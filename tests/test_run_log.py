"""What a run's log shows: mixsync's own loggers, and the progress of downloads, backfills and pushes."""

from __future__ import annotations

import datetime as dt
import gzip
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from mixsync.definitions import defs
from mixsync.mixpanel.assets import mixpanel_events
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.progress import CountProgress, DownloadProgress, LineCounter
from mixsync.resources import WarehouseResource
from mixsync.sandbox.data import ensure_day_file
from mixsync.split.assets import split_events
from mixsync.split.resources import SplitResource

RESOURCES = {"mixpanel": MixpanelResource(), "split": SplitResource(), "warehouse": WarehouseResource()}
REPOSITORY = Path(__file__).resolve().parents[1]


def range_tags(days) -> dict:
    return {"dagster/asset_partition_range_start": days[0].isoformat(),
            "dagster/asset_partition_range_end": days[-1].isoformat()}


def messages(instance, result) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(result.run_id)]


def day_lines(sandbox, day: dt.date) -> int:
    with gzip.open(ensure_day_file(sandbox.dataset, day, sandbox.mixpanel.data_dir)) as handle:
        return sum(1 for _ in handle)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_progress_lines_are_throttled_by_time_not_by_batch(tmp_path):
    clock, handler = Clock(), Lines()
    logger = logging.getLogger("test.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        progress = CountProgress(logger, "push", total=100, unit="events", interval=5, clock=clock, batched=True)
        for _ in range(9):  # 9 batches of 10 events, one second apart
            clock.now += 1
            progress.advance(10)
        assert len(handler.lines) == 1  # at 5 s only
        assert handler.lines[0] == "push: 50 of 100 events done, 50 remaining (5 batches sent, about 5 to go), about 5s left"
        clock.now += 1
        progress.advance(10)  # the last batch is always reported
        assert handler.lines[-1] == "push: 100 of 100 events done, 0 remaining (10 batches sent, about 0 to go)"

        body = gzip.compress(b'{"event": "a"}\n' * 1000) + gzip.compress(b'{"event": "b"}\n' * 500)
        file = tmp_path / "body.jsonl.gz"
        download = DownloadProgress(logger, "export", interval=5, clock=clock)
        with open(file, "wb") as out:
            download.start(gzipped=True, body=file)
            lines_before = len(handler.lines)
            for chunk in (body[:50], body[50:100]):  # 2 s apart: no line due, nothing counted
                clock.now += 2
                out.write(chunk)
                download.advance(len(chunk), out.flush)
            assert len(handler.lines) == lines_before and download.counted_bytes == 0
            clock.now += 3
            out.write(body[100:])
            download.advance(len(body) - 100, out.flush)  # due: every byte received so far is counted
        assert handler.lines[-1].startswith("export: 0.0 MB, 1,500 lines so far")
        assert download.bytes == download.counted_bytes == len(body) and download.lines == 1500
    finally:
        logger.removeHandler(handler)


def test_line_counter_reads_gzip_members_and_plain_bodies():
    body = gzip.compress(b"a\nb\n") + gzip.compress(b"c\n")
    counter = LineCounter(gzipped=True)
    for n in range(len(body)):
        counter.feed(body[n:n + 1])
    assert counter.lines == 3
    plain = LineCounter(gzipped=False)
    plain.feed(b"a\nb\nc")
    assert plain.lines == 2


def test_a_backfill_reports_windows_downloads_and_push_progress(sandbox, env, instance, monkeypatch):
    monkeypatch.setenv("MIXSYNC_PROGRESS_SECONDS", "0")
    monkeypatch.setenv("MIXPANEL_EXPORT_WINDOW_DAYS", "1")
    monkeypatch.setenv("SPLIT_BATCH_SIZE", "100")
    days = sorted(sandbox.dataset.days)
    result = dg.materialize([mixpanel_events, split_events], instance=instance, resources=RESOURCES,
                            tags=range_tags(days))
    log = messages(instance, result)
    span = f"{days[0]}..{days[-1]}"
    windows = [line for line in log if line.startswith(f"export of {span}: ")]
    assert len(windows) == 3
    assert windows[0].startswith(f"export of {span}: 1 of 3 windows done, 2 remaining, about ")
    assert windows[1].startswith(f"export of {span}: 2 of 3 windows done, 1 remaining, about ")
    assert windows[2].startswith(f"export of {span}: 3 of 3 windows done, 0 remaining; loaded {days[2]}..{days[2]}: ")
    assert re.search(r"about \d+s left; loaded ", windows[0])
    for day in days:
        downloads = [line for line in log if line.startswith(f"export {day}..{day}: ")]
        assert downloads, f"no download progress for {day}"
        assert f" {day_lines(sandbox, day):,} lines so far" in downloads[-1]
    pushes = [line for line in log if line.startswith(f"push of {span} to Split: ")]
    sent = sandbox.split.accepted
    assert len(pushes) >= sent // 100  # every batch, at interval 0
    assert pushes[-1].startswith(f"push of {span} to Split: {sent:,} of {sent:,} events done, 0 remaining")


def test_mixsync_loggers_reach_the_run_log(sandbox, env, instance):
    """A retry is logged by mixsync.http, not by the asset: it shows in the run's event log all the same."""
    day = sandbox.dataset.days[0]
    sandbox.mixpanel.faults.add("export", kind="status", status=429, retry_after="0")
    result = dg.materialize([mixpanel_events], instance=instance, resources=RESOURCES, partition_key=day.isoformat())
    retries = [entry for entry in instance.all_logs(result.run_id)
               if "HTTP 429 from Mixpanel export" in entry.user_message and "retry 1/" in entry.user_message]
    assert len(retries) == 1 and retries[0].level == logging.WARNING


@pytest.mark.slow
def test_the_cli_shows_progress_and_mixsyncs_loggers(sandbox, env, tmp_path):
    """`dagster asset materialize` with the repository's dagster.yaml prints the same lines as the UI's run log."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPOSITORY / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    dg.DagsterInstance.from_config(str(home)).dispose()  # its storage created here (conftest: scripts read once)
    sandbox.mixpanel.faults.add("export", kind="status", status=503)
    day = sandbox.dataset.days[0]
    cli_env = {**os.environ, **env, "DAGSTER_HOME": str(home), "MIXSYNC_PROGRESS_SECONDS": "0"}
    dagster = str(Path(sys.executable).with_name("dagster"))
    run = subprocess.run([dagster, "asset", "materialize", "-m", "mixsync.definitions", "--select", "mixpanel_events",
                          "--partition", day.isoformat()], env=cli_env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    # The README's command is quiet: no supersession, beta or instance notice (dagster_cli_notices.pth, make venv).
    assert "Warning" not in run.stderr and "will not be used" not in run.stderr, run.stderr[-3000:]
    assert f"export {day}..{day}: " in output and f"{day_lines(sandbox, day):,} lines so far" in output
    assert f"export of {day}..{day}: 1 of 1 windows done, 0 remaining" in output
    assert "HTTP 503 from Mixpanel export" in output and "retry 1/" in output
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (record,) = instance.get_run_records()
        logged = [entry.user_message for entry in instance.all_logs(record.dagster_run.run_id)]
    assert any("HTTP 503 from Mixpanel export" in line for line in logged)


# Maintains the whole warehouse (compaction, checkpoints): no one table is its output.
NO_TABLE = {dg.AssetKey("warehouse_maintenance")}


def test_every_asset_names_its_table():
    for key in defs.resolve_asset_graph().get_all_asset_keys() - NO_TABLE:
        spec = defs.get_assets_def(key).specs_by_key[key]
        assert "dagster/table_name" in spec.metadata, f"{key.to_user_string()} has no dagster/table_name"
