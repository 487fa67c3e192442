"""The experiments flow's SQL: exposures from split.impressions, per-user metric values over mixpanel.events, and the
per-treatment sufficient statistics; every bulk step runs in DuckDB, Python receives a few rows per treatment."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import duckdb

# The tables this flow reads: importing their SQL modules registers them before ours.
import mixsync.impressions.sql
import mixsync.mixpanel.sql  # noqa: F401
from mixsync.experiments.settings import Experiment, Metric
from mixsync.warehouse.schema import register_ddl

DDL = """
-- Each key's first impression of a split (in the configured environment); keys that saw more than one treatment
-- of the split are left out (counted as users_multiple_treatments in the materialization's metadata).
CREATE TABLE IF NOT EXISTS analytics.experiment_exposures (
    split VARCHAR NOT NULL,
    environment_id VARCHAR NOT NULL,
    key VARCHAR NOT NULL,                -- the Split key; Mixpanel's distinct_id
    treatment VARCHAR NOT NULL,
    first_exposed_at TIMESTAMPTZ NOT NULL
);
-- One row per configured split, metric and treatment; the control's row holds its users and mean only.
CREATE TABLE IF NOT EXISTS analytics.experiment_results (
    split VARCHAR NOT NULL,
    metric VARCHAR NOT NULL,
    treatment VARCHAR NOT NULL,
    is_control BOOLEAN NOT NULL,
    users BIGINT NOT NULL,
    mean DOUBLE,
    lift DOUBLE,                         -- (mean - control mean) / control mean
    ci_low DOUBLE,                       -- 95% confidence interval of the lift
    ci_high DOUBLE,
    p_value DOUBLE,                      -- Welch's two-sided t test of the difference of means
    reason VARCHAR                       -- why a number is null, or a warning about the comparison
);
CREATE TABLE IF NOT EXISTS analytics.experiment_srm (
    split VARCHAR NOT NULL,
    treatment VARCHAR NOT NULL,
    users BIGINT NOT NULL,
    expected_share DOUBLE NOT NULL,
    srm_p_value DOUBLE                   -- chi-square goodness of fit of users per treatment; null with < 2 treatments
);
"""


register_ddl("analytics.experiments", DDL)


class ExperimentDataError(ValueError):
    """The data cannot be analysed as configured (for example: which environment is meant is ambiguous)."""


@dataclass(frozen=True)
class SplitExposures:
    split: str
    environment_id: str
    users: int                           # keys exposed to exactly one treatment
    users_multiple_treatments: int


@dataclass
class TreatmentStats:
    """Sufficient statistics of one treatment: users, and per metric the mean and sample variance."""

    treatment: str
    users: int
    means: dict[str, float | None] = field(default_factory=dict)
    variances: dict[str, float | None] = field(default_factory=dict)
    missing_values: dict[str, int] = field(default_factory=dict)       # sum metrics: events without the property
    non_numeric_values: dict[str, int] = field(default_factory=dict)   # sum metrics: events where it is not a number
    window_incomplete: int = 0                                           # users whose window is not loaded to its end


def _insert_columns(con: duckdb.DuckDBPyConnection, table: str, columns: list[list]) -> None:
    """Insert rows given column by column, in one statement."""
    if not columns or not columns[0]:
        return
    names = [f"c{i}" for i in range(len(columns))]
    con.execute(f"INSERT INTO {table} SELECT {', '.join(f'unnest(${n})' for n in names)}", dict(zip(names, columns, strict=False)))


def environments(con: duckdb.DuckDBPyConnection, splits: list[str]) -> dict[str, list[tuple[str, str | None, int]]]:
    """For each of `splits` with impressions: its environments (id, name, impressions), most impressions first."""
    if not splits:
        return {}
    rows = con.execute("""SELECT split, environment_id, any_value(environment_name), count(*) AS impressions
                          FROM split.impressions WHERE split IN (SELECT unnest($splits))
                          GROUP BY ALL ORDER BY split, impressions DESC, environment_id""", {"splits": splits}).fetchall()
    out: dict[str, list[tuple[str, str | None, int]]] = {}
    for split, environment_id, name, impressions in rows:
        out.setdefault(split, []).append((environment_id, name, impressions))
    return out


def _describe(envs: list[tuple[str, str | None, int]]) -> str:
    return ", ".join(f"{eid!r}" + (f" ({name})" if name else "") + f" with {n} impressions" for eid, name, n in envs)


def resolve_environments(experiments: tuple[Experiment, ...], envs: dict[str, list[tuple[str, str | None, int]]]
                         ) -> dict[str, str]:
    """The environment each configured split with impressions is analysed in. Raises ExperimentDataError when a
    split has impressions from several environments and none is configured, or the configured one has none."""
    chosen: dict[str, str] = {}
    for experiment in experiments:
        found = envs.get(experiment.split)
        if not found:
            continue
        ids = [eid for eid, _, _ in found]
        if experiment.environment_id is None:
            if len(ids) > 1:
                raise ExperimentDataError(
                    f"split {experiment.split} (experiments file, line {experiment.line}) has impressions from "
                    f"{len(ids)} environments: {_describe(found)}. Set environment_id to one of them.")
            chosen[experiment.split] = ids[0]
        elif experiment.environment_id not in ids:
            raise ExperimentDataError(
                f"split {experiment.split} (experiments file, line {experiment.line}): environment_id "
                f"{experiment.environment_id!r} has no impressions; the split's environments are {_describe(found)}")
        else:
            chosen[experiment.split] = experiment.environment_id
    return chosen


def prepare_exposures(con: duckdb.DuckDBPyConnection, environment_by_split: dict[str, str]) -> None:
    """Compute every split's first exposures (configured splits: in their one environment; others: per environment)
    into the temporary table experiment_first_impressions, which the analysis reads and writes next (drop_work drops
    it): per split, environment and key, the first impression's treatment and time, and whether the key saw one
    treatment only."""
    con.execute("CREATE OR REPLACE TEMP TABLE experiment_environment (split VARCHAR, environment_id VARCHAR)")
    _insert_columns(con, "experiment_environment", [list(environment_by_split), list(environment_by_split.values())])
    # arg_min picks the first impression's treatment; a key with two treatments at the same instant has
    # min <> max and is left out anyway. (min = max is a much cheaper test than count(DISTINCT treatment) = 1.)
    con.execute("""CREATE OR REPLACE TEMP TABLE experiment_first_impressions AS
        SELECT i.split, i.environment_id, i.key, arg_min(i.treatment, i.time) AS treatment,
               min(i.time) AS first_exposed_at, min(i.treatment) = max(i.treatment) AS one_treatment
        FROM split.impressions i LEFT JOIN experiment_environment c ON c.split = i.split
        WHERE c.environment_id IS NULL OR c.environment_id = i.environment_id
        GROUP BY i.split, i.environment_id, i.key""")
    con.execute("DROP TABLE experiment_environment")


def exposure_counts(con: duckdb.DuckDBPyConnection) -> list[SplitExposures]:
    """The users and excluded users per split and environment (after prepare_exposures)."""
    rows = con.execute("""SELECT split, environment_id, count(*) FILTER (WHERE one_treatment),
                                 count(*) FILTER (WHERE NOT one_treatment)
                          FROM experiment_first_impressions GROUP BY ALL ORDER BY ALL""").fetchall()
    return [SplitExposures(*row) for row in rows]


def write_exposures(con: duckdb.DuckDBPyConnection) -> None:
    """Replace analytics.experiment_exposures with the single-treatment first exposures (after prepare_exposures)."""
    con.execute("DELETE FROM analytics.experiment_exposures")
    con.execute("""INSERT INTO analytics.experiment_exposures
                   SELECT split, environment_id, key, treatment, first_exposed_at
                   FROM experiment_first_impressions WHERE one_treatment""")


def drop_work(con: duckdb.DuckDBPyConnection) -> None:
    """Drop the temporary tables of one analysis."""
    con.execute("""DROP TABLE IF EXISTS experiment_environment; DROP TABLE IF EXISTS experiment_first_impressions;
                   DROP TABLE IF EXISTS experiment_exposed""")


def users_per_treatment(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], dict[str, int]]:
    """(split, environment_id) -> treatment -> users (single-treatment keys; after prepare_exposures)."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for split, environment_id, treatment, users in con.execute(
            """SELECT split, environment_id, treatment, count(*) FROM experiment_first_impressions
               WHERE one_treatment GROUP BY ALL ORDER BY ALL""").fetchall():
        out.setdefault((split, environment_id), {})[treatment] = users
    return out


