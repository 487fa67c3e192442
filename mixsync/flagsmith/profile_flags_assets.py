"""Flagsmith flag states → Mixpanel user profiles: each managed identity's flags as `$set`/`$unset` on its profile.

Flagsmith's own Mixpanel integration sends `{feature: value}` on every identify, fire-and-forget, and collapses
falsy remote-config values to true. This one reads the flags, lands them in DuckDB, and sends only what changed
through an outbox, with the values exactly as Flagsmith typed them.
"""

import datetime as dt
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import orjson

from mixsync.dry_run import DryRunConfig, would_send
from mixsync.flagsmith import profile_flags_sql as sql
from mixsync.flagsmith.client import FlagsmithClient, FlagsmithKeyError
from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.http import RetryStats, ServiceError
from mixsync.metadata import table_metadata, table_name
from mixsync.mixpanel.profiles_client import ProfilesClient
from mixsync.outbox_health import outbox_check_results, outbox_check_specs
from mixsync.privacy import pseudonym, redact
from mixsync.progress import CountProgress, reporting_sends
from mixsync.resources import WarehouseResource
from mixsync.settings import SettingsError
from mixsync.warehouse import markdown_table
from mixsync.warehouse.outbox import BatchOutcome, FatalPushError, push, recover

# Mixpanel recommends ~200 profiles per /engage call.
PROFILES_PER_REQUEST = 200
MAX_REQUEST_BYTES = 1 << 20


def read_flags(client: FlagsmithClient, identities: list[str], concurrency: int, answers_path, log) -> dict[str, str]:
    """Read every identity's flags (bounded concurrency) into an NDJSON file, one answer per line, as it arrives.

    Returns {identity: error} for the reads that failed after retries: those identities keep their last flags
    and get no plan this run (never an $unset because a read failed)."""
    errors: dict[str, str] = {}

    def one(identity: str) -> bytes | None:
        try:
            answer = client.identity_flags(identity)
        except FlagsmithKeyError:
            raise
        except ServiceError as exc:
            errors[identity] = str(exc)[:300]
            return None
        read_at = dt.datetime.now(dt.UTC).isoformat()
        # A JSON text has newlines only between tokens, so flattening them keeps it one NDJSON line, unparsed.
        return (b'{"identity":' + orjson.dumps(identity) + b',"read_at":"' + read_at.encode() + b'","answer":'
                + answer.strip().replace(b"\n", b" ").replace(b"\r", b" ") + b"}\n")

    with open(answers_path, "wb") as out, \
            ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="flagsmith-flags") as pool:
        for done, line in enumerate(pool.map(one, identities), start=1):
            if line is not None:
                out.write(line)
            if done % 1000 == 0:
                log.info(f"read the flags of {done}/{len(identities)} identities")
    return errors


def _preview(payloads: list[str]) -> str:
    """The first updates as they would be sent, with the project token masked ($token is a credential)."""
    shown = []
    for payload in payloads:
        update = orjson.loads(payload)
        if "$token" in update:
            update["$token"] = "***"
        shown.append(f"```json\n{orjson.dumps(update).decode()}\n```")
    return "\n".join(shown) or "(nothing to send)"


def _sender(client: ProfilesClient):
    def send(payloads: list[bytes]) -> BatchOutcome:
        try:
            refused = client.send(payloads)
        except ServiceError as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                raise FatalPushError(str(exc)) from None
            raise
        # Mixpanel's reason names the profile ("update 0 ($distinct_id 'ann@example.com'): ..."), and the outbox's
        # reasons go to the run log, the materialization's rejects_by_reason and the outbox check: they keep the
        # pseudonym instead (the outbox's items still name the profile, in the warehouse).
        return BatchOutcome(rejected={
            position: redact(reason, orjson.loads(payloads[position]).get("$distinct_id", ""))
            for position, reason in refused.items()})

    return send


def _read_into(client: FlagsmithClient, identities: list[str], concurrency: int, answers, log) -> dict[str, str]:
    try:
        return read_flags(client, identities, concurrency, answers, log)
    except FlagsmithKeyError as exc:
        raise dg.Failure(str(exc)) from None


