"""The accuracy bench's budget: every row gets the dense run's 384 x 16 windows, calibration passes included."""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter

import pytest
import yaml


@pytest.fixture(scope="module")
def bench(bench_script):
    return bench_script("accuracy_budget")


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


def test_a_forced_split_keeps_the_heads_asked_for_and_fills_the_budget_with_neurons(bench_script):
    import torch

    from pruning.importance import Importance, StructureCosts

    split = bench_script("fisher_split")
    est = Importance(torch.tensor([[3.0, 1.0], [2.0, 0.5]]), torch.tensor([[0.1, 0.4, 0.3], [0.2, 0.05, 0.6]]), 8)
    costs = StructureCosts(head=10, neuron=3, total=4 * 10 + 6 * 3)
    head_keep, neuron_keep = split.split_masks(est, costs, 29, heads=2)
    assert head_keep.tolist() == [[True, False], [True, False]]  # the two most important heads
    assert neuron_keep.tolist() == [[False, True, True], [False, False, True]]  # 9 // 3 = 3 neurons, the best
    with pytest.raises(ValueError, match="3 heads cost more than the budget"):
        split.split_masks(est, costs, 29, heads=3)


@pytest.mark.parametrize("heads,message", [
    ("-1", "--heads: head counts must be >= 0, got -1"),
    ("9", "--heads 9: the --teacher model has 8 heads"),
    ("8", "--heads 8: that many heads cost more than the --density 0.3 budget, which pays for at most 4"),
])
def test_a_head_count_the_split_cannot_keep_is_one_line_before_the_fisher_pass(bench_script, tiny_bert_config,
                                                                                 tokenizer, tmp_path, monkeypatch,
                                                                                 capsys, heads, message):
    """fisher_split --heads -1 kept every head but one and reported the split as "heads": -1; a count beyond the
    model's heads or what the --density budget pays stopped with a ValueError traceback after the Fisher pass. Each
    is now one line naming --heads before the pass (exit 2)."""
    from transformers import BertForQuestionAnswering

    teacher = tmp_path / "teacher"  # a dense 2-layer model of 4 heads each
    BertForQuestionAnswering(tiny_bert_config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    monkeypatch.chdir(tmp_path)
    split = bench_script("fisher_split")
    argv = ["--teacher", str(teacher), "--density", "0.3", "--heads", "2", heads]
    if heads.startswith("-"):
        with pytest.raises(SystemExit) as exit_:
            split.main(argv)
        code = exit_.value.code
    else:
        code = split.main(argv)
    err = capsys.readouterr()
    assert code == 2 and message in err.err.strip().splitlines()[-1] and err.out == ""


# --- the budget in FLOPs --------------------------------------------------------------------------------------


def test_the_flop_model_counts_what_the_flop_counter_counts(bench, masked_checkpoint):
    from pruning.bench import linear_flops
    from pruning.checkpoint import load_model
    from pruning.packing import pack
    from pruning.sparsity import sparsity_report

    import torch
    from transformers import BertForQuestionAnswering

    from pruning import importance

    masked = load_model(masked_checkpoint)
    assert bench.forward_flops(masked.config, 96) == linear_flops(masked, 96)
    # A structured cut costs at most its share of the linear weights plus every head's attention products.
    model = BertForQuestionAnswering(masked.config)
    heads = torch.tensor([[True, False, True, True], [False, False, True, False]])
    neurons = torch.arange(128).repeat(2, 1) % 3 == 0
    importance.zero_removed_(model, heads, neurons)
    importance.apply_structure_(model, heads, neurons)
    share = sparsity_report(model).linear_density
    flops = linear_flops(pack(model), 96)
    assert flops < bench.forward_flops(masked.config, 96, share) < linear_flops(masked, 96)
    # ... and exactly that when it removes no head.
    model = BertForQuestionAnswering(masked.config)
    importance.zero_removed_(model, torch.ones(2, 4, dtype=torch.bool), neurons)
    importance.apply_structure_(model, torch.ones(2, 4, dtype=torch.bool), neurons)
    share = sparsity_report(model).linear_density
    assert linear_flops(pack(model), 96) == pytest.approx(bench.forward_flops(masked.config, 96, share))


def _windows(widths: list[int], max_len: int = 96) -> dict:
    """Synthetic training windows whose real tokens number ``widths`` (the rest padding)."""
    import torch

    mask = (torch.arange(max_len) < torch.tensor(widths)[:, None]).long()
    return {"input_ids": mask.clone(), "attention_mask": mask, "token_type_ids": torch.zeros_like(mask)}


def test_a_flop_budget_charges_the_teacher_and_pays_packed_steps_their_size(bench, masked_checkpoint, tmp_path):
    from pruning.checkpoint import load_model

    config = load_model(masked_checkpoint).config
    flops = ["--budget", "flops", "--set", "max_seq_length=96", "--set", "doc_stride=32", "--train-limit", "20"]
    masked = _config(bench, masked_checkpoint, tmp_path, "fisher_recovery", *flops)
    dense, student = (bench.forward_flops(config, 96, share) for share in (1.0, 0.5))
    # Hand-worked, on 64 full windows (every batch 16 windows of the full width): a masked student pays the dense
    # price plus the teacher's forward, 4 forwards a window against the dense run's 3, after the 768 calibration and
    # tuning windows; a packed one pays its share; the cached teacher runs once per window.
    full = _windows([96] * 64)
    assert bench.flop_steps_left(masked, config, 384, full) == (384 * 16 * 3 - 768 * 3) // (16 * 4)
    packed = dataclasses.replace(masked, fill_packed=True)
    assert bench.flop_steps_left(packed, config, 384, full) == int(
        (384 * 16 - 768) * 3 * dense // (16 * (3 * student + dense)))
    cached = dataclasses.replace(packed, teacher_cache=True, alpha_hidden=0.0)
    assert bench.flop_steps_left(cached, config, 384, full) == int(
        ((384 * 16 - 768) * 3 * dense - 64 * dense) // (16 * 3 * student))
    # On the row's real windows, each row's steps are the most that fit: one more would not.
    budget = bench.budget_flops(masked, config, 384)
    rows = [_config(bench, masked_checkpoint, tmp_path, "fisher_recovery", *flops, *more) for more in
            ((), ("--set", "fill_packed=true"),
             ("--set", "fill_packed=true", "--set", "teacher_cache=true", "--alpha-hidden", "0"))]
    assert rows[0].fill_steps < rows[1].fill_steps < rows[2].fill_steps
    features = bench.row_features(rows[2], str(masked_checkpoint))
    windows = int(features["input_ids"].shape[0])
    for cfg in rows:
        bound = functools.partial(bench.forward_flops, config, linear_share=bench.student_share(cfg))
        for steps, fits in ((cfg.fill_steps, True), (cfg.fill_steps + 1, False)):
            widths = sum(bench.step_widths(cfg, features, steps), Counter())
            used = bench.compute_used(cfg, config, widths, bound, teacher_windows=windows)
            assert (used <= budget) is fits
    # The step count is unchanged where the budget counts steps.
    assert _config(bench, masked_checkpoint, tmp_path, "fisher_recovery", "--set", "fill_packed=true").fill_steps \
        == 384 - 48


def test_batches_grouped_by_length_buy_steps_in_a_flop_budget(bench, masked_checkpoint, tmp_path):
    from pruning.checkpoint import load_model

    config = load_model(masked_checkpoint).config
    cfg = _config(bench, masked_checkpoint, tmp_path, "fisher_recovery", "--budget", "flops",
                  "--set", "max_seq_length=96", "--set", "doc_stride=32", "--train-limit", "20")
    # Half the windows full, half 48 tokens: batches drawn at random all hold a full window, grouped ones split
    # 2 + 2 per epoch of 4 steps.
    features = _windows([96, 48] * 32)
    grouped = dataclasses.replace(cfg, group_by_length=True)
    assert [max(w) for w in bench.step_widths(cfg, features, 8)] == [96] * 8
    assert sorted(max(w) for w in bench.step_widths(grouped, features, 4)) == [48, 48, 96, 96]
    left = (384 * 16 - 768) * 3 * bench.forward_flops(config, 96)
    per_epoch = 32 * 4 * (bench.forward_flops(config, 96) + bench.forward_flops(config, 48))
    epochs = int(left // per_epoch)
    steps = bench.flop_steps_left(grouped, config, 384, features)
    assert 4 * epochs <= steps < 4 * (epochs + 1)
    assert steps > bench.flop_steps_left(cfg, config, 384, features)


def test_a_row_reports_what_it_spent_within_the_budget(bench, masked_checkpoint, tokenizer, tmp_path):
    from transformers import BertForQuestionAnswering

    from pruning.checkpoint import load_model, save_model

    teacher = save_model(BertForQuestionAnswering(load_model(masked_checkpoint).config), tokenizer,
                         tmp_path / "teacher")
    out = tmp_path / "out"
    code = bench.main(["--teacher", str(teacher), "--rows", "fisher_recovery", "--densities", "0.5",
                       "--budget", "flops", "--steps", "12", "--calibration", "16", "--tuning", "16",
                       "--eval-limit", "4", "--train-limit", "6", "--repeats", "1", "--alpha-hidden", "0",
                       "--set", "max_seq_length=96", "--set", "doc_stride=32", "--set", "fill_packed=true",
                       "--set", "teacher_cache=true", "--out-dir", str(out)])
    assert code == 0
    import json

    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["budget"] == "flops" and row["config"]["fill_packed"] and row["steps"] > 12 - 2
    assert 0.5 < row["compute"] <= 1.0


def test_a_malformed_results_file_is_one_line_before_any_work(bench, masked_checkpoint, tmp_path, capsys):
    results = tmp_path / "results.json"
    for content, message in (('{"rows": [', "not valid JSON"), ('{"rows": [{"row": "fisher"}]}',
                                                                 "rows[0]: no field 'density_target'")):
        results.write_text(content)
        code = bench.main(["--teacher", str(masked_checkpoint), "--rows", "fisher", "--json", str(results),
                           "--out-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith(f"accuracy_budget: --json {results}: ") and message in err[-1]
        assert not (tmp_path / "out").exists()  # the teacher was not scored
        assert results.read_text() == content  # and nothing was written over the file


def test_a_missing_teacher_is_one_line(bench, tmp_path, capsys):
    code = bench.main(["--teacher", str(tmp_path / "absent"), "--rows", "topk", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"accuracy_budget: {tmp_path / 'absent'}: model directory not found"


def test_the_last_line_reports_the_densities_that_ran(bench):
    rows = [{"row": "fisher", "density_target": 0.4, "retention": 0.8},
            {"row": "fisher_recovery", "density_target": 0.4, "retention": 0.9}]
    assert bench.summary_line(rows, [0.4]) == "accuracy_budget retention@0.4 = 0.900"
    assert bench.summary_line(rows, [0.5, 0.3]) == "accuracy_budget retention@0.5 = n/a retention@0.3 = n/a"


def test_the_teacher_is_scored_again_when_the_rows_evaluate_otherwise(bench, masked_checkpoint, tmp_path):
    """The teacher's cached score is reused only for the same questions, windows (and question cut) and span
    search."""
    cache = tmp_path / "teacher_scores.json"
    cfg = dataclasses.replace(_config(bench, masked_checkpoint, tmp_path, "fisher_recovery"), eval_limit=4,
                              max_seq_length=64, doc_stride=16)
    first = bench.teacher_f1(str(masked_checkpoint), cfg, cache)
    cache.write_text(cache.read_text().replace(f'"f1": {first["f1"]}', '"f1": -1.0'))  # marks the cached entry
    assert bench.teacher_f1(str(masked_checkpoint), cfg, cache)["f1"] == -1.0
    for changed in ({"max_seq_length": 96}, {"doc_stride": 32}, {"max_answer_length": 5}, {"eval_limit": 3},
                    {"max_query_length": 16}):
        again = bench.teacher_f1(str(masked_checkpoint), dataclasses.replace(cfg, **changed), cache)
        assert again["f1"] != -1.0, changed
        cache.write_text(cache.read_text().replace(f'"f1": {again["f1"]}', '"f1": -1.0'))
        cfg = dataclasses.replace(cfg, **changed)


def test_the_results_file_is_on_the_disk_before_it_replaces_the_earlier_one(bench, tmp_path, monkeypatch):
    """It holds every finished row: a power cut just after it is replaced must not leave it empty or cut short."""
    import json
    import os

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append((st.st_ino, st.st_size))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "results.json"
    row = {"row": "fisher", "teacher": "t", "density_target": 0.5, "f1": 80.0}
    for density in (0.5, 0.3):
        synced.clear()
        bench.save_row(path, {"exact_match": 80.0, "f1": 88.0}, {**row, "density_target": density})
        assert (path.stat().st_ino, path.stat().st_size) in synced
    assert [r["density_target"] for r in json.loads(path.read_text())["rows"]] == [0.5, 0.3]
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize("argv,message", [
    (["--rows", "topk", "--densities", "0"], "--densities 0: a linear density must be in (0, 1]"),
    (["--rows", "fisher", "--set", "alpha_ce=-1"], "--set: alpha_ce: must be a number >= 0, got -1"),
    (["--rows", "fisher_recovery", "--calibration", "6144"],
     "--calibration, --tuning, --stages, --steps: the calibration of fisher_recovery takes 400 of the 384 steps"),
])
def test_without_a_teacher_bad_values_are_refused_before_the_teacher_trains(bench, tmp_path, monkeypatch, capsys,
                                                                             argv, message):
    """Without --teacher the script first trains the dense teacher (53 minutes for the shipped config), and only
    then found a density of 0, a bad --set value or a calibration that takes the whole budget; the last of these
    was also exit status 1. Each is now one line and status 2 before the teacher's training starts."""
    dense = tmp_path / "dense.yaml"  # a teacher that trains in seconds, so that a late refusal shows as one
    dense.write_text(yaml.safe_dump({"model_config": {"hidden_size": 32, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 64},
                                     "train_data": "dev", "eval_data": "dev", "train_limit": 4, "eval_limit": 2,
                                     "max_seq_length": 64, "doc_stride": 32, "max_steps": 1, "method": "dense"}))
    monkeypatch.setattr(bench, "DENSE_CONFIG", dense)
    code = bench.main([*argv, "--out-dir", str(tmp_path / "out"), "--eval-limit", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("accuracy_budget: ") and err[-1].endswith(message), err[-1]
    assert not (tmp_path / "out").exists()  # no teacher trained


@pytest.mark.parametrize("density", ["0", "-0.2", "1.5", "nan"])
def test_a_density_out_of_range_names_the_flag_it_came_from(bench, masked_checkpoint, tmp_path, capsys, density):
    """--densities 0 was refused as the shipped config's "target_density: must be in (0, 1], got 0.0", a key the
    command line never wrote."""
    code = bench.main(["--teacher", str(masked_checkpoint), "--rows", "fisher", "--densities", "0.5", density,
                       "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"accuracy_budget: --densities {float(density):g}: a linear density must be in (0, 1]"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("density", ["0", "1.5"])
def test_fisher_split_names_its_density_flag_too(bench_script, tmp_path, monkeypatch, capsys, density):
    """fisher_split --density 0 was refused as the shipped config's target_density, before any model is read."""
    monkeypatch.chdir(tmp_path)
    code = bench_script("fisher_split").main(["--teacher", str(tmp_path / "absent"), "--density", density,
                                              "--heads", "2"])
    err = capsys.readouterr()
    assert code == 2 and err.out == ""
    assert err.err.strip().splitlines() == [f"fisher_split: --density {float(density):g}: a linear density must be in "
                                            "(0, 1]"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag,value", [("--train-limit", "0"), ("--train-limit", "-5"), ("--eval-limit", "0")])
def test_a_question_limit_below_one_names_its_flag_before_any_work(bench, masked_checkpoint, tmp_path, capsys, flag,
                                                                    value):
    """--train-limit 0 was taken for no limit given: the rows trained on the config's 2,000 questions; -5, or
    --eval-limit 0, was refused as the shipped config's train_limit or eval_limit, keys the command line never
    wrote."""
    code = bench.main(["--teacher", str(masked_checkpoint), "--rows", "fisher", flag, value,
                       "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"accuracy_budget: {flag} {value}: must be a number of questions >= 1"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value,rule", [("--steps", "0", "an integer >= 1"), ("--calibration", "0", "an integer >= 1"),
                                             ("--tuning", "-1", "an integer >= 0"), ("--stages", "0", "an integer >= 1"),
                                             ("--alpha-hidden", "-1", "a number >= 0"),
                                             ("--init-scale", "0", "a number > 0"),
                                             ("--recovery-lr", "nan", "a number > 0")])
def test_a_row_setting_out_of_range_names_its_flag_before_any_work(bench, masked_checkpoint, tmp_path, capsys, flag,
                                                                   value, rule):
    """--calibration 0, --tuning -1, --stages 0 or --alpha-hidden -1 were refused as a row config's key
    (calibration_samples, ...) the command line never wrote, and --steps 0 as a budget the calibration overran."""
    code = bench.main(["--teacher", str(masked_checkpoint), "--rows", "fisher_recovery", flag, value,
                       "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"accuracy_budget: {flag} {float(value):g}: must be {rule}"]
    assert not (tmp_path / "out").exists()
