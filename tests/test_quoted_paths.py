"""Every push with the warehouse and the landing folder under a folder whose name holds a quote and a space.

The paths reach SQL text (COPY … TO, read_json, read_text, read_csv); a quote there would end the string early.
"""

from __future__ import annotations

import dagster as dg

from mixsync.flagsmith.assets import flagsmith_cohort_traits
from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.impressions.assets import mixpanel_experiment_exposures, split_impressions
from mixsync.impressions.landing import write_atomically
from mixsync.impressions.resources import ImpressionsResource
from mixsync.impressions.settings import ImpressionsSettings
from mixsync.mixpanel.assets import mixpanel_events
from mixsync.mixpanel.cohort_assets import mixpanel_cohort_members, mixpanel_cohorts
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource
from mixsync.sandbox.impressions import ImpressionGenerator, encode
from mixsync.settings import WarehouseSettings
from mixsync.split.assets import split_events
from mixsync.split.resources import SplitResource
from mixsync.warehouse import Warehouse

RESOURCES = {"mixpanel": MixpanelResource(), "split": SplitResource(), "flagsmith": FlagsmithResource(),
             "impressions": ImpressionsResource(), "warehouse": WarehouseResource()}


def outbox_statuses(warehouse: Warehouse, table: str) -> dict[str, int]:
    with warehouse.read() as con:
        return dict(con.execute(f"SELECT status, count(*) FROM {table} GROUP BY status").fetchall())


def test_every_push_works_under_a_folder_named_with_a_quote_and_a_space(sandbox, env, instance, tmp_path, monkeypatch):
    root = tmp_path / "o'brien dir"
    monkeypatch.setenv("MIXSYNC_DUCKDB_PATH", str(root / "ware'house.duckdb"))
    monkeypatch.setenv("MIXSYNC_LANDING_DIR", str(root / "landing"))
    monkeypatch.setenv("MIXSYNC_IMPRESSIONS_DIR", str(root / "impressions"))
    monkeypatch.setenv("MIXSYNC_IMPRESSIONS_SETTLE_SECONDS", "0")
    warehouse = Warehouse(WarehouseSettings.from_env().duckdb_path)
    day = sandbox.dataset.days[0].isoformat()

    # Mixpanel export -> Split events.
    assert dg.materialize([mixpanel_events], instance=instance, resources=RESOURCES, partition_key=day).success
    assert dg.materialize([split_events], instance=instance, resources=RESOURCES, partition_key=day).success
    split_sent = outbox_statuses(warehouse, "sync.split_events")
    assert split_sent.keys() == {"sent"} and split_sent["sent"] == sandbox.split.accepted > 0

    # Mixpanel cohorts -> Flagsmith traits.
    chain = [mixpanel_cohorts, mixpanel_cohort_members, flagsmith_cohort_traits]
    assert dg.materialize(chain, instance=instance, resources=RESOURCES).success
    traits_sent = outbox_statuses(warehouse, "sync.flagsmith_outbox")
    assert traits_sent.keys() == {"sent"} and traits_sent["sent"] > 0
    members = {m for c in sandbox.mixpanel.query.cohorts.values() for m in c.members}
    assert members and members <= set(sandbox.flagsmith.all_traits())

    # Split impressions -> Mixpanel exposures (/import).
    body, _ = encode(ImpressionGenerator(seed=3).batch(40))
    write_atomically(ImpressionsSettings.from_env().impressions_dir, "impressions-1.json.gz", body)
    config = {"ops": {"split_impressions": {"config": {"files": ["impressions-1.json.gz"]}}}}
    assert dg.materialize([split_impressions], run_config=config, instance=instance, resources=RESOURCES).success
    assert dg.materialize([mixpanel_experiment_exposures], instance=instance, resources=RESOURCES).success
    assert outbox_statuses(warehouse, "sync.mixpanel_exposures") == {"sent": 40}
    assert len(sandbox.mixpanel.ingest.held("$experiment_started")) == 40
