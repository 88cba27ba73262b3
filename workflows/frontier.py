"""The Pareto frontier over trial results and its hypervolume: pure functions of plain dicts (no Ray, no MLflow).

A point ``a`` dominates ``b`` when ``a`` is at least as good as ``b`` on every objective (in each objective's
direction, ``max`` or ``min``) and strictly better on at least one. The frontier is the set of points no other
point dominates. Points with exactly equal values in every objective are one point of objective space, so the
frontier holds one of them: the first one given (the others would register and report the same trade-off twice).
A point whose value for an objective is missing, not a number, NaN or infinite takes no part: it is neither on the
frontier nor dominates.

The hypervolume of a set of points is the volume of objective space they dominate, bounded by a reference point
that is worse than any point worth counting (by default F1 0 and linear density 1: the dense model adds nothing).
It grows whenever a new point pushes the frontier out, so its curve over a sweep's trials shows whether the last
trials still improved the frontier.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np

from workflows.record import EXACT_MATCH, F1, HEADS_REMOVED, LINEAR_DENSITY, SPEEDUP, TOTAL_DENSITY

__all__ = ["pareto_front", "frontier_axis", "frontier_order", "frontier_table", "DEFAULT_REFERENCE", "reference_point",
           "hypervolume", "hypervolume_progress"]

# Reference values of the metrics a sweep may optimise: the worst value that still counts.
DEFAULT_REFERENCE: dict[str, float] = {F1: 0.0, EXACT_MATCH: 0.0, LINEAR_DENSITY: 1.0, TOTAL_DENSITY: 1.0,
                                       SPEEDUP: 0.0, HEADS_REMOVED: 0.0}


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
        The indices (into ``points``, ascending) of the valid points that no other valid point dominates; of
        valid points equal in every objective, only the first (the lowest index) is on the frontier.

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
    return [valid[i] for i in _non_dominated(scores)]


def _non_dominated(scores: np.ndarray) -> list[int]:
    """Row indices of ``scores`` (larger is better in every column) that no other row dominates, the first of
    equal rows only."""
    front = []
    for i, row in enumerate(scores):
        at_least = np.all(scores >= row, axis=1)
        better = np.any(scores > row, axis=1)
        equal_before = at_least[:i] & ~better[:i]
        if not np.any(at_least & better) and not np.any(equal_before):
            front.append(i)
    return front


def frontier_axis(objectives: Sequence[tuple[str, str]]) -> str:
    """The objective a frontier is laid out along: the first whose name contains ``density``, else the last one.

    The frontier plot shows it across, and every listing of a frontier (``frontier.json``, the sweep's summary and
    log, the report's tables) is sorted along it by :func:`frontier_order`.
    """
    _check_objectives(objectives)
    names = [name for name, _ in objectives]
    return next((name for name in names if "density" in name), names[-1])


def frontier_order(points: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]) -> list[int]:
    """Indices of ``points`` in the order a frontier is listed: ascending along :func:`frontier_axis` (as the plot
    reads left to right), ties by the other objectives, best first, then as given. A point missing a value (not a
    finite number) goes after those that have it."""
    axis = frontier_axis(objectives)
    others = [(name, mode) for name, mode in objectives if name != axis]

    def key(index: int) -> tuple[Any, ...]:
        point = points[index]
        out: list[Any] = []
        for name, sign in ((axis, 1.0), *((name, -1.0 if mode == "max" else 1.0) for name, mode in others)):
            value = _value(point, name)
            out += [value is None, 0.0 if value is None else sign * value]
        return (*out, index)

    return sorted(range(len(points)), key=key)


def frontier_table(points: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]],
                   columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The frontier's points as table rows, in :func:`frontier_order`: ascending along :func:`frontier_axis` (the
    first density objective, else the last objective), ties by the other objectives, best first.

    Args:
        points: one mapping per trial, as for :func:`pareto_front`.
        objectives: ``(metric, "max" | "min")`` pairs.
        columns: the keys of each row (a point lacking one gets None); default: the objectives' metrics.

    Returns:
        One dict per frontier point.
    """
    front = pareto_front(points, objectives)
    columns = list(columns) if columns is not None else [name for name, _ in objectives]
    order = frontier_order([points[i] for i in front], objectives)
    return [{column: points[front[i]].get(column) for column in columns} for i in order]


def reference_point(objectives: Sequence[tuple[str, str]],
                    given: Mapping[str, float] | None = None) -> dict[str, float]:
    """The hypervolume reference of ``objectives``: ``given`` values first, then :data:`DEFAULT_REFERENCE`.

    Raises:
        ValueError: an objective has neither a given nor a default reference value, or ``given`` names a metric
            that is not an objective.
    """
    _check_objectives(objectives)
    given = dict(given or {})
    names = [name for name, _ in objectives]
    extra = sorted(set(given) - set(names))
    if extra:
        raise ValueError(f"reference_point: {extra[0]!r} is not an objective (objectives: {', '.join(names)})")
    out = {}
    for name in names:
        value = given.get(name, DEFAULT_REFERENCE.get(name))
        if value is None:
            raise ValueError(f"reference_point: no default reference for objective {name!r}; give one")
        if _value({name: value}, name) is None:
            raise ValueError(f"reference_point: {name} must be a finite number, got {value!r}")
        out[name] = float(value)
    return out


def _gains(points: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]],
           reference: Mapping[str, float]) -> np.ndarray:
    """Each valid point as its gain over the reference per objective (larger is better), only points strictly
    better than the reference in every objective (the others dominate no volume)."""
    rows = []
    for point in points:
        values = [_value(point, name) for name, _ in objectives]
        if any(v is None for v in values):
            continue
        gain = [v - reference[name] if mode == "max" else reference[name] - v
                for v, (name, mode) in zip(values, objectives)]
        if all(g > 0 for g in gain):
            rows.append(gain)
    return np.asarray(rows, dtype=float).reshape(-1, len(objectives))


