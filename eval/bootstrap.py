"""Bootstrap confidence intervals and the paired bootstrap test.

Test sets here are small (80-100 questions), so every mean in a report carries a 95% percentile
interval, and "grounded beats plain" is judged per question on the same questions (paired), which
removes the question-difficulty variance that two independent intervals would double-count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
LEVEL = 0.95


@dataclass
class MeanCI:
    mean: float | None
    lo: float | None
    hi: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PairedTest:
    """Mean of a − b over paired items, its interval, and a two-sided p-value for "no difference"."""

    delta: float | None
    lo: float | None
    hi: float | None
    p: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def _clean(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None], dtype=float)


def _resampled_means(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)


def mean_ci(values, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = LEVEL) -> MeanCI:
    """Mean and percentile interval; None values (undefined for that item) are left out."""
    x = _clean(values)
    if len(x) == 0:
        return MeanCI(None, None, None, 0)
    means = _resampled_means(x, resamples, seed)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return MeanCI(float(x.mean()), float(lo), float(hi), len(x))


def paired_test(a, b, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = LEVEL) -> PairedTest:
    """Paired bootstrap on d = a − b: the interval of mean d, and p = the share of null-centred
    resampled means at least as far from 0 as the observed one (add-one smoothed, so never 0)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    d = _clean(x - y for x, y in zip(a, b) if x is not None and y is not None)
    if len(d) == 0:
        return PairedTest(None, None, None, None, 0)
    observed = float(d.mean())
    means = _resampled_means(d, resamples, seed)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    extreme = np.count_nonzero(np.abs(means - observed) >= abs(observed) - 1e-12)
    return PairedTest(observed, float(lo), float(hi), float((extreme + 1) / (resamples + 1)), len(d))
