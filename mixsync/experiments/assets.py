"""experiment_results: who saw which treatment, what they did in their window, and whether the difference is real."""

import base64
import os
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg

from mixsync.experiments.analysis import Analysis, ExperimentSummary, analyse
from mixsync.experiments.chart import chart_file_name, render_chart
from mixsync.experiments.resources import ExperimentsResource
from mixsync.experiments.settings import ExperimentsFileError
from mixsync.experiments.sql import ExperimentDataError
from mixsync.experiments.stats import SRM_ALPHA, disagreement
from mixsync.impressions.assets import split_impressions
from mixsync.metadata import table_metadata, table_name
from mixsync.mixpanel.assets import mixpanel_events
from mixsync.resources import WarehouseResource
from mixsync.settings import SettingsError
from mixsync.warehouse import Warehouse

SAMPLE_RATIO_CHECK = "experiment_sample_ratio"


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:+.1f}%"


def results_markdown(analysis: Analysis) -> str:
    lines = ["| split | metric | treatment | users | mean | lift | 95% CI | p-value | note |",
             "|---|---|---|---:|---:|---:|---|---:|---|"]
    for split, metric, treatment, is_control, users, mean, lift, low, high, p_value, reason in analysis.results:
        ci = "–" if low is None else f"[{_percent(low)}, {_percent(high)}]"
        name = f"{treatment} (control)" if is_control else treatment
        note = "; ".join(filter(None, (reason, disagreement(low, high, p_value)))).replace("|", "\\|")
        lines.append(f"| {split} | {metric} | {name} | {users:,} | {_number(mean)} | {_percent(lift)} | {ci} | "
                     f"{_number(p_value, 3)} | {note} |")
    return "\n".join(lines)


def srm_markdown(analysis: Analysis) -> str:
    lines = ["| split | treatment | users | expected share | SRM p-value |", "|---|---|---:|---:|---:|"]
    for split, treatment, users, share, p_value in analysis.srm:
        flag = " ⚠" if p_value is not None and p_value < SRM_ALPHA else ""
        lines.append(f"| {split} | {treatment} | {users:,} | {share:.3f} | {_number(p_value, 3)}{flag} |")
    return "\n".join(lines)


def _summary_metadata(summary: ExperimentSummary) -> dict:
    return {
        "environment_id": summary.environment_id,
        "users": summary.users,
        "users_multiple_treatments": summary.users_multiple_treatments,
        "users_window_incomplete": summary.users_window_incomplete,
        "window_days": summary.experiment.window_days,
        "srm_p_value": summary.srm_p_value,
        "sum_values_missing": summary.missing_values,
        "sum_values_non_numeric": summary.non_numeric_values,
    }


