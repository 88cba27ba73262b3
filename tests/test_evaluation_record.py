"""What a model directory records about how its run evaluated it, and `fineprune eval`/`ask` reading it back:
a run's own model, packed or exported, is scored as the run scored it without repeating its settings."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pruning.checkpoint import EVALUATION_KEY, CheckpointError, read_evaluation
from pruning.config import EVALUATION_KEYS, RunConfig
from pruning.trainer import train
from workflows import cli

# Settings that differ from every default of eval and ask (384, 128, 64, 30, 20).
SETTINGS = dict(max_seq_length=96, doc_stride=24, max_query_length=16, max_answer_length=4, n_best=3)
EVAL_LIMIT = 16


def run_cfg(tmp_path: Path, **overrides) -> RunConfig:
    values = dict(model_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    max_position_embeddings=128),
                  train_data="dev", eval_data="dev", train_limit=16, eval_limit=EVAL_LIMIT, batch_size=8,
                  max_steps=4, learning_rate=1e-3, method="topk", attention_block=(16, 16), target_density=0.5,
                  initial_warmup=0, final_warmup=1, output_dir=str(tmp_path / "run"), log_every=100, **SETTINGS)
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One tiny topk run with non-default windows and span search: its final metrics."""
    return train(run_cfg(tmp_path_factory.mktemp("record")), progress=False)


def evaluated(capsys, model_dir: str | Path, *flags: str) -> dict:
    assert cli.main(["eval", str(model_dir), "--eval-limit", str(EVAL_LIMIT), "--no-progress", *flags]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_final_model_and_checkpoint_record_the_runs_evaluation(run):
    final = Path(run["model_dir"])
    assert read_evaluation(final) == SETTINGS
    assert read_evaluation(final.parent / "checkpoint") == SETTINGS


def test_eval_of_a_runs_own_models_reproduces_its_figures(run, capsys, tmp_path):
    final = Path(run["model_dir"])
    result = evaluated(capsys, final)
    assert {key: result[key] for key in EVALUATION_KEYS} == SETTINGS
    assert (result["exact_match"], result["f1"]) == pytest.approx((run["exact_match"], run["f1"]), abs=1e-9)

    packed = tmp_path / "packed"
    assert cli.main(["pack", str(final), str(packed), "--questions", "2", "--repeats", "1"]) == 0
    capsys.readouterr()
    assert read_evaluation(packed) == SETTINGS
    result = evaluated(capsys, packed)
    assert {key: result[key] for key in EVALUATION_KEYS} == SETTINGS
    assert (result["exact_match"], result["f1"]) == pytest.approx((run["exact_match"], run["f1"]), abs=1e-9)

    exported = tmp_path / "exported"
    assert cli.main(["export", str(packed), str(exported), "--questions", "2"]) == 0
    capsys.readouterr()
    assert read_evaluation(exported) == SETTINGS
    result = evaluated(capsys, exported, "--variant", "fp32")
    assert {key: result[key] for key in EVALUATION_KEYS} == SETTINGS


def test_a_flag_wins_over_the_record(run, capsys):
    result = evaluated(capsys, run["model_dir"], "--doc-stride", "40", "--n-best", "7")
    assert {key: result[key] for key in EVALUATION_KEYS} == {**SETTINGS, "doc_stride": 40, "n_best": 7}


def test_ask_takes_the_recorded_span_search(run, capsys):
    context = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 3)
    answers = {}
    for flags in ((), ("--max-answer-length", "4"), ("--max-answer-length", "30")):
        assert cli.main(["ask", run["model_dir"], "--question", "What jumps?", "--context", context, *flags]) == 0
        answers[flags] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answers[()] == answers[("--max-answer-length", "4")]
    assert answers[()] != answers[("--max-answer-length", "30")]  # the random model prefers a longer span


def _copy_with_record(model_dir: Path, dest: Path, edit) -> Path:
    """A copy of a model directory whose config.json ``edit`` (a function of the parsed config) has changed."""
    dest.mkdir()
    for entry in model_dir.iterdir():
        (dest / entry.name).write_bytes(entry.read_bytes())
    config = json.loads((dest / "config.json").read_text())
    edit(config)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_a_directory_without_the_record_keeps_the_defaults(run, capsys, tmp_path):
    final = Path(run["model_dir"])
    bare = _copy_with_record(final, tmp_path / "bare", lambda config: config.pop(EVALUATION_KEY))
    assert read_evaluation(bare) == {}
    result = evaluated(capsys, bare)
    # 384-token windows cut to the model's 128 positions, the stride to half a window.
    assert {key: result[key] for key in EVALUATION_KEYS} == dict(max_seq_length=128, doc_stride=64,
                                                                  max_query_length=64, max_answer_length=30, n_best=20)


