"""Mixpanel cohort membership → a boolean trait per cohort on each Flagsmith identity; only changes are sent."""

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import orjson

from mixsync.dry_run import DryRunConfig, would_send
from mixsync.flagsmith.client import FlagsmithClient, FlagsmithKeyError
from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.flagsmith.settings import FlagsmithSettings
from mixsync.flagsmith.sql import (
    OUTBOX,
    Plan,
    begin_sync,
    finish_sync,
    fold_acknowledged,
    ledger_summary,
    plan_changes,
    reconcile_read_back,
    record_requeue,
    rejected_by_reason,
    remember_bulk_mode,
    remembered_bulk_mode,
    verification_sample,
)
from mixsync.flagsmith.traits import TraitKeyError, trait_keys
from mixsync.http import RetryStats, ServiceError
from mixsync.metadata import table_metadata, table_name
from mixsync.outbox_health import outbox_check_results, outbox_check_specs
from mixsync.privacy import pseudonym
from mixsync.progress import CountProgress, reporting_sends
from mixsync.resources import WarehouseResource
from mixsync.settings import SettingsError
from mixsync.warehouse import AnyWarehouse, markdown_table
from mixsync.warehouse.outbox import BatchOutcome, FatalPushError, PushReport, push, recover

# Per-identity POSTs go one by one inside a batch: smaller batches keep FLAGSMITH_CONCURRENCY requests in flight.
PER_IDENTITY_BATCH = 10


def _sender(client: FlagsmithClient, mode: str):
    def send(payloads: list[bytes]) -> BatchOutcome:
        try:
            return BatchOutcome(rejected=client.send(mode, payloads))
        except FlagsmithKeyError as exc:
            raise FatalPushError(str(exc)) from None

    return send


def _batch_size(settings: FlagsmithSettings, mode: str | None) -> int:
    return settings.batch_identities if mode != "identities" else min(settings.batch_identities, PER_IDENTITY_BATCH)


def _push(store: AnyWarehouse, client: FlagsmithClient, mode: str, settings: FlagsmithSettings, work_dir, scope: str,
          log, identities: int) -> PushReport:
    """Push one scope's pending identities; the run log shows batches sent and remaining with the time left."""
    progress = CountProgress(log, f"push of {scope} to Flagsmith ({mode})", identities, "identities", batched=True)
    try:
        return push(store, OUTBOX, reporting_sends(_sender(client, mode), progress), work_dir, scope=scope,
                    max_items=_batch_size(settings, mode),
                    concurrency=settings.concurrency, logger=log)
    except FatalPushError as exc:
        raise dg.Failure(f"Flagsmith refused the environment key; nothing more was sent. {exc}") from None


def _read_back(client: FlagsmithClient, identifiers: list[str], concurrency: int) -> list[tuple[str, str, str]]:
    def one(identifier: str) -> list[tuple[str, str, str]]:
        return [(identifier, key, orjson.dumps(value).decode()) for key, value in client.read_traits(identifier).items()]

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="flagsmith-verify") as pool:
        return [row for rows in pool.map(one, identifiers) for row in rows]


def _cohort_keys(con, settings: FlagsmithSettings) -> dict[int, str]:
    if con.execute("SELECT count(*) FROM mixpanel.cohort_snapshots").fetchone()[0] == 0:
        raise dg.Failure("no cohort membership in the warehouse yet: materialize mixpanel_cohort_members first")
    if settings.identifier_property:
        missing = con.execute("""SELECT string_agg(cohort_id::VARCHAR, ', ') FROM mixpanel.cohort_member_loads
                                 WHERE NOT list_contains(coalesce(properties, []), ?)""",
                              [settings.identifier_property]).fetchone()[0]
        if missing:
            raise dg.Failure(f"FLAGSMITH_IDENTIFIER_PROPERTY={settings.identifier_property} but the members of cohorts "
                             f"{missing} were loaded without that property: materialize mixpanel_cohort_members again "
                             "(it fetches the property when FLAGSMITH_IDENTIFIER_PROPERTY is set)")
    # The current name from the cohorts list: a cohort renamed in Mixpanel moves its trait key in this sync.
    cohorts = con.execute("""SELECT l.cohort_id, coalesce(c.name, l.cohort_name)
                             FROM mixpanel.cohort_member_loads l LEFT JOIN mixpanel.cohorts c ON c.id = l.cohort_id
                             ORDER BY l.cohort_id""").fetchall()
    try:
        return trait_keys(settings.trait_prefix, cohorts)
    except TraitKeyError as exc:
        raise dg.Failure(str(exc)) from None


