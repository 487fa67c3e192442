"""One analysis pass over the warehouse: exposures, per-treatment statistics, comparisons and sample-ratio tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

from mixsync.experiments import sql
from mixsync.experiments.settings import Experiment, Metric
from mixsync.experiments.stats import SRM_ALPHA, Arm, compare, conversion_arm, sample_ratio_p_value


@dataclass
class ExperimentSummary:
    """What a person needs next to the numbers of one configured experiment."""

    experiment: Experiment
    environment_id: str | None
    users: dict[str, int] = field(default_factory=dict)          # per treatment, single-treatment users
    users_multiple_treatments: int = 0
    users_window_incomplete: int = 0
    srm_p_value: float | None = None
    missing_values: dict[str, int] = field(default_factory=dict)     # sum metric -> events without the property
    non_numeric_values: dict[str, int] = field(default_factory=dict)  # sum metric -> events with a non-number

    @property
    def srm_failed(self) -> bool:
        return self.srm_p_value is not None and self.srm_p_value < SRM_ALPHA


@dataclass
class Analysis:
    exposures: list[sql.SplitExposures] = field(default_factory=list)
    summaries: list[ExperimentSummary] = field(default_factory=list)
    results: list[tuple] = field(default_factory=list)   # rows of analytics.experiment_results
    srm: list[tuple] = field(default_factory=list)       # rows of analytics.experiment_srm
    srm_by_split: dict[str, float | None] = field(default_factory=dict)
    srm_skipped: dict[str, str] = field(default_factory=dict)
    not_started: list[str] = field(default_factory=list)  # configured splits without impressions

    @property
    def srm_failures(self) -> dict[str, float]:
        return {s: p for s, p in self.srm_by_split.items() if p is not None and p < SRM_ALPHA}


def srm_warning(p_value: float) -> str:
    return (f"sample ratio mismatch (p = {p_value:.2g} < {SRM_ALPHA}): users per treatment differ from the expected "
            "split, so the groups may not be comparable; find the cause before trusting this comparison")


def _sample_ratios(analysis: Analysis, experiments: dict[str, Experiment],
                   users: dict[tuple[str, str], dict[str, int]]) -> None:
    environments_per_split: dict[str, int] = {}
    for split, _ in users:
        environments_per_split[split] = environments_per_split.get(split, 0) + 1
    for (split, _environment_id), counts in users.items():
        if environments_per_split[split] > 1:
            analysis.srm_skipped[split] = (f"impressions from {environments_per_split[split]} environments; configure "
                                           "the split with an environment_id in MIXSYNC_EXPERIMENTS_FILE to check it")
            continue
        experiment = experiments.get(split)
        if experiment is not None and experiment.weights is not None:
            shares = dict(experiment.weights)
            shares.update({t: 0.0 for t in counts if t not in shares})
        else:
            shares = {t: 1 / len(counts) for t in counts}
        treatments = sorted(shares)
        p_value = sample_ratio_p_value([counts.get(t, 0) for t in treatments], [shares[t] for t in treatments])
        analysis.srm_by_split[split] = p_value
        analysis.srm.extend((split, t, counts.get(t, 0), shares[t], p_value) for t in treatments)


def _compare_experiment(analysis: Analysis, experiment: Experiment, stats: list[sql.TreatmentStats],
                        summary: ExperimentSummary) -> None:
    by_treatment = {s.treatment: s for s in stats}
    control = by_treatment.get(experiment.control)
    warning = srm_warning(summary.srm_p_value) if summary.srm_failed and summary.srm_p_value is not None else None
    ordered = ([control] if control else []) + [s for s in stats if s.treatment != experiment.control]
    for metric in experiment.metrics:
        def arm(s: sql.TreatmentStats, metric: Metric = metric) -> Arm:
            mean = s.means[metric.name] or 0.0
            if metric.type == "conversion":
                return conversion_arm(s.users, mean)
            return Arm(s.users, mean, s.variances[metric.name])

        for s in ordered:
            mean = s.means[metric.name]
            if s is control:
                analysis.results.append((experiment.split, metric.name, s.treatment, True, s.users, mean,
                                         None, None, None, None, warning))
                continue
            if control is None:
                reasons = [f"no users exposed to the control {experiment.control!r}"]
                lift = low = high = p_value = None
            else:
                comparison = compare(arm(s), arm(control))
                lift, low, high, p_value = comparison.lift, comparison.ci_low, comparison.ci_high, comparison.p_value
                reasons = [comparison.reason] if comparison.reason else []
            if warning:
                reasons.append(warning)
            analysis.results.append((experiment.split, metric.name, s.treatment, False, s.users, mean, lift, low,
                                     high, p_value, "; ".join(reasons) or None))


def analyse(con: duckdb.DuckDBPyConnection, experiments: tuple[Experiment, ...]) -> Analysis:
    """Recompute exposures, results and sample ratios into the analytics tables, in one transaction on `con` (which
    must not be in one: the analysis reads in its own statements first).

    Raises sql.ExperimentDataError (nothing written) when a configured split's environment is ambiguous or absent."""
    analysis = Analysis()
    envs = sql.environments(con, [e.split for e in experiments])
    environment_by_split = sql.resolve_environments(experiments, envs)
    analysis.not_started = [e.split for e in experiments if e.split not in envs]
    configured = {e.split: e for e in experiments}
    try:
        # Everything is computed into temporary tables and Python first, and the analytics tables are replaced
        # in one short transaction at the end. (Mixpanel events and impressions are not written meanwhile: a
        # DuckDB file has one writer, whose lock this connection holds.)
        sql.prepare_exposures(con, environment_by_split)
        analysis.exposures = sql.exposure_counts(con)
        users = sql.users_per_treatment(con)
        multiple = {(e.split, e.environment_id): e.users_multiple_treatments for e in analysis.exposures}
        loaded_until_us = sql.loaded_until_us(con)
        stats_by_split = {e.split: sql.metric_statistics(con, e, environment_by_split[e.split], loaded_until_us)
                          for e in experiments if e.split in environment_by_split}
        # After the metric queries: the sample-ratio test needs scipy, which the asset imports meanwhile.
        _sample_ratios(analysis, configured, users)
        for experiment in experiments:
            environment_id = environment_by_split.get(experiment.split)
            if environment_id is None:
                continue
            stats = stats_by_split[experiment.split]
            summary = ExperimentSummary(experiment, environment_id,
                                        users=users.get((experiment.split, environment_id), {}),
                                        users_multiple_treatments=multiple.get((experiment.split, environment_id), 0),
                                        srm_p_value=analysis.srm_by_split.get(experiment.split),
                                        users_window_incomplete=sum(s.window_incomplete for s in stats))
            for s in stats:
                for name, n in s.missing_values.items():
                    summary.missing_values[name] = summary.missing_values.get(name, 0) + n
                for name, n in s.non_numeric_values.items():
                    summary.non_numeric_values[name] = summary.non_numeric_values.get(name, 0) + n
            _compare_experiment(analysis, experiment, stats, summary)
            analysis.summaries.append(summary)
        con.execute("BEGIN TRANSACTION")
        try:
            sql.write_exposures(con)
            sql.replace_results(con, analysis.results, analysis.srm)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        sql.drop_work(con)
    return analysis
