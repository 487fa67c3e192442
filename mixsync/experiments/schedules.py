"""The daily analysis, after the nightly Mixpanel pull (02:15 UTC) has had time to finish."""

import dagster as dg

from mixsync.experiments.assets import experiment_results

experiment_results_job = dg.define_asset_job(
    "experiment_results_job", selection=[experiment_results], tags={"mixsync/writes": "duckdb"},
    description="Exposures, per-treatment results and sample-ratio checks of every split, recomputed.",
)


@dg.schedule(job=experiment_results_job, cron_schedule="15 5 * * *", execution_timezone="UTC",
             description="Every day at 05:15 UTC, three hours after mixpanel_events_schedule's pull.")
def experiment_results_schedule(context: dg.ScheduleEvaluationContext):
    return dg.RunRequest(run_key=f"experiment-results-{context.scheduled_execution_time:%Y-%m-%d}")
