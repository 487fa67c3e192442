"""What README's configuration section says about `.env`: Dagster's own commands read it and it wins over the shell."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import pytest

CODE = textwrap.dedent('''
    import os
    from pathlib import Path

    import dagster as dg


    @dg.asset
    def seen():
        Path(os.environ["WHERE_TO_WRITE"]).write_text(os.environ.get("MIXSYNC_PRECEDENCE_PROBE", "unset"))


    defs = dg.Definitions(assets=[seen])
''')


@pytest.mark.slow
def test_dagster_commands_load_dotenv_and_its_values_override_the_shell(tmp_path):
    (tmp_path / "probe_defs.py").write_text(CODE)
    (tmp_path / ".env").write_text("MIXSYNC_PRECEDENCE_PROBE=from-dotenv\n")
    out = tmp_path / "seen.txt"
    env = {**os.environ, "MIXSYNC_PRECEDENCE_PROBE": "from-shell", "WHERE_TO_WRITE": str(out),
           "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    dg.DagsterInstance.from_config(str(tmp_path / "home")).dispose()  # its storage created here (conftest: scripts read once)
    dagster = str(Path(sys.executable).with_name("dagster"))
    done = subprocess.run([dagster, "asset", "materialize", "-f", "probe_defs.py", "--select", "seen"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert out.read_text() == "from-dotenv"


def test_mixsync_commands_read_only_the_shell(tmp_path):
    # `mixsync query` does not read .env: a path set only there is not used.
    (tmp_path / ".env").write_text(f"MIXSYNC_DUCKDB_PATH={tmp_path / 'from-dotenv.duckdb'}\n")
    env = {**os.environ, "MIXSYNC_DUCKDB_PATH": str(tmp_path / "from-shell.duckdb")}
    mixsync = str(Path(sys.executable).with_name("mixsync"))
    done = subprocess.run([mixsync, "query", "SELECT 1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "from-shell.duckdb" in done.stderr, done.stderr
