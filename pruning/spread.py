"""How far the timed passes of one model disagree, and how far counts as noise. Torch-free: the report, which
reads a sweep back without torch, judges the trials' timings by it."""

from __future__ import annotations

import statistics
from typing import Sequence

__all__ = ["NOISY_SPREAD", "JUDGED_PASSES", "spread"]

# Timed passes of one model whose upper quartile exceeds their lower one by more than this are noise, not its speed:
# on a quiet machine the passes of a model agree to within 10 to 20%.
NOISY_SPREAD = 1.5
# Fewer timed passes than this have no quartiles worth judging them by.
JUDGED_PASSES = 4


def spread(seconds: Sequence[float]) -> float:
    """How far the timed passes of one model disagree: their upper quartile over their lower one (1.0 when the
    passes take the same time). Another process, or more threads than free cores, slows some passes and widens it.

    Raises:
        ValueError: fewer than two passes.
    """
    if len(seconds) < 2:
        raise ValueError(f"a spread needs two or more timed passes, got {len(seconds)}")
    lower, _, upper = statistics.quantiles(seconds, n=4, method="inclusive")
    return upper / lower if lower > 0 else float("inf")
