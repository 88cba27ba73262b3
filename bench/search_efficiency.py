"""How fast do the search algorithms find the frontier? Replay them against one measured grid of real trials.

Measuring every algorithm's sweep for real would cost many sweeps. Instead one grid of real trial outcomes is
measured once (``--measure``: a real ``fineprune`` sweep of ``bench/search_efficiency_space.yaml``, algorithm
``grid``; the table is committed as ``bench/results/search_efficiency_grid.json``). Each algorithm is then replayed
against the table: a configuration it samples gets the outcome of the nearest measured grid point (per key, in the
key's own scale: log for keys whose grid values are spaced geometrically). The samplers search the box the grid
discretises: each grid value stands for its cell, from halfway to its lower neighbour to halfway to its upper one
(the outer cells as wide as their inner halves), so every grid point has the same share of the box and uniform
random sampling draws the grid's points with equal chances. As in a sweep
(:class:`workflows.distinct.DistinctConfigurations`), no grid point runs twice: a sampler that proposes a measured
point again is told its outcome, and the next trial is the nearest grid point not yet run (``--ask-again`` asks the
sampler again instead; ``--repeats`` counts such proposals as trials). Replays cost no training, so every algorithm
runs with 10 seeds.

Algorithms: ``grid`` (the measured grid in a random order per seed), ``random`` (Optuna's RandomSampler), and
Optuna's multi-objective samplers ``tpe`` (TPESampler, what ``algorithm: optuna`` uses) and ``nsga2``
(NSGAIISampler, population 8); ``gp`` (GPSampler) on request. Each optimises the space's objectives (F1 up, linear
density down); progress is the hypervolume of the frontier found after n trials
(:func:`workflows.frontier.hypervolume_progress`, reference F1 0 and linear density 1). ``oracle`` and
``oracle:pairs`` are no samplers but a reference: a search that knows the table's fitted landscape before its first
trial (:func:`_run_oracle`).

``--prior TABLE`` warm-starts the Optuna samplers as ``fineprune sweep --warm-start`` does: every finished outcome
of an earlier measurement of the same grid is in the study before the first trial (the grid and oracles ignore it).

Last line: ``search_efficiency trials_to_grid_hypervolume optuna/grid = X.XX``: the trials the best Optuna sampler
needs (median over seeds) to reach the whole grid's hypervolume, as a fraction of the grid's trials; ``inf`` when no
Optuna sampler reached it within ``--budget`` trials in the median (its line before says "never reached within the
budget"; the results file has ``null``).

Usage::

    python bench/search_efficiency.py --measure --storage-path runs/search_efficiency   # once: ~48 real trials
    python bench/search_efficiency.py                                                   # replay (a minute)
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from workflows.frontier import hypervolume, hypervolume_progress, reference_point  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from script_input import (InputError, check_output, one_line_errors, read_json, write_bytes,  # noqa: E402
                          write_text)

__all__ = ["measure", "load_table", "replay", "main"]

logger = logging.getLogger("search_efficiency")

SPACE = ROOT / "bench" / "search_efficiency_space.yaml"
TABLE = ROOT / "bench" / "results" / "search_efficiency_grid.json"
METRICS = ("exact_match", "f1", "linear_density", "total_density", "heads_removed", "speedup")
OPTUNA_SAMPLERS = ("tpe", "mvtpe", "nsga2", "gp")  # mvtpe: TPE with multivariate: true
DEFAULT_SAMPLERS = ("grid", "random", "tpe", "nsga2")
CHECKPOINTS = (4, 8, 12, 16, 24, 32, 48, 96, 192)
# How close to the grid's hypervolume counts as reaching it: the whole volume, then to 0.01% (points whose densities
# differ in the eighth digit split off slivers of volume that no measurement resolves), 1% and 5%.
TOLERANCES = (0.0, 1e-4, 0.01, 0.05)


def _labels() -> list[str]:
    return [f"{100 * (1 - t):g}" for t in TOLERANCES]


# --------------------------------------------------------------------------------------------------------------
# Measuring the table (once)
# --------------------------------------------------------------------------------------------------------------


def _unevenness(values: Sequence[float]) -> float:
    """How unevenly the sorted values step: the steps' standard deviation over their mean (0 when even)."""
    steps = np.diff(sorted(float(v) for v in values))
    return float(np.std(steps) / np.mean(steps)) if len(steps) > 1 else 0.0