def json_pointer(name: str) -> str:
    """A top-level property name as a JSON pointer (RFC 6901), so any character in the name is safe."""
    return "/" + name.replace("~", "~0").replace("/", "~1")


# Users whose window ends after the last loaded day ($loaded_until_us; NULL when no day is loaded: all of them).
WINDOW_INCOMPLETE = ("count(*) FILTER (WHERE coalesce(x.first_exposed_us + $window_us > $loaded_until_us, true)) "
                     "AS window_incomplete")


def metric_events(metrics: tuple[Metric, ...]) -> list[str]:
    """The distinct events an experiment's metrics read, in the order of the $event_j parameters."""
    return sorted({m.event for m in metrics})


def metric_statistics_sql(metrics: tuple[Metric, ...]) -> str:
    """The query of one experiment's per-treatment statistics over the temporary table experiment_exposed (see
    metric_statistics). Parameters: $window_us, $loaded_until_us, $from, $until, $event_j per distinct event
    (metric_events), and $pointer_i per sum metric i."""
    if not metrics:
        return f"SELECT treatment, count(*) AS users, {WINDOW_INCOMPLETE} FROM experiment_exposed x GROUP BY treatment"
    events = metric_events(metrics)
    single = len(events) == 1          # then every scanned event is the metrics' event: no per-event filter
    columns, numbers, per_user, finals, outer = [], [], [], [], []
    if not single:
        columns += [f"e.event = $event_{j} AS is{j}" for j in range(len(events))]
    # One count per event, shared by the conversion and count metrics of that event.
    counted = sorted({events.index(m.event) for m in metrics if m.type != "sum"})
    per_user += [f"count(*){'' if single else f' FILTER (WHERE is{j})'} AS n{j}" for j in counted]
    for i, metric in enumerate(metrics):
        j = events.index(metric.event)
        if metric.type == "conversion":
            value = f"(coalesce(h.n{j}, 0) > 0)::INTEGER"
        elif metric.type == "count":
            value = f"coalesce(h.n{j}, 0)"
        else:
            # The property is read and converted once per matching event, before the join carries the row along.
            read = f"json_extract_string(e.properties, $pointer_{i})"
            columns.append(f"{read} AS raw{i}" if single else f"CASE WHEN e.event = $event_{j} THEN {read} END AS raw{i}")
            numbers.append(f"TRY_CAST(raw{i} AS DOUBLE) AS number{i}")
            of_event = "" if single else f"is{j} AND "
            per_user.append(f"sum(number{i}) FILTER (WHERE isfinite(number{i})) AS s{i}")
            per_user.append(f"count(*) FILTER (WHERE {of_event}raw{i} IS NULL) AS missing{i}")
            per_user.append(f"count(*) FILTER (WHERE raw{i} IS NOT NULL AND NOT coalesce(isfinite(number{i}), false))"
                            f" AS non_numeric{i}")
            outer.append(f"coalesce(sum(h.missing{i}), 0) AS missing{i}, coalesce(sum(h.non_numeric{i}), 0) AS non_numeric{i}")
            value = f"coalesce(h.s{i}, 0)"
        finals.append(f"avg({value}) AS mean{i}, var_samp({value}) AS variance{i}")
    # The window test is one subtraction of microseconds (the warehouse's time zone is UTC, so a day is 86,400 s):
    # timestamp-plus-interval per joined event, or the window as join conditions, measured twice as slow.
    return f"""
        WITH events AS (
            SELECT *{''.join(', ' + n for n in numbers)}
            FROM (SELECT e.distinct_id, epoch_us(e.time) AS time_us{''.join(', ' + c for c in columns)}
                  FROM mixpanel.events e
                  WHERE e.event IN ({', '.join(f'$event_{j}' for j in range(len(events)))})
                    AND e.time >= $from AND e.time < $until)),
        hits AS (
            SELECT x.user_number, {', '.join(per_user)}
            FROM events e JOIN experiment_exposed x ON e.distinct_id = x.key
            WHERE e.time_us - x.first_exposed_us BETWEEN 0 AND $window_us - 1
            GROUP BY x.user_number)
        SELECT x.treatment, count(*) AS users, {WINDOW_INCOMPLETE}, {', '.join(finals + outer)}
        FROM experiment_exposed x LEFT JOIN hits h ON h.user_number = x.user_number
        GROUP BY x.treatment"""


