"""experiment_results: definitions on hand-made data, statistics against scipy, sample ratios, a real materialization."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pytest
from experiments_data import T0, load, write_experiments
from scipy import stats as scipy_stats

from mixsync.experiments.analysis import analyse
from mixsync.experiments.assets import experiment_results
from mixsync.experiments.settings import ExperimentsFileError, parse_experiments
from mixsync.experiments.stats import Arm, compare, sample_ratio_p_value
from mixsync.warehouse import Warehouse

H = dt.timedelta(hours=1)
D = dt.timedelta(days=1)
S = dt.timedelta(seconds=1)


@pytest.fixture
def warehouse(tmp_path, monkeypatch) -> Warehouse:
    """A fresh DuckDB file; this flow reads only the warehouse, so no sandbox is started."""
    monkeypatch.setenv("MIXSYNC_DUCKDB_PATH", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("MIXSYNC_LANDING_DIR", str(tmp_path / "landing"))
    monkeypatch.delenv("MIXSYNC_EXPERIMENTS_CHART_DIR", raising=False)
    return Warehouse(tmp_path / "warehouse.duckdb", lock_timeout_seconds=60)

CHECKOUT = """experiments:
  - split: checkout
    environment_id: prod
    control: off
    window_days: 2
    metrics:
      - {name: purchased, event: Purchase, type: conversion}
      - {name: purchases, event: Purchase, type: count}
      - {name: revenue, event: Purchase, type: sum, property: amount}
