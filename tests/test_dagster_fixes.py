"""mixsync's one fix to Dagster: a run waiting on a full pool sleeps until its next check instead of spinning."""

from __future__ import annotations

import dagster as dg
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from waiting import poll

import mixsync.definitions  # noqa: F401  (importing the code location installs the fix)
from mixsync import dagster_fixes


def test_the_code_location_installs_the_fix():
    # Fails once Dagster changes the method it replaces: then check whether Dagster fixed it and drop the fix.
    assert InstanceConcurrencyContext.interval_to_next_pending_claim_check is \
        dagster_fixes.interval_to_next_pending_claim_check


def test_a_step_blocked_on_a_full_pool_waits_until_its_next_check(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.event_log_storage.set_concurrency_slots("split_events", 1)
        holder = instance.create_run_for_job(dg.GraphDefinition("holder").to_job())
        waiter = instance.create_run_for_job(dg.GraphDefinition("waiter").to_job())
        with InstanceConcurrencyContext(instance, holder) as holding, \
                InstanceConcurrencyContext(instance, waiter) as waiting:
            assert not waiting.has_pending_claims()
            assert waiting.interval_to_next_pending_claim_check() == 0.0  # nothing pending: no sleep
            assert holding.claim("split_events", "held_step")
            assert not waiting.claim("split_events", "held_step")  # the pool's one slot is taken
            # Dagster schedules its first re-check a second later; the executor now sleeps until then (Dagster's own
            # method answered 0 here, and the run spun a core until the slot was freed).
            interval = waiting.interval_to_next_pending_claim_check()
            assert 0.5 < interval <= 1.0
            # Asked before it is due, the pool is not queried again and the claim stays pending.
            assert not waiting.claim("split_events", "held_step")
            holding.free_step("held_step")
            poll(lambda: waiting.claim("split_events", "held_step"), 30, "the freed slot to be claimed once due")
            assert waiting.interval_to_next_pending_claim_check() == 0.0