def _volume(gains: np.ndarray) -> float:
    """Volume of the union of the boxes [0, g] (exact; slices along the last axis, recursing on the others).

    The cost is O(n^d) for n points in d objectives: nothing for the handful of objectives and the hundreds of
    trials of a sweep.
    """
    if len(gains) == 0:
        return 0.0
    if gains.shape[1] == 1:
        return float(gains[:, 0].max())
    last = np.unique(gains[:, -1])  # ascending
    total, below = 0.0, 0.0
    for level in last:
        # Between the previous level and this one, every point reaching at least this level covers the slab.
        slab = gains[gains[:, -1] >= level][:, :-1]
        total += (level - below) * _volume(slab)
        below = level
    return total


def hypervolume(points: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]],
                reference: Mapping[str, float] | None = None) -> float:
    """The hypervolume the points dominate, up to the reference point.

    Minimised objectives are flipped (``reference - value``), maximised ones are taken as ``value - reference``,
    so the volume is the Lebesgue measure of ``{y : ref < y <= some point}`` in the flipped space. Points that do
    not beat the reference in every objective, and invalid points (as for :func:`pareto_front`), add nothing.

    Args:
        points: one mapping of metric name -> value per trial.
        objectives: ``(metric, "max" | "min")`` pairs.
        reference: metric -> reference value; default (and for missing keys): :data:`DEFAULT_REFERENCE`.

    Returns:
        The hypervolume in the objectives' own units (F1 points x density for the default objectives).

    Raises:
        ValueError: bad objectives, or a reference that :func:`reference_point` rejects.
    """
    ref = reference_point(objectives, reference)
    gains = _gains(points, objectives, ref)
    # Only the non-dominated gains matter; dropping the rest first keeps the recursion small.
    return _volume(gains[_non_dominated(gains)])


def hypervolume_progress(points: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]],
                         reference: Mapping[str, float] | None = None) -> list[float]:
    """The hypervolume after each point, in the given order: ``[hypervolume(points[:1]), ..., hypervolume(points)]``.

    Pass the trials in the order they completed; a trial that failed or stopped early (no valid metrics) repeats
    the previous value. The list never decreases.

    A point that pushes the frontier out adds the volume only it dominates: its own box less the part the frontier
    already covers (the boxes of the frontier's points cut to its box, of which only the few not dominated among
    themselves count). Measuring the whole frontier again after each point would cost O(f^(d-1)) box slices for a
    frontier of f points in d objectives, each time: minutes for a few hundred trials in four objectives.
    """
    ref = reference_point(objectives, reference)
    front = np.zeros((0, len(objectives)))
    volume = 0.0
    out = []
    for point in points:
        gain = _gains([point], objectives, ref)
        if len(gain) and not np.any(np.all(front >= gain[0], axis=1)):  # it pushes the frontier out
            covered = np.minimum(front, gain[0])
            covered = covered[np.all(covered > 0, axis=1)]
            volume += max(0.0, float(np.prod(gain[0])) - _volume(covered[_non_dominated(covered)]))
            front = np.vstack([front, gain])
            front = front[_non_dominated(front)]
        out.append(volume)
    return out