"""


def _known_answer_data(store) -> None:
    impressions = [
        ("prod", "checkout", "c1", "off", T0), ("prod", "checkout", "c1", "off", T0 + 3 * H),
        ("prod", "checkout", "c2", "off", T0 + 5 * H), ("prod", "checkout", "c2", "off", T0 + H),
        ("prod", "checkout", "c3", "off", T0 + 2 * H),
        ("prod", "checkout", "t1", "on", T0), ("prod", "checkout", "t2", "on", T0),
        ("prod", "checkout", "m1", "on", T0), ("prod", "checkout", "m1", "off", T0 + H),   # saw both: excluded
        ("staging", "checkout", "s1", "on", T0),                                           # other environment
    ]
    events = [
        ("Purchase", "c1", T0 - S, {"amount": 1}),                 # before exposure
        ("Purchase", "c1", T0, {"amount": 10}),                    # at exposure: counts
        ("Purchase", "c1", T0 + H, {"amount": "abc"}),             # counts; its amount is not a number
        ("Purchase", "c1", T0 + 2 * D - S, {"amount": "5"}),       # last second of the window; a numeric string
        ("Purchase", "c1", T0 + 2 * D, {"amount": 100}),           # window end: excluded
        ("Viewed Page", "c1", T0 + H, {"amount": 7}),              # another event
        ("Purchase", "c2", T0 + H / 2, {"amount": 7}),             # before c2's FIRST impression (T0 + 1h)
        ("Purchase", "c2", T0 + 2 * H, {}),                        # no amount
        ("Purchase", "t1", T0 + D, {"amount": 20}),
        ("Purchase", "t1", T0 + D + H, {"amount": 30.0}),
        ("Purchase", "m1", T0 + 2 * H, {"amount": 1000}),          # excluded user
        ("Purchase", "s1", T0 + 2 * H, {"amount": 1000}),          # other environment
    ]
    load(store, impressions, events)


def test_definitions_on_hand_made_data(warehouse):
    _known_answer_data(warehouse)
    with warehouse.write() as con:
        analysis = analyse(con, parse_experiments(CHECKOUT))
        exposures = con.execute("""SELECT key, treatment, first_exposed_at, environment_id
                                   FROM analytics.experiment_exposures WHERE split = 'checkout' ORDER BY key""").fetchall()
        results = {(m, t): (c, n, mean) for m, t, c, n, mean in con.execute(
            "SELECT metric, treatment, is_control, users, mean FROM analytics.experiment_results").fetchall()}
    assert exposures == [("c1", "off", T0, "prod"), ("c2", "off", T0 + H, "prod"), ("c3", "off", T0 + 2 * H, "prod"),
                         ("t1", "on", T0, "prod"), ("t2", "on", T0, "prod")]
    assert results == {
        ("purchased", "off"): (True, 3, pytest.approx(2 / 3)), ("purchased", "on"): (False, 2, 0.5),
        ("purchases", "off"): (True, 3, pytest.approx(4 / 3)), ("purchases", "on"): (False, 2, 1.0),
        ("revenue", "off"): (True, 3, 5.0), ("revenue", "on"): (False, 2, 25.0),
    }
    [summary] = analysis.summaries
    assert summary.users_multiple_treatments == 1
    assert summary.non_numeric_values == {"revenue": 1} and summary.missing_values == {"revenue": 1}


def _random_experiment(store, seed: int = 5):
    """Per-user purchase counts and amounts drawn at random; returns the per-user arrays the warehouse should see."""
    rng = np.random.default_rng(seed)
    impressions, events, per_user = [], [], {"off": ([], []), "on": ([], [])}
    for treatment, users, rate in (("off", 400, 0.35), ("on", 380, 0.5)):
        for n in range(users):
            key = f"{treatment}-{n}"
            impressions.append(("prod", "checkout", key, treatment, T0))
            k = int(rng.poisson(rate))
            amounts = [round(float(rng.uniform(1, 100)), 2) for _ in range(k)]
            events += [("Purchase", key, T0 + (i + 1) * H, {"amount": a}) for i, a in enumerate(amounts)]
            per_user[treatment][0].append(k)
            per_user[treatment][1].append(sum(amounts))
    load(store, impressions, events)
    return {t: (np.array(c, dtype=float), np.array(r)) for t, (c, r) in per_user.items()}


def _delta_method(t: np.ndarray, c: np.ndarray, vt: float, vc: float):
    """The relative lift's 95% interval by the delta method, written out directly, with Welch's degrees of freedom."""
    nt, nc, mt, mc = len(t), len(c), t.mean(), c.mean()
    var = vt / (nt * mc ** 2) + vc * mt ** 2 / (nc * mc ** 4)
    a, b = vt / nt, vc / nc
    df = (a + b) ** 2 / (a ** 2 / (nt - 1) + b ** 2 / (nc - 1))
    q = scipy_stats.t.ppf(0.975, df)
    lift = mt / mc - 1
    return lift, lift - q * math.sqrt(var), lift + q * math.sqrt(var)


def test_statistics_match_scipy_and_the_delta_method(warehouse):
    arrays = _random_experiment(warehouse)
    with warehouse.write() as con:
        analyse(con, parse_experiments(CHECKOUT))
        rows = {m: (lift, low, high, p) for m, lift, low, high, p in con.execute(
            """SELECT metric, lift, ci_low, ci_high, p_value FROM analytics.experiment_results
               WHERE treatment = 'on'""").fetchall()}
    (tc, tr), (cc, cr) = arrays["on"], arrays["off"]
    for metric, t, c in (("purchases", tc, cc), ("revenue", tr, cr)):
        lift, low, high, p_value = rows[metric]
        assert p_value == pytest.approx(scipy_stats.ttest_ind(t, c, equal_var=False).pvalue, rel=1e-9)
        assert (lift, low, high) == pytest.approx(_delta_method(t, c, t.var(ddof=1), c.var(ddof=1)), rel=1e-9)
    # Conversion: variance p(1 - p) of the 0/1 values.
    t, c = (tc > 0).astype(float), (cc > 0).astype(float)
    vt, vc = t.mean() * (1 - t.mean()), c.mean() * (1 - c.mean())
    lift, low, high, p_value = rows["purchased"]
    expected = scipy_stats.ttest_ind_from_stats(t.mean(), math.sqrt(vt), len(t), c.mean(), math.sqrt(vc), len(c),
                                                equal_var=False).pvalue
    assert p_value == pytest.approx(expected, rel=1e-9)
    assert (lift, low, high) == pytest.approx(_delta_method(t, c, vt, vc), rel=1e-9)


def test_undefined_statistics_are_null_with_a_reason():
    zero_control = compare(Arm(10, 0.3, 0.21), Arm(10, 0.0, 0.0))
    assert zero_control.lift is None and zero_control.ci_low is None and zero_control.p_value is not None
    assert "control mean is 0" in zero_control.reason
    flat = compare(Arm(10, 1.0, 0.0), Arm(12, 1.0, 0.0))
    assert (flat.lift, flat.p_value) == (None, None) and "zero variance" in flat.reason
    lonely = compare(Arm(1, 1.0, None), Arm(12, 1.0, 0.5))
    assert lonely.p_value is None and "fewer than 2 users" in lonely.reason


def test_sample_ratio_p_value_is_the_chi_square_goodness_of_fit():
    expected = scipy_stats.chisquare([520, 480], [500, 500]).pvalue
    assert sample_ratio_p_value([520, 480], [0.5, 0.5]) == pytest.approx(expected, rel=1e-12)
    expected = scipy_stats.chisquare([610, 190, 200], [600, 200, 200]).pvalue
    assert sample_ratio_p_value([610, 190, 200], [0.6, 0.2, 0.2]) == pytest.approx(expected, rel=1e-12)
    assert sample_ratio_p_value([10, 5], [1.0, 0.0]) == 0.0        # traffic where none was expected
    assert sample_ratio_p_value([10], [1.0]) is None


def _materialize(instance, raise_on_error: bool = False):
    from mixsync.definitions import resources
    from mixsync.experiments.resources import ExperimentsResource

    # Unbound fields: the resource reads MIXSYNC_EXPERIMENTS_* when the asset runs, as each test sets them (the
    # definitions' copy was bound to whatever was set when the first test imported them).
    return dg.materialize([experiment_results], instance=instance,
                          resources={**resources, "experiments": ExperimentsResource()}, raise_on_error=raise_on_error)


def _skewed_split(store, on: int, off: int) -> None:
    load(store, [("prod", "checkout", f"u{n}", "on" if n < on else "off", T0) for n in range(on + off)])


def test_a_skewed_split_fails_the_sample_ratio_check(warehouse, instance, tmp_path, monkeypatch):
    _skewed_split(warehouse, 600, 400)
    monkeypatch.setenv("MIXSYNC_EXPERIMENTS_FILE", write_experiments(tmp_path / "e.yaml", CHECKOUT))
    result = _materialize(instance, raise_on_error=True)
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "experiment_sample_ratio" and not check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR
    assert check.metadata["splits_failing"].value["checkout"] < 0.001
    with warehouse.read() as con:
        reasons = con.execute("SELECT DISTINCT reason FROM analytics.experiment_results WHERE NOT is_control").fetchall()
        srm = con.execute("SELECT treatment, users, expected_share FROM analytics.experiment_srm ORDER BY 1").fetchall()
    assert srm == [("off", 400, 0.5), ("on", 600, 0.5)]
    assert all("sample ratio mismatch" in r for (r,) in reasons)
    # The same counts are what a 60/40 design expects: the check passes.
    monkeypatch.setenv("MIXSYNC_EXPERIMENTS_FILE", write_experiments(
        tmp_path / "e.yaml", CHECKOUT.replace("control: off", 'control: off\n    weights: {"on": 60, "off": 40}')))
    [check] = _materialize(instance, raise_on_error=True).get_asset_check_evaluations()
    assert check.passed


def test_without_a_file_every_split_gets_exposures_and_a_sample_ratio(warehouse, instance, monkeypatch):
    monkeypatch.delenv("MIXSYNC_EXPERIMENTS_FILE", raising=False)
    _skewed_split(warehouse, 500, 500)
    load(warehouse, [("prod", "rollout", f"r{n}", "on" if n < 900 else "off", T0) for n in range(1000)])
    result = _materialize(instance, raise_on_error=True)
    [check] = result.get_asset_check_evaluations()
    # The unconfigured rollout (90/10 against equal shares) fails, but only as a warning.
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert set(check.metadata["srm_p_values"].value) == {"checkout", "rollout"}
    with warehouse.read() as con:
        assert con.execute("SELECT split, count(*) FROM analytics.experiment_exposures GROUP BY 1 ORDER BY 1"
                           ).fetchall() == [("checkout", 1000), ("rollout", 1000)]
        assert con.execute("SELECT count(*) FROM analytics.experiment_results").fetchone()[0] == 0


def test_a_split_in_several_environments_needs_environment_id(warehouse, instance, tmp_path, monkeypatch):
    _known_answer_data(warehouse)
    monkeypatch.setenv("MIXSYNC_EXPERIMENTS_FILE", write_experiments(tmp_path / "e.yaml", CHECKOUT))
    _materialize(instance, raise_on_error=True)
    with warehouse.read() as con:
        before = con.execute("SELECT * FROM analytics.experiment_results ORDER BY ALL").fetchall()
    assert before
    monkeypatch.setenv("MIXSYNC_EXPERIMENTS_FILE",
                       write_experiments(tmp_path / "e.yaml", CHECKOUT.replace("    environment_id: prod\n", "")))
    result = _materialize(instance)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert "has impressions from 2 environments" in message
    assert "'prod' (Env prod)" in message and "'staging' (Env staging)" in message
    assert "e.yaml" in message and "line 2" in message
    # A configured environment without impressions names the ones there are.
    monkeypatch.setenv("MIXSYNC_EXPERIMENTS_FILE", write_experiments(
        tmp_path / "e.yaml", CHECKOUT.replace("environment_id: prod", "environment_id: prdo")))
    result = _materialize(instance)
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "'prdo' has no impressions" in failure.step_failure_data.error.message
    assert "'prod'" in failure.step_failure_data.error.message
    # Failed runs leave the previous results in place.
    with warehouse.read() as con:
        assert con.execute("SELECT * FROM analytics.experiment_results ORDER BY ALL").fetchall() == before


def test_a_materialization_writes_tables_chart_and_markdown(warehouse, instance, tmp_path, monkeypatch):
    _random_experiment(warehouse)
    monkeypatch.setenv("MIXSYNC_EXPERIMENTS_FILE", write_experiments(tmp_path / "e.yaml", CHECKOUT))
    result = _materialize(instance, raise_on_error=True)
    metadata = result.asset_materializations_for_node("experiment_results")[0].metadata
    chart = metadata["chart checkout"].value
    assert chart.startswith("![checkout](data:image/png;base64,iVBORw0KGgo")   # base64 of the PNG signature
    path = Path(metadata["chart_path checkout"].value)
    assert path.parent == Path(warehouse.path).parent / "experiment_charts"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = metadata["results"].value
    assert "| checkout | purchases | on |" in table and "off (control)" in table
    assert metadata["dagster/row_count"].value == 6
    with warehouse.read() as con:
        first = con.execute("SELECT * FROM analytics.experiment_results ORDER BY ALL").fetchall()
    # Re-runnable: a second run replaces the tables with the same rows (DuckDB sums in parallel, so a mean or a
    # variance may differ in its last bits).
    _materialize(instance, raise_on_error=True)
    with warehouse.read() as con:
        again = con.execute("SELECT * FROM analytics.experiment_results ORDER BY ALL").fetchall()
        assert con.execute("SELECT count(*) FROM analytics.experiment_exposures").fetchone()[0] == 780
    for row, before in zip(again, first, strict=True):
        assert row[:5] == before[:5] and row[10] == before[10]
        assert [v is None for v in row[5:10]] == [v is None for v in before[5:10]]
        assert [v for v in row[5:10] if v is not None] == pytest.approx(
            [v for v in before[5:10] if v is not None], rel=1e-9)


def test_a_bad_experiments_file_fails_the_run_naming_file_and_line(warehouse, instance, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSYNC_EXPERIMENTS_FILE",
                       write_experiments(tmp_path / "bad.yaml", CHECKOUT.replace("type: count", "type: counts")))
    result = _materialize(instance)
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert f"{tmp_path / 'bad.yaml'}, line 8: type of metric purchases is 'counts'" in failure.step_failure_data.error.message
    assert not Path(warehouse.path).exists()   # failed before opening the warehouse: nothing written


@pytest.mark.parametrize("text, error", [
    ("experiments:\n  - split: a\n", "line 2: an experiment needs 'control'"),
    ("experiments:\n  - split: a\n    control: off\n    colour: red\n", "line 4: unknown setting 'colour'"),
    ("experiments:\n  - split: a\n    control: off\n    window_days: 0\n", "line 4: window_days of a must be a whole number"),
    ("experiments:\n  - split: a\n    control: off\n    weights: {on: 1, x: 1}\n", "line 4: weights of a have no weight for the control 'off'"),
    ("experiments:\n  - split: a\n    control: off\n    weights: {on: 1, off: -1}\n", "line 4: the weight of 'off' in a must be a number greater than 0"),
    ("experiments:\n  - split: a\n    control: off\n    metrics:\n      - {name: r, event: P, type: sum}\n",
     "line 5: metric r is a sum: name the numeric event property"),
    ("experiments:\n  - split: a\n    control: off\n    metrics:\n      - {name: r, event: P, type: count, property: x}\n",
     "line 5: metric r is a count: property applies only to sum"),
    ("experiments:\n  - split: a\n    control: off\n    metrics:\n      - {name: 2x, event: P, type: count}\n",
     "line 5: metric name '2x' must be letters"),
    ("experiments:\n  - split: a\n    control: off\n  - split: a\n    control: on\n", "line 4: split a is configured twice"),
    ("experiments:\n  - split: a\n    control: [off\n", "line 4: not valid YAML"),
    ("experiment:\n  - split: a\n", "line 1: unknown setting 'experiment'"),
])
def test_experiments_file_errors_name_the_line(text, error):
    with pytest.raises(ExperimentsFileError) as raised:
        parse_experiments(text, "exp.yaml")
    assert str(raised.value).startswith("exp.yaml, ")
    assert error in str(raised.value)


def test_the_example_file_is_valid_and_unquoted_treatments_stay_names():
    example = Path(__file__).parent.parent / "mixsync" / "experiments" / "experiments.example.yaml"
    assert parse_experiments(example.read_text(), str(example))
    [experiment] = parse_experiments("experiments:\n  - split: a\n    control: off\n    weights: {on: 3, off: 1}\n")
    assert experiment.control == "off" and experiment.weights == {"on": 0.75, "off": 0.25}


def test_a_missing_file_is_named():
    from mixsync.experiments.settings import ExperimentsSettings

    with pytest.raises(ExperimentsFileError, match=r"MIXSYNC_EXPERIMENTS_FILE=/nope\.yaml: no such file"):
        ExperimentsSettings.from_env({"MIXSYNC_EXPERIMENTS_FILE": "/nope.yaml"})


def test_the_demo_data_has_a_real_effect_and_a_null_experiment(warehouse):
    """The sandbox's seeded shoppers, as `make demo` lands them: one_click_checkout wins, the carousel does nothing."""
    from mixsync.sandbox import experiments as seeded
    from mixsync.sandbox.data import Dataset

    days = tuple(dt.date(2026, 1, 5) + dt.timedelta(days=n) for n in range(5))
    dataset = Dataset(days=days, experiment_users=6000)
    moment = lambda ms: dt.datetime.fromtimestamp(ms / 1000, dt.UTC)  # noqa: E731
    load(warehouse,
         [(i["environmentId"], i["split"], i["key"], i["treatment"], moment(i["time"]))
          for i in seeded.impressions(days, dataset.experiment_users, dataset.seed)],
         [(e.name, e.key, moment(e.time_ms), e.properties)
          for e in seeded.events(days, dataset.experiment_users, dataset.seed)
          if days[0] <= moment(e.time_ms).date() <= days[-1]])
    example = Path(__file__).parent.parent / "mixsync" / "experiments" / "experiments.example.yaml"
    with warehouse.write() as con:
        analysis = analyse(con, parse_experiments(example.read_text(), str(example)))
    compared = {(r[0], r[1], r[2]): r for r in analysis.results if not r[3]}
    for metric in ("purchased", "purchases", "revenue"):
        _, _, _, _, _, _, lift, low, _, p_value, _ = compared[("one_click_checkout", metric, "on")]
        assert lift > 0 and low > 0 and p_value < 0.001
    for (split, _, _), row in compared.items():
        if split == "recommendation_carousel":
            assert row[9] > 0.05 and row[7] < 0 < row[8]
    assert not analysis.srm_failures
    assert {s.experiment.split: s.users_multiple_treatments > 0 for s in analysis.summaries} == {
        "one_click_checkout": True, "recommendation_carousel": False}


