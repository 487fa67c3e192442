"""Materializing mixpanel_events against the sandbox: real HTTP, a real DuckDB file, real Dagster runs."""

from __future__ import annotations

import dagster as dg

from mixsync.definitions import defs
from mixsync.mixpanel.assets import mixpanel_events
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource

RESOURCES = {"mixpanel": MixpanelResource(), "warehouse": WarehouseResource()}


def materialize_days(instance, first: str, last: str | None = None, raise_on_error: bool = True):
    tags = {}
    partition_key = first
    if last and last != first:
        tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
        partition_key = None
    return dg.materialize([mixpanel_events], instance=instance, resources=RESOURCES, partition_key=partition_key,
                          tags=tags, raise_on_error=raise_on_error)


def test_one_day_lands_in_duckdb(sandbox, env, warehouse, instance):
    day = sandbox.dataset.days[0].isoformat()
    result = materialize_days(instance, day)
    assert result.success
    with warehouse.read() as con:
        n = con.execute("SELECT count(*) FROM mixpanel.events WHERE day = ?", [day]).fetchone()[0]
    assert n > 500
    meta = result.asset_materializations_for_node("mixpanel_events")[0].metadata
    assert meta["dagster/row_count"].value == n
