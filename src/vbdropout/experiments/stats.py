"""Seed statistics for the reproduced tables: mean ± sd, 95% intervals, Welch's comparison.

With n seeds of a cell, the 95% interval of its mean is m ± t(0.975, n − 1)·s/√n
(s the sample standard deviation), and the 95% prediction interval of one more run
m ± t(0.975, n − 1)·s·√(1 + 1/n): the range a further seed falls in 95% of the time,
against which a single published run is judged. Two cells are compared by the
difference of their means with Welch's interval: d ± t(0.975, ν)·√(s₁²/n₁ + s₂²/n₂),
with the Welch–Satterthwaite degrees of freedom ν = (s₁²/n₁ + s₂²/n₂)² /
((s₁²/n₁)²/(n₁ − 1) + (s₂²/n₂)²/(n₂ − 1)). Values that are not finite (a compression
ratio of ``inf``) give no interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Interval",
    "mean_interval",
    "prediction_interval",
    "t_quantile_975",
    "welch_interval",
]

# above _NORMAL_DF, where the continued fraction of the tail loses precision,
# t(0.975, ν) = z + (z³ + z)/(4ν) + (5z⁵ + 16z³ + 3z)/(96ν²) (Cornish–Fisher; the next
# term is below 1e−14 there); below _SMALLEST_DF, t² overflows
_NORMAL_DF = 1e5
_SMALLEST_DF = 0.05
_NORMAL_975 = 1.959963984540054


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction
    (modified Lentz), using the symmetry I_x(a, b) = 1 − I_{1−x}(b, a) where it converges
    faster."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        + a * math.log(x) + b * math.log1p(-x)
    )  # fmt: skip
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom, t ≥ 0."""
    return 0.5 * _incomplete_beta(df / (df + t * t), df / 2, 0.5)


def t_quantile_975(df: float) -> float:
    """The 97.5% quantile of Student's t with ``df`` ≥ 0.05 degrees of freedom (any real
    df, as Welch's is, which is at least 1), found by bisection on the tail probability to
    1e−10 relative."""
    if not df >= _SMALLEST_DF:
        raise ValueError(f"degrees of freedom must be at least {_SMALLEST_DF}, got {df}")
    if df > _NORMAL_DF:
        z = _NORMAL_975
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    low, high = 0.0, 1.0
    while _t_upper_tail(high, df) > 0.025:
        high *= 2
    while high - low > 1e-10 * high:
        middle = 0.5 * (low + high)
        low, high = (middle, high) if _t_upper_tail(middle, df) > 0.025 else (low, middle)
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval; ``low``/``high`` are ``None`` for one value."""

    estimate: float
    low: float | None
    high: float | None

    def contains(self, value: float) -> bool | None:
        """Whether ``value`` lies in the interval, up to rounding (an interval of equal
        values holds the value they round to); ``None`` when there is none."""
        if self.low is None or self.high is None:
            return None
        slack = 1e-9 * max(1.0, abs(value))
        return self.low - slack <= value <= self.high + slack


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def _t_interval(values: Sequence[float], scale: float) -> Interval:
    """m ± t(0.975, n − 1)·s·``scale`` (none for one value or a value not finite)."""
    mean = statistics.fmean(values)
    if len(values) < 2 or not _finite(values):
        return Interval(mean, None, None)
    half = t_quantile_975(len(values) - 1) * statistics.stdev(values) * scale
    return Interval(mean, mean - half, mean + half)


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean of ``values`` and its 95% t-interval, m ± t·s/√n."""
    return _t_interval(values, 1 / math.sqrt(len(values)))


def prediction_interval(values: Sequence[float]) -> Interval:
    """The mean of ``values`` and the 95% prediction interval of one more value drawn
    as they were, m ± t·s·√(1 + 1/n)."""
    return _t_interval(values, math.sqrt(1 + 1 / len(values)))


def welch_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
    """mean(a) − mean(b) with Welch's 95% interval (none unless both have ≥ 2 values,
    all finite)."""
    difference = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2 or not (_finite(a) and _finite(b)):
        return Interval(difference, None, None)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return Interval(difference, difference, difference)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile_975(df) * math.sqrt(va + vb)
    return Interval(difference, difference - half, difference + half)
