"""mixpanel.events → Split's Events API, through the sync.split_events outbox, a day per partition."""

import datetime as dt
import threading
import time
from collections.abc import Iterator

import dagster as dg

from mixsync.dry_run import DryRunConfig, WouldSend, would_send
from mixsync.http import RetryStats, ServiceError
from mixsync.metadata import column_schema, table_name
from mixsync.mixpanel.partitions import accept_backfill_policy_beta, daily_partitions, partition_days
from mixsync.outbox_health import outbox_check_results, outbox_check_specs
from mixsync.progress import CountProgress, reporting_sends
from mixsync.resources import WarehouseResource
from mixsync.settings import SettingsError
from mixsync.split.client import SplitEventsClient
from mixsync.split.mapping import MappingError
from mixsync.split.resources import SplitResource
from mixsync.split.sql import EVENTS_OUTBOX, day_figures, stage_window
from mixsync.warehouse import markdown_table
from mixsync.warehouse.outbox import BatchOutcome, BodySender, FatalPushError, PushReport, push, recover


class SplitEventsConfig(DryRunConfig):
    resend: bool = False
    """Send again events Split already acknowledged. Split does not deduplicate: it will count them twice."""
    resend_in_doubt: bool = False
    """Send again events held `in_doubt` (their outcome is unknown). Split counts twice any that had arrived."""


def batch_sender(client: SplitEventsClient):
    """The outbox's send function: one request per batch; a refusal Split will repeat stops the whole push."""

    def send(body: bytes, count: int) -> BatchOutcome:
        try:
            client.post_events(body, count)
        except ServiceError as exc:
            raise FatalPushError(str(exc)) from exc
        return BatchOutcome()

    # The outbox hands over each batch's request body as it lies in the snapshot: no per-event work in Python.
    return BodySender(send)


class FirstSend:
    """Wraps the push's send to note when its first request went out.

    Every row this push marks sent is stamped after that (when its batch is answered), and every row another
    push marked before it: the recovery of a dead push's journal, at this run's start or at the push's own start,
    and a push of the same outbox by another run, which holds the outbox's lock until it ends. So the rows of a
    day marked sent since then are the ones this push sent."""

    def __init__(self) -> None:
        self.at: dt.datetime | None = None
        self._lock = threading.Lock()

    def wrap(self, sender: BodySender) -> BodySender:
        def send(body: bytes, count: int) -> BatchOutcome:
            with self._lock:  # set before any request goes out, whichever sender thread comes first
                if self.at is None:
                    self.at = dt.datetime.now(dt.UTC)
            return sender.send(body, count)

        return BodySender(send)


accept_backfill_policy_beta()


