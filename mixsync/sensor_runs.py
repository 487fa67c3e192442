"""What became of the runs a sensor asked for, by run key: so a sensor can ask again for work whose run failed
(Dagster drops a request whose run key it has seen, so without a new key that work would wait for good)."""

from __future__ import annotations

import dagster as dg

RUN_KEY_TAG = "dagster/run_key"  # the tag Dagster's daemon puts on a run a sensor requested
ENDED_IN_FAILURE = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def all_runs_failed(instance: dg.DagsterInstance, keys: set[str]) -> dict[str, bool]:
    """For each of `keys` that has runs: whether every one of them failed or was canceled (one storage query). A
    key with a run queued, running or succeeded maps to False; a key with no run yet (the daemon has not launched
    it) is absent."""
    if not keys:
        return {}
    outcome: dict[str, bool] = {}
    for run in instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: sorted(keys)})):
        key = run.tags[RUN_KEY_TAG]
        outcome[key] = outcome.get(key, True) and run.status in ENDED_IN_FAILURE
    return outcome