@pytest.mark.parametrize("record,needle", [([96], "fineprune_evaluation: expected an object"),
                                           ({"n_best": 0}, "fineprune_evaluation.n_best: must be a whole number"),
                                           ({"doc_stride": "32"}, "fineprune_evaluation.doc_stride")])
def test_a_broken_record_is_one_line_naming_the_file(run, capsys, tmp_path, record, needle):
    broken = _copy_with_record(Path(run["model_dir"]), tmp_path / "broken",
                               lambda config: config.__setitem__(EVALUATION_KEY, record))
    with pytest.raises(CheckpointError, match="config.json"):
        read_evaluation(broken)
    assert cli.main(["eval", str(broken), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and str(broken / "config.json") in err[-1]


def test_a_resumed_run_records_its_own_evaluation(tmp_path):
    """The span search may change on resume: the final model records what the resumed run evaluated with."""
    cfg = run_cfg(tmp_path, eval_every=2)
    step_two = tmp_path / "step_two"

    def keep_step_two(metrics, checkpoint_dir):
        if metrics["step"] == 2:
            shutil.copytree(checkpoint_dir, step_two)

    train(cfg, report=keep_step_two, progress=False)
    assert read_evaluation(step_two) == SETTINGS
    changed = dataclasses.replace(cfg, output_dir=str(tmp_path / "resumed"), n_best=6, max_answer_length=8)
    result = train(changed, resume_from=step_two, progress=False)
    assert result["step"] == 4
    assert read_evaluation(result["model_dir"]) == {**SETTINGS, "n_best": 6, "max_answer_length": 8}


def test_eval_runs_a_model_in_the_precision_its_run_evaluated_it_in_where_it_can(run, capsys, caplog, monkeypatch,
                                                                                  tmp_path):
    import logging

    from pruning import precision
    from pruning.checkpoint import read_precision

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)  # the capability check, simulated
    bf16_run = train(run_cfg(tmp_path, precision="bf16", device="cpu"), progress=False)
    final = Path(bf16_run["model_dir"])
    assert bf16_run["precision"] == "bf16"
    assert read_precision(final) == read_precision(final.parent / "checkpoint") == "bf16"
    assert read_precision(run["model_dir"]) == "fp32"
    packed = tmp_path / "packed"
    assert cli.main(["pack", str(final), str(packed), "--questions", "2", "--repeats", "1"]) == 0
    capsys.readouterr()
    assert read_precision(packed) == "bf16"

    result = evaluated(capsys, final, "--device", "cpu")
    assert result["precision"] == "bf16"
    assert (result["exact_match"], result["f1"]) == pytest.approx((bf16_run["exact_match"], bf16_run["f1"]),
                                                                  abs=1e-9)
    assert evaluated(capsys, packed, "--device", "cpu")["precision"] == "bf16"
    assert evaluated(capsys, final, "--device", "cpu", "--precision", "fp32")["precision"] == "fp32"  # a flag wins
    assert evaluated(capsys, run["model_dir"], "--device", "cpu")["precision"] == "fp32"

    # Where the CPU has no bf16 matrix units: fp32, with one warning, not an error.
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="workflows.cli"):
        assert evaluated(capsys, final, "--device", "cpu")["precision"] == "fp32"
    warnings = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert warnings == [f"{final / 'config.json'} records that its run evaluated it in bf16, but cpu has no bf16 "
                        "matrix units: running it in fp32 (the figures may differ slightly from the run's)"]


def test_a_broken_recorded_precision_is_one_line_naming_the_file(run, capsys, tmp_path):
    broken = _copy_with_record(Path(run["model_dir"]), tmp_path / "broken",
                               lambda config: config[EVALUATION_KEY].__setitem__("precision", "fp16"))
    assert cli.main(["eval", str(broken), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "fineprune_evaluation.precision: must be fp32 or bf16, got 'fp16'" in err
    assert str(broken / "config.json") in err
