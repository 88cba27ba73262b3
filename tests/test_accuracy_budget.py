"""The accuracy bench's budget: every row gets the dense run's 384 x 16 windows, calibration passes included."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("accuracy_budget", ROOT / "bench" / "accuracy_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(bench, masked_checkpoint, tmp_path, row, *argv):
    args = bench.parse_args(["--teacher", str(masked_checkpoint), *argv])
    return bench.row_config(row, 0.5, str(masked_checkpoint), tmp_path, args)


def test_recovery_gets_the_budget_left_after_calibration(bench, masked_checkpoint, tmp_path):
    cfg = _config(bench, masked_checkpoint, tmp_path, "fisher_recovery")
    assert (cfg.calibration_samples, cfg.mask_tuning_samples, cfg.batch_size) == (512, 256, 16)
    assert bench.calibration_steps(cfg) == 48
    assert cfg.fill_steps == 384 - 48
    assert list(cfg.attention_block) == [16, 64]  # one head of the 64-wide, 4-head checkpoint


def test_a_smaller_batch_gets_more_steps_of_the_same_windows(bench, masked_checkpoint, tmp_path):
    cfg = _config(bench, masked_checkpoint, tmp_path, "fisher_recovery", "--set", "batch_size=8",
                  "--set", "alpha_ce=0")
    assert cfg.batch_size == 8 and cfg.alpha_ce == 0
    assert bench.calibration_steps(cfg) == 48  # counted in steps of batch 16 whatever the run's batch
    assert cfg.fill_steps * 8 == (384 - 48) * 16
    accumulated = _config(bench, masked_checkpoint, tmp_path, "topk_fisher", "--set", "grad_accum=2")
    assert accumulated.max_steps * 16 * 2 == (384 - 32) * 16


def test_a_malformed_override_is_refused(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--set", "alpha_ce"])
    assert exit_.value.code == 2
    assert "--set: 'alpha_ce': expected KEY=VALUE" in capsys.readouterr().err


def test_an_unknown_key_is_refused_before_any_work(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--set", "no_such_key=1"])
    assert exit_.value.code == 2
    assert "'no_such_key' is not a run-config key" in capsys.readouterr().err


def test_a_bad_value_is_one_line_and_exit_2_before_any_training(bench, masked_checkpoint, tmp_path, capsys):
    code = bench.main(["--teacher", str(masked_checkpoint), "--rows", "fisher", "--set", "batch_size=abc",
                       "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("accuracy_budget: --set: ") and "batch_size: must be a positive integer" in err[-1]
    assert not (tmp_path / "out").exists()
    # The values come after the row's own, so a key of the row's method is accepted where it applies, and refused
    # with its row's method named where it does not.
    cfg = _config(bench, masked_checkpoint, tmp_path, "fisher_recovery", "--set", "fisher_layer_floor=0.2",
                  "--set", "calibration_samples=64")
    assert (cfg.fisher_layer_floor, cfg.calibration_samples, cfg.fill_steps) == (0.2, 64, 384 - 4 - 16)
    code = bench.main(["--teacher", str(masked_checkpoint), "--rows", "topk", "--set", "fisher_layer_floor=0.2",
                       "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == ("accuracy_budget: --set: fisher_layer_floor: is 0.2, but only method fisher "
                                     "searches a layer floor")


def test_a_forced_split_keeps_the_heads_asked_for_and_fills_the_budget_with_neurons():
    import torch

    from pruning.importance import Importance, StructureCosts

    spec = importlib.util.spec_from_file_location("fisher_split", ROOT / "bench" / "fisher_split.py")
    split = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split)
    est = Importance(torch.tensor([[3.0, 1.0], [2.0, 0.5]]), torch.tensor([[0.1, 0.4, 0.3], [0.2, 0.05, 0.6]]), 8)
    costs = StructureCosts(head=10, neuron=3, total=4 * 10 + 6 * 3)
    head_keep, neuron_keep = split.split_masks(est, costs, 29, heads=2)
    assert head_keep.tolist() == [[True, False], [True, False]]  # the two most important heads
    assert neuron_keep.tolist() == [[False, True, True], [False, False, True]]  # 9 // 3 = 3 neurons, the best
    with pytest.raises(ValueError, match="3 heads cost more than the budget"):
        split.split_masks(est, costs, 29, heads=3)
