"""The Pareto frontier: hand-made cases with a known answer, and a property test against the O(n^2) definition."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workflows.frontier import frontier_table, hypervolume, hypervolume_progress, pareto_front, reference_point

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


def test_identical_points_are_one_frontier_point_the_first_given():
    points = [{"f1": 60.0, "linear_density": 0.3}, {"f1": 70.0, "linear_density": 0.3, "name": "a"},
              {"f1": 70.0, "linear_density": 0.3, "name": "b"}, {"f1": 80.0, "linear_density": 0.6},
              {"f1": 80.0, "linear_density": 0.6}]
    assert pareto_front(points, F1_DENSITY) == [1, 3]
    assert pareto_front(points[::-1], F1_DENSITY) == [0, 2]  # the first given, whatever the order
    assert [row["name"] for row in frontier_table(points, F1_DENSITY, ["name"])] == ["a", None]
    # A tie with a point that is not on the frontier changes nothing; the hypervolume counts the point once.
    assert pareto_front([*points, {"f1": 60.0, "linear_density": 0.3}], F1_DENSITY) == [1, 3]
    assert hypervolume(points, F1_DENSITY) == pytest.approx(hypervolume([points[1], points[3]], F1_DENSITY))


def test_invalid_points_take_no_part():
    points = [
        {"f1": float("nan"), "linear_density": 0.1},  # NaN: excluded, would otherwise be on the front
        {"f1": 99.0},  # missing density: excluded, would otherwise dominate everything
        {"f1": 70.0, "linear_density": 0.5},
        {"f1": None, "linear_density": 0.01},
        {"f1": "high", "linear_density": 0.01},
        {"f1": float("inf"), "linear_density": 0.5},
        {"f1": 60.0, "linear_density": 0.6},
        {"f1": True, "linear_density": 0.01},  # a flag is no score (True would count as 1)
        {"f1": 99.0, "linear_density": False},
    ]
    assert pareto_front(points, F1_DENSITY) == [2]


def test_empty_and_single():
    assert pareto_front([], F1_DENSITY) == []
    assert pareto_front([{"f1": 1.0, "linear_density": 1.0}], F1_DENSITY) == [0]
    assert pareto_front([{"f1": float("nan"), "linear_density": 1.0}], F1_DENSITY) == []


def test_single_objective_keeps_the_first_best():
    points = [{"f1": 3.0}, {"f1": 5.0}, {"f1": 5.0}, {"f1": 4.0}]
    assert pareto_front(points, [("f1", "max")]) == [1]


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


def test_frontier_table_without_a_density_objective_sorts_along_the_plots_x_axis():
    """The last objective, as the frontier plot shows it across and the report lists it."""
    points = [{"f1": 80.0, "speedup": 1.0}, {"f1": 60.0, "speedup": 3.0}, {"f1": 70.0, "speedup": 2.0}]
    rows = frontier_table(points, [("f1", "max"), ("speedup", "max")], ["f1"])
    assert [r["f1"] for r in rows] == [80.0, 70.0, 60.0]


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

    def same(p, q):
        return all(p[k] == q[k] for k, _ in objectives)

    valid = [i for i, p in enumerate(points) if good(p)]
    return [i for i in valid if not any(dominates(points[j], points[i]) for j in valid if j != i)
            and not any(same(points[j], points[i]) for j in valid if j < i)]


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


# --- hypervolume ---------------------------------------------------------------------------------------------


def test_hypervolume_of_one_point_is_its_box_to_the_default_reference():
    # Reference F1 0, linear density 1: the box is 80 F1 x (1 - 0.5) density.
    assert hypervolume([{"f1": 80.0, "linear_density": 0.5}], F1_DENSITY) == pytest.approx(40.0)


def test_hypervolume_of_two_points_counts_their_overlap_once():
    points = [{"f1": 80.0, "linear_density": 0.5}, {"f1": 60.0, "linear_density": 0.2}]
    # 80 x 0.5 + 60 x 0.8 - 60 x 0.5 (the overlap) = 40 + 48 - 30
    assert hypervolume(points, F1_DENSITY) == pytest.approx(58.0)
    # A dominated point, a point at the reference density and a point worse than the reference add nothing.
    more = points + [{"f1": 50.0, "linear_density": 0.6}, {"f1": 99.0, "linear_density": 1.0},
                     {"f1": -1.0, "linear_density": 0.1}, {"f1": float("nan"), "linear_density": 0.1}]
    assert hypervolume(more, F1_DENSITY) == pytest.approx(58.0)


def test_hypervolume_with_a_given_reference():
    points = [{"f1": 80.0, "linear_density": 0.5}, {"f1": 60.0, "linear_density": 0.2}]
    # Gains over (F1 40, density 1): (40, 0.5) and (20, 0.8); 20 + 16 - 10.
    assert hypervolume(points, F1_DENSITY, {"f1": 40.0}) == pytest.approx(26.0)
    # Gains over (F1 0, density 0.6): only (80, 0.1) and (60, 0.4) count; 8 + 24 - 6.
    assert hypervolume(points, F1_DENSITY, {"linear_density": 0.6}) == pytest.approx(26.0)


def test_hypervolume_of_a_staircase_and_of_both_directions():
    stairs = [{"a": 1.0, "b": 3.0}, {"a": 2.0, "b": 2.0}, {"a": 3.0, "b": 1.0}]
    assert hypervolume(stairs, [("a", "max"), ("b", "max")], {"a": 0.0, "b": 0.0}) == pytest.approx(6.0)
    # The same points minimised against the reference (4, 4): gains (3, 1), (2, 2), (1, 3) -> the same staircase.
    assert hypervolume(stairs, [("a", "min"), ("b", "min")], {"a": 4.0, "b": 4.0}) == pytest.approx(6.0)


def test_hypervolume_in_three_objectives_by_inclusion_exclusion():
    objectives = [("x", "max"), ("y", "max"), ("z", "max")]
    reference = {"x": 0.0, "y": 0.0, "z": 0.0}
    points = [{"x": 2.0, "y": 1.0, "z": 1.0}, {"x": 1.0, "y": 2.0, "z": 1.0}, {"x": 1.0, "y": 1.0, "z": 2.0}]
    # Three boxes of 2, pairwise and triple intersections the unit cube: 6 - 3 + 1.
    assert hypervolume(points, objectives, reference) == pytest.approx(4.0)


def test_hypervolume_edge_cases():
    assert hypervolume([], F1_DENSITY) == 0.0
    assert hypervolume([{"f1": 80.0}], F1_DENSITY) == 0.0
    with pytest.raises(ValueError, match="no default reference"):
        hypervolume([{"loss": 1.0}], [("loss", "min")])
    with pytest.raises(ValueError, match="not an objective"):
        hypervolume([], F1_DENSITY, {"speedup": 1.0})


def test_reference_point_defaults_and_overrides():
    assert reference_point(F1_DENSITY) == {"f1": 0.0, "linear_density": 1.0}
    assert reference_point([("f1", "max"), ("speedup", "max")], {"speedup": 1}) == {"f1": 0.0, "speedup": 1.0}
    with pytest.raises(ValueError, match="finite"):
        reference_point(F1_DENSITY, {"f1": float("inf")})


def test_hypervolume_progress_grows_to_the_whole_set():
    points = [{"f1": 60.0, "linear_density": 0.2}, {"f1": 50.0, "linear_density": 0.6},  # dominated: no growth
              {"f1": None, "linear_density": 0.1},  # a failed trial: no growth
              {"f1": 80.0, "linear_density": 0.5}]
    assert hypervolume_progress(points, F1_DENSITY) == pytest.approx([48.0, 48.0, 48.0, 58.0])
    assert hypervolume_progress([], F1_DENSITY) == []


_metric = st.floats(0.0, 100.0, allow_nan=False)
_density = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(points=st.lists(st.fixed_dictionaries({"f1": _metric, "linear_density": _density, "speedup": _metric}),
                       max_size=12),
       three=st.booleans())
def test_hypervolume_matches_optuna(points, three):
    optuna_hv = pytest.importorskip("optuna._hypervolume")
    import numpy as np

    objectives = [("f1", "max"), ("linear_density", "min")] + ([("speedup", "max")] if three else [])
    reference = reference_point(objectives)
    # Optuna minimises: maximised objectives are negated, and points not better than the reference dropped.
    losses = np.array([[-p[k] if m == "max" else p[k] for k, m in objectives] for p in points]).reshape(
        -1, len(objectives))
    ref = np.array([-reference[k] if m == "max" else reference[k] for k, m in objectives])
    losses = losses[np.all(losses < ref, axis=1)]
    expected = float(optuna_hv.compute_hypervolume(losses, ref)) if len(losses) else 0.0
    assert hypervolume(points, objectives) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert hypervolume_progress(points, objectives)[-1:] == pytest.approx([expected] if points else [])


@settings(max_examples=60, deadline=None)
@given(points=st.lists(st.fixed_dictionaries({"f1": _metric, "linear_density": _density, "speedup": _metric,
                                              "exact_match": _metric}), max_size=10),
       three=st.booleans())
def test_hypervolume_progress_is_the_hypervolume_of_each_prefix(points, three):
    objectives = [("f1", "max"), ("linear_density", "min"), ("speedup", "max")] + \
        ([] if three else [("exact_match", "max")])
    progress = hypervolume_progress(points, objectives)
    assert progress == pytest.approx([hypervolume(points[:n + 1], objectives) for n in range(len(points))],
                                     rel=1e-9, abs=1e-9)
    assert progress == sorted(progress)


def test_the_hypervolume_of_a_long_sweep_in_four_objectives_is_measured_point_by_point(monkeypatch):
    """300 trials over four objectives, a frontier of about a hundred of them: each trial that moves the frontier
    measures the volume only it adds, a few box slices, not the whole frontier again (hundreds of thousands of
    slices a trial, minutes for the sweep)."""
    import random

    from workflows import frontier

    rng = random.Random(0)
    points = []
    for _ in range(300):
        density = rng.uniform(0.05, 1.0)
        f1 = 90 * density ** 0.2 + rng.gauss(0, 2)
        points.append({"f1": f1, "linear_density": density, "speedup": 1 / density ** 0.7 + rng.gauss(0, 0.3),
                       "exact_match": f1 - 10 + rng.gauss(0, 3)})
    objectives = [("f1", "max"), ("linear_density", "min"), ("speedup", "max"), ("exact_match", "max")]
    volume, slices = frontier._volume, []

    def counted(gains):
        slices.append(len(gains))
        return volume(gains)

    monkeypatch.setattr(frontier, "_volume", counted)
    progress = hypervolume_progress(points, objectives)
    assert len(pareto_front(points, objectives)) > 60
    assert len(slices) < 200 * len(points)
    monkeypatch.undo()
    assert progress[-1] == pytest.approx(hypervolume(points, objectives), rel=1e-9)
