"""The statistics an Evaluation reports: a share with its bootstrap interval, the exact
McNemar test of two systems on the same questions, and percentiles.

At 48 questions a share moves by about +-14 points between samples; a number without its
interval is read as a difference when it is noise. The interval is the percentile bootstrap
(2,000 resamples of the questions, seeded: the same answers give the same interval). The
paired test looks only at the questions where the two systems disagree (b: the baseline
right and the candidate wrong, c: the reverse): under "no difference" each disagreement is
a fair coin, so the two-sided p-value is the binomial tail of min(b, c) in b + c flips,
exact at any sample size (``nel compare --strict`` uses the same test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

RESAMPLES = 2000
CONFIDENCE = 0.95


def share_interval(outcomes: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the share of true outcomes (or the mean of scores in 0-1, e.g. a
    win rate's 1, 0.5 and 0) and its 95% percentile-bootstrap interval; (0, 0, 0) for none."""
    import numpy as np  # (here: `tailor eval compare` runs in the operator image, without it)

    n = len(outcomes)
    if n == 0:
        return 0.0, 0.0, 0.0
    values = np.asarray(outcomes, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, n, size=(RESAMPLES, n))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(values.mean()), float(low), float(high)


def mcnemar_exact(baseline: Sequence[bool], candidate: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value of paired outcomes (the same questions, in order)."""
    if len(baseline) != len(candidate):
        raise ValueError("paired outcomes must have the same length")
    b = sum(1 for x, y in zip(baseline, candidate, strict=True) if x and not y)
    c = sum(1 for x, y in zip(baseline, candidate, strict=True) if y and not x)
    flips = b + c
    if flips == 0:
        return 1.0
    tail = sum(math.comb(flips, k) for k in range(min(b, c) + 1)) / 2**flips
    return float(min(1.0, 2 * tail))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100, linear interpolation); None for no values."""
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else None