@dg.asset(
    deps=[dg.AssetKey("flagsmith_cohort_traits")],
    pool="mixpanel_profile_flags",
    group_name="flagsmith",
    kinds={"flagsmith", "mixpanel", "duckdb"},
    tags={"mixsync/destination": "mixpanel"},
    metadata=table_name(sql.LEDGER),
    check_specs=outbox_check_specs("mixpanel_profile_flags", sql.OUTBOX),
    # A dry run materializes nothing: it reports what would be sent as an observation.
    output_required=False,
    description="Each managed Flagsmith identity's flag states as Mixpanel profile properties "
                "(FLAGSMITH_PROFILE_PROPERTY_PREFIX + feature name) through /engage $set/$unset; flags land in "
                "flagsmith.identity_flags, and only changes since sync.mixpanel_profile_flags are sent.",
)
def mixpanel_profile_flags(context: dg.AssetExecutionContext, config: DryRunConfig, flagsmith: FlagsmithResource,
                           warehouse: WarehouseResource
                           ) -> Iterator[dg.MaterializeResult | dg.AssetObservation | dg.AssetCheckResult]:
    started = time.monotonic()
    try:
        settings = flagsmith.profile_flags_settings()
        flagsmith_settings = flagsmith.settings()
    except SettingsError as exc:
        raise dg.Failure(str(exc)) from None
    # How flagsmith_cohort_traits named the identities: the way back to the members' own distinct_ids.
    identifier_property = flagsmith_settings.identifier_property
    store = warehouse.warehouse()
    work_dir = warehouse.settings().landing_dir / "outbox"
    flags_dir = warehouse.settings().landing_dir / "flagsmith_flags"
    flags_dir.mkdir(parents=True, exist_ok=True)
    read_stats, push_stats = RetryStats(), RetryStats()
    if config.dry_run:
        # The flags are read (reads change nothing), then the fold, the landing and the plan run exactly as below in
        # one transaction that is read and rolled back: Mixpanel gets nothing, no table changes. A write connection
        # for the ledger too, as the other dry runs have: on a warehouse no run has written yet it makes the empty
        # tables (a read found no warehouse and failed the dry run).
        with store.write() as con:
            identities = sql.managed_identities(con)
            to_read, skipped = sql.identities_to_read(con, identities, identifier_property)
        answers = flags_dir / f"dry-run-{context.run.run_id}.ndjson"
        with flagsmith.client(read_stats) as client:
            read_errors = _read_into(client, to_read, flagsmith_settings.concurrency, answers, context.log)
        try:
            with store.write() as con:
                con.execute("BEGIN TRANSACTION")
                try:
                    sql.fold_acknowledged(con, transaction=False)
                    sync_id = sql.begin_sync(con, len(identities))
                    identities_read = sql.land_flags(con, answers, identities, transaction=False)
                    plan = sql.plan_changes(con, sync_id, settings.property_prefix, settings.project_token.value,
                                            identifier_property, transaction=False)
                    seen = would_send(con, sql.OUTBOX, [f"sync-{sync_id}"], PROFILES_PER_REQUEST)
                finally:
                    con.execute("ROLLBACK")
                checks = outbox_check_results(con, "mixpanel_profile_flags", sql.OUTBOX)
        finally:
            os.unlink(answers)
        context.log.info(f"dry run: would send {seen.items} profile updates ({plan.properties_set} properties set, "
                         f"{plan.properties_unset} unset) for {plan.profiles} profiles; nothing was sent or kept")
        # The preview's payloads carry the project token as $token: it is not shown.
        metadata = {**seen.metadata(), "would_send_preview": dg.MetadataValue.md(_preview(seen.preview))}
        yield dg.AssetObservation(asset_key=context.asset_key, metadata={
            **metadata, "identities": len(identities), "identities_read": identities_read,
            "identities_skipped": sum(skipped.values()), "skipped_by_reason": skipped,
            "read_errors": len(read_errors), "profiles_changed": plan.profiles,
            "properties_set": plan.properties_set, "properties_unset": plan.properties_unset})
        yield from checks
        return
    # 1. An interrupted run: apply what Mixpanel acknowledged, so the plan below starts from the truth.
    recovered = recover(store, sql.OUTBOX, work_dir, context.log)
    with store.write() as con:
        folded_earlier = sql.fold_acknowledged(con)
        identities = sql.managed_identities(con)
        to_read, skipped = sql.identities_to_read(con, identities, identifier_property)
        sync_id = sql.begin_sync(con, len(identities))
    if skipped:
        context.log.warning(f"{sum(skipped.values())} identities have no Mixpanel profile to write: {skipped}")
    answers = flags_dir / f"sync-{sync_id}.ndjson"
    with flagsmith.client(read_stats) as client:
        read_errors = _read_into(client, to_read, flagsmith_settings.concurrency, answers, context.log)
        flag_requests = client.requests_sent
    if read_errors:
        context.log.warning(f"could not read the flags of {len(read_errors)} identities (kept as they were): "
                            f"{[(pseudonym(i), redact(e, i)) for i, e in list(read_errors.items())[:3]]}")
    # 2. Land the flags and plan the changes against the ledger, in one short write.
    with store.write() as con:
        identities_read = sql.land_flags(con, answers, identities)
        plan = sql.plan_changes(con, sync_id, settings.property_prefix, settings.project_token.value,
                                identifier_property)
    os.unlink(answers)
    context.log.info(f"sync {sync_id}: {identities_read} identities read, {plan.profiles} profiles to update "
                     f"({plan.properties_set} properties set, {plan.properties_unset} unset)")
    # 3. Send. A $set or $unset is idempotent: an update in flight at a kill was folded into the ledger as
    # unconfirmed, so the plan above sent it again if still wanted, or corrected it.
    progress = CountProgress(context.log, f"push of sync-{sync_id} to Mixpanel profiles", plan.updates, "updates",
                             batched=True)
    with ProfilesClient(settings.ingestion_url, flagsmith.retry_policy(), push_stats) as profiles:
        try:
            report = push(store, sql.OUTBOX, reporting_sends(_sender(profiles), progress), work_dir,
                          scope=f"sync-{sync_id}",
                          max_items=PROFILES_PER_REQUEST, max_bytes=MAX_REQUEST_BYTES, concurrency=2,
                          logger=context.log)
        except FatalPushError as exc:
            raise dg.Failure(f"Mixpanel refused the profile updates; nothing more was sent. {exc}") from None
        engage_requests = profiles.requests_sent
    with store.write() as con:
        sql.fold_acknowledged(con)
        sql.finish_sync(con, plan, identities_read, len(read_errors))
        rejects = sql.rejected_by_reason(con, sync_id)
        ledger = sql.ledger_summary(con)
        preview = markdown_table(con, f"""SELECT property, count(*) AS profiles,
                                                 string_agg(DISTINCT value::VARCHAR, ', ') AS "values"
                                          FROM {sql.LEDGER} WHERE value IS NOT NULL
                                          GROUP BY property ORDER BY property LIMIT 20""")
        flags_rows = con.execute("SELECT count(*) FROM flagsmith.identity_flags").fetchone()[0]
        table = table_metadata(con, sql.LEDGER)
        checks = outbox_check_results(con, "mixpanel_profile_flags", sql.OUTBOX)
    if rejects:
        context.log.warning(f"Mixpanel refused {sum(rejects.values())} profile updates: {rejects} "
                            f"(see {sql.OUTBOX} WHERE status = 'rejected')")
    yield dg.MaterializeResult(check_results=checks, metadata={
        **table,
        "identity_flags_rows": flags_rows,
        "sync_id": sync_id,
        "identities": len(identities),
        "identities_read": identities_read,
        "read_errors": len(read_errors),
        "identities_skipped": sum(skipped.values()),
        "skipped_by_reason": skipped,
        "profiles_changed": plan.profiles,
        "properties_set": plan.properties_set,
        "properties_unset": plan.properties_unset,
        "updates_enqueued": plan.updates,
        "updates_sent": report.sent,
        "updates_rejected": report.rejected,
        "rejects_by_reason": rejects,
        "rejected_earlier_not_resent": plan.held_back_rejected,
        "batches": report.batches,
        "flag_requests": flag_requests,
        "engage_requests": engage_requests,
        "recovered_updates": recovered.recovered_sent,
        # Items (updates) an earlier push left in flight when it was killed, as this run's recovery found them;
        # what of them this run sent again unchanged, and what it corrected (the value is no longer wanted).
        "in_flight_at_crash": recovered.in_flight_at_crash,
        "resent_in_flight_at_crash": plan.resent_in_flight,
        "corrected_in_flight_at_crash": plan.corrected_in_flight,
        "folded_from_earlier_runs": folded_earlier,
        "superseded_pending": plan.superseded,
        **ledger,
        "flagsmith_retries": read_stats.retries,
        "mixpanel_retries": push_stats.retries,
        "duration_seconds": round(time.monotonic() - started, 3),
        "properties": dg.MetadataValue.md(preview),
    })
