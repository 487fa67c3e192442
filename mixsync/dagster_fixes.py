"""One fix to Dagster, applied when the code location is imported (so in every run process that executes its steps).

A step waiting on a full pool (every mixsync flow runs in a pool of one slot) makes its run re-check the pool on a
backoff of 1 to 15 seconds, but between checks Dagster 1.13 sleeps for `min(0, time to the next check)`, always 0:
the run spins a whole core until its slot frees (measured: 11 CPU-seconds in 20 s of waiting, on a 2-core
machine). Dagster's maintainers found the same line (dagster-io/dagster#20367, closed unmerged); this restores the
intended sleep, up to the next scheduled check, and leaves the checks themselves as Dagster schedules them.
"""

from __future__ import annotations

import time

from dagster._core.execution.plan import instance_concurrency_context as concurrency


def interval_to_next_pending_claim_check(self: concurrency.InstanceConcurrencyContext) -> float:
    """Seconds until the earliest pending pool claim is due to be retried; 0 when one is due now (or none is
    scheduled), so the executor asks again at once."""
    if not self._pending_claims or not self._pending_timeouts:
        return 0.0
    return max(0.0, min(self._pending_timeouts.values()) - time.time())


def install() -> None:
    # Only where Dagster's method is the one described above: a Dagster that renamed or fixed it is left alone.
    method = getattr(concurrency.InstanceConcurrencyContext, "interval_to_next_pending_claim_check", None)
    if method is not None and method.__code__.co_consts[:2] == (None, 0.0) and "min" in method.__code__.co_names:
        concurrency.InstanceConcurrencyContext.interval_to_next_pending_claim_check = (  # type: ignore[method-assign]
            interval_to_next_pending_claim_check)