def _log_spaced(values: Sequence[float]) -> bool:
    """True when the grid values are more evenly spaced in log scale than in linear scale."""
    values = sorted(float(v) for v in values)
    if len(values) < 3 or values[0] <= 0:
        return False
    return _unevenness(np.log(values)) < _unevenness(values)


def grid_space(space_path: Path) -> Any:
    """The search space in ``space_path``, or an :class:`InputError` where it is not a grid (a replay table is)."""
    from workflows.space import load_space

    space = load_space(space_path)
    if space.algorithm != "grid":
        raise InputError(f"--space {space_path}: algorithm: must be grid for a replay table, got {space.algorithm}")
    return space


def measure(space_path: Path, out: Path, tracking_uri: str, storage_path: str) -> dict[str, Any]:
    """Run the grid sweep of ``space_path`` for real and write its trials' outcomes as the replay table."""
    from mlflow.tracking import MlflowClient

    from workflows import record, tracking
    from workflows.sweep import run_sweep

    space = grid_space(space_path)
    started = time.time()
    summary = run_sweep(space_path, tracking_uri=tracking_uri, storage_path=storage_path,
                        report_dir=Path(storage_path) / "report")
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = tracking.trial_runs(client, summary["experiment"], summary["parent_run_id"], include_baseline=True)
    rows = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        kind = run.data.tags.get(record.TAG_KIND)
        row: dict[str, Any] = {"run_id": run.info.run_id, "kind": kind,
                               "status": run.data.tags.get(record.TAG_STATUS, "unknown")}
        for key in space.search:
            value = run.data.params.get(f"searched.{key}")
            row[key] = None if value is None else float(value)
        row.update({key: run.data.metrics.get(key) for key in METRICS})
        if run.info.end_time:
            row["seconds"] = round((run.info.end_time - run.info.start_time) / 1000.0, 1)
        rows.append(row)
    search = {key: {"values": [float(v) for v in spec.values], "log": _log_spaced(spec.values)}
              for key, spec in space.search.items()}
    table = {
        "space": str(space_path.relative_to(ROOT)) if space_path.is_relative_to(ROOT) else str(space_path),
        "search": search,
        "objectives": [list(o) for o in space.objectives],
        "reference_point": reference_point(space.objectives, space.reference_point),
        "sweep_wall_seconds": summary.get("wall_seconds"),
        "measure_wall_seconds": round(time.time() - started, 1),
        "measured": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    write_text(out, json.dumps(table, indent=1) + "\n")
    trials = [r for r in rows if r["kind"] == "trial"]
    logger.info("wrote %s: %d trials (%d finished), sweep wall %.0f s", out, len(trials),
                sum(r["status"] == "finished" for r in trials), summary.get("wall_seconds") or 0)
    return table


# --------------------------------------------------------------------------------------------------------------
# Replaying the search algorithms
# --------------------------------------------------------------------------------------------------------------


class Table:
    """The measured grid: outcome lookup by nearest grid point.

    Each key is searched in the scale its grid values are even in: linear, log (``"log": true`` in the table), or,
    when neither (e.g. 0, 32, 128, 512), the values' rank: a coordinate in [-0.5, n - 0.5] rounded to the nearest
    index. Either way every grid value stands for a cell of equal width.
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.search: dict[str, dict[str, Any]] = data["search"]
        self.keys = list(self.search)
        self.values = {key: sorted(float(v) for v in spec["values"]) for key, spec in self.search.items()}
        # Linear when the values step evenly within 10%.
        self.scale = {key: "log" if spec["log"] else "linear" if _unevenness(spec["values"]) < 0.1 else "index"
                      for key, spec in self.search.items()}
        self.objectives = [tuple(o) for o in data["objectives"]]
        self.reference = dict(data["reference_point"])
        self.trials = [r for r in data["rows"] if r["kind"] == "trial"]
        self.baseline = [r for r in data["rows"] if r["kind"] == "baseline"]
        self._index = {tuple(row[key] for key in self.keys): row for row in self.trials}
        expected = math.prod(len(spec["values"]) for spec in self.search.values())
        if len(self._index) != expected:
            raise ValueError(f"table: {len(self._index)} distinct grid points, the grid has {expected}")

    def distribution(self, key: str) -> Any:
        """The Optuna distribution a sampler searches for ``key``: the box its grid values' cells fill."""
        from optuna.distributions import FloatDistribution

        values = self.values[key]
        if self.scale[key] == "index":
            return FloatDistribution(-0.5, len(values) - 0.5)
        if len(values) == 1:
            return FloatDistribution(values[0], values[0])
        log = self.scale[key] == "log"
        xs = np.log(values) if log else np.asarray(values)
        low, high = xs[0] - (xs[1] - xs[0]) / 2, xs[-1] + (xs[-1] - xs[-2]) / 2
        return FloatDistribution(*(np.exp([low, high]) if log else (low, high)), log=log)

    def _snap(self, key: str, coordinate: float) -> float:
        values = self.values[key]
        if self.scale[key] == "index":
            return values[min(max(int(round(coordinate)), 0), len(values) - 1)]
        if self.scale[key] == "log":
            return min(values, key=lambda v: abs(math.log(v) - math.log(coordinate)))
        return min(values, key=lambda v: abs(v - coordinate))

    def cell(self, row: dict[str, Any]) -> dict[str, float]:
        """A row's grid point: searched key -> grid value."""
        return {key: row[key] for key in self.keys}

    def coordinates(self, cell: dict[str, float]) -> dict[str, float]:
        """A grid point in the samplers' coordinates (its rank for a key searched by rank)."""
        return {key: float(self.values[key].index(cell[key])) if self.scale[key] == "index" else cell[key]
                for key in self.keys}

    def outcome(self, params: dict[str, float]) -> dict[str, Any]:
        """The measured trial nearest to ``params`` (coordinates in each key's search scale)."""
        return self._index[tuple(self._snap(key, params[key]) for key in self.keys)]

    def point(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row as a frontier point (empty when the trial did not finish: it adds no volume)."""
        return {k: row[k] for k in METRICS if row.get(k) is not None} if row["status"] == "finished" else {}

    def grid_hypervolume(self) -> float:
        return hypervolume([self.point(r) for r in self.trials], self.objectives, self.reference)

    def smoothed(self, interactions: bool = False) -> Table:
        """The same grid with each objective replaced by its additive fit over the keys (a least-squares value per
        grid value of each key, summed): no noise and no interactions, the landscape a model-based sampler learns
        best. Replaying it separates what the samplers lose to the measured table's noise from what they lose to
        having to hit single cells of a grid. ``interactions`` adds a value per pair of grid values of every two
        keys (what each key's best value does as another key changes)."""
        finished = [r for r in self.trials if r["status"] == "finished"]
        columns: list[tuple[tuple[str, Any], ...]] = [((key, v),) for key in self.keys
                                                      for v in self.search[key]["values"]]
        if interactions:
            columns += [((a, v), (b, w)) for a, b in itertools.combinations(self.keys, 2)
                        for v in self.search[a]["values"] for w in self.search[b]["values"]]

        def design(rows: list[dict[str, Any]]) -> np.ndarray:
            return np.array([[1.0] + [float(all(r[key] == v for key, v in column)) for column in columns]
                             for r in rows])

        rows = [dict(r) for r in self.trials]
        for metric, _ in self.objectives:
            coef, *_ = np.linalg.lstsq(design(finished), np.array([r[metric] for r in finished]), rcond=None)
            for row, fit in zip(rows, design(rows) @ coef):
                if row["status"] == "finished":
                    row[metric] = float(fit)
        return Table({"search": self.search, "objectives": [list(o) for o in self.objectives],
                      "reference_point": self.reference, "rows": self.baseline + rows})


def _optuna_sampler(name: str, seed: int):
    """``tpe``, ``mvtpe`` (``tpe`` with ``multivariate: true``), ``gp``, ``nsga2`` (population 8) or ``random``,
    built as a sweep builds it; ``tpe:4``, ``mvtpe:4`` and ``gp:4`` start the model after 4 random trials instead
    of Optuna's 10."""
    from workflows.space import SAMPLERS, SamplerSpec
    from workflows.tune_search import optuna_sampler

    kind, _, startup = name.partition(":")
    multivariate = kind == "mvtpe"
    kind = "tpe" if multivariate else kind
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}")
    spec = SamplerSpec(type=kind, startup_trials=int(startup) if startup else None,
                       population_size=8 if kind == "nsga2" else None, multivariate=multivariate)
    return optuna_sampler(spec, seed)


def _run_optuna(table: Table, name: str, seed: int, budget: int, distinct: bool = True,
                steer: bool = True, prior: Table | None = None) -> list[dict[str, Any]]:
    """The trials an Optuna sampler runs against the table, in order.

    ``distinct``: as the sweep does (:class:`workflows.distinct.DistinctConfigurations`), a grid point already
    measured is not run again: the sampler is told its outcome and, with ``steer``, told to suggest next the nearest
    grid point not yet run (:func:`workflows.distinct.nearest_untried`); without, it is asked again, and the search
    ends when it offers nothing new ``DEFAULT_PATIENCE`` times in a row. Either way it ends when every grid point
    ran. Otherwise each suggestion is a trial, repeats included. ``prior``: another table of the same grid (an
    earlier sweep), whose finished outcomes the study holds before its first trial, as a warm-started sweep's does.
    """
    import optuna
    from optuna.trial import TrialState

    from workflows.distinct import DEFAULT_PATIENCE, configuration_key, nearest_untried

    distributions = {key: table.distribution(key) for key in table.keys}
    directions = ["maximize" if mode == "max" else "minimize" for _, mode in table.objectives]
    study = optuna.create_study(directions=directions, sampler=_optuna_sampler(name, seed))
    for row in prior.trials if prior is not None else ():
        point = prior.point(row)
        if point:
            study.add_trial(optuna.trial.create_trial(
                params=table.coordinates(prior.cell(row)), distributions=distributions,
                values=[point[metric] for metric, _ in table.objectives]))
    ladders = {key: table.values[key] for key in table.keys}
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    ran: set[str] = set()
    in_a_row = 0
    while len(rows) < budget and len(ran) < len(table.trials):
        trial = study.ask(distributions)
        row = table.outcome(trial.params)
        point = table.point(row)
        if point:
            study.tell(trial, [point[metric] for metric, _ in table.objectives])
        else:
            study.tell(trial, state=TrialState.FAIL)
        key = configuration_key(table.cell(row))
        if distinct and key in ran:
            in_a_row += 1
            if in_a_row >= DEFAULT_PATIENCE:
                break
            nearest = nearest_untried(table.cell(row), ladders, ran, rng) if steer else None
            if nearest is not None:
                study.enqueue_trial(table.coordinates(nearest))
            continue
        in_a_row = 0
        if distinct:
            ran.add(key)
        rows.append(row)
    return rows


def _run_grid(table: Table, seed: int, budget: int) -> list[dict[str, Any]]:
    order = list(table.trials)
    np.random.default_rng(seed).shuffle(order)
    return order[:budget]


ORACLES = {"oracle": False, "oracle:pairs": True}  # name -> the fit it knows has pairwise interactions


def _run_oracle(table: Table, budget: int, interactions: bool = False) -> list[dict[str, Any]]:
    """The trials of a search that knows the table's fitted landscape before its first trial (``oracle``: the
    additive fit of :meth:`Table.smoothed`; ``oracle:pairs``: with every pairwise interaction) but not its noise.

    Each trial is the grid point not yet run whose fitted outcome would add the most to the hypervolume of the
    outcomes measured so far; when none would add any, the one whose fitted outcome falls least short of that
    frontier (the smallest step, each objective in units of its range over the table, that would take it out of
    the region the measured points dominate). No sampler can know the fit, which takes the whole table to make;
    the oracle shows what knowing a landscape of that shape is worth, not a bound for every search.
    """
    fitted = table.smoothed(interactions).trials
    signs = [1.0 if mode == "max" else -1.0 for _, mode in table.objectives]
    metrics = [metric for metric, _ in table.objectives]
    spans = []
    for metric in metrics:
        values = [r[metric] for r in table.trials if r["status"] == "finished"]
        spans.append((max(values) - min(values)) or 1.0)

    def shortfall(candidate: dict[str, Any], front: list[dict[str, Any]]) -> float:
        # To escape a point that dominates it, a candidate must pass it in one objective: the smallest gap.
        gaps = [min(max(sign * (p[m] - candidate[m]) / span, 0.0) for m, sign, span in zip(metrics, signs, spans))
                for p in front if p]
        return max(gaps, default=0.0)

    points = [table.point(r) for r in table.baseline]  # measured outcomes so far
    untried = list(range(len(table.trials)))
    rows: list[dict[str, Any]] = []
    while untried and len(rows) < budget:
        base = hypervolume(points, table.objectives, table.reference)

        def value(i: int) -> tuple[float, float]:
            guess = table.point(fitted[i])
            gain = hypervolume(points + [guess], table.objectives, table.reference) - base
            return gain, -shortfall(guess, points)

        best = max(untried, key=value)
        untried.remove(best)
        rows.append(table.trials[best])
        points.append(table.point(table.trials[best]))
    return rows


def replay(table: Table, sampler: str, seeds: int, budget: int, distinct: bool = True,
           steer: bool = True, prior: Table | None = None) -> list[list[float]]:
    """Hypervolume after each of ``budget`` trials, one list per seed (the dense baseline counts from the start, as
    in a sweep); a search that ends sooner keeps its last value."""
    curves = []
    for seed in range(seeds):
        if sampler == "grid":
            rows = _run_grid(table, seed, budget)
        elif sampler in ORACLES:
            rows = _run_oracle(table, budget, ORACLES[sampler])
        else:
            rows = _run_optuna(table, sampler, seed, budget, distinct, steer, prior)
        start = [table.point(r) for r in table.baseline]
        curve = hypervolume_progress(start + [table.point(r) for r in rows], table.objectives, table.reference)
        curve = curve[len(start):] or [hypervolume(start, table.objectives, table.reference)]
        curves.append(curve + [curve[-1]] * (budget - len(curve)))
    return curves


def trials_to_reach(curve: Sequence[float], target: float, tolerance: float = 0.0) -> float:
    """1-based trial count at which the curve reaches ``target`` (within a relative tolerance); inf if never."""
    goal = target * (1.0 - tolerance) - 1e-9 * abs(target)
    for i, value in enumerate(curve):
        if value >= goal:
            return float(i + 1)
    return math.inf


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _fmt(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:g}"


def report(table: Table, curves: dict[str, list[list[float]]], budget: int, plot: Path | None) -> dict[str, Any]:
    """Print the comparison (Markdown tables) and return it as a dict; the last printed line is the summary."""
    grid_hv = table.grid_hypervolume()
    n_grid = len(table.trials)
    checkpoints = [n for n in CHECKPOINTS if n <= budget]
    results: dict[str, Any] = {"grid_trials": n_grid, "grid_hypervolume": grid_hv, "budget": budget,
                               "samplers": {}}
    print(f"grid: {n_grid} measured trials, {sum(r['status'] == 'finished' for r in table.trials)} finished, "
          f"hypervolume {grid_hv:.4f} (reference {table.reference})")
    print()
    seeds = len(next(iter(curves.values())))
    print(f"Median fraction of the grid's hypervolume after n trials ({seeds} seeds; min-max in brackets):")
    print()
    print("| sampler | " + " | ".join(f"n={n}" for n in checkpoints) + " |")
    print("|---|" + "---|" * len(checkpoints))
    for name, runs in curves.items():
        cells = []
        for n in checkpoints:
            fractions = [run[n - 1] / grid_hv for run in runs]
            cells.append(f"{_median(fractions):.3f} [{min(fractions):.2f}-{max(fractions):.2f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("Trials to reach the grid's hypervolume (median over seeds [min-max]; 'never' within the budget of "
          f"{budget}):")
    print()
    print("| sampler | " + " | ".join(f"{label}%" for label in _labels()) + " | 100%: as a fraction of the grid's "
          "trials |")
    print("|---|" + "---|" * (len(TOLERANCES) + 1))
    for name, runs in curves.items():
        entry = {}
        cells = []
        for tolerance, label in zip(TOLERANCES, _labels()):
            reached = [trials_to_reach(run, grid_hv, tolerance) for run in runs]
            median = _median(reached)
            entry[f"trials_to_{label}pct"] = {"median": median, "all": reached}
            cells.append(f"{_fmt(median)} [{_fmt(min(reached))}-{_fmt(max(reached))}]")
        exact = entry["trials_to_100pct"]["median"]
        cells.append("never" if math.isinf(exact) else f"{exact / n_grid:.2f}")
        entry["median_curve"] = [_median([run[i] for run in runs]) for i in range(budget)]
        results["samplers"][name] = entry
        print(f"| {name} | " + " | ".join(cells) + " |")
    if plot is not None:
        _plot(curves, grid_hv, n_grid, plot)
    print()
    for label in reversed(_labels()[:2]):  # to 0.01% first; the last line is the whole volume
        optuna = {name: results["samplers"][name][f"trials_to_{label}pct"]["median"] for name in curves
                  if name.partition(":")[0] in OPTUNA_SAMPLERS}
        best = min(optuna, key=optuna.get)
        ratio = optuna[best] / n_grid
        if math.isinf(ratio):  # every one "never": none is best, and the ratio is inf
            best = None
            print(f"best Optuna sampler to {label}% of the grid's hypervolume: none, never reached within the "
                  f"budget of {budget} trials (median over seeds): inf")
        else:
            print(f"best Optuna sampler to {label}% of the grid's hypervolume: {best} ({_fmt(optuna[best])} "
                  f"trials, median over seeds, of the grid's {n_grid}): {ratio:.2f} of the grid's trials")
        results[f"best_optuna_sampler_{label}pct"] = best
        results[f"ratio_{label}pct"] = ratio
    results.update({"best_optuna_sampler": best, "ratio": ratio})
    print(f"search_efficiency trials_to_grid_hypervolume optuna/grid = {ratio:.2f}")
    return results


def _finite(value: Any) -> Any:
    """``value`` with every infinite or NaN float as None: "never" in the results file is ``null``, which any JSON
    reader takes (``Infinity`` is Python's own extension)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _plot(curves: dict[str, list[list[float]]], grid_hv: float, n_grid: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in curves.items():
        median = [statistics.median(run[i] for run in runs) / grid_hv for i in range(len(runs[0]))]
        low = [min(run[i] for run in runs) / grid_hv for i in range(len(runs[0]))]
        high = [max(run[i] for run in runs) / grid_hv for i in range(len(runs[0]))]
        xs = range(1, len(median) + 1)
        (line,) = ax.plot(xs, median, label=name)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.12)
    ax.axvline(n_grid, color="#999999", linestyle="--", linewidth=0.8)
    ax.set_xlabel("trials")
    ax.set_ylabel("fraction of the grid's hypervolume")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    image = io.BytesIO()  # drawn here, written whole: in the format its suffix names (.svg, .pdf), as savefig does
    suffix = path.suffix[1:].lower()
    fig.savefig(image, format=suffix if suffix in fig.canvas.get_supported_filetypes() else "png", dpi=120,
                bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, image.getvalue())


def load_table(path: Path, flag: str = "--table") -> Table:
    """The replay table in ``path``; a missing, malformed or incomplete file is an :class:`InputError` naming it."""
    data = read_json(path, flag)
    try:
        return Table(data)
    except KeyError as err:
        raise InputError(f"{flag} {path}: not a replay table: no field {err}") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise InputError(f"{flag} {path}: not a replay table: {err}") from None


def _sampler_problem(name: str) -> str | None:
    """Why ``name`` is not a sampler the replay knows (None when it is one)."""
    if name in ORACLES:
        return None
    kind, colon, startup = name.partition(":")
    if kind not in ("grid", "random", *OPTUNA_SAMPLERS):
        return f"{name!r} is not one of grid, random, {', '.join(OPTUNA_SAMPLERS)}, {', '.join(ORACLES)}"
    if colon and (kind not in ("tpe", "mvtpe", "gp") or not startup.isdigit() or int(startup) < 1):
        return f"{name!r}: only tpe:N, mvtpe:N and gp:N take a count of startup trials (N a whole number >= 1)"
    return None


@one_line_errors("search_efficiency")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="run the grid sweep for real and write the table")
    parser.add_argument("--space", type=Path, default=SPACE)
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--tracking-uri", default=None, help="for --measure (default sqlite:///<storage>/mlflow.db)")
    parser.add_argument("--storage-path", default="runs/search_efficiency", help="for --measure")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=int, default=None,
                        help="trials per replay (default: 4 x the grid); a hypervolume never reached within them is "
                             "'never' in the tables and inf in the last line")
    parser.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS),
                        help=f"comma-separated, of grid, random, {', '.join(OPTUNA_SAMPLERS)} (mvtpe: multivariate "
                             "TPE); tpe:N, mvtpe:N and gp:N start the model after N random trials (Optuna's default: "
                             "10); oracle and oracle:pairs know the table's fitted landscape beforehand (a reference, "
                             "not a sampler)")
    parser.add_argument("--smooth", action="store_true",
                        help="replay the table's additive fit (no noise, no interactions) instead of its outcomes")
    parser.add_argument("--repeats", action="store_true",
                        help="count a sampler's repeated grid points as trials (the sweep runs each configuration "
                             "once)")
    parser.add_argument("--ask-again", action="store_true",
                        help="answer a repeated grid point by asking the sampler again, not with the nearest grid "
                             "point not yet run")
    parser.add_argument("--prior", type=Path,
                        help="a table of an earlier sweep of the same grid: the Optuna samplers are told its outcomes "
                             "before their first trial (a warm start, as `fineprune sweep --warm-start`)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path,
                        help="draw the median curves here (PNG, or the format its suffix names: .svg, .pdf)")
    args = parser.parse_args(argv)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    problems = [problem for problem in map(_sampler_problem, samplers) if problem]
    if problems:
        parser.error(f"--samplers: {problems[0]}")
    if not any(s.partition(":")[0] in OPTUNA_SAMPLERS for s in samplers):
        parser.error(f"--samplers: no Optuna multi-objective sampler ({', '.join(OPTUNA_SAMPLERS)}) among {samplers}")
    if args.seeds < 1 or (args.budget is not None and args.budget < 1):
        parser.error("--seeds and --budget must be >= 1")
    check_output(args.json, "--json")
    check_output(args.plot, "--plot")
    if args.measure:
        check_output(args.table, "--table")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.measure:
        grid_space(args.space.resolve())  # before the storage directory is made
        storage = str(Path(args.storage_path).resolve())
        uri = args.tracking_uri or f"sqlite:///{storage}/mlflow.db"
        Path(storage).mkdir(parents=True, exist_ok=True)
        measure(args.space.resolve(), args.table, uri, storage)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = load_table(args.table)
    if args.smooth:
        table = table.smoothed()
    prior = load_table(args.prior, "--prior") if args.prior else None
    if prior is not None and (prior.values != table.values or prior.objectives != table.objectives):
        raise InputError(f"--prior {args.prior}: not a table of the same grid and objectives as --table {args.table}")
    budget = args.budget or 4 * len(table.trials)
    curves: dict[str, list[list[float]]] = {}
    for name in samplers:
        started = time.time()
        curves[name] = replay(table, name, args.seeds, budget, distinct=not args.repeats, steer=not args.ask_again,
                              prior=prior)
        logger.info("replayed %s: %d seeds x %d trials in %.1f s", name, args.seeds, budget, time.time() - started)
    if prior is not None:
        print(f"\nThe Optuna samplers were told the {sum(1 for r in prior.trials if prior.point(r))} finished outcomes "
              f"of {args.prior} before their first trial (a warm start).")
    results = report(table, curves, budget, args.plot)
    if prior is not None:
        results["prior"] = str(args.prior)
    if args.json:
        write_text(args.json, json.dumps(_finite(results), indent=1, default=str, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
