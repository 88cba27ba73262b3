"""The search-efficiency replay: each key's search scale, nearest-point lookup, and what a replay can reach."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = [["f1", "max"], ["linear_density", "min"]]


@pytest.fixture(scope="module")
def bench(bench_script):
    return bench_script("search_efficiency")


def make_table(bench, f1):
    """3 densities x 4 calibration sizes (log spaced) x 4 tuning sizes (neither linear nor log spaced)."""
    search = {"target_density": {"values": [0.3, 0.5, 0.7], "log": False},
              "calibration_samples": {"values": [16.0, 64.0, 256.0, 1024.0], "log": True},
              "mask_tuning_samples": {"values": [0.0, 32.0, 128.0, 512.0], "log": False}}
    rows = [{"kind": "baseline", "status": "finished", "f1": 60.0, "linear_density": 1.0}]
    for d, c, t in itertools.product(*(spec["values"] for spec in search.values())):
        rows.append({"kind": "trial", "status": "finished", "target_density": d, "calibration_samples": c,
                     "mask_tuning_samples": t, "f1": f1(d, c, t), "linear_density": d})
    return bench.Table({"search": search, "objectives": OBJECTIVES,
                        "reference_point": {"f1": 0.0, "linear_density": 1.0}, "rows": rows})


def smooth(d, c, t):
    return 60 * d + np.log2(c) + np.log2(1 + t)


def test_each_key_is_searched_in_the_scale_its_values_are_even_in(bench):
    table = make_table(bench, smooth)
    assert table.scale == {"target_density": "linear", "calibration_samples": "log", "mask_tuning_samples": "index"}
    for key in table.keys:
        dist = table.distribution(key)
        values = sorted(table.search[key]["values"])
        # A uniform draw over the key's box lands on each grid value equally often.
        coordinates = (np.geomspace if dist.log else np.linspace)(dist.low, dist.high, 4001)[:-1]
        counts = {v: 0 for v in values}
        for x in coordinates:
            counts[table._snap(key, float(x))] += 1
        assert max(counts.values()) - min(counts.values()) <= 2, (key, counts)
    assert table.outcome({"target_density": 0.41, "calibration_samples": 100.0, "mask_tuning_samples": 2.6}) \
        == next(r for r in table.trials if (r["target_density"], r["calibration_samples"],
                                             r["mask_tuning_samples"]) == (0.5, 64.0, 512.0))


def test_a_shuffled_grid_reaches_the_grid_hypervolume_by_its_last_trial(bench):
    table = make_table(bench, smooth)
    grid_hv = table.grid_hypervolume()
    # By hand: the dense point (60, 1) adds nothing; the frontier is the best cell per density, F1 = 60 d + 10 + 9.
    best = {d: 60 * d + 10 + np.log2(513) for d in (0.3, 0.5, 0.7)}
    assert grid_hv == pytest.approx(best[0.3] * 0.7 + (best[0.5] - best[0.3]) * 0.5 + (best[0.7] - best[0.5]) * 0.3)
    curves = bench.replay(table, "grid", seeds=3, budget=len(table.trials))
    for curve in curves:
        assert curve == sorted(curve) and curve[-1] == pytest.approx(grid_hv)
        assert bench.trials_to_reach(curve, grid_hv) <= len(table.trials)
    assert bench.trials_to_reach([1.0, 2.0, 3.0], 3.0) == 3
    assert bench.trials_to_reach([1.0, 2.0, 2.9], 3.0, tolerance=0.05) == 3
    assert bench.trials_to_reach([1.0, 2.0], 3.0) == float("inf")


@pytest.mark.parametrize("name,kind,startup", [("tpe", "TPESampler", 10), ("mvtpe:4", "TPESampler", 4),
                                               ("gp:3", "GPSampler", 3), ("nsga2", "NSGAIISampler", None),
                                               ("random", "RandomSampler", None)])
def test_replayed_samplers_are_built_as_a_sweep_builds_them(bench, name, kind, startup):
    sampler = bench._optuna_sampler(name, seed=0)
    assert type(sampler).__name__ == kind
    if startup is not None:
        assert sampler._n_startup_trials == startup
    if kind == "TPESampler":
        assert bool(sampler._multivariate) == name.startswith("mvtpe")


def test_an_optuna_replay_only_sees_measured_outcomes(bench):
    table = make_table(bench, smooth)
    rows = bench._run_optuna(table, "tpe:4", seed=0, budget=12)
    assert len(rows) == 12 and all(any(row is trial for trial in table.trials) for row in rows)
    assert len({id(row) for row in rows}) == 12  # as in a sweep, no grid point runs twice
    with pytest.raises(ValueError, match="unknown sampler"):
        bench._optuna_sampler("cmaes", seed=0)


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "results").glob("search_efficiency*_grid.json")),
                         ids=lambda p: p.name)
def test_the_committed_tables_are_whole_grids(bench, path):
    table = bench.load_table(path)
    assert len(table.trials) >= 48
    assert table.grid_hypervolume() > 0
    assert json.loads(path.read_text())["objectives"] == OBJECTIVES


def test_the_smoothed_table_is_the_additive_fit(bench):
    additive = make_table(bench, smooth)
    smoothed = additive.smoothed()
    for row, fit in zip(additive.trials, smoothed.trials):
        assert fit["f1"] == pytest.approx(row["f1"]) and fit["linear_density"] == pytest.approx(row["linear_density"])

    def interacting(d, c, t):  # one cell far above an additive landscape
        return smooth(d, c, t) + (20.0 if (d, c, t) == (0.5, 64.0, 0.0) else 0.0)

    table = make_table(bench, interacting)
    fits = {(r["target_density"], r["calibration_samples"], r["mask_tuning_samples"]): r["f1"]
            for r in table.smoothed().trials}
    assert fits[(0.5, 64.0, 0.0)] < interacting(0.5, 64.0, 0.0) - 10  # the lucky cell is no longer an outlier
    assert table.smoothed().baseline == table.baseline


def test_a_replay_runs_each_grid_point_once_unless_asked_to_count_repeats(bench):
    """A random sampler over 48 cells repeats cells within a few dozen draws; the sweep would not run them."""
    table = make_table(bench, smooth)
    once = bench._run_optuna(table, "random", seed=0, budget=200)
    assert len(once) == len(table.trials) and len({id(r) for r in once}) == len(table.trials)
    counted = bench._run_optuna(table, "random", seed=0, budget=200, distinct=False)
    assert len(counted) == 200 and len({id(r) for r in counted}) < 200
    # Every cell ran: the curve reaches the grid's volume and stays there to the budget's end.
    (curve,) = bench.replay(table, "random", seeds=1, budget=60)
    assert len(curve) == 60 and curve[-1] == pytest.approx(table.grid_hypervolume())
    assert bench.trials_to_reach(curve, table.grid_hypervolume()) <= len(table.trials)


def test_a_sampler_stuck_on_one_cell_is_steered_outwards_or_stops(bench, monkeypatch):
    """A sampler stuck on one cell: as in a sweep, each repeat is followed by the nearest cell not yet run (steps
    along each key's grid values), until the budget is spent; asked again instead, the search ends after
    DEFAULT_PATIENCE repeats in a row."""
    import optuna

    class Stuck(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, distribution):
            return distribution.low

    table = make_table(bench, smooth)
    monkeypatch.setattr(bench, "_optuna_sampler", lambda name, seed: Stuck(seed=seed))
    rows = bench._run_optuna(table, "stuck", seed=0, budget=10)
    steps = [sum(table.values[key].index(row[key]) for key in table.keys) for row in rows]  # from the low corner
    assert len({id(r) for r in rows}) == 10 and steps == sorted(steps) and steps[:4] == [0, 1, 1, 1]
    assert len(bench._run_optuna(table, "stuck", seed=0, budget=10, steer=False)) == 1


def pairwise(d, c, t):
    """Mask tuning helps most at low density; the best calibration size moves with density: every best cell of a
    density is a different (calibration, tuning) pair, which no additive landscape places."""
    return smooth(d, c, t) + (0.7 - d) * 10 * np.log2(1 + t) / 9 - 3 * abs(np.log2(c) - (4 + 10 * (d - 0.3)))


def test_the_fit_with_interactions_reproduces_a_pairwise_landscape(bench):
    table = make_table(bench, pairwise)
    for row, fit in zip(table.trials, table.smoothed(interactions=True).trials):
        assert fit["f1"] == pytest.approx(row["f1"], abs=1e-9)
    additive = [fit["f1"] - row["f1"] for row, fit in zip(table.trials, table.smoothed().trials)]
    assert max(map(abs, additive)) > 1.0  # the additive fit cannot


def test_an_oracle_that_knows_the_landscape_runs_only_frontier_cells(bench):
    table = make_table(bench, pairwise)
    grid_hv = table.grid_hypervolume()
    best = {}  # by hand: the best cell of each density is the whole frontier
    for row in table.trials:
        if row["f1"] > best.get(row["target_density"], {"f1": -np.inf})["f1"]:
            best[row["target_density"]] = row
    rows = bench._run_oracle(table, budget=len(table.trials), interactions=True)
    assert {id(r) for r in rows[:3]} == {id(r) for r in best.values()}
    assert len(rows) == len(table.trials) and len({id(r) for r in rows}) == len(rows)  # each cell once
    (curve,) = bench.replay(table, "oracle:pairs", seeds=1, budget=10)
    assert bench.trials_to_reach(curve, grid_hv) == 3 and len(curve) == 10
    # Knowing only the main effects, the oracle misses at least one of them at first.
    (additive,) = bench.replay(table, "oracle", seeds=1, budget=48)
    assert bench.trials_to_reach(additive, grid_hv) > 3
    assert len(bench._run_oracle(table, budget=5)) == 5


def test_a_sampler_told_an_earlier_measurement_of_the_grid_finds_its_frontier_sooner(bench):
    """``--prior``: the outcomes of another table of the same grid are in the study before the first trial. Told
    a noisy remeasurement of the pairwise landscape, TPE reaches 95% of the grid's hypervolume sooner than untold
    in every seed, and the whole of it sooner in the median."""
    table = make_table(bench, pairwise)
    rng = np.random.default_rng(0)
    earlier = make_table(bench, lambda d, c, t: pairwise(d, c, t) + rng.normal(0, 0.3))
    grid_hv = table.grid_hypervolume()
    cold = bench.replay(table, "tpe:4", seeds=5, budget=48)
    warm = bench.replay(table, "tpe:4", seeds=5, budget=48, prior=earlier)
    for tolerance in (0.05, 0.0):
        untold = [bench.trials_to_reach(curve, grid_hv, tolerance) for curve in cold]
        told = [bench.trials_to_reach(curve, grid_hv, tolerance) for curve in warm]
        assert np.median(told) < np.median(untold), (tolerance, told, untold)
        if tolerance:
            assert all(w < c for w, c in zip(told, untold)), (told, untold)


def test_a_prior_of_another_grid_is_one_line_and_exit_2(bench, tmp_path, capsys):
    table = _table_file(bench, tmp_path / "grid.json")
    other = json.loads(table.read_text())
    other["search"]["target_density"]["values"] = [0.2, 0.5, 0.7]
    for row in other["rows"]:
        if row.get("target_density") == 0.3:
            row["target_density"] = 0.2
    prior = tmp_path / "other.json"
    prior.write_text(json.dumps(other))
    code = bench.main(["--table", str(table), "--prior", str(prior), "--samplers", "grid,tpe", "--seeds", "1",
                       "--budget", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (f"search_efficiency: --prior {prior}: not a table of the same grid and objectives as "
                       f"--table {table}")


def _table_file(bench, path):
    table = make_table(bench, smooth)
    rows = table.baseline + table.trials
    path.write_text(json.dumps({"search": table.search, "objectives": OBJECTIVES,
                                "reference_point": table.reference, "rows": rows}))
    return path


def test_a_replay_writes_its_results_where_asked_and_says_how_many_seeds_it_ran(bench, tmp_path, capsys):
    table = _table_file(bench, tmp_path / "grid.json")
    out = tmp_path / "new" / "dir" / "results.json"
    code = bench.main(["--table", str(table), "--samplers", "grid,tpe:4", "--seeds", "2", "--budget", "6",
                       "--json", str(out), "--plot", str(tmp_path / "new" / "plot.png")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "after n trials (2 seeds;" in printed
    results = json.loads(out.read_text(), parse_constant=lambda constant: pytest.fail(f"not JSON: {constant}"))
    assert results["budget"] == 6 and set(results["samplers"]) == {"grid", "tpe:4"}
    assert None in results["samplers"]["tpe:4"]["trials_to_100pct"]["all"]  # "never" within 6 trials: null
    assert len(results["samplers"]["grid"]["trials_to_100pct"]["all"]) == 2
    assert (tmp_path / "new" / "plot.png").is_file()


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ('{"rows": [', "not valid JSON (Expecting value: line 1 column 11"),
    ('{"search": {}}', "not a replay table: no field 'objectives'"),
    ('[1, 2]', "not a replay table: "),
])
def test_a_missing_or_malformed_table_is_one_line_and_exit_2(bench, tmp_path, capsys, content, message):
    path = tmp_path / "table.json"
    if content is not None:
        path.write_text(content)
    code = bench.main(["--table", str(path), "--samplers", "grid,tpe", "--seeds", "1", "--budget", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"search_efficiency: --table {path}: {message}")
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("argv,message", [
    (["--samplers", "grid,tpe:x"], "'tpe:x': only tpe:N, mvtpe:N and gp:N take a count"),
    (["--samplers", "grid,gp:0"], "'gp:0': only tpe:N, mvtpe:N and gp:N take a count"),
    (["--samplers", "grid,cmaes"], "'cmaes' is not one of"),
    (["--samplers", "grid,random"], "no Optuna multi-objective sampler"),
    (["--seeds", "0"], "--seeds and --budget must be >= 1"),
])
def test_bad_arguments_are_refused_before_the_table_is_read(bench, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--table", str(tmp_path / "absent.json"), *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_the_replay(bench, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = bench.main(["--table", str(tmp_path / "absent.json"), "--json", str(tmp_path / "file" / "r.json")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"search_efficiency: --json {tmp_path / 'file' / 'r.json'}: {tmp_path / 'file'} is a file, not a directory")


@pytest.mark.parametrize("flag,under", [("--json", ""), ("--json", "new"), ("--plot", "")])
def test_an_output_in_a_directory_that_takes_no_new_files_is_refused_before_the_replay(bench, tmp_path, capsys,
                                                                                        unwritable_dir, flag, under):
    """--json or --plot in a directory nothing can be written into ran every replay, then stopped with a
    PermissionError traceback when it came to write them."""
    out = unwritable_dir / under / "r.out" if under else unwritable_dir / "r.out"
    code = bench.main(["--table", str(_table_file(bench, tmp_path / "grid.json")), "--samplers", "grid,tpe",
                       "--seeds", "1", "--budget", "2", flag, str(out)])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        f"search_efficiency: {flag} {out}: cannot be made ({unwritable_dir} takes no new files)")
    assert captured.out == ""  # refused before the replay


def test_measuring_a_space_that_is_not_a_grid_is_one_line_before_anything_is_made(bench, tmp_path, capsys):
    """--measure of a space whose algorithm is not grid printed the space's line without the script's name and
    exited with status 1, after making the --storage-path directory."""
    space = ROOT / "tune_spaces" / "smoke.yaml"
    code = bench.main(["--measure", "--space", str(space), "--table", str(tmp_path / "table.json"),
                       "--storage-path", str(tmp_path / "store")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"search_efficiency: --space {space}: algorithm: must be grid for a replay table, got optuna")
    assert list(tmp_path.iterdir()) == []


def test_a_hypervolume_no_sampler_reached_is_said_to_be_never_reached_before_the_inf_of_the_last_line(
        bench, tmp_path, capsys):
    """With a budget no Optuna sampler reached the grid's hypervolume in, the lines before the last named a best
    sampler it had not reached ("tpe (never trials, ...): inf of the grid's trials") and the last line said inf
    with nothing to read it by."""
    table = _table_file(bench, tmp_path / "grid.json")
    out = tmp_path / "results.json"
    assert bench.main(["--table", str(table), "--samplers", "grid,tpe", "--seeds", "1", "--budget", "2",
                       "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3:] == [
        "best Optuna sampler to 99.99% of the grid's hypervolume: none, never reached within the budget of 2 trials "
        "(median over seeds): inf",
        "best Optuna sampler to 100% of the grid's hypervolume: none, never reached within the budget of 2 trials "
        "(median over seeds): inf",
        "search_efficiency trials_to_grid_hypervolume optuna/grid = inf"]
    results = json.loads(out.read_text())
    assert results["best_optuna_sampler"] is None and results["ratio"] is None
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "never reached within them is 'never' in the tables and inf in the last line" in " ".join(
        capsys.readouterr().out.split())


@pytest.mark.parametrize("suffix,start", [(".svg", b"<?xml"), (".pdf", b"%PDF"), (".png", b"\x89PNG")])
def test_the_plot_is_drawn_in_the_format_its_suffix_names(bench, tmp_path, suffix, start):
    """--plot curves.svg (or .pdf) was written as PNG bytes under that name since the plot came to be written whole,
    a file no viewer of SVG opens; it is drawn in the format its suffix names again, PNG by default."""
    plot = tmp_path / f"curves{suffix}"
    assert bench.main(["--table", str(_table_file(bench, tmp_path / "grid.json")), "--samplers", "grid,tpe:4",
                       "--seeds", "2", "--budget", "6", "--plot", str(plot)]) == 0
    assert plot.read_bytes().startswith(start)
