"""What a flow writes is private to its user: folders 0700, files 0600 (the DuckDB file, landing files, journals)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# A fresh interpreter with the usual permissive umask: only mixsync itself can make its files private.
RUN = textwrap.dedent("""
    import os, sys
    os.umask(0o022)
    import dagster as dg
    from mixsync.definitions import defs, resources
    from mixsync.mixpanel.assets import mixpanel_events
    from mixsync.split.assets import split_events
    dg.materialize([mixpanel_events, split_events], partition_key=sys.argv[1], resources=resources)
""")


@pytest.mark.slow
def test_a_flow_leaves_only_private_folders_and_files(sandbox, env, tmp_path):
    day = sandbox.dataset.days[0].isoformat()
    done = subprocess.run([sys.executable, "-c", RUN, day], env=os.environ.copy(), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert sandbox.split.accepted > 0
    created = [Path(env["MIXSYNC_DUCKDB_PATH"]), Path(env["MIXSYNC_LANDING_DIR"])]
    for root in created:
        paths = [root] + (list(root.rglob("*")) if root.is_dir() else [])
        for path in paths:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
    assert stat.S_IMODE(Path(env["MIXSYNC_LANDING_DIR"]).stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(env["MIXSYNC_DUCKDB_PATH"]).stat().st_mode) == 0o600
