"""CI's warning policy (pyproject's filterwarnings): a new Dagster or DuckDB deprecation fails the suite."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBES = textwrap.dedent('''
    import warnings

    import dagster as dg
    from dagster_shared.utils.warnings import beta_warning, deprecation_warning, supersession_warning


    def test_a_dagster_deprecation():
        deprecation_warning("Some Dagster API mixsync started to use", "2.0")


    def test_a_dagster_supersession():
        supersession_warning("Some Dagster API mixsync started to use")


    def test_a_dagster_beta():
        beta_warning("Some beta Dagster API")


    def test_a_duckdb_deprecation():
        warnings.warn("DuckDB: this will change", DeprecationWarning)


    def test_the_backfill_policy_mixsync_uses_knowingly_is_quiet():
        import mixsync.definitions  # noqa: F401
        from mixsync.mixpanel.partitions import accept_backfill_policy_beta

        accept_backfill_policy_beta()

        @dg.asset(partitions_def=dg.DailyPartitionsDefinition(start_date="2026-01-01"),
                  backfill_policy=dg.BackfillPolicy.single_run())
        def probe():
            return None
''')


def test_new_deprecations_and_betas_fail_and_the_known_one_does_not(tmp_path):
    (tmp_path / "test_probes.py").write_text(PROBES)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = done.stdout
    assert "FAILED test_probes.py::test_a_dagster_deprecation" in out, out[-3000:]
    assert "FAILED test_probes.py::test_a_dagster_beta" in out
    assert "FAILED test_probes.py::test_a_duckdb_deprecation" in out
    assert "FAILED test_probes.py::test_a_dagster_supersession" in out
    assert "4 failed, 1 passed" in out