def test_the_schedule_runs_daily_after_the_mixpanel_pull():
    from mixsync.experiments.schedules import experiment_results_schedule
    from mixsync.mixpanel.schedules import mixpanel_events_schedule

    assert experiment_results_schedule.cron_schedule == "15 5 * * *"
    assert mixpanel_events_schedule.cron_schedule == "15 2 * * *"
    context = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2026, 1, 6, 5, 15, tzinfo=dt.UTC))
    [request] = experiment_results_schedule.evaluate_tick(context).run_requests or []
    assert request.run_key == "experiment-results-2026-01-06"


SEVERAL_EVENTS = """experiments:
  - split: multi
    environment_id: prod
    control: off
    window_days: 2
    metrics:
      - {name: purchased, event: Purchase, type: conversion}
      - {name: views, event: Viewed Page, type: count}
      - {name: revenue, event: Purchase, type: sum, property: amount}
      - {name: seconds, event: Viewed Page, type: sum, property: seconds}
"""


def test_metrics_over_several_events_and_windows_not_loaded_to_their_end(warehouse):
    """Each metric counts only its own event; a user's window is incomplete when it ends after the last loaded day."""
    load(warehouse, [("prod", "multi", "a1", "on", T0), ("prod", "multi", "a2", "on", T0),
                     ("prod", "multi", "b1", "off", T0),
                     ("prod", "multi", "b2", "off", T0 + 13 * H),    # window ends 2026-01-08 01:00
                     ("prod", "multi", "b3", "off", T0 + 12 * H)])   # window ends 2026-01-08 00:00 exactly
    experiments = parse_experiments(SEVERAL_EVENTS)
    with warehouse.write() as con:
        # No Mixpanel day loaded yet: every window is incomplete, every value 0.
        [summary] = analyse(con, experiments).summaries
    assert summary.users_window_incomplete == 5
    load(warehouse, [], [
        ("Purchase", "a1", T0 + H, {"amount": 10}),
        ("Viewed Page", "a1", T0 + 2 * H, {"seconds": 5, "amount": 1000}),    # not a Purchase: no revenue
        ("Viewed Page", "a1", T0 + 3 * H, {"seconds": "x"}),                   # counts; not a number
        ("Viewed Page", "a1", T0 + 4 * H, {}),                                 # counts; no seconds
        ("Viewed Page", "a2", T0 - S, {"seconds": 1}),                         # before exposure
        ("Viewed Page", "a2", T0 + H, {"seconds": 2}),
        ("Purchase", "b1", T0 + H, {"amount": 3, "seconds": 1000}),           # not a view: no seconds
        ("Purchase", "b1", T0 + 2 * D, {"amount": 4}),                         # window end; loads 2026-01-07
        ("Signed Up", "b2", T0 + 14 * H, {"seconds": 1000}),                   # no metric reads this event
    ])
    with warehouse.write() as con:
        [summary] = analyse(con, experiments).summaries
        results = {(m, t): (n, mean) for m, t, n, mean in con.execute(
            "SELECT metric, treatment, users, mean FROM analytics.experiment_results").fetchall()}
    assert results == {
        ("purchased", "on"): (2, 0.5), ("purchased", "off"): (3, pytest.approx(1 / 3)),
        ("views", "on"): (2, 2.0), ("views", "off"): (3, 0.0),
        ("revenue", "on"): (2, 5.0), ("revenue", "off"): (3, 1.0),
        ("seconds", "on"): (2, 3.5), ("seconds", "off"): (3, 0.0),
    }
    assert summary.non_numeric_values == {"revenue": 0, "seconds": 1}
    assert summary.missing_values == {"revenue": 0, "seconds": 1}
    assert summary.users_window_incomplete == 1   # b2; b3's window ends exactly where the loaded days end