def metric_statistics_params(experiment: Experiment, first_exposed_from: dt.datetime, first_exposed_until: dt.datetime,
                             loaded_until_us: int | None) -> dict[str, object]:
    """The parameters of metric_statistics_sql for `experiment`, whose users were first exposed in the given range."""
    params: dict[str, object] = {"window_us": experiment.window_days * 86_400_000_000,
                                 "loaded_until_us": loaded_until_us}
    if not experiment.metrics:
        return params
    params.update({"from": first_exposed_from,
                   "until": first_exposed_until + dt.timedelta(days=experiment.window_days)})
    params.update({f"event_{j}": event for j, event in enumerate(metric_events(experiment.metrics))})
    for i, metric in enumerate(experiment.metrics):
        if metric.type == "sum":
            params[f"pointer_{i}"] = json_pointer(metric.property or "")
    return params


def metric_statistics(con: duckdb.DuckDBPyConnection, experiment: Experiment, environment_id: str,
                      loaded_until_us: int | None) -> list[TreatmentStats]:
    """Each treatment's users and, per metric, the mean and sample variance of the per-user values; and its users
    whose window ends after `loaded_until_us` (see loaded_until_us). Reads experiment_first_impressions
    (prepare_exposures)."""
    # The experiment's exposed users, numbered: the join and the per-user grouping then hash an integer, and the
    # planner sees how many there are (from a CTE it misjudged the sides of the join).
    con.execute("""CREATE OR REPLACE TEMP TABLE experiment_exposed AS
                   SELECT row_number() OVER () AS user_number, key, treatment, epoch_us(first_exposed_at) AS first_exposed_us
                   FROM experiment_first_impressions
                   WHERE split = $split AND environment_id = $environment_id AND one_treatment""",
                {"split": experiment.split, "environment_id": environment_id})
    try:
        return _metric_statistics(con, experiment, loaded_until_us)
    finally:
        con.execute("DROP TABLE IF EXISTS experiment_exposed")


