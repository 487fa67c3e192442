"""split_impression_files_sensor: batches new complete landing files into runs of split_impressions."""

import base64
import hashlib
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import orjson

from mixsync.impressions.assets import mixpanel_experiment_exposures, split_impressions
from mixsync.impressions.landing import landed_entries
from mixsync.impressions.resources import ImpressionsResource
from mixsync.sensor_runs import all_runs_failed

CURSOR_PREFIX = "z1:"

split_impressions_job = dg.define_asset_job(
    "split_impressions_job",
    # Landing and forwarding in one run: exposures reach Mixpanel without a second sensor to switch on.
    selection=[split_impressions, mixpanel_experiment_exposures],
    tags={"mixsync/writes": "duckdb"},
    description="Load the landing files named in the run config into split.impressions, then send the new "
                "impressions to Mixpanel as exposures.",
)


@dataclass
class CursorState:
    """Files requested and still in the landing folder (name -> inode and the run key that asked for it), and a
    counter that makes run keys new.

    A loaded file leaves the folder (archived, deleted or quarantined), so it leaves the cursor too: the cursor
    stays as small as what is in flight, however many files a day brings. The inode tells a file that came back
    under a requested name from the one requested; the run key finds the run, so a file whose run failed is
    asked for again."""

    sequence: int = 0
    requested: dict[str, tuple[int, str]] = field(default_factory=dict)

    def encode(self) -> str:
        data = orjson.dumps({"sequence": self.sequence,
                             "requested": {name: list(value) for name, value in sorted(self.requested.items())}})
        # Names share long prefixes: compressed, thousands of in-flight names stay a few kilobytes.
        return CURSOR_PREFIX + base64.b64encode(zlib.compress(data, 6)).decode()

    @classmethod
    def decode(cls, cursor: str | None) -> "CursorState":
        if not cursor:
            return cls()
        if not cursor.startswith(CURSOR_PREFIX):
            raise ValueError(f"unknown cursor format {cursor[:10]!r}: reset the sensor's cursor")
        data = orjson.loads(zlib.decompress(base64.b64decode(cursor[len(CURSOR_PREFIX):])))
        # Cursors from before run keys were kept hold an inode alone: their files stay in flight as they were.
        return cls(int(data["sequence"]), {name: (int(value), "") if isinstance(value, int) else (int(value[0]), value[1])
                                           for name, value in data["requested"].items()})


@dataclass
class FilePlan:
    batches: list[list[str]]
    state: CursorState
    in_folder: int
    in_flight: int
    settling: int
    left_for_next_tick: int
    not_utf8: list[str] = field(default_factory=list)


def plan_file_batches(directory: Path, state: CursorState, batch_files: int, max_batches: int,
                      settle_seconds: float, now: float | None = None,
                      failed_run_keys: frozenset[str] = frozenset()) -> FilePlan:
    """Group the new complete files of `directory` into at most `max_batches` batches of `batch_files` names.

    A file requested by a run that failed (`failed_run_keys`) and still in the folder is new again: a failed run
    loaded none of its files (the load is one transaction), and loading is idempotent anyway.
    One readdir per tick; a file is stat'ed only when it is a new candidate and only while batches still have room
    (to skip files modified in the last `settle_seconds`, which a non-atomic writer may still be writing)."""
    now = time.time() if now is None else now
    not_utf8: list[str] = []
    entries = dict(landed_entries(directory, not_utf8))
    in_flight = {name: state.requested[name] for name, inode in entries.items()
                 if name in state.requested and state.requested[name][0] == inode
                 and state.requested[name][1] not in failed_run_keys}
    candidates = sorted(entries.keys() - in_flight.keys())
    batches: list[list[str]] = []
    current: list[str] = []
    settling = 0
    considered = 0
    for name in candidates:
        if len(batches) >= max_batches:
            break
        considered += 1
        if settle_seconds > 0:
            try:
                modified = os.stat(directory / name).st_mtime
            except FileNotFoundError:
                continue
            if now - modified < settle_seconds:
                settling += 1
                continue
        current.append(name)
        if len(current) == batch_files:
            batches.append(current)
            current = []
    if current and len(batches) < max_batches:
        batches.append(current)
    sequence = state.sequence + (1 if batches else 0)
    requested = {**in_flight, **{name: (entries[name], run_key(sequence, batch)) for batch in batches for name in batch}}
    return FilePlan(batches, CursorState(sequence, requested), len(entries),
                    len(in_flight), settling, len(candidates) - considered, not_utf8)


def run_key(sequence: int, batch: list[str]) -> str:
    """Derived from the tick and the file names: a re-evaluated tick asks for the same keys (Dagster drops them),
    a later tick for new ones (a file that comes back under an old name is loaded again, if its bytes are new)."""
    digest = hashlib.sha256("\n".join(batch).encode()).hexdigest()[:16]
    return f"impressions-{sequence}-{len(batch)}-{digest}"


@dg.sensor(
    job=split_impressions_job,
    # Split posts every ~10 s: a minute gathers a handful of files per run without making people wait long.
    minimum_interval_seconds=60,
    description="Requests a run of split_impressions for new complete files in MIXSYNC_IMPRESSIONS_DIR, "
                "in batches of MIXSYNC_IMPRESSIONS_BATCH_FILES, each file once.",
)
def split_impression_files_sensor(context: dg.SensorEvaluationContext, impressions: ImpressionsResource) -> dg.SensorResult:
    settings = impressions.settings()
    directory = settings.impressions_dir
    if not directory.is_dir():
        return dg.SensorResult(skip_reason=f"{directory} does not exist yet (MIXSYNC_IMPRESSIONS_DIR)",
                               cursor=context.cursor)
    state = CursorState.decode(context.cursor)
    failed = frozenset(key for key, every_run_failed in all_runs_failed(
        context.instance, {key for _, key in state.requested.values() if key}).items() if every_run_failed)
    plan = plan_file_batches(directory, state, settings.batch_files, settings.max_runs_per_tick,
                             settings.settle_seconds, failed_run_keys=failed)
    if failed:
        context.log.warning(f"{len(failed)} run(s) of split_impressions failed (run keys {sorted(failed)[:5]}): "
                            "their files still in the folder are requested again")
    if plan.not_utf8:
        shown = ", ".join(ascii(name) for name in sorted(plan.not_utf8)[:5])
        context.log.warning(f"{len(plan.not_utf8)} file(s) in {directory} have a name that is not UTF-8 and are "
                            f"not loaded; rename them to load them: {shown}")
    if not plan.batches:
        return dg.SensorResult(
            skip_reason=f"no new complete files ({plan.in_flight} requested and pending, {plan.settling} still settling)",
            cursor=plan.state.encode())
    if plan.left_for_next_tick:
        context.log.info(f"{plan.left_for_next_tick} more new files wait for the next tick")
    requests = [
        dg.RunRequest(
            run_key=run_key(plan.state.sequence, batch),
            run_config={"ops": {"split_impressions": {"config": {"files": batch}}}},
            tags={"mixsync/files": str(len(batch)), "mixsync/first_file": batch[0][:200]},
        )
        for batch in plan.batches
    ]
    return dg.SensorResult(run_requests=requests, cursor=plan.state.encode())
