"""Statistics of one treatment against control, from per-treatment sufficient statistics (users, mean, variance).

Welch's unequal-variance t test of the difference of means, with Welch–Satterthwaite degrees of freedom; the
relative lift's variance by the delta method; its 95% interval from the same t distribution. Undefined numbers are
None with a reason, never an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _special():
    # Imported when a test runs, not when the code location loads: scipy costs a second or more of import in every
    # Dagster process (each step's too), and most runs never compute a test (bench/bench_one_day.py). The
    # distribution functions themselves (the ones scipy.stats.t and .chi2 call) import in half the time of
    # scipy.stats.
    from scipy import special

    return special

CONFIDENCE = 0.95
SRM_ALPHA = 0.001   # a sample-ratio mismatch is declared below this p-value (the usual, deliberately strict bar)


@dataclass(frozen=True)
class Arm:
    """One treatment's sufficient statistics for one metric."""

    users: int
    mean: float
    variance: float | None      # None when undefined (fewer than 2 users for a sample variance)


@dataclass(frozen=True)
class Comparison:
    lift: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    reason: str | None = None


def conversion_arm(users: int, converted_share: float) -> Arm:
    """A conversion metric's variance is p(1 − p), p the share of users with the event."""
    return Arm(users, converted_share, converted_share * (1 - converted_share))


def compare(treatment: Arm, control: Arm) -> Comparison:
    """Treatment against control: relative lift, its 95% CI, and the Welch t test's two-sided p-value."""
    if treatment.users < 2 or control.users < 2:
        return Comparison(reason="fewer than 2 users in " + ("the treatment" if treatment.users < 2 else "control"))
    if treatment.variance is None or control.variance is None:
        return Comparison(reason="variance undefined")
    a = treatment.variance / treatment.users
    b = control.variance / control.users
    if a + b <= 0:
        return Comparison(reason="zero variance in both treatment and control: no test possible")
    df = (a + b) ** 2 / (a * a / (treatment.users - 1) + b * b / (control.users - 1))
    t = (treatment.mean - control.mean) / math.sqrt(a + b)
    p_value = float(2 * _special().stdtr(df, -abs(t)))
    if control.mean == 0:
        return Comparison(p_value=p_value, reason="control mean is 0: relative lift undefined")
    lift = (treatment.mean - control.mean) / control.mean
    lift_variance = (treatment.variance / (treatment.users * control.mean ** 2)
                     + control.variance * treatment.mean ** 2 / (control.users * control.mean ** 4))
    half_width = float(_special().stdtrit(df, 0.5 + CONFIDENCE / 2)) * math.sqrt(lift_variance)
    return Comparison(lift, lift - half_width, lift + half_width, p_value)


def disagreement(low: float | None, high: float | None, p_value: float | None) -> str | None:
    """Why a comparison is inconclusive when its two answers differ, else None. The p-value tests the difference
    of means; the interval is the relative lift's, whose denominator carries control's own uncertainty: with few
    conversions in control the first can find a difference that the second cannot size, and (rarely) the reverse."""
    if low is None or high is None or p_value is None:
        return None
    test_finds, interval_finds = p_value < 1 - CONFIDENCE, low > 0 or high < 0
    if test_finds == interval_finds:
        return None
    return ("the t test finds a difference but the lift's interval includes 0 (control's mean is too uncertain "
            "to size it)" if test_finds else "the lift's interval excludes 0 but the t test finds no difference")


def sample_ratio_p_value(users: list[int], expected_shares: list[float]) -> float | None:
    """Chi-square goodness of fit of users per treatment to the expected shares; None with fewer than 2 treatments
    or no users. A treatment expected to get no traffic but seen gives 0."""
    total = sum(users)
    if len(users) < 2 or total == 0:
        return None
    if any(share <= 0 and seen > 0 for seen, share in zip(users, expected_shares, strict=False)):
        return 0.0
    kept = [(seen, share) for seen, share in zip(users, expected_shares, strict=False) if share > 0]
    if len(kept) < 2:
        return None
    norm = sum(share for _, share in kept)
    statistic = sum((seen - total * share / norm) ** 2 / (total * share / norm) for seen, share in kept)
    return float(_special().chdtrc(len(kept) - 1, statistic))