@dg.asset(
    # Membership comes from the engage poll and from the cohort webhooks; both land in mixpanel.cohort_members.
    deps=[dg.AssetKey("mixpanel_cohort_members"), dg.AssetKey("mixpanel_cohort_webhook_members")],
    pool="flagsmith",
    group_name="flagsmith",
    kinds={"flagsmith", "duckdb"},
    tags={"mixsync/destination": "flagsmith"},
    metadata=table_name("sync.flagsmith_traits"),
    check_specs=outbox_check_specs("flagsmith_cohort_traits", OUTBOX),
    # A dry run materializes nothing: it reports what would be sent as an observation.
    output_required=False,
    description="A boolean trait per synced Mixpanel cohort (FLAGSMITH_TRAIT_PREFIX + snake_cased name) on each "
                "Flagsmith identity: only changes since what Flagsmith last confirmed are sent (sync.flagsmith_traits).",
)
def flagsmith_cohort_traits(context: dg.AssetExecutionContext, config: DryRunConfig, flagsmith: FlagsmithResource,
                            warehouse: WarehouseResource
                            ) -> Iterator[dg.MaterializeResult | dg.AssetObservation | dg.AssetCheckResult]:
    started = time.monotonic()
    try:
        settings = flagsmith.settings()
    except SettingsError as exc:
        raise dg.Failure(str(exc)) from None
    store = warehouse.warehouse()
    work_dir = warehouse.settings().landing_dir / "outbox"
    stats = RetryStats()
    with flagsmith.client(stats) as client:
        with store.write() as con:
            remembered = remembered_bulk_mode(con, settings.api_url) if settings.bulk_mode == "auto" else None
        mode: str | None = remembered if settings.bulk_mode == "auto" else settings.bulk_mode

        def route() -> str:
            """The write route: configured, remembered from an earlier run, or probed now that there is something
            to send (a run with nothing to send makes no write request) and remembered for the runs after."""
            nonlocal mode
            if mode is None:
                try:
                    mode = client.detect_bulk_mode()
                except FlagsmithKeyError as exc:
                    raise dg.Failure(str(exc)) from None
                context.log.info(f"Flagsmith write route detected: {mode} (kept in sync.flagsmith_routes)")
                with store.write() as con:
                    remember_bulk_mode(con, settings.api_url, mode)
            return mode

        if config.dry_run:
            # The fold and the plan exactly as below, in one transaction that is read, then rolled back. No probe:
            # a dry run makes no write request, so an undetected route is shown as such.
            shown_mode = mode or "auto (detected by the first real run with something to send)"
            with store.write() as con:
                keys = _cohort_keys(con, settings)
                con.execute("BEGIN TRANSACTION")
                try:
                    fold_acknowledged(con, transaction=False)
                    sync_id = begin_sync(con, mode or "auto", settings.exit_mode)
                    plan = plan_changes(con, sync_id, 0, keys, settings.exit_mode, settings.identifier_property,
                                        transaction=False)
                    seen = would_send(con, OUTBOX, [f"sync-{sync_id}-r0"], _batch_size(settings, mode))
                finally:
                    con.execute("ROLLBACK")
                checks = outbox_check_results(con, "flagsmith_cohort_traits", OUTBOX)
            context.log.info(f"dry run ({shown_mode}): would send {seen.items} identities ({plan.set_true} true, "
                             f"{plan.set_false} false, {plan.deleted} deleted); nothing was sent or kept")
            yield dg.AssetObservation(asset_key=context.asset_key, metadata={
                **seen.metadata(), "bulk_mode": shown_mode, "traits_set_true": plan.set_true,
                "traits_set_false": plan.set_false, "traits_deleted": plan.deleted,
                "skipped_by_reason": plan.skipped_by_reason})
            yield from checks
            return
        # 1. An interrupted run: apply what Flagsmith acknowledged, so none of it is sent again.
        recovered = recover(store, OUTBOX, work_dir, context.log)
        with store.write() as con:
            keys = _cohort_keys(con, settings)
            folded_earlier = fold_acknowledged(con)
            sync_id = begin_sync(con, mode or "auto", settings.exit_mode)
            # 2. The changes, computed in DuckDB against the ledger, enqueued one item per identity.
            plan = plan_changes(con, sync_id, 0, keys, settings.exit_mode, settings.identifier_property)
        context.log.info(f"sync {sync_id}: {plan.identities} identities, +{plan.set_true} true, "
                         f"{plan.set_false} false, {plan.deleted} deleted")
        report = PushReport()
        if plan.identities:
            report = _push(store, client, route(), settings, work_dir, f"sync-{sync_id}-r0", context.log,
                           plan.identities)
        with store.write() as con:
            fold_acknowledged(con)
            sample = verification_sample(con, sync_id, settings.verify_sample)
        # 3. Read a sample back: a 202 from the bulk route does not prove the traits were stored.
        verify_errors = 0
        try:
            read_back = _read_back(client, sample, settings.concurrency)
        except ServiceError as exc:
            context.log.warning(f"read-back verification failed, skipped: {exc}")
            read_back, sample, verify_errors = [], [], 1
        requeue = Plan(sync_id, 1)
        requeue_report = PushReport()
        with store.write() as con:
            mismatches, non_boolean, examples = reconcile_read_back(con, sync_id, read_back, sample)
            # Identifiers may be e-mail addresses (FLAGSMITH_IDENTIFIER_PROPERTY=$email): logs and metadata get
            # pseudonyms only.
            examples = [{**example, "identifier": pseudonym(example["identifier"])} for example in examples]
            if mismatches:
                requeue = plan_changes(con, sync_id, 1, keys, settings.exit_mode, settings.identifier_property)
                record_requeue(con, sync_id, requeue.traits)
        if mismatches:
            context.log.warning(f"{mismatches} traits in the read-back sample differ from what Flagsmith acknowledged "
                                f"({non_boolean} hold a value that is not a boolean; e.g. {examples[:2]}); "
                                f"re-queued {requeue.traits} trait changes")
            if requeue.identities:
                requeue_report = _push(store, client, route(), settings, work_dir, f"sync-{sync_id}-r1", context.log,
                                       requeue.identities)
        route_missing = client.missing_bulk_route
        with store.write() as con:
            fold_acknowledged(con)
            if route_missing is not None and settings.bulk_mode == "auto":
                remember_bulk_mode(con, settings.api_url, None)
            finish_sync(con, sync_id, plan, len(sample), mismatches, mode, requeue.traits)
            rejects = rejected_by_reason(con, sync_id)
            ledger = ledger_summary(con)
            preview = markdown_table(con, """SELECT trait_key, count(*) FILTER (trait_value) AS "true",
                                                    count(*) FILTER (NOT trait_value) AS "false",
                                                    count(*) FILTER (trait_value IS NULL) AS deleted
                                             FROM sync.flagsmith_traits GROUP BY trait_key ORDER BY trait_key LIMIT 20""")
            table = table_metadata(con, "sync.flagsmith_traits")
            checks = outbox_check_results(con, "flagsmith_cohort_traits", OUTBOX)
        requests = client.requests_sent
    if route_missing is not None:
        context.log.warning(f"Flagsmith answered 404/405 on the {route_missing} bulk route: this run went identity "
                            "by identity; the next run that sends detects the route again")
    if rejects:
        context.log.warning(f"Flagsmith refused {sum(rejects.values())} identities: {rejects} "
                            f"(see {OUTBOX} WHERE status = 'rejected')")
    yield dg.MaterializeResult(check_results=checks, metadata={
        **table,
        "sync_id": sync_id,
        # "none": nothing had to be sent, and no route was configured or remembered (so none was probed).
        "bulk_mode": mode or "none",
        "exit_mode": settings.exit_mode,
        "trait_keys": {str(c): k for c, k in sorted(keys.items())},
        "identities_touched": plan.identities,
        "traits_set_true": plan.set_true,
        "traits_set_false": plan.set_false,
        "traits_deleted": plan.deleted,
        "trait_writes": plan.traits,
        "identities_sent": report.sent + requeue_report.sent,
        "batches": report.batches + requeue_report.batches,
        "requests": requests,
        "rejected": report.rejected + requeue_report.rejected,
        "rejects_by_reason": rejects,
        "rejected_earlier_not_resent": plan.held_back_rejected,
        "skipped_members": sum(plan.skipped_by_reason.values()),
        "skipped_by_reason": plan.skipped_by_reason,
        "recovered_identities": recovered.recovered_sent,
        "folded_from_earlier_runs": folded_earlier,
        # Items (identities) an earlier push left in flight when it was killed, as this run's recovery found them;
        # what of them this run sent again unchanged, and what it corrected (the value is no longer wanted).
        "in_flight_at_crash": recovered.in_flight_at_crash,
        "resent_in_flight_at_crash": plan.resent_in_flight,
        "corrected_in_flight_at_crash": plan.corrected_in_flight,
        "superseded_pending": plan.superseded,
        "verified_identities": len(sample),
        "verify_mismatches": mismatches,
        "verify_non_boolean": non_boolean,
        "verify_examples": examples,
        "verify_errors": verify_errors,
        "requeued_trait_writes": requeue.traits,
        **ledger,
        **stats.as_metadata(),
        "duration_seconds": round(time.monotonic() - started, 3),
        "traits": dg.MetadataValue.md(preview),
    })