def write_chart(directory: Path, split: str, png: bytes) -> Path:
    """Write the PNG atomically (temp name, then rename), so a reader never sees half a picture."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / chart_file_name(split)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)
    return path


def sample_ratio_result(analysis: Analysis, configured: set[str]) -> dg.AssetCheckResult:
    failures = analysis.srm_failures
    # A configured experiment with a mismatch is an error; a split nobody configured (a rollout compared against
    # equal shares, say) only warns.
    severity = dg.AssetCheckSeverity.ERROR if set(failures) & configured else dg.AssetCheckSeverity.WARN
    return dg.AssetCheckResult(
        check_name=SAMPLE_RATIO_CHECK,
        passed=not failures,
        severity=severity,
        description=(f"sample ratio mismatch in {', '.join(sorted(failures))}" if failures
                     else f"users per treatment match the expected shares in {len(analysis.srm_by_split)} split(s)"),
        metadata={
            "splits_checked": len([p for p in analysis.srm_by_split.values() if p is not None]),
            "splits_failing": dict(sorted(failures.items())),
            "srm_p_values": dict(sorted(analysis.srm_by_split.items())),
            "splits_not_checked": analysis.srm_skipped,
            "threshold": SRM_ALPHA,
            "users_per_treatment": dg.MetadataValue.md(srm_markdown(analysis)),
        },
    )


def _import_statistics_and_chart(chart: bool) -> None:
    # Kept out of module import (every Dagster process loads the code location), needed only after the analysis:
    # the sample-ratio test always, the chart when experiments are configured.
    import scipy.special  # noqa: F401

    if chart:
        import matplotlib.figure  # noqa: F401


@dg.asset(
    deps=[mixpanel_events, split_impressions],
    pool="experiments",
    group_name="analytics",
    kinds={"duckdb", "python"},
    tags={"mixsync/source": "warehouse"},
    metadata=table_name("analytics.experiment_results"),
    check_specs=[dg.AssetCheckSpec(
        SAMPLE_RATIO_CHECK, asset="experiment_results",
        description=f"Users per treatment of each split match its expected shares (chi-square p >= {SRM_ALPHA}).")],
    description="Split exposures joined to the Mixpanel events in each user's window, compared per treatment "
                "against control: analytics.experiment_exposures, analytics.experiment_results, "
                "analytics.experiment_srm, and a chart per experiment (MIXSYNC_EXPERIMENTS_FILE).",
)
def experiment_results(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                       experiments: ExperimentsResource) -> dg.MaterializeResult:
    started = time.monotonic()
    try:
        settings = experiments.settings()
    except (SettingsError, ExperimentsFileError) as exc:
        raise dg.Failure(str(exc)) from None
    store = warehouse.warehouse()
    # The statistics' and the chart's libraries (about a second of import) load while DuckDB computes.
    threading.Thread(target=_import_statistics_and_chart, args=(bool(settings.experiments),),
                     name="experiments-imports", daemon=True).start()
    try:
        with store.write() as con:
            analysis = analyse(con, settings.experiments)
            table = table_metadata(con, "analytics.experiment_results")
    except ExperimentDataError as exc:
        raise dg.Failure(f"{settings.source}: {exc}" if settings.source else str(exc)) from None
    for split in analysis.not_started:
        context.log.warning(f"split {split} is configured but has no impressions in split.impressions yet")
    for split, p_value in analysis.srm_failures.items():
        context.log.warning(f"{split}: sample ratio mismatch (p = {p_value:.2g}); see analytics.experiment_srm")
    # Beside the DuckDB file, or (a lake has no local file) beside the landing folder.
    local_dir = store.path.parent if isinstance(store, Warehouse) else warehouse.settings().landing_dir.parent
    chart_dir = settings.chart_dir or local_dir / "experiment_charts"
    metadata: dict[str, Any] = {}
    for summary in analysis.summaries:
        rows = [r for r in analysis.results if r[0] == summary.experiment.split]
        png = render_chart(summary, rows)
        path = write_chart(chart_dir, summary.experiment.split, png)
        # A data: URI image inside markdown: Dagster's UI renders it on the materialization (its markdown
        # sanitizer allows the data protocol for img src); the path points at the same PNG on disk.
        image = base64.b64encode(png).decode()
        metadata[f"chart {summary.experiment.split}"] = dg.MetadataValue.md(
            f"![{summary.experiment.split}](data:image/png;base64,{image})")
        metadata[f"chart_path {summary.experiment.split}"] = dg.MetadataValue.path(str(path))
        metadata[f"summary {summary.experiment.split}"] = _summary_metadata(summary)
    return dg.MaterializeResult(
        metadata={
            **table,
            "experiments": len(analysis.summaries),
            "experiments_file": settings.source or "(not set: exposures and sample ratios only)",
            "exposures": sum(e.users for e in analysis.exposures),
            "users_multiple_treatments": sum(e.users_multiple_treatments for e in analysis.exposures),
            "splits": len({e.split for e in analysis.exposures}),
            "splits_not_started": analysis.not_started,
            "duration_seconds": round(time.monotonic() - started, 3),
            "results": dg.MetadataValue.md(results_markdown(analysis) if analysis.results
                                           else "No configured experiment has results yet."),
            "sample_ratios": dg.MetadataValue.md(srm_markdown(analysis)),
            **metadata,
        },
        check_results=[sample_ratio_result(analysis, {e.split for e in settings.experiments})],
    )