@dg.asset(
    partitions_def=daily_partitions,
    # The same partitions and policy as mixpanel_events: a range backfill of both runs as one run.
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[dg.AssetKey("mixpanel_events")],
    pool="split_events",
    group_name="split",
    kinds={"split", "duckdb"},
    tags={"mixsync/destination": "split"},
    metadata=table_name(EVENTS_OUTBOX),
    check_specs=outbox_check_specs("split_events", EVENTS_OUTBOX),
    # A dry run materializes nothing: it reports what would be sent as an observation.
    output_required=False,
    description="Mixpanel events of the day sent to Split's Events API, each once (outbox sync.split_events; "
                "unmappable events in split.events_rejected).",
)
def split_events(context: dg.AssetExecutionContext, config: SplitEventsConfig, split: SplitResource,
                 warehouse: WarehouseResource) -> Iterator[dg.MaterializeResult | dg.AssetObservation | dg.AssetCheckResult]:
    started = time.monotonic()
    try:
        settings = split.settings()
        mapping = split.mapping(settings)
    except (SettingsError, MappingError) as exc:
        raise dg.Failure(str(exc)) from None
    store = warehouse.warehouse()
    work_dir = warehouse.settings().landing_dir / "outbox"
    first_day, last_day = partition_days(context)
    days = [(first_day + dt.timedelta(days=n)).isoformat() for n in range((last_day - first_day).days + 1)]

    if config.dry_run:
        # Staged exactly as below, read, then rolled back: no outbox, ledger or rejects change.
        seen: list[WouldSend] = []
        with store.write() as con:
            staged = stage_window(con, mapping, first_day, last_day, settings.environment, dt.datetime.now(dt.UTC),
                                  resend=config.resend, resend_in_doubt=config.resend_in_doubt,
                                  inspect=lambda c: seen.append(would_send(c, EVENTS_OUTBOX, days, settings.batch_size)))
            checks = outbox_check_results(con, "split_events", EVENTS_OUTBOX)
        context.log.info(f"dry run of {first_day}..{last_day}: would send {seen[0].items} events in about "
                         f"{seen[0].batches} batches; nothing was sent or kept")
        # A one-day dry run is that day's: the UI shows it on the day's partition. Over several days its figures
        # are the run's (per day only in would_send_by_scope), so it stays on no partition.
        yield dg.AssetObservation(asset_key=context.asset_key, partition=days[0] if len(days) == 1 else None, metadata={
            **seen[0].metadata(), "days": f"{first_day}..{last_day}", "events_considered": staged.considered,
            "events_mapped": staged.mapped, "events_rejected": staged.rejected,
            "rejects_by_reason": staged.rejects_by_reason,
            "events_already_sent_before": staged.already_sent_not_resent, "events_resent": staged.resend,
            "events_resent_in_doubt": staged.resend_in_doubt})
        yield from checks
        return

    # What a crashed push acknowledged is applied before the mapping touches pending rows.
    # A batch in flight when a push was killed or interrupted is marked in_doubt here, never resent on a guess.
    recovered = recover(store, EVENTS_OUTBOX, work_dir, context.log, at_most_once=True)
    with store.write() as con:
        staged = stage_window(con, mapping, first_day, last_day, settings.environment,
                              dt.datetime.now(dt.UTC), resend=config.resend,
                              resend_in_doubt=config.resend_in_doubt)
    if staged.resend_in_doubt:
        option = "resend" if config.resend else "resend_in_doubt"
        context.log.warning(f"{option} requested: {staged.resend_in_doubt} events whose delivery is unknown (held "
                            "in_doubt) are sent again; Split does not deduplicate, so it counts twice any that had "
                            "arrived")
    if staged.resend:
        context.log.warning(f"resend requested: {staged.resend} events Split already acknowledged are sent again; "
                            "Split does not deduplicate, so its metrics will count them twice")
    if staged.rejected:
        context.log.warning(f"{staged.rejected} events could not be mapped (see split.events_rejected): "
                            f"{staged.rejects_by_reason}")
    unusable = [name for name, target in staged.renames.items() if target is None]
    if unusable:
        context.log.warning(f"event names with no character Split accepts, rejected until renamed in the mapping "
                            f"file: {unusable[:20]}")

    stats = RetryStats()
    failure: str | None = None
    report = PushReport()
    first_send = FirstSend()
    with store.read() as con:
        pending_before = con.execute(f"""SELECT count(*) FROM {EVENTS_OUTBOX} WHERE status = 'pending'
                                         AND list_contains(?, scope)""", [days]).fetchone()[0]
    progress = CountProgress(context.log, f"push of {first_day}..{last_day} to Split", pending_before, "events",
                             batched=True)
    with split.client(settings, stats) as client:
        try:
            report = push(store, EVENTS_OUTBOX, reporting_sends(first_send.wrap(batch_sender(client)), progress),
                          work_dir, scopes=days, max_items=settings.batch_size, max_bytes=settings.max_batch_bytes,
                          concurrency=settings.concurrency, logger=context.log, at_most_once=True)
        except (FatalPushError, ServiceError) as exc:
            failure = str(exc)
        requests = client.requests_sent
    with store.read() as con:
        pending_after, in_doubt_held = con.execute(f"""
            SELECT count(*) FILTER (status = 'pending' AND list_contains(?, scope)),
                   count(*) FILTER (status = 'in_doubt')
            FROM {EVENTS_OUTBOX}""", [days]).fetchone()
        # A day's `events_sent`: its rows marked sent since this push's first request (None: it sent nothing).
        per_day = day_figures(con, days, first_send.at)
        schema = column_schema(con, EVENTS_OUTBOX)
        checks = outbox_check_results(con, "split_events", EVENTS_OUTBOX)
        preview = markdown_table(con, f"""SELECT payload->>'eventTypeId' AS event_type_id, status, count(*) AS events
                                          FROM {EVENTS_OUTBOX} WHERE list_contains(?, scope)
                                          GROUP BY ALL ORDER BY events DESC LIMIT 10""", [days])
    # Each partition carries its own day's figures; `dagster/row_count` is the events of that day Split holds.
    # What belongs to the whole run (which may cover many days) is under run/.
    for key in context.partition_keys:
        figures = per_day.get(key, {})
        context.add_asset_metadata({"dagster/row_count": figures.get("events_sent_total", 0), **figures},
                                   partition_key=key)
    run = {
        "days": f"{first_day}..{last_day}",
        "events_considered": staged.considered,
        "events_not_selected": staged.not_selected,
        "events_mapped": staged.mapped,
        "events_enqueued": staged.enqueued,
        "events_sent": report.sent,
        "events_already_sent_before": staged.already_sent_not_resent,
        "events_resent": staged.resend,
        "events_pending_after": pending_after,
        "events_withdrawn": staged.withdrawn,
        "events_rejected": staged.rejected,
        "rejects_by_reason": staged.rejects_by_reason,
        "properties_trimmed": staged.properties_trimmed,
        "renames": len(staged.renames),
        "renamed_events": dict(list(staged.renames.items())[:50]),
        "batches": report.batches,
        "requests": requests,
        "recovered_sent": recovered.recovered_sent,
        "in_flight_at_crash": recovered.in_flight_at_crash,
        # An earlier, dead push's events whose outcome is unknown, found in its journal: in flight at its crash
        # (in_flight_at_crash) or answered too late before it died. Held, not resent.
        "recovered_in_doubt": recovered.recovered_in_doubt,
        # This run's own: sent by its push, outcome unknown (late answer, cut connection, 500/502/504). Held.
        "in_doubt": report.in_doubt,
        "events_in_doubt_held": in_doubt_held,
        "events_resent_in_doubt": staged.resend_in_doubt,
        **stats.as_metadata(),
        "duration_seconds": round(time.monotonic() - started, 3),
        "outbox": dg.MetadataValue.md(preview),
    }
    if report.in_doubt or recovered.recovered_in_doubt:
        found = [f"{report.in_doubt} sent by this run"] if report.in_doubt else []
        if recovered.recovered_in_doubt:
            found.append(f"{recovered.recovered_in_doubt} of an earlier push that did not finish (found at recovery)")
        context.log.warning(
            f"events in doubt (Split may or may not have them): {' and '.join(found)}; {in_doubt_held} are held in "
            "sync.split_events with status 'in_doubt' and are not sent again. "
            "Check Split, then run with resend_in_doubt: true to send them anyway")
    metadata = {"dagster/table_name": EVENTS_OUTBOX, "dagster/column_schema": schema,
                **{f"run/{name}": value for name, value in run.items()}}
    if failure is not None:
        # Batches Split acknowledged stay marked sent; the rest stay pending for the next run.
        raise dg.Failure(description=f"Split refused the push: {failure}", metadata=metadata)
    yield dg.MaterializeResult(metadata=metadata, check_results=checks)


@dg.asset_check(asset=split_events, blocking=False,
                description="No event of sync.split_events is held in_doubt (sent, outcome unknown, not resent).")
def split_events_in_doubt(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    with warehouse.warehouse().read() as con:
        held, by_day = con.execute(f"""
            SELECT coalesce(sum(n), 0)::BIGINT, coalesce(map_from_entries(list({{'k': scope, 'v': n}} ORDER BY scope)), MAP {{}})
            FROM (SELECT scope, count(*) AS n FROM {EVENTS_OUTBOX} WHERE status = 'in_doubt' GROUP BY scope)""").fetchone()
    return dg.AssetCheckResult(
        passed=held == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=None if held == 0 else (
            f"{held} events are in doubt: Split may or may not have them. Check Split, then materialize with "
            "run config resend_in_doubt: true to send them again (any that had arrived will count twice)"),
        metadata={"in_doubt": held, "in_doubt_by_day": {str(k): int(v) for k, v in dict(by_day or {}).items()}},
    )