def test_a_failed_analysis_leaves_the_tables_as_they_were_and_no_temporary_table(warehouse):
    _known_answer_data(warehouse)
    experiments = parse_experiments(CHECKOUT)
    with warehouse.write() as con:
        analyse(con, experiments)
        before = [con.execute(f"SELECT * FROM analytics.{t} ORDER BY ALL").fetchall()
                  for t in ("experiment_exposures", "experiment_results", "experiment_srm")]
        con.execute("DELETE FROM split.impressions WHERE key = 'c1'")
        con.execute("DROP VIEW mixpanel.events")              # the metric query fails after the exposures
        with pytest.raises(duckdb.CatalogException, match="events"):
            analyse(con, experiments)
        assert [con.execute(f"SELECT * FROM analytics.{t} ORDER BY ALL").fetchall()
                for t in ("experiment_exposures", "experiment_results", "experiment_srm")] == before
        assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE temporary").fetchone()[0] == 0


def test_the_demos_verdict_never_puts_a_small_p_value_beside_not_distinguishable():
    """The p-value tests the difference of means, the interval is the relative lift's: when they disagree (few
    conversions in control, as in a small demo) the verdict says so instead of picking one."""
    from mixsync.demo import _verdict

    # The figures a 2-day demo printed: p = 0.0035 with an interval across 0.
    disagreeing = _verdict("one_click_checkout", "purchased", "on", "off", 1.492, -0.0838, 3.0677, 0.0035, None)
    assert "inconclusive" in disagreeing and "not distinguishable" not in disagreeing
    assert "p = 0.0035" in disagreeing and "interval includes 0" in disagreeing
    assert "is better than off" in _verdict("s", "m", "on", "off", 0.5, 0.2, 0.8, 0.001, None)
    assert "is worse than off" in _verdict("s", "m", "on", "off", -0.5, -0.8, -0.2, 0.001, None)
    assert "is not distinguishable from control" in _verdict("s", "m", "a", "control", 0.2, -0.5, 0.9, 0.54, None)
    assert "no lift (control mean is 0" in _verdict("s", "m", "a", "c", None, None, None, 0.2, "control mean is 0")


def test_the_uis_results_table_notes_when_the_p_value_and_the_interval_disagree():
    from mixsync.experiments.analysis import Analysis
    from mixsync.experiments.assets import results_markdown

    analysis = Analysis(results=[
        ("checkout", "purchased", "off", True, 311, 0.0418, None, None, None, None, None),
        ("checkout", "purchased", "on", False, 288, 0.1042, 1.492, -0.0838, 3.0677, 0.0035, None),
        ("checkout", "revenue", "on", False, 288, 10.0, 2.3, 0.4, 4.2, 0.002, None)])
    disagreeing, agreeing = results_markdown(analysis).splitlines()[3:5]
    assert "interval includes 0" in disagreeing.split("|")[-2]
    assert agreeing.split("|")[-2].strip() == ""
