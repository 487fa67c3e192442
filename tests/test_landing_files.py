"""The export's landing folder: files left by a dead run are removed by the next load; a full disk is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from mixsync.mixpanel.assets import mixpanel_events
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource

RESOURCES = {"mixpanel": MixpanelResource(), "warehouse": WarehouseResource()}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_files_of_a_dead_run_are_removed_by_the_next_load_and_a_live_writers_are_kept(sandbox, env, instance):
    landing = Path(env["MIXSYNC_LANDING_DIR"]) / "mixpanel"
    landing.mkdir(parents=True)
    gone = dead_pid()
    orphans = [landing / f"export-2026-01-01-2026-01-01-p{gone}-0badc0de.jsonl.gz.part",
               landing / f"export-2026-01-02-2026-01-02-p{gone}-0badc0df.jsonl"]
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        in_progress = landing / f"export-2026-01-03-2026-01-03-p{alive.pid}-0badc0e0.jsonl.part"
        for path in [*orphans, in_progress]:
            path.write_bytes(b"{}\n")
        day = sandbox.dataset.days[0].isoformat()
        result = dg.materialize([mixpanel_events], instance=instance, resources=RESOURCES, partition_key=day)
        metadata = result.asset_materializations_for_node("mixpanel_events")[0].metadata
        assert metadata["run/orphaned_files_removed"].value == 2
        assert not any(path.exists() for path in orphans) and in_progress.exists()
        assert sorted(p.name for p in landing.iterdir()) == [in_progress.name]  # the load cleaned up after itself
    finally:
        alive.kill()
        alive.wait()


def test_a_full_landing_disk_fails_naming_the_setting(sandbox, env, instance, tmp_path, monkeypatch):
    small = tmp_path / "small-disk"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        monkeypatch.setenv("MIXSYNC_LANDING_DIR", str(small))
        day = sandbox.dataset.days[0].isoformat()
        result = dg.materialize([mixpanel_events], instance=instance, resources=RESOURCES, partition_key=day,
                                raise_on_error=False)
        assert not result.success
        failure = result.get_step_failure_events()[0].step_failure_data
        text = failure.user_failure_data.description if failure.user_failure_data else failure.error.message
        assert f"no space left in {small / 'mixpanel'} (MIXSYNC_LANDING_DIR)" in text
        assert not list((small / "mixpanel").iterdir())  # the partial download is gone too
    finally:
        subprocess.run(["umount", str(small)], check=False)
