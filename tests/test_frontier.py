"""The Pareto frontier: hand-made cases with a known answer, and a property test against the O(n^2) definition."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workflows.frontier import frontier_table, pareto_front

F1_DENSITY = [("f1", "max"), ("linear_density", "min")]


def test_known_frontier_f1_up_density_down():
    points = [
        {"f1": 80.0, "linear_density": 0.5},  # 0: on the front
        {"f1": 70.0, "linear_density": 0.3},  # 1: on the front
        {"f1": 60.0, "linear_density": 0.4},  # 2: dominated by 1
        {"f1": 85.0, "linear_density": 0.9},  # 3: on the front
        {"f1": 80.0, "linear_density": 0.6},  # 4: dominated by 0 (same f1, denser)
        {"f1": 50.0, "linear_density": 0.1},  # 5: on the front
    ]
    assert pareto_front(points, F1_DENSITY) == [0, 1, 3, 5]


def test_direction_matters():
    points = [{"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 2.0}]
    assert pareto_front(points, [("a", "max"), ("b", "max")]) == [1]
    assert pareto_front(points, [("a", "min"), ("b", "min")]) == [0]
    assert pareto_front(points, [("a", "max"), ("b", "min")]) == [0, 1]


def test_identical_points_are_both_kept():
    points = [{"f1": 70.0, "linear_density": 0.3}, {"f1": 70.0, "linear_density": 0.3},
              {"f1": 60.0, "linear_density": 0.3}]
    assert pareto_front(points, F1_DENSITY) == [0, 1]


def test_invalid_points_take_no_part():
    points = [
        {"f1": float("nan"), "linear_density": 0.1},  # NaN: excluded, would otherwise be on the front
        {"f1": 99.0},  # missing density: excluded, would otherwise dominate everything
        {"f1": 70.0, "linear_density": 0.5},
        {"f1": None, "linear_density": 0.01},
        {"f1": "high", "linear_density": 0.01},
        {"f1": float("inf"), "linear_density": 0.5},
        {"f1": 60.0, "linear_density": 0.6},
    ]
    assert pareto_front(points, F1_DENSITY) == [2]


def test_empty_and_single():
    assert pareto_front([], F1_DENSITY) == []
    assert pareto_front([{"f1": 1.0, "linear_density": 1.0}], F1_DENSITY) == [0]
    assert pareto_front([{"f1": float("nan"), "linear_density": 1.0}], F1_DENSITY) == []


def test_single_objective_keeps_every_best():
    points = [{"f1": 3.0}, {"f1": 5.0}, {"f1": 5.0}, {"f1": 4.0}]
    assert pareto_front(points, [("f1", "max")]) == [1, 2]


def test_three_objectives():
    points = [
        {"f1": 80, "linear_density": 0.5, "speedup": 1.5},
        {"f1": 80, "linear_density": 0.5, "speedup": 1.8},  # dominates 0
        {"f1": 75, "linear_density": 0.5, "speedup": 2.0},
    ]
    assert pareto_front(points, [("f1", "max"), ("linear_density", "min"), ("speedup", "max")]) == [1, 2]


def test_bad_objectives_raise():
    with pytest.raises(ValueError, match="at least one"):
        pareto_front([{"f1": 1.0}], [])
    with pytest.raises(ValueError, match="must be max or min"):
        pareto_front([{"f1": 1.0}], [("f1", "up")])


def test_frontier_table_sorted_by_density_with_chosen_columns():
    points = [
        {"name": "a", "f1": 85.0, "linear_density": 0.9, "speedup": 1.1},
        {"name": "b", "f1": 50.0, "linear_density": 0.1},
        {"name": "c", "f1": 40.0, "linear_density": 0.2},  # dominated
        {"name": "d", "f1": 70.0, "linear_density": 0.3, "speedup": 2.0},
    ]
    rows = frontier_table(points, F1_DENSITY, ["name", "f1", "speedup"])
    assert rows == [{"name": "b", "f1": 50.0, "speedup": None}, {"name": "d", "f1": 70.0, "speedup": 2.0},
                    {"name": "a", "f1": 85.0, "speedup": 1.1}]
    assert frontier_table(points, F1_DENSITY)[0] == {"f1": 50.0, "linear_density": 0.1}


def test_frontier_table_without_a_density_objective_sorts_by_the_first():
    points = [{"f1": 80.0, "speedup": 1.0}, {"f1": 60.0, "speedup": 3.0}, {"f1": 70.0, "speedup": 2.0}]
    rows = frontier_table(points, [("f1", "max"), ("speedup", "max")], ["f1"])
    assert [r["f1"] for r in rows] == [60.0, 70.0, 80.0]


# --- property test against the definition ----------------------------------------------------------------------


def _brute_force(points, objectives):
    def good(p):
        return all(isinstance(p.get(k), float) and math.isfinite(p[k]) for k, _ in objectives)

    def better_eq(a, b, mode):
        return a >= b if mode == "max" else a <= b

    def strictly(a, b, mode):
        return a > b if mode == "max" else a < b

    def dominates(p, q):
        return (all(better_eq(p[k], q[k], m) for k, m in objectives)
                and any(strictly(p[k], q[k], m) for k, m in objectives))

    valid = [i for i, p in enumerate(points) if good(p)]
    return [i for i in valid if not any(dominates(points[j], points[i]) for j in valid if j != i)]


# Few distinct values make ties and dominated points common; NaN and missing keys make invalid points.
_value = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(-10, 10), st.just(float("nan")))
_point = st.dictionaries(st.sampled_from(["f1", "linear_density", "speedup"]), _value, min_size=1, max_size=3)
_objectives = st.lists(st.tuples(st.sampled_from(["f1", "linear_density", "speedup"]), st.sampled_from(["max", "min"])),
                       min_size=1, max_size=3, unique_by=lambda o: o[0])


@settings(max_examples=300, deadline=None)
@given(points=st.lists(_point, max_size=25), objectives=_objectives)
def test_matches_the_quadratic_definition(points, objectives):
    front = pareto_front(points, objectives)
    assert front == _brute_force(points, objectives)
    # The table lists exactly the frontier points.
    assert len(frontier_table(points, objectives)) == len(front)
