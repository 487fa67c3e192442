"""A code location for the dead-run tests: one asset in the `split_events` pool that can be held mid-step.

With MIXSYNC_TEST_HOLD set to a folder, the step writes `started-<pid>` there and then waits (to be killed);
without it, it returns at once. It is loaded by real `dagster` and `dagster-daemon` processes.
"""

import os
import pathlib
import threading

import dagster as dg

from mixsync import dagster_fixes

dagster_fixes.install()  # as mixsync's own code location does


@dg.asset(pool="split_events")
def held_step() -> dg.MaterializeResult:
    hold = os.environ.get("MIXSYNC_TEST_HOLD")
    if hold:
        (pathlib.Path(hold) / f"started-{os.getpid()}").write_text("")
        threading.Event().wait()  # until SIGKILL
    return dg.MaterializeResult(metadata={"pid": os.getpid()})


# Steps in the run's process, as in mixsync's definitions (Dagster's multiprocess executor busy-waits on a full pool).
defs = dg.Definitions(assets=[held_step], executor=dg.in_process_executor)
