"""The mixsync code location: each flow's definitions, merged, with the resources they share."""

import dagster as dg

from mixsync import dagster_fixes
from mixsync.experiments import defs as experiments
from mixsync.flagsmith import defs as flagsmith
from mixsync.impressions import defs as impressions
from mixsync.maintenance import defs as maintenance
from mixsync.mixpanel import defs as mixpanel
from mixsync.resources import WarehouseResource
from mixsync.split import defs as split

dagster_fixes.install()

FLOWS = (mixpanel, split, flagsmith, impressions, experiments, maintenance)

resources = {"warehouse": WarehouseResource.from_environment()}
for flow in FLOWS:
    resources.update(flow.resources)

# Steps run in the run's own process. A step process per step (Dagster's default) imports Dagster and the code
# location again, a second or more each, and buys nothing here: a step's work is DuckDB's (which uses every core
# itself) or waiting on an HTTP service, and writers take turns on the warehouse anyway. Pools (instance
# concurrency) and asset checks work the same in process; bench/bench_one_day.py measures the difference.
defs = dg.Definitions.merge(*(flow.defs for flow in FLOWS),
                            dg.Definitions(resources=resources, executor=dg.in_process_executor))
