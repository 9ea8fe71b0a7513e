"""Means over repeated runs with a 95% interval, and the medians latency decisions rest on.

An attack repeated with other seeds (another query order, another surrogate initialisation) is
another draw of the same random experiment. We report the mean over the seeds with Student's t
interval for that mean: with n seeds and sample standard deviation s, mean +- t(0.975, n-1) s /
sqrt(n). It says how well the seeds pin down the attack's expected fidelity, not where a single
run will land. One seed gives no interval; the report then says so instead of inventing one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of `n` values and its 95% interval; `low == high == mean` when `n < 2`."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def has_interval(self) -> bool:
        return self.n >= 2

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def text(self, digits: int = 3) -> str:
        """`0.812 [0.790, 0.834]`, or just the mean when there is no interval."""
        if math.isnan(self.mean):
            return "n/a"
        if not self.has_interval:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_interval(values: Sequence[float], *, bounds: tuple[float, float] | None = (0.0, 1.0)) -> Interval:
    """Mean and Student-t 95% interval of `values` (NaNs dropped), clipped to `bounds`.

    Fidelity and accuracy cannot leave [0, 1], so their intervals are clipped there; pass
    `bounds=None` for unbounded quantities.
    """
    finite = [float(v) for v in values if not math.isnan(float(v))]
    if not finite:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(finite)
    if len(finite) < 2:
        return Interval(mean, mean, mean, len(finite))
    from scipy.stats import t

    half = float(t.ppf(0.5 + CONFIDENCE / 2, len(finite) - 1)) * statistics.stdev(finite) / math.sqrt(len(finite))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return Interval(mean, low, high, len(finite))


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of repeated measurements (latency ratios): robust to a few stalls."""

    median: float
    q1: float
    q3: float
    n: int


def spread(values: Sequence[float]) -> Spread:
    ordered = sorted(float(v) for v in values)
    if not ordered:
        return Spread(math.nan, math.nan, math.nan, 0)
    if len(ordered) == 1:
        return Spread(ordered[0], ordered[0], ordered[0], 1)
    q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return Spread(median, q1, q3, len(ordered))