def _metric_statistics(con: duckdb.DuckDBPyConnection, experiment: Experiment, loaded_until_us: int | None
                       ) -> list[TreatmentStats]:
    users, first, last = con.execute("""SELECT count(*), make_timestamptz(min(first_exposed_us)),
                                               make_timestamptz(max(first_exposed_us)) FROM experiment_exposed""").fetchone()
    if not users:
        return []
    params = metric_statistics_params(experiment, first, last, loaded_until_us)
    cursor = con.execute(metric_statistics_sql(experiment.metrics), params)
    columns = [d[0] for d in cursor.description]
    rows = cursor.fetchall()
    out = []
    for row in rows:
        values = dict(zip(columns, row, strict=False))
        stats = TreatmentStats(values["treatment"], values["users"], window_incomplete=values["window_incomplete"])
        for i, metric in enumerate(experiment.metrics):
            stats.means[metric.name] = values[f"mean{i}"]
            stats.variances[metric.name] = values[f"variance{i}"]
            if metric.type == "sum":
                stats.missing_values[metric.name] = int(values[f"missing{i}"])
                stats.non_numeric_values[metric.name] = int(values[f"non_numeric{i}"])
        out.append(stats)
    return sorted(out, key=lambda s: s.treatment)


def loaded_until_us(con: duckdb.DuckDBPyConnection) -> int | None:
    """The end of the last day loaded into mixpanel.events, in epoch microseconds (a user's window ending later may
    still gain events); None when no day is loaded. (The warehouse's time zone is UTC: a day ends at midnight UTC.)"""
    return con.execute("SELECT epoch_us((max(day) + 1)::TIMESTAMPTZ) FROM mixpanel.event_loads").fetchone()[0]


def replace_results(con: duckdb.DuckDBPyConnection, results: list[tuple], srm: list[tuple]) -> None:
    """Replace analytics.experiment_results and analytics.experiment_srm with these rows (in the caller's transaction)."""
    con.execute("DELETE FROM analytics.experiment_results")
    con.execute("DELETE FROM analytics.experiment_srm")
    if results:
        _insert_columns(con, "analytics.experiment_results", [list(c) for c in zip(*results, strict=False)])
    if srm:
        _insert_columns(con, "analytics.experiment_srm", [list(c) for c in zip(*srm, strict=False)])
