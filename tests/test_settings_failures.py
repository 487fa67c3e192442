"""A bad setting fails the asset that reads it with mixsync's one-line message naming the variable (a Failure),
not a traceback of the code that read it."""

from __future__ import annotations

import dagster as dg
import pytest

from mixsync.flagsmith.assets import flagsmith_cohort_traits
from mixsync.flagsmith.profile_flags_assets import mixpanel_profile_flags
from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.mixpanel.assets import mixpanel_events
from mixsync.mixpanel.cohort_assets import mixpanel_cohort_members, mixpanel_cohorts
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource

RESOURCES = {"mixpanel": MixpanelResource(), "warehouse": WarehouseResource(), "flagsmith": FlagsmithResource()}


@pytest.mark.parametrize(("assets", "variable", "value"), [
    ([flagsmith_cohort_traits], "FLAGSMITH_BULK_MODE", "fast"),
    ([flagsmith_cohort_traits], "FLAGSMITH_ON_COHORT_EXIT", "remove"),
    ([mixpanel_profile_flags], "FLAGSMITH_TRAIT_PREFIX", "x" * 101),
    ([mixpanel_cohort_members], "MIXPANEL_COHORTS", "[1,"),
    ([mixpanel_cohorts], "MIXPANEL_REGION", "mars"),
    ([mixpanel_events], "MIXPANEL_REGION", "mars"),
])
def test_a_bad_setting_fails_its_asset_with_a_message_naming_the_variable(env, instance, monkeypatch,
                                                                           assets, variable, value):
    monkeypatch.setenv(variable, value)
    partition = {"partition_key": "2026-01-05"} if assets == [mixpanel_events] else {}
    result = dg.materialize(assets, instance=instance, resources=RESOURCES, raise_on_error=False, **partition)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.step_failure_data.error
    assert variable in error.message
    # A Failure raised by the asset: Dagster shows its message, with no cause and no user-code stack to read.
    assert error.cls_name == "Failure" and error.cause is None, (error.cls_name, error.message)
