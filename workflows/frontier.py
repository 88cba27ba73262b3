"""The Pareto frontier over trial results: pure functions of plain dicts (no Ray, no MLflow).

A point ``a`` dominates ``b`` when ``a`` is at least as good as ``b`` on every objective (in each objective's
direction, ``max`` or ``min``) and strictly better on at least one. The frontier is the set of points no other
point dominates; identical points do not dominate each other, so ties are all kept. A point whose value for an
objective is missing, not a number, NaN or infinite takes no part: it is neither on the frontier nor dominates.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["pareto_front", "frontier_table"]


def _check_objectives(objectives: Sequence[tuple[str, str]]) -> None:
    if not objectives:
        raise ValueError("objectives: at least one (metric, max|min) pair is needed")
    for name, mode in objectives:
        if mode not in ("max", "min"):
            raise ValueError(f"objectives: mode of {name!r} must be max or min, got {mode!r}")


def _value(point: Mapping[str, Any], name: str) -> float | None:
    value = point.get(name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def pareto_front(points: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]) -> list[int]:
    """Indices of the points on the Pareto frontier.

    Args:
        points: one mapping of metric name -> value per trial.
        objectives: ``(metric, "max" | "min")`` pairs.

    Returns:
        The indices (into ``points``, ascending) of the valid points that no other valid point dominates.

    Raises:
        ValueError: ``objectives`` is empty or has a mode other than max/min.
    """
    _check_objectives(objectives)
    valid: list[int] = []
    rows: list[list[float]] = []
    for i, point in enumerate(points):
        values = [_value(point, name) for name, _ in objectives]
        if all(v is not None for v in values):
            valid.append(i)
            rows.append(values)  # type: ignore[arg-type]
    if not valid:
        return []
    # Flip minimised objectives so that "larger is better" everywhere.
    signs = np.array([1.0 if mode == "max" else -1.0 for _, mode in objectives])
    scores = np.asarray(rows, dtype=float) * signs
    front = []
    for row, index in zip(scores, valid):
        at_least = np.all(scores >= row, axis=1)
        better = np.any(scores > row, axis=1)
        if not np.any(at_least & better):
            front.append(index)
    return front


def _density_objective(objectives: Sequence[tuple[str, str]]) -> tuple[str, str]:
    for name, mode in objectives:
        if "density" in name:
            return name, mode
    return objectives[0]


def frontier_table(points: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]],
                   columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The frontier's points as table rows, sorted by density.

    Rows are sorted by the first objective whose name contains ``density`` (the first objective when none does),
    ascending; ties are ordered by the other objectives, best first.

    Args:
        points: one mapping per trial, as for :func:`pareto_front`.
        objectives: ``(metric, "max" | "min")`` pairs.
        columns: the keys of each row (a point lacking one gets None); default: the objectives' metrics.

    Returns:
        One dict per frontier point.
    """
    front = pareto_front(points, objectives)
    columns = list(columns) if columns is not None else [name for name, _ in objectives]
    sort_name, _ = _density_objective(objectives)
    others = [(name, mode) for name, mode in objectives if name != sort_name]

    def key(index: int) -> tuple[float, ...]:
        # Frontier points have every objective as a finite number.
        point = points[index]
        rest = [(-1.0 if mode == "max" else 1.0) * float(point[name]) for name, mode in others]
        return (float(point[sort_name]), *rest, float(index))

    return [{column: points[i].get(column) for column in columns} for i in sorted(front, key=key)]
