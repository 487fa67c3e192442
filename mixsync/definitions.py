"""The mixsync code location: each flow's definitions, merged, with the resources they share."""

import dagster as dg

from mixsync.experiments import defs as experiments
from mixsync.flagsmith import defs as flagsmith
from mixsync.impressions import defs as impressions
from mixsync.maintenance import defs as maintenance
from mixsync.mixpanel import defs as mixpanel
from mixsync.resources import WarehouseResource
from mixsync.split import defs as split

FLOWS = (mixpanel, split, flagsmith, impressions, experiments, maintenance)

resources = {"warehouse": WarehouseResource.from_environment()}
for flow in FLOWS:
    resources.update(flow.resources)

defs = dg.Definitions.merge(*(flow.defs for flow in FLOWS), dg.Definitions(resources=resources))
