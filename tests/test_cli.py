"""The command line as a user runs it: one JSON line on stdout, one-line errors with exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import BertConfig

from conftest import sqlite_store
from pruning import squad
from pruning.resources import squad_file
from workflows import cli


def fineprune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def fineprune_at_once(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """``fineprune`` of each argument list, all started at once (commands that do not depend on each other spend
    most of their time starting up); their results, in order."""
    procs = [subprocess.Popen([sys.executable, "-m", "workflows.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    try:
        outputs = [proc.communicate(timeout=300) for proc in procs]
        return [subprocess.CompletedProcess(proc.args, proc.returncode, *output)
                for proc, output in zip(procs, outputs)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_score_agrees_with_the_metric(tmp_path):
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "The cat sat on the mat.", "qas": [
        {"id": "q1", "question": "Who sat?", "answers": [{"text": "The cat", "answer_start": 0}]},
        {"id": "q2", "question": "Where?", "answers": [{"text": "on the mat", "answer_start": 12}]}]}]}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    (tmp_path / "p.json").write_text(json.dumps({"q1": "cat", "q2": "the mat"}))
    proc = fineprune("score", str(tmp_path / "d.json"), str(tmp_path / "p.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # q1: "cat" vs "The cat" -> EM 1 after removing the article; q2: "the mat" vs "on the mat" -> F1 2/3
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * (1 + 2 * (1 * 1) / (1 + 2)) / 2)


def test_score_takes_a_gold_file_without_answer_start(tmp_path, capsys, dev_subset):
    """The official v1.1 evaluation reads the answer texts only: a gold file that leaves answer_start out (written
    for scoring alone) scores (training still needs the starts)."""
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": ex.context, "qas": [{"id": ex.id, "question": ex.question, "answers": [{"text": ex.answers[0]}]}]}
        for ex in dev_subset[:2]]}]}
    (tmp_path / "data.json").write_text(json.dumps(data))
    (tmp_path / "pred.json").write_text(json.dumps({dev_subset[0].id: dev_subset[0].answers[0]}))
    assert cli.main(["score", str(tmp_path / "data.json"), str(tmp_path / "pred.json")]) == 0
    assert json.loads(capsys.readouterr().out) == {"exact_match": 50.0, "f1": 50.0}
    assert squad.load_squad(tmp_path / "data.json", spans=False)[0].answer_starts == ()
    with pytest.raises(squad.SquadFormatError, match="missing 'answer_start'"):
        squad.load_squad(tmp_path / "data.json")


def test_pack_eval_and_ask_on_a_packed_directory(masked_checkpoint, tmp_path):
    out = tmp_path / "packed"
    proc = fineprune("pack", str(masked_checkpoint), str(out), "--questions", "4")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["max_logit_diff"] <= 1e-4
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    context = "Paris is the capital of France."
    again, masked_eval, packed_eval, ask = fineprune_at_once(
        ["pack", str(masked_checkpoint), str(out)],  # nothing already written is overwritten
        ["eval", str(masked_checkpoint), "--limit", "6", "--max-seq-length", "128", "--doc-stride", "32",
         "--no-progress"],
        ["eval", str(out), "--limit", "6", "--max-seq-length", "128", "--doc-stride", "32", "--no-progress"],
        ["ask", str(out), "--question", "What is the capital of France?", "--context", context])
    assert again.returncode == 2 and "not empty" in again.stderr

    assert masked_eval.returncode == 0 and packed_eval.returncode == 0, packed_eval.stderr
    m, p = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (masked_eval, packed_eval))
    assert (m["exact_match"], m["f1"]) == (p["exact_match"], p["f1"])

    assert ask.returncode == 0, ask.stderr
    answer = json.loads(ask.stdout.strip().splitlines()[-1])
    assert answer["answer"] == context[answer["start"]:answer["end"]]


_CHECKOUT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args,needle", [
    (["eval", "no/such/model"], "no/such/model: model directory not found"),
    (["train", "--config", "no/such.yaml"], "no/such.yaml: config file not found"),
    (["score", "no/such.json", "p.json"], "no/such.json"),
    # A name misspelt in a directory that is there: the entry beside it closest to the name.
    (["train", "--config", f"{_CHECKOUT}/configs/dense_minilm.yml"], f"{_CHECKOUT}/configs/dense_minilm.yml: config "
     f"file not found; did you mean '{_CHECKOUT}/configs/dense_minilm.yaml'?"),
    (["sweep", "--space", f"{_CHECKOUT}/tune_spaces/smok.yaml"], f"{_CHECKOUT}/tune_spaces/smok.yaml: search-space "
     f"file not found; did you mean '{_CHECKOUT}/tune_spaces/smoke.yaml'?"),
    # A bare word close to a shipped name: that name.
    (["eval", "minlm"], "minlm: model directory not found; did you mean 'minilm'?"),
    (["train", "--config", f"{_CHECKOUT}/configs/dense_minilm.yaml", "--eval-data", "dve"],
     "--eval-data: dve: SQuAD data file not found; did you mean 'dev'?"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path):
    proc = fineprune(*args, cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert needle in last and last.startswith("fineprune ")


def test_corrupted_checkpoint_is_named(masked_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in masked_checkpoint.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = fineprune("eval", str(broken), "--limit", "2")
    assert proc.returncode == 2
    assert "model.safetensors" in proc.stderr.strip().splitlines()[-1]


def test_prune_rejects_a_dense_config(tmp_path):
    cfg = tmp_path / "dense.yaml"
    cfg.write_text("method: dense\n")
    proc = fineprune("prune", "--config", str(cfg))
    assert proc.returncode == 2 and "method" in proc.stderr.strip().splitlines()[-1]


def test_the_wrong_command_for_a_config_is_named_before_its_output_dir(capsys, tmp_path):
    """A dense config given to prune (or a pruning one to train) is the error, not the output_dir it would write:
    --overwrite, which that error asks for, would only lead to the next one."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    dense = tmp_path / "dense.yaml"
    dense.write_text(f"method: dense\noutput_dir: {run}\n")
    line = _one_line_error(capsys, ["prune", "--config", str(dense)])
    assert "method: `fineprune prune` needs topk" in line
    line = _one_line_error(capsys, ["train", "--config", TINY, "--output-dir", str(run)])
    assert "method: sigmoid_threshold is a pruning method; use `fineprune prune`" in line
    assert (run / "final" / "config.json").read_text() == "{}"


def test_eval_writes_official_predictions_and_fits_windows_to_the_model(masked_checkpoint, tmp_path):
    predictions = tmp_path / "out" / "predictions.json"
    proc = fineprune("eval", str(masked_checkpoint), "--eval-limit", "5", "--no-progress", "--predictions", str(predictions))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The model has 128 positions: the default 384-token windows are cut to it, the stride to half a window.
    assert (result["max_seq_length"], result["doc_stride"]) == (128, 64)
    written = json.loads(predictions.read_text())
    # A text file's last line ends in a newline: written to /dev/stdout, the result's line follows on its own line.
    assert predictions.read_text().endswith("}\n")
    questions = squad.load_squad(squad_file("dev"), limit=5)
    assert set(written) == {q.id for q in questions} and all(isinstance(a, str) for a in written.values())
    score = fineprune("score", str(squad_file("dev")), str(predictions))
    assert score.returncode == 0, score.stderr
    scored = json.loads(score.stdout.strip().splitlines()[-1])
    # `score` reads the whole dev set; the five answered questions carry all of it.
    assert scored["f1"] * len(squad.load_squad(squad_file("dev"))) == pytest.approx(result["f1"] * 5, abs=1e-6)


def test_eval_keeps_a_stride_over_half_a_window_that_fits_the_model(capsys, masked_checkpoint):
    # 96-token windows fit the model's 128 positions: evaluated as a run with these windows was, not at stride 48.
    assert cli.main(["eval", str(masked_checkpoint), "--eval-limit", "2", "--no-progress", "--max-seq-length", "96",
                     "--doc-stride", "64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["max_seq_length"], result["doc_stride"]) == (96, 64)


@pytest.mark.parametrize("command", ["eval", "ask"])
def test_a_doc_stride_not_shorter_than_the_window_is_refused_as_a_run_config_refuses_it(capsys, masked_checkpoint,
                                                                                       tmp_path, command):
    """Halved in silence, it came back in the too-long-question error as a stride never given ("doc_stride 32" for
    --doc-stride 64), whose advice to lower it would only have widened the overlap."""
    question = " ".join(["which"] * 40) + "?"
    data = {"data": [{"title": "t", "paragraphs": [{"context": "The cat sat on the mat.", "qas": [
        {"id": "long-q", "question": question, "answers": [{"text": "the mat", "answer_start": 15}]}]}]}]}
    (tmp_path / "long.json").write_text(json.dumps(data))
    inputs = {"eval": ["--eval-data", str(tmp_path / "long.json"), "--no-progress"],
              "ask": ["--question", question, "--context", "The cat sat on the mat."]}[command]
    line = _one_line_error(capsys, [command, str(masked_checkpoint), *inputs, "--max-seq-length", "64",
                                    "--doc-stride", "64"])
    assert line.endswith("error: --doc-stride 64: must be smaller than --max-seq-length (64): it is the overlap of "
                         "consecutive windows")
    line = _one_line_error(capsys, [command, str(masked_checkpoint), *inputs, "--doc-stride", "400"])
    assert "--doc-stride 400: must be smaller than --max-seq-length (384 as the default)" in line


def test_eval_reads_no_answer_start(capsys, masked_checkpoint, tmp_path):
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "The cat sat on the mat.", "qas": [
        {"id": "q1", "question": "Where?", "answers": [{"text": "the mat", "answer_start": 3}]}]}]}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    assert cli.main(["eval", str(masked_checkpoint), "--eval-data", str(tmp_path / "d.json"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["questions"] == 1


def test_eval_and_ask_take_the_span_search_of_the_run_config(masked_checkpoint, tmp_path):
    """--max-answer-length and --n-best reach the span search: answers of at most one token hold no space."""
    lengths = ("30", "1")
    context = " ".join(["The quick brown fox jumps over the lazy dog."] * 3)
    *evals, ask, refused = fineprune_at_once(
        *(["eval", str(masked_checkpoint), "--eval-limit", "12", "--no-progress", "--max-answer-length", length,
           "--n-best", "5", "--predictions", str(tmp_path / f"predictions_{length}.json")] for length in lengths),
        ["ask", str(masked_checkpoint), "--question", "What jumps?", "--context", context, "--max-answer-length", "1"],
        ["eval", str(masked_checkpoint), "--n-best", "0"])
    answers = {}
    for length, proc in zip(lengths, evals):
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert (result["max_answer_length"], result["n_best"]) == (int(length), 5)
        answers[length] = json.loads((tmp_path / f"predictions_{length}.json").read_text())
    assert any(" " in a.strip() for a in answers["30"].values())  # the random model answers with longer spans
    assert not any(" " in a.strip() for a in answers["1"].values())
    assert ask.returncode == 0, ask.stderr
    assert " " not in json.loads(ask.stdout.strip().splitlines()[-1])["answer"].strip()
    assert refused.returncode == 2 and "--n-best must be >= 1" in refused.stderr


def test_ask_fits_its_windows_to_the_model(masked_checkpoint):
    context = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)  # ~400 tokens, 128 positions
    proc = fineprune("ask", str(masked_checkpoint), "--question", "What jumps?", "--context", context)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["answer"] == context[answer["start"]:answer["end"]]


def test_stdout_json_is_strict(capsys):
    cli._emit({"ratio": float("inf"), "nested": {"x": [float("nan"), np.float32(1.5)]}, "n": np.int64(3)})
    line = capsys.readouterr().out.strip()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    assert json.loads(line, parse_constant=refuse) == {"ratio": None, "nested": {"x": [None, 1.5]}, "n": 3}


def _options() -> dict[str, list[argparse.Action]]:
    """Every option of every sub-command, by sub-command."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: [a for a in sub._actions if a.option_strings and a.dest != "help"] for name, sub in commands.items()}


def _help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([command, "--help"])
    return capsys.readouterr().out


def test_the_top_level_help_says_what_the_tool_does_in_plain_words(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "question-answering" in out and "prune" in out


def test_every_option_has_a_help_text_that_says_its_default(capsys):
    for name, actions in _options().items():
        # The options section on one line (argparse wraps it at the terminal width).
        text = " ".join(_help_of(name, capsys).split("options:", 1)[1].split())
        for action in actions:
            flag = action.option_strings[-1]
            # An option's entry runs from its flag to the next option's.
            entry = re.search(rf"(?:^| ){re.escape(flag)}\b(.*?)(?= --?[a-z][a-z-]*[ ,]| -h|$)", text)
            assert entry and action.help, f"{name} {flag} has no help"
            assert action.required or "default" in entry.group(1), f"{name} {flag}: {entry.group(1)}"


def test_doc_stride_help_says_it_is_the_overlap(capsys):
    for name in ("eval", "ask"):
        text = " ".join(_help_of(name, capsys).split())
        assert "consecutive windows of one context share (their overlap)" in text


def test_a_flag_means_the_same_in_every_sub_command():
    seen: dict[str, tuple] = {}
    for name, actions in _options().items():
        for action in actions:
            meaning = (action.dest, action.type, action.choices)
            if action.dest == "resume":  # continue what the command runs: a training checkpoint, or a sweep
                meaning = (action.dest, action.choices)
            else:
                meaning += (action.nargs,)
            for flag in action.option_strings:
                assert seen.setdefault(flag, meaning) == meaning, f"{flag} differs in {name}"
    assert "--data" not in seen  # once training data here and evaluation data there
    assert {"--train-data", "--eval-data", "--model", "--registered-model"} <= set(seen)


def test_a_path_typed_with_a_tilde_is_under_the_home_directory(capsys, monkeypatch, tmp_path):
    """A shell leaves `--out=~/report` or a quoted `"~/my data.json"` as typed; the command reads `~` as the home
    directory, as it does in a run config or search space."""
    monkeypatch.setenv("HOME", str(tmp_path))
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "The cat sat.", "qas": [
        {"id": "q1", "question": "Who sat?", "answers": [{"text": "The cat", "answer_start": 0}]}]}]}]}
    (tmp_path / "my data.json").write_text(json.dumps(data))
    (tmp_path / "p.json").write_text(json.dumps({"q1": "the cat"}))
    assert cli.main(["score", "~/my data.json", "~/p.json"]) == 0
    assert json.loads(capsys.readouterr().out)["exact_match"] == pytest.approx(100.0)
    # Every option and argument naming a file or directory reads it so.
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    paths = [(name, a.dest) for name, sub in commands.items() for a in sub._actions
             if a.metavar in ("PATH", "DIR", "YAML") or a.dest in ("model_dir", "out_dir", "checkpoint", "data",
                                                                     "predictions")]
    assert len(paths) >= 20 and ("sweep", "storage_path") in paths and ("report", "out") in paths
    for name, dest in paths:
        action = next(a for a in commands[name]._actions if a.dest == dest)
        assert action.type is not None and action.type("~/x") == str(tmp_path / "x"), f"{name} {dest}"
        assert action.type("minilm") == "minilm" and action.type("a~b") == "a~b"
    # A process without a home directory (no HOME, a user id the system does not know) is told so, in one line.
    import pwd

    def unknown(uid):
        raise KeyError(uid)

    monkeypatch.delenv("HOME")
    monkeypatch.setattr(pwd, "getpwuid", unknown)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main(["score", "~/my data.json", "~/p.json"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "fineprune score: error: argument data: ~/my data.json: ~ is the home directory, and this process has none "
        "(HOME is not set); give the path in full")


def test_commands_print_no_mlflow_type_hint_warning(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import workflows.registry, workflows.cli"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "type hint" not in proc.stderr


ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_smoke.yaml")


def _one_line_error(capsys, argv: list[str], status: int = 2) -> str:
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("fineprune ")]
    assert code == status and captured.out == "", captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("argv,needle", [
    # --model names the student even when the config builds a random one (model_config).
    (["prune", "--config", TINY, "--model", "no/such/model", "--output-dir", "{tmp}/out"],
     "no/such/model: model directory not found"),
    (["eval", "no/such/model", "--device", "sideways"], "--device 'sideways': not a device"),
    # A bad value of a flag is named by the flag, not by the config file whose value it replaced.
    (["prune", "--config", TINY, "--max-steps", "0", "--output-dir", "{tmp}/out"],
     "error: --max-steps: must be a positive integer"),
    (["train", "--config", TINY, "--eval-limit", "-3", "--output-dir", "{tmp}/out"],
     "error: --eval-limit: must be a positive integer"),
    (["prune", "--config", TINY, "--device", "gpu", "--output-dir", "{tmp}/out"], "error: --device: must be auto"),
    (["eval", "no/such/model", "--eval-limit", "0"], "--eval-limit must be >= 1"),
    (["eval", "no/such/model", "--predictions", "{tmp}"], "is a directory"),
    (["score", "dev", "{tmp}/no-predictions.json"], "no-predictions.json"),
    (["sweep", "--space", "no/such.yaml", "--tracking-timeout", "0"], "--tracking-timeout must be a positive"),
    (["report", "--experiment", "e", "--out", "{tmp}/a-file"], "exists and is not a directory"),
    (["pack", "{tmp}/model", "{tmp}/model/packed", "--overwrite"], "overlaps the model directory"),
    (["export", "{tmp}/model", "{tmp}", "--overwrite"], "overlaps the model directory"),
    # An output under a file, or a file where a directory goes: refused before any work, not a traceback after it.
    (["eval", "no/such/model", "--predictions", "{tmp}/a-file/p.json"], "{tmp}/a-file is a file, not a directory"),
    (["pack", "{tmp}/model", "{tmp}/a-file/packed"], "{tmp}/a-file is a file, not a directory"),
    (["export", "{tmp}/model", "{tmp}/a-file/onnx"], "{tmp}/a-file is a file, not a directory"),
    (["export", "{tmp}/model", "{tmp}/a-file"], "exists and is not a directory"),
    # Named by the command's flags, before the model is read.
    (["export", "{tmp}/model", "{tmp}/full"], "{tmp}/full: exists and is not an empty directory (pass --overwrite"),
    (["export", "{tmp}/model", "{tmp}/onnx", "--opset", "9"], "--opset: must be an integer from 14 to 20"),
    (["prune", "--config", TINY, "--output-dir", "{tmp}/a-file/run"], "{tmp}/a-file is a file, not a directory"),
    (["prune", "--config", TINY, "--output-dir", "{tmp}/a-file"], "output_dir {tmp}/a-file: exists and is not a"),
    (["report", "--experiment", "e", "--out", "{tmp}/a-file/r"], "{tmp}/a-file is a file, not a directory"),
])
def test_more_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, needle):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept").write_text("x")
    line = _one_line_error(capsys, [arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    assert needle.replace("{tmp}", str(tmp_path)) in line
    assert (tmp_path / "model" / "config.json").read_text() == "{}"  # nothing written over
    assert (tmp_path / "a-file").read_text() == "x"
    assert [path.name for path in (tmp_path / "full").iterdir()] == ["kept"]


def test_a_data_file_without_questions_is_one_line(capsys, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"version": "1.1", "data": []}))
    predictions = tmp_path / "predictions.json"
    predictions.write_text("{}")
    assert f"{empty}: data: no questions" in _one_line_error(capsys, ["score", str(empty), str(predictions)])
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--train-data", str(empty),
                                    "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert f"{empty}: data: no questions" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_one_line(capsys, tmp_path):
    assert "CUDA is not available" in _one_line_error(capsys, ["eval", "no/such/model", "--device", "cuda"])
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--device", "cuda:0", "--output-dir", str(tmp_path)])
    assert line == "fineprune prune: error: --device cuda:0: CUDA is not available on this machine (use cpu)"
    config = tmp_path / "c.yaml"  # given by the config file, named by it
    config.write_text(Path(TINY).read_text() + "device: cuda\n")
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--output-dir", str(tmp_path / "out")])
    assert line.startswith(f"fineprune prune: error: {config}: device cuda: CUDA is not available"), line


def test_training_refuses_an_output_dir_that_holds_an_earlier_run(capsys, tmp_path):
    earlier = tmp_path / "final" / "model.safetensors"
    earlier.parent.mkdir()
    earlier.write_bytes(b"earlier run")
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--output-dir", str(tmp_path)])
    assert str(tmp_path) in line and "--overwrite" in line and "--resume" in line
    assert earlier.read_bytes() == b"earlier run"


def test_the_resume_an_earlier_runs_line_gives_names_its_checkpoint_as_a_shell_reads_it(capsys, tmp_path):
    """The line gave `--resume DIR/checkpoint` unquoted: for an output_dir whose name holds a space, a shell split it."""
    import shlex

    out = tmp_path / "my runs"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "model.safetensors").write_bytes(b"earlier run")
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--output-dir", str(out)])
    words = shlex.split(line.split(", ")[1].removesuffix(" to continue it"))
    assert words == ["--resume", str(out / "checkpoint")]


def test_resuming_a_checkpoint_into_another_runs_output_dir_is_refused(capsys, tmp_path):
    """--resume continues the run of its output_dir: the checkpoint of another run, resumed into an output_dir that
    holds an earlier run (e.g. the config's, when the run was started with --output-dir), leaves that run as it was."""
    small = ["--config", TINY, "--max-steps", "2", "--train-limit", "8", "--eval-limit", "2", "--no-progress"]
    first = tmp_path / "first"
    assert cli.main(["prune", *small, "--output-dir", str(first)]) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    earlier = other / "final" / "model.safetensors"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"earlier run")
    line = _one_line_error(capsys, ["prune", *small, "--output-dir", str(other), "--resume",
                                    str(first / "checkpoint")])
    assert f"{other}: output_dir holds another run than the checkpoint {first / 'checkpoint'}" in line
    assert "--overwrite" in line
    assert earlier.read_bytes() == b"earlier run" and sorted(p.name for p in other.iterdir()) == ["final"]
    # In its own output_dir (however spelt) the checkpoint resumes.
    spelt = tmp_path / "first" / ".." / "first" / "checkpoint"
    assert cli.main(["prune", *small, "--output-dir", str(first), "--resume", str(spelt)]) == 0


@pytest.mark.parametrize("flag", ["--model", "--teacher"])
def test_an_output_dir_holding_the_model_the_run_reads_is_refused(capsys, masked_checkpoint, tmp_path, flag):
    """A run replaces its output_dir's final/ and checkpoint/ (with --overwrite, before it trains): pointed at the
    run whose final model it reads as student or teacher, it would remove that model."""
    run = tmp_path / "run"
    shutil.copytree(masked_checkpoint, run / "final")
    before = (run / "final" / "model.safetensors").read_bytes()
    line = _one_line_error(capsys, ["prune", "--config", TINY, flag, str(run / "final"), "--output-dir", str(run),
                                    "--overwrite", "--max-steps", "2", "--train-limit", "8", "--eval-limit", "2",
                                    "--no-progress"])
    assert f"output_dir {run}: holds the {flag[2:]} directory {run / 'final'} the run reads ({flag})" in line
    assert (run / "final" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["final"]


@pytest.mark.parametrize("flag", ["--train-data", "--eval-data"])
def test_an_output_dir_holding_the_data_the_run_reads_is_refused(capsys, masked_checkpoint, tmp_path, flag):
    """The same for a data file kept in the earlier run's final/ (its questions, say): --overwrite removed it, and the
    run went on with what it had read (exit 0)."""
    run = tmp_path / "run"
    shutil.copytree(masked_checkpoint, run / "final")
    data = run / "final" / "questions.json"
    shutil.copy(squad_file("dev"), data)
    line = _one_line_error(capsys, ["prune", "--config", TINY, flag, str(data), "--output-dir", str(run),
                                    "--overwrite", "--max-steps", "2", "--train-limit", "8", "--eval-limit", "2",
                                    "--no-progress"])
    assert f"output_dir {run}: holds the {flag[2:].replace('-', '_')} file {data} the run reads ({flag})" in line
    assert data.is_file() and sorted(p.name for p in run.iterdir()) == ["final"]


def test_what_a_killed_first_checkpoint_write_left_is_not_taken_for_an_earlier_run(capsys, tmp_path):
    """A run killed outright (SIGKILL, the OOM killer) while it wrote its first checkpoint leaves only the staging
    directory of that write: the same command run again clears it and trains, rather than asking for --overwrite or
    a --resume of a checkpoint there is none of."""
    out = tmp_path / "run"
    out.mkdir()
    script = "\n".join(["import os, pathlib, signal", "from pruning.atomic import staging_dir",
                        f"tmp = staging_dir(pathlib.Path({str(out / 'checkpoint')!r}))",
                        "(tmp / 'model.safetensors').write_bytes(b'cut short')", "os.kill(os.getpid(), signal.SIGKILL)"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", script], env=env, timeout=120).returncode == -signal.SIGKILL
    assert [p.name.startswith(".checkpoint.") for p in out.iterdir()] == [True]
    assert cli.main(["prune", "--config", TINY, "--output-dir", str(out), "--max-steps", "2", "--train-limit", "8",
                     "--eval-limit", "2", "--no-progress"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "final"]


def test_a_missing_model_or_data_file_is_named_by_its_flag_or_config_key(capsys, tmp_path):
    """A path that is not there, named as the user gave it: the flag, or the config file and key."""
    config = tmp_path / "run.yaml"
    config.write_text(Path(TINY).read_text().replace("train_data: dev", "train_data: data/train.json")
                      + f"teacher: {tmp_path / 'teacher'}\n")
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--output-dir", str(tmp_path / "out")])
    assert line.endswith(f"{config}: train_data: data/train.json: SQuAD data file not found")
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--train-data", "dev", "--eval-data",
                                    str(tmp_path / "dev.json"), "--output-dir", str(tmp_path / "out")])
    assert line.endswith(f"--eval-data: {tmp_path / 'dev.json'}: SQuAD data file not found")
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--train-data", "dev", "--output-dir",
                                    str(tmp_path / "out")])
    assert line.endswith(f"{config}: teacher: {tmp_path / 'teacher'}: model directory not found")
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--model", str(tmp_path), "--output-dir",
                                    str(tmp_path / "out")])
    assert line.endswith(f"--model: {tmp_path}: not a model directory (no config.json)")
    assert not (tmp_path / "out").exists()


def test_a_config_through_a_pipe_is_read_and_a_space_or_data_file_through_one_is_refused_as_a_pipe(capsys,
                                                                                                   tmp_path):
    """`--config <(envsubst < run.yaml)` said "config file not found" of a file that was there to read; a space or
    data file is read more than once, which a pipe cannot give, and is refused as what it is."""
    import threading

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text(Path(TINY).read_text()))
    writer.start()
    try:
        assert cli.main(["prune", "--config", str(pipe), "--max-steps", "1", "--train-limit", "4", "--eval-limit",
                         "2", "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    finally:
        writer.join(timeout=5)
    assert json.loads(capsys.readouterr().out)["step"] >= 1
    line = _one_line_error(capsys, ["score", str(pipe), str(tmp_path / "p.json")])
    assert line.endswith(f"error: {pipe}: not a regular file (a pipe, as <(...) makes?): the data is read more than "
                         "once; give a file"), line
    line = _one_line_error(capsys, ["sweep", "--space", str(pipe)])
    assert line.endswith(f"error: {pipe}: not a regular file (a pipe, as <(...) makes?): the sweep reads its space "
                         "more than once; give a file"), line


def test_a_tokenizer_directory_is_named_by_its_config_key_when_missing_and_needs_no_config_json(
        capsys, monkeypatch, tokenizer, tmp_path):
    """A missing one was found by transformers, whose message named neither the config file nor the key, and spoke
    of connecting to the Hugging Face Hub; one of tokenizer files alone was refused by a sweep for lacking a model's
    config.json."""
    from pruning.resources import first_missing

    config = tmp_path / "run.yaml"
    config.write_text(Path(TINY).read_text() + "tokenizer: my_tokenizer\n")
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--output-dir", str(tmp_path / "out")])
    assert line == f"fineprune prune: error: {config}: tokenizer: my_tokenizer: tokenizer directory not found", line
    tokenizer.save_pretrained(tmp_path / "my_tokenizer")
    assert not (tmp_path / "my_tokenizer" / "config.json").exists()
    assert first_missing({"tokenizer": str(tmp_path / "my_tokenizer")}, ["tokenizer"]) is None
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prune", "--config", str(config), "--max-steps", "1", "--train-limit", "4", "--eval-limit", "2",
                     "--output-dir", "out", "--no-progress"]) == 0
    assert (tmp_path / "out" / "final" / "tokenizer.json").is_file()


def test_resuming_from_a_run_directory_or_its_final_model_names_the_checkpoint(capsys, tmp_path):
    """The checkpoint to resume is the run's checkpoint/; the output_dir or final/ given instead is named, with it."""
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "trainer_state.json").write_text(json.dumps({"step": 5}))
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--output-dir", str(run)])
    assert f"--resume {run / 'checkpoint'} to continue it" in line
    for given in (run, run / "final"):
        line = _one_line_error(capsys, ["prune", "--config", TINY, "--output-dir", str(run), "--resume", str(given)])
        assert f"{given}: not a training checkpoint (no trainer_state.json)" in line
        assert line.endswith(f"checkpoint {run / 'checkpoint'}")
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--output-dir", str(run), "--resume",
                                    str(tmp_path / "absent")])
    assert line.endswith(f"{tmp_path / 'absent'}: checkpoint directory not found")
    assert (run / "final" / "config.json").read_text() == "{}"  # nothing written over


def test_a_question_too_long_for_the_window_is_one_line(capsys, masked_checkpoint, tmp_path):
    question = " ".join(["which"] * 60) + "?"
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "The cat sat on the mat.", "qas": [
        {"id": "long-q", "question": question, "answers": [{"text": "the mat", "answer_start": 15}]}]}]}]}
    path = tmp_path / "long.json"
    path.write_text(json.dumps(data))
    line = _one_line_error(capsys, ["eval", str(masked_checkpoint), "--eval-data", str(path), "--max-seq-length", "64",
                                    "--no-progress"])
    assert "question long-q has" in line and "max_seq_length 64" in line
    line = _one_line_error(capsys, ["eval", str(masked_checkpoint), "--eval-data", str(path), "--max-seq-length", "5",
                                    "--doc-stride", "2", "--no-progress"])
    assert "leave no room for a question" in line


def test_a_question_too_long_for_the_window_names_its_file(capsys, masked_checkpoint, tmp_path):
    """The training and the evaluation file of a run may share question ids (the same questions, reworded): the
    line names the file that holds the long one."""
    context = "The cat sat on the mat."

    def squad_file(name: str, question: str) -> Path:
        path = tmp_path / name
        qa = {"id": "q", "question": question, "answers": [{"text": "the mat", "answer_start": 15}]}
        path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [qa]}]}]}))
        return path

    short = squad_file("train.json", "Where did the cat sit?")
    # tiny_smoke's windows (96 tokens, stride 32) take a question of at most 60 tokens; the cut to 64 leaves 63.
    long = squad_file("eval.json", " ".join(["which"] * 62) + "?")
    for train, evaluate in ((short, long), (long, short)):
        line = _one_line_error(capsys, ["prune", "--config", TINY, "--train-data", str(train), "--eval-data",
                                        str(evaluate), "--output-dir", str(tmp_path / "run")])
        assert line.startswith(f"fineprune prune: error: {long}: question q has 63 tokens: with max_seq_length 96 ")
        assert not (tmp_path / "run" / "final").exists()
    line = _one_line_error(capsys, ["eval", str(masked_checkpoint), "--eval-data", str(long), "--max-seq-length", "96",
                                    "--doc-stride", "32", "--no-progress"])
    assert line.startswith(f"fineprune eval: error: {long}: question q has 63 tokens")


@pytest.mark.parametrize("question,context,field,shown", [
    ("\u200b\u200b", "The cat sat on the mat.", "question", "'\\u200b\\u200b'"),
    ("Where?", "\u200b\x01\u200b", "context", "'\\u200b\\x01\\u200b'"),
    ("\ufffd\ufffd\ufffd", "The cat sat on the mat.", "question", "'\ufffd\ufffd\ufffd'"),
], ids=["zero-width-question", "control-context", "replacement-character-question"])
def test_a_question_or_context_without_tokens_is_one_line_in_eval_and_prune_as_in_ask(
        capsys, masked_checkpoint, tmp_path, question, context, field, shown):
    """Made only of characters the tokenizer drops, it was windowed as nothing and scored 0 (or trained on) without
    a word, while ask refused it."""
    good = {"id": "ok", "question": "Where did the cat sit?", "answers": [{"text": "The cat", "answer_start": 0}]}
    bad = {"id": "empty-q", "question": question, "answers": [{"text": context[:1], "answer_start": 0}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": "The cat sat on the mat.", "qas": [good]}, {"context": context, "qas": [bad]}]}]}))
    line = _one_line_error(capsys, ["eval", str(masked_checkpoint), "--eval-data", str(path), "--no-progress"])
    assert line == (f"fineprune eval: error: {path}: question empty-q: its {field} {shown} has no tokens the model "
                    "reads (only characters the tokenizer drops, such as zero-width spaces or control characters)")
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--train-data", str(path), "--eval-data", str(path),
                                    "--output-dir", str(tmp_path / "run")])
    assert line.startswith(f"fineprune prune: error: {path}: question empty-q: its {field} {shown} has no tokens")
    assert not (tmp_path / "run" / "final").exists()
    line = _one_line_error(capsys, ["ask", str(masked_checkpoint), "--question", question, "--context", context])
    assert line == f"fineprune ask: error: {field} has no tokens the model reads"


def test_a_question_too_long_for_the_check_windows_of_pack_and_export_is_cut_to_them(capsys, caplog,
                                                                                     masked_checkpoint, tmp_path):
    """pack and export compare logits on fixed windows (384 tokens fitted to the model's 128 positions: 60 question
    tokens at most), for which they have no flags; a longer question there stopped them with advice to "lower
    max_query_length (64), raise max_seq_length or lower doc_stride", flags neither has. It is now cut to what the
    windows take, as a long question is cut everywhere, and the model is packed and exported."""
    qa = {"id": "long-q", "question": " ".join(["which"] * 70) + "?",
          "answers": [{"text": "the mat", "answer_start": 15}]}
    path = tmp_path / "long.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "The cat sat on the mat.",
                                                                         "qas": [qa]}]}]}))
    for command in ("pack", "export"):
        out = tmp_path / command
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert cli.main([command, str(masked_checkpoint), str(out), "--eval-data", str(path)]) == 0, \
                capsys.readouterr().err
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["logit_check_windows"] >= 1 and (out / "config.json").is_file()
        assert "1 of 1 questions have more than max_query_length (60) tokens" in caplog.text


@pytest.mark.parametrize("answer,shown", [("\u200b", "'\\u200b'"), ("\x07", "'\\x07'")],
                         ids=["zero-width", "control"])
def test_a_trained_answer_without_tokens_is_one_line_in_prune_and_scored_as_the_official_script(
        capsys, tmp_path, answer, shown):
    """A gold answer made only of characters the tokenizer drops passed the check for an empty answer: no token
    covers it, so training labelled every window of its question "no answer" without a word. The metric reads it as
    a text, as the official evaluation script does, so score still takes it."""
    context = f"The cat sat{answer} on the mat."
    good = {"id": "ok", "question": "Where did the cat sit?", "answers": [{"text": "The cat", "answer_start": 0}]}
    bad = {"id": "hidden", "question": "What is between sat and on?", "answers": [{"text": answer, "answer_start": 11}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [good, bad]}]}]}))
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--train-data", str(path), "--eval-data", str(path),
                                    "--output-dir", str(tmp_path / "run")])
    assert line == (f"fineprune prune: error: {path}: question hidden: its answer {shown} has no tokens the model "
                    "reads (only characters the tokenizer drops, such as zero-width spaces or control characters)")
    assert not (tmp_path / "run" / "final").exists()
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({"ok": "The cat", "hidden": answer}))
    assert cli.main(["score", str(path), str(predictions)]) == 0
    assert json.loads(capsys.readouterr().out)["exact_match"] == 100.0


def test_a_long_question_is_cut_to_max_query_length_in_eval_and_ask(capsys, caplog, masked_checkpoint, tmp_path):
    question = " ".join(["which"] * 70) + "?"
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "The cat sat on the mat.", "qas": [
        {"id": "long-q", "question": question, "answers": [{"text": "the mat", "answer_start": 15}]},
        {"id": "short-q", "question": "Where?", "answers": [{"text": "the mat", "answer_start": 15}]}]}]}]}
    path = tmp_path / "long.json"
    path.write_text(json.dumps(data))
    # The model's 128 positions leave room for 60 question tokens: the default cut to 64 is not enough.
    line = _one_line_error(capsys, ["eval", str(masked_checkpoint), "--eval-data", str(path), "--no-progress"])
    assert "question long-q has 64 tokens" in line and "lower max_query_length (64)" in line
    assert cli.main(["eval", str(masked_checkpoint), "--eval-data", str(path), "--no-progress",
                     "--max-query-length", "40"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert (result["questions"], result["max_query_length"]) == (2, 40)
    assert "1 of 2 questions have more than max_query_length (40) tokens" in caplog.text
    assert cli.main(["ask", str(masked_checkpoint), "--question", question, "--context", "The cat sat on the mat.",
                     "--max-query-length", "40"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["answer"] == "The cat sat on the mat."[answer["start"]:answer["end"]] != ""
    line = _one_line_error(capsys, ["ask", str(masked_checkpoint), "--question", question, "--context", "A cat."])
    assert "question is too long" in line and "max_query_length 64" in line
    line = _one_line_error(capsys, ["ask", str(masked_checkpoint), "--question", "Who?", "--context", "A cat.",
                                    "--max-query-length", "0"])
    assert "--max-query-length must be >= 1" in line


def test_a_question_or_context_that_is_not_unicode_text_is_one_line_in_ask(capsys, masked_checkpoint):
    """A command-line argument that is not valid UTF-8 reaches Python with each undecodable byte as a lone
    surrogate (\\udcff for the byte 0xff), which the tokenizer refuses with a TypeError."""
    context = os.fsdecode(b"It was written by \xffAnn.")
    assert context == "It was written by \udcffAnn."
    line = _one_line_error(capsys, ["ask", str(masked_checkpoint), "--question", "Who?", "--context", context])
    assert line == ("fineprune ask: error: context holds a lone surrogate \\udcff at character 18, which is not a "
                    "character (half of a surrogate pair, or a byte that is not UTF-8)")
    line = _one_line_error(capsys, ["ask", str(masked_checkpoint), "--question", "Who\ud83d?", "--context", "Ann."])
    assert line.startswith("fineprune ask: error: question holds a lone surrogate \\ud83d at character 3")


@pytest.mark.parametrize("window", [["--max-seq-length", "5"], ["--max-seq-length", "8"],
                                    ["--max-seq-length", "6", "--doc-stride", "2"]])
def test_windows_without_room_for_a_question_are_one_line_in_ask_and_eval(capsys, masked_checkpoint, window):
    ask = ["ask", str(masked_checkpoint), "--question", "Who?", "--context", "It was written by Ann.", *window]
    evaluate = ["eval", str(masked_checkpoint), "--eval-limit", "1", "--no-progress", *window]
    for argv in (ask, evaluate):
        line = _one_line_error(capsys, argv)
        assert "leave no room for a question" in line and "--max-seq-length" in line and "--doc-stride" in line


def test_windows_cut_to_a_models_few_positions_say_so_rather_than_advise_longer_ones(capsys, tiny_bert_config,
                                                                                     tokenizer, tmp_path):
    """Windows cut to a model's position embeddings (fit_windows) that leave no room for a question, or too little for
    one, advised raising max_seq_length, which cannot lengthen them, and named the cut length as if it were given."""
    from transformers import BertForQuestionAnswering

    from pruning.checkpoint import save_model

    for positions in (6, 10):
        save_model(BertForQuestionAnswering(BertConfig(**{**tiny_bert_config.to_dict(),
                                                          "max_position_embeddings": positions})),
                   tokenizer, tmp_path / f"short{positions}")
    line = _one_line_error(capsys, ["eval", str(tmp_path / "short6"), "--eval-limit", "1", "--no-progress",
                                    "--max-seq-length", "300"])
    assert line.endswith("leave no room for a question (cut to the model's 6 position embeddings, which no "
                         "--max-seq-length lengthens: lower --doc-stride)"), line
    line = _one_line_error(capsys, ["eval", str(tmp_path / "short10"), "--eval-limit", "1", "--no-progress",
                                    "--max-seq-length", "300"])
    assert line.endswith("; these windows are max_seq_length 300 cut to the model's 10 position embeddings, which no "
                         "max_seq_length lengthens"), line
    config = tmp_path / "short.yaml"
    config.write_text(Path(TINY).read_text().replace("max_position_embeddings: 128", "max_position_embeddings: 24"))
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--max-steps", "1", "--output-dir",
                                    str(tmp_path / "run")])
    assert re.search(r"question \S+ has \d+ tokens: with max_seq_length 24 and doc_stride 12 a question may have at "
                     r"most 8 .*; these windows are max_seq_length 96 cut to the model's 24 position embeddings, "
                     r"which no max_seq_length lengthens$", line), line


def test_a_tracking_server_that_does_not_answer_is_exit_1_in_seconds(capsys, caplog, monkeypatch):
    """Said in two lines: that it does not answer and for how long it is tried, and the error. urllib3's line for
    each of MLflow's retries of a request came between them, five in the 15 s."""
    monkeypatch.setattr(cli, "REACH_TIMEOUT_S", 2.0)  # the wait is not what is checked here; its end is
    with caplog.at_level(logging.INFO):
        line = _one_line_error(capsys, ["select", "--registered-model", "m", "--max-latency-ms", "5",
                                        "--tracking-uri", "http://127.0.0.1:9"], status=1)
    assert "http://127.0.0.1:9" in line
    warnings = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert [name for name, _ in warnings] == ["workflows.retry"], warnings
    assert "retrying for up to 2 s" in warnings[0][1]


def test_score_reads_the_shipped_dev_set_by_name(capsys, tmp_path):
    questions = squad.load_squad(squad_file("dev"), limit=3)
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({q.id: q.answers[0] for q in questions}))
    assert cli.main(["score", "dev", str(predictions)]) == 0
    scored = json.loads(capsys.readouterr().out)
    total = len(squad.load_squad(squad_file("dev")))
    assert scored["exact_match"] == pytest.approx(100 * 3 / total)


def test_a_command_reading_a_sweep_creates_no_tracking_database(capsys, tmp_path):
    database = tmp_path / "absent.db"
    for argv in (["register", "--experiment", "e"], ["report", "--experiment", "e", "--out", str(tmp_path / "r")],
                 ["select", "--registered-model", "m", "--max-latency-ms", "5"]):
        line = _one_line_error(capsys, [*argv, "--tracking-uri", f"sqlite:///{database}"])
        assert "no MLflow database" in line and str(database) in line
    assert list(tmp_path.iterdir()) == []
    # One misspelt beside the store that is there: its name.
    sqlite_store(tmp_path / "mlflow.db")
    line = _one_line_error(capsys, ["report", "--experiment", "e", "--out", str(tmp_path / "r"),
                                    "--tracking-uri", f"sqlite:///{tmp_path}/mlfow.db"])
    assert line.endswith(f"no MLflow database at {tmp_path}/mlfow.db; did you mean '{tmp_path}/mlflow.db'? (pass "
                         "the sweep's --tracking-uri)"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_ask_and_eval_write_only_their_own_output(capsys, tokenizer, masked_checkpoint, tmp_path):
    """ask and eval of a dense model directory wrote transformers' "Loading weights" bar to stderr, and pack its
    "Writing model shards" bar: a command's output is its own (the answer on stdout, its log on stderr)."""
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    dense = tmp_path / "dense"
    BertForQuestionAnswering(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64)).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    capsys.readouterr()
    assert cli.main(["ask", str(dense), "--question", "Who went home?", "--context", "Bob went home."]) == 0
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)) == {"answer", "start", "end", "score"} and captured.err == ""
    assert cli.main(["eval", str(dense), "--eval-limit", "2", "--no-progress"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert cli.main(["pack", str(masked_checkpoint), str(tmp_path / "packed"), "--questions", "2"]) == 0
    assert "Writing model shards" not in capsys.readouterr().err


def test_a_command_reading_a_sweep_leaves_an_empty_file_as_it_was(capsys, tmp_path):
    """`select --tracking-uri sqlite:///EMPTY` (and register, report) made MLflow's tables in a 0-byte file that was
    no MLflow database, and then said the experiment or model was not in it; it is refused as a file that is not one."""
    database = tmp_path / "empty.db"
    database.touch()
    for argv in (["register", "--experiment", "e"], ["report", "--experiment", "e", "--out", str(tmp_path / "r")],
                 ["select", "--registered-model", "m", "--max-latency-ms", "5"]):
        line = _one_line_error(capsys, [*argv, "--tracking-uri", f"sqlite:///{database}"])
        assert line.endswith(f"{database} is an empty file, not an MLflow database (pass the sweep's "
                             "--tracking-uri)"), line
    assert database.stat().st_size == 0 and sorted(tmp_path.iterdir()) == [database]


@pytest.mark.parametrize("alias, said", [
    ("a\nb", "Invalid alias name: 'a b'. Names may only contain alphanumerics, underscores (_), and dashes (-)."),
    ("latest", "'latest' alias name (case insensitive) is reserved."),
    ("v3", "Version alias name 'v3' is reserved."),
])
def test_an_alias_the_registry_refuses_is_one_line_before_the_store_is_opened(capsys, tmp_path, alias, said):
    """An alias with a line break ended the error at the break (MLflow's message repeats the alias)."""
    database = tmp_path / "mlflow.db"
    line = _one_line_error(capsys, ["select", "--registered-model", "m", "--max-latency-ms", "5", "--alias", alias,
                                    "--tracking-uri", f"sqlite:///{database}"])
    assert line == f"fineprune select: error: --alias {alias!r}: {said}"
    assert not database.exists()


def test_another_applications_sqlite_database_is_refused_and_left_as_it_was(capsys, tmp_path):
    """A --tracking-uri (or MLFLOW_TRACKING_URI) that named another application's SQLite database got MLflow's
    tables written into it (1 table -> 66) by register, report, select and eval of a models:/ version, which then said
    the experiment or model was not there; a sweep would have recorded into it. It is refused, untouched."""
    import sqlite3

    import ray

    database = tmp_path / "app.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
    db.close()
    before = database.read_bytes()
    uri = f"sqlite:///{database}"
    problem = "a SQLite database of something else (tables users), not an MLflow database: it is left as it is"
    for argv in (["register", "--experiment", "e"], ["report", "--experiment", "e", "--out", str(tmp_path / "r")],
                 ["select", "--registered-model", "m", "--max-latency-ms", "5"], ["eval", "models:/m@champion"]):
        line = _one_line_error(capsys, [*argv, "--tracking-uri", uri])
        assert line.endswith(f"{database} is {problem} (pass the sweep's --tracking-uri)"), line
    line = _one_line_error(capsys, ["sweep", "--space", str(ROOT / "tune_spaces" / "smoke.yaml"), "--storage-path",
                                    str(tmp_path / "ray"), "--tracking-uri", uri])
    assert line == (f"fineprune sweep: error: tracking URI {uri}: the database {database}: {problem} (pass another "
                    "--tracking-uri)")
    assert not ray.is_initialized()
    assert database.read_bytes() == before and sorted(tmp_path.iterdir()) == [database]


def test_a_training_run_that_fails_before_writing_leaves_no_output_dir(capsys, tmp_path):
    question = " ".join(["which"] * 200) + "?"
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "The cat sat on the mat.", "qas": [
        {"id": "long-q", "question": question, "answers": [{"text": "the mat", "answer_start": 15}]}]}]}]}
    path = tmp_path / "long.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--train-data", str(path), "--eval-data", str(path),
                                    "--output-dir", str(out), "--no-progress"])
    assert "question long-q has" in line
    assert not out.exists()


@pytest.mark.parametrize("value,needle", [("abc", "FINEPRUNE_TRACKING_TIMEOUT='abc' is not a number of seconds"),
                                          ("-5", "FINEPRUNE_TRACKING_TIMEOUT must be a positive number")])
def test_a_bad_tracking_timeout_in_the_environment_is_one_line(capsys, monkeypatch, tmp_path, value, needle):
    monkeypatch.setenv("FINEPRUNE_TRACKING_TIMEOUT", value)
    line = _one_line_error(capsys, ["sweep", "--space", str(ROOT / "tune_spaces" / "smoke.yaml"),
                                    "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert needle in line
    assert list(tmp_path.iterdir()) == []  # refused before the tracking store was touched


def test_a_diverging_run_is_one_line_and_exit_2(capsys, tmp_path):
    config = tmp_path / "diverge.yaml"
    values = yaml.safe_load((ROOT / "configs" / "tiny_smoke.yaml").read_text())
    config.write_text(yaml.safe_dump({**values, "learning_rate": 1e30, "warmup_ratio": 0.0, "max_grad_norm": None}))
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--output-dir", str(tmp_path / "run"),
                                    "--no-progress"])
    assert re.search(r"fineprune prune: error: step \d+: the training loss is nan .*training diverged", line), line
    assert not (tmp_path / "run" / "final").exists()


def test_a_directory_given_as_data_is_named_as_one(capsys, tmp_path):
    """A folder given where a SQuAD file goes was "SQuAD data file not found", while it was there."""
    from workflows.preflight import check_local_paths
    from workflows.space import SpaceError, load_space

    data = tmp_path / "squad"
    data.mkdir()
    says = f"{data}: is a directory; a SQuAD JSON file is expected"
    (tmp_path / "predictions.json").write_text("{}")
    assert _one_line_error(capsys, ["score", str(data), str(tmp_path / "predictions.json")]).endswith(f"error: {says}")
    for flag in ("--train-data", "--eval-data"):
        line = _one_line_error(capsys, ["prune", "--config", TINY, flag, str(data), "--output-dir",
                                        str(tmp_path / "out")])
        assert line.endswith(f"error: {flag}: {says}"), line
    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    space["base"]["eval_data"] = str(data)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    with pytest.raises(SpaceError, match=f"^{tmp_path / 'space.yaml'}: base.eval_data: {says}$"):
        check_local_paths(load_space(tmp_path / "space.yaml"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.json", "space.yaml", "squad"]


def test_a_file_given_as_a_model_is_named_as_one(capsys, tmp_path):
    """A model's config.json given where its directory goes was "model directory not found", while it was there."""
    model = tmp_path / "config.json"
    model.write_text('{"model_type": "bert"}')
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--model", str(model), "--output-dir",
                                    str(tmp_path / "out")])
    assert line.endswith(f"error: --model: {model}: is a file; a model directory is expected"), line
    line = _one_line_error(capsys, ["eval", str(model), "--eval-limit", "2"])
    assert line.endswith(f"error: {model}: is a file; a model directory is expected"), line



def test_a_directory_given_as_a_config_or_space_and_a_file_as_a_checkpoint_are_named_as_such(capsys, tmp_path):
    """The configs/ folder given as --config (tune_spaces/ as --space) was "config file not found" while it was
    there, and a checkpoint's trainer_state.json given as --resume "checkpoint directory not found"."""
    folder = tmp_path / "configs"
    folder.mkdir()
    line = _one_line_error(capsys, ["prune", "--config", str(folder)])
    assert line.endswith(f"error: {folder}: is a directory; a YAML run config file is expected"), line
    line = _one_line_error(capsys, ["sweep", "--space", str(folder)])
    assert line.endswith(f"error: {folder}: is a directory; a YAML search-space file is expected"), line
    state = tmp_path / "trainer_state.json"
    state.write_text("{}")
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--resume", str(state), "--output-dir",
                                    str(tmp_path / "out"), "--no-progress"])
    assert line.endswith(f"error: {state}: is a file; a training checkpoint directory is expected"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "trainer_state.json"]


@pytest.mark.parametrize("value,needle", [
    ("hidden_act: bogus", "model_config.hidden_act: unknown activation 'bogus' (one of gelu, "),
    ("layer_norm_eps: tiny", "model_config: invalid BertConfig (Validation error for field 'layer_norm_eps': "),
    # taken by the config, refused by the model's layers (an AssertionError, a RuntimeError)
    ("pad_token_id: 30522", "model_config.pad_token_id: must be a token id below vocab_size (30522), got 30522"),
    ("initializer_range: -0.02", "model_config.initializer_range: must be a number >= 0, got -0.02"),
    ("model_type: electra, embedding_size: -4", "model_config.embedding_size: must be a positive integer, got -4"),
])
def test_a_model_config_value_transformers_cannot_build_is_one_line(capsys, tmp_path, value, needle):
    """A random model's model_config with an activation transformers lacks, or a value of the wrong type, passed the
    config's checks and stopped the run with a traceback from transformers."""
    config = tmp_path / "run.yaml"
    config.write_text("model_config: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
                      f"intermediate_size: 64, max_position_embeddings: 128, {value}}}\n"
                      f"train_data: dev\ntrain_limit: 4\nmax_steps: 1\noutput_dir: {tmp_path / 'out'}\n")
    line = _one_line_error(capsys, ["train", "--config", str(config), "--no-progress"])
    assert f"error: {config}: {needle}" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["report.html", "report.md"])
def test_a_directory_where_the_report_writes_a_file_is_one_line_before_any_work(capsys, monkeypatch, tmp_path, name):
    """It was found once the sweep's record had been read and the report drawn, exit 1."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / name).mkdir(parents=True)
    line = _one_line_error(capsys, ["report", "--experiment", "e", "--out", "out"])
    assert line == f"fineprune report: error: --out {Path('out') / name}: is a directory, not a file", line
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["out", f"out/{name}"]


@pytest.mark.parametrize("kind,edit,needle", [
    ("masked", {"num_attention_heads": 3}, "(ValueError: The hidden size (64) is not a multiple of the number of "
                                           "attention heads (3))"),
    ("masked", {"hidden_act": "bogus"}, "(KeyError: 'bogus')"),
    ("dense", {"hidden_act": "bogus"}, "(KeyError: 'bogus')"),
])
def test_a_config_json_no_model_can_be_built_from_is_one_line(capsys, masked_checkpoint, tiny_bert_config, tokenizer,
                                                              tmp_path, kind, edit, needle):
    """A model directory whose config.json transformers reads but builds no model from (heads that do not divide
    the hidden size, an activation it lacks: a file edited by hand) was a traceback in eval, ask, pack and export."""
    from transformers import BertForQuestionAnswering

    from pruning.checkpoint import save_model

    model = tmp_path / kind
    if kind == "masked":
        shutil.copytree(masked_checkpoint, model)
    else:
        save_model(BertForQuestionAnswering(tiny_bert_config), tokenizer, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **edit}))
    says = f"error: {model / 'config.json'}: BertForQuestionAnswering cannot be built from it {needle}"
    line = _one_line_error(capsys, ["eval", str(model), "--eval-limit", "2", "--no-progress"])
    assert line.endswith(says), line
    line = _one_line_error(capsys, ["pack", str(model), str(tmp_path / "packed"), "--questions", "2"])
    assert line.endswith(says), line
    assert not (tmp_path / "packed").exists()


@pytest.mark.parametrize("edit,needle", [
    ({"vocab_size": 1000}, "vocab_size 1000 is smaller than the tokenizer's 30522 tokens"),
    ({"type_vocab_size": 1}, "type_vocab_size 1, but the tokenizer gives the context token type 1"),
])
def test_a_model_that_cannot_embed_its_own_tokenizers_windows_is_one_line_before_any_work(
        capsys, tiny_bert_config, tokenizer, tmp_path, edit, needle):
    """A model saved beside another model's tokenizer (fewer word embeddings than its tokens, or one token type where
    the tokenizer marks the context with a second) failed at the first forward with an IndexError traceback in eval,
    ask, pack and export, and in prune after --overwrite had removed the earlier run."""
    from transformers import BertForQuestionAnswering

    from pruning.checkpoint import save_model

    model = tmp_path / "model"
    save_model(BertForQuestionAnswering(BertConfig(**{**tiny_bert_config.to_dict(), **edit})), tokenizer, model)
    says = f"error: {model / 'config.json'}: {needle}: the model and the tokenizer files beside it do not belong"
    for argv in (["eval", str(model), "--eval-limit", "2", "--no-progress"],
                 ["ask", str(model), "--question", "Who won?", "--context", "The Broncos won."],
                 ["pack", str(model), str(tmp_path / "packed"), "--questions", "2"],
                 ["export", str(model), str(tmp_path / "onnx"), "--questions", "2"]):
        assert says in _one_line_error(capsys, argv), argv
    assert not (tmp_path / "packed").exists() and not (tmp_path / "onnx").exists()
    out = tmp_path / "run"
    assert cli.main(["prune", "--config", TINY, "--max-steps", "1", "--train-limit", "4", "--eval-limit", "2",
                     "--output-dir", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    earlier = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--max-steps", "1", "--train-limit", "4",
                                    "--output-dir", str(out), "--overwrite", "--model", str(model)])
    assert f"model: {model / 'config.json'}: {needle}" in line
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == earlier  # the earlier run kept
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--max-steps", "1", "--train-limit", "4",
                                    "--output-dir", str(tmp_path / "taught"), "--teacher", str(model)])
    teacher_needle = needle.replace("the tokenizer", "the student's tokenizer")
    if "vocab_size 1000" in needle:
        teacher_needle = "embeds 1000 tokens, fewer than the student's tokenizer has (30522)"
    assert "teacher: " in line and teacher_needle in line, line


def test_a_seed_torch_cannot_take_is_one_line(capsys, tmp_path):
    """A run config's seed past what torch and NumPy take stopped the run with a traceback once it had started."""
    config = tmp_path / "run.yaml"
    config.write_text((ROOT / "configs" / "tiny_smoke.yaml").read_text() + "seed: 9223372036854775808\n")
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--output-dir", str(tmp_path / "out"),
                                    "--no-progress"])
    assert line.endswith(f"error: {config}: seed: must be an integer from 0 to 4294967295, got "
                         "9223372036854775808"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value,shown", [("true", "True"), ("[runs, a]", "['runs', 'a']"), ("{a: 1}", "{'a': 1}")])
def test_an_output_dir_that_is_no_path_is_one_line(capsys, monkeypatch, tmp_path, value, shown):
    """A run config's output_dir given as a boolean, list or mapping was written out as text, and the run trained
    into a directory named True or ['runs', 'a'] in the working directory; a number is still a name."""
    from pruning.config import load_config

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text((ROOT / "configs" / "tiny_smoke.yaml").read_text().replace("output_dir: runs/tiny_smoke",
                                                                                 f"output_dir: {value}"))
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--max-steps", "1", "--no-progress"])
    assert line.endswith(f"error: {config}: output_dir: must be a path or name, got {shown}"), line
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]
    config.write_text("output_dir: 2024\n")
    assert load_config(config).output_dir == "2024"


@pytest.mark.parametrize("storage", ["a-file", "a-file/ray", "file://{tmp}/a-file"])
def test_a_storage_path_that_is_a_file_is_one_line_before_the_sweep_starts(capsys, tmp_path, storage):
    """A --storage-path that was a file (or under one) was "[Errno 17] File exists", status 1, once the sweep had
    made its tracking store."""
    (tmp_path / "a-file").write_text("x")
    storage = storage.replace("{tmp}", str(tmp_path))
    path = storage if "://" in storage else str(tmp_path / storage)
    line = _one_line_error(capsys, ["sweep", "--space", str(ROOT / "tune_spaces" / "smoke.yaml"), "--storage-path",
                                    path, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    problem = "exists and is not a directory" if path.endswith("a-file") else f"{tmp_path / 'a-file'} is a file"
    assert line.startswith(f"fineprune sweep: error: --storage-path {path}: {problem}"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert (tmp_path / "a-file").read_text() == "x"


@pytest.mark.parametrize("under", ["", "ray"])
def test_a_storage_path_that_cannot_be_written_is_one_line_before_the_sweep_starts(capsys, tmp_path, unwritable_dir,
                                                                                     under):
    """A --storage-path in a directory nothing can be written into made the sweep's tracking database, then stopped
    with "[Errno 1] Operation not permitted", status 1."""
    path = unwritable_dir / under if under else unwritable_dir
    line = _one_line_error(capsys, ["sweep", "--space", str(ROOT / "tune_spaces" / "smoke.yaml"), "--storage-path",
                                    str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    problem = (f"cannot be made ({unwritable_dir} takes no new files)" if under
               else "cannot be written (no permission to write into it)")
    assert line == f"fineprune sweep: error: --storage-path {path}: {problem}", line
    assert sorted(p.name for p in tmp_path.iterdir()) == [unwritable_dir.name]


@pytest.mark.parametrize("name,says", [
    ("team/a", "--experiment 'team/a': use letters, digits, '_', '.', '-' (it names directories)"),
    ("a b", "--experiment 'a b': use letters, digits, '_', '.', '-' (it names directories)"),
    ("a" * 201, f"--experiment {'a' * 20!r}... is 201 characters long: at most 200 (it names directories)"),
])
def test_an_experiment_name_that_cannot_name_the_sweeps_directories_is_refused_before_the_sweep_starts(
        capsys, tmp_path, name, says):
    """`sweep --experiment team/a` recorded its sweep directory as <storage>/team/a-<time>, while Tune wrote it to
    <storage>/a-<time>: the summary, the record and --resume named a directory that does not exist. One of 201
    characters failed once the teacher was trained (Tune's directory name too long). The name rule is the space's
    `name`'s. (The address that does not answer is checked later: a sweep that got past the name would stop
    there.)"""
    line = _one_line_error(capsys, ["sweep", "--space", str(ROOT / "tune_spaces" / "smoke.yaml"), "--experiment",
                                    name, "--address", "127.0.0.1:1", "--storage-path", str(tmp_path / "ray"),
                                    "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert line == f"fineprune sweep: error: {says}", line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cache,says", [("notes.txt", "exists and is not a directory"),
                                         ("notes.txt/cache", "{tmp}/notes.txt is a file, not a directory")])
def test_a_cache_dir_that_is_a_file_or_under_one_is_one_line_before_any_work(capsys, tmp_path, cache, says):
    """It was found once the training questions were tokenized, as "[Errno 20] Not a directory" naming a temporary
    file, exit 1."""
    (tmp_path / "notes.txt").write_text("notes")
    config = tmp_path / "run.yaml"
    config.write_text(Path(TINY).read_text() + f"\ncache_dir: {tmp_path / cache}\n")
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--output-dir", str(tmp_path / "run")])
    assert line == (f"fineprune prune: error: {config}: cache_dir {tmp_path / cache}: "
                    f"{says.replace('{tmp}', str(tmp_path))}"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run.yaml"]


@pytest.mark.parametrize("name,text,argv,says", [
    ("deep.json", "[" * 100_000 + "]" * 100_000, ["score", "{file}", "{tmp}/p.json"], "not readable JSON (nested too "
                                                                                     "deeply)"),
    ("long.json", '{"data": [], "n": ' + "9" * 5000 + "}", ["score", "{file}", "{tmp}/p.json"],
     "not readable JSON (a number too long to read)"),
    ("p.json", "[" * 100_000 + "]" * 100_000, ["score", "dev", "{file}"], "not readable JSON (nested too deeply)"),
    ("deep.jsonl", json.dumps({"id": "q1", "context": "Ann wrote it.", "question": "Who?",
                               "answers": {"text": ["Ann"], "answer_start": [0]}}) + "\n" + "[" * 100_000
     + "]" * 100_000 + "\n", ["score", "{file}", "{tmp}/p.json"], "not readable JSON at line 2 (nested too deeply)"),
    ("deep.yaml", "model_config: " + "[" * 5000 + "]" * 5000, ["prune", "--config", "{file}"],
     "not readable YAML (nested too deeply)"),
    ("long.yaml", "seed: " + "9" * 5000, ["prune", "--config", "{file}"], "not readable YAML (a number too long to "
                                                                          "read)"),
    ("space.yaml", "num_samples: " + "9" * 5000, ["sweep", "--space", "{file}"], "not readable YAML (a number too "
                                                                                 "long to read)"),
    ("model/config.json", '{"a": ' * 100_000 + "1" + "}" * 100_000, ["eval", "{tmp}/model"],
     "not readable JSON (nested too deeply)"),
])
def test_a_file_nested_too_deeply_or_with_a_number_too_long_is_one_line_naming_it(capsys, tmp_path, name, text, argv,
                                                                                  says):
    """Python's parsers stop on nesting past the recursion limit and on integers of over 4,300 digits with a
    RecursionError or ValueError, which were tracebacks in every reader of SQuAD, predictions, config and space
    files and of a model's config.json."""
    file = tmp_path / name
    file.parent.mkdir(exist_ok=True)
    file.write_text(text)
    if name != "p.json":  # the predictions scored against the data file
        (tmp_path / "p.json").write_text('{"q1": "x"}')
    line = _one_line_error(capsys, [arg.replace("{file}", str(file)).replace("{tmp}", str(tmp_path)) for arg in argv])
    assert line.endswith(f"error: {file}: {says}"), line


@pytest.mark.parametrize("uri,meant", [("mlflow.db", "sqlite:///mlflow.db"),
                                       ("file:///{tmp}/runs/mlflow.db", "sqlite:////{tmp}/runs/mlflow.db"),
                                       # escapes a file: URI decodes, and what SQLAlchemy would misread in the path
                                       ("file:///{tmp}/my%20runs/mlflow.db", "sqlite:////{tmp}/my runs/mlflow.db"),
                                       ("pct%41 q?x/mlflow.db", "sqlite:///pct%2541 q%3Fx/mlflow.db")])
def test_a_database_given_without_its_scheme_is_one_line_naming_the_uri_meant(capsys, monkeypatch, tmp_path, uri,
                                                                             meant):
    """`--tracking-uri mlflow.db` got MLflow's paragraph on its file store's maintenance mode, which named neither
    the mistake nor the URI of the database at that path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri, meant = (text.replace("/{tmp}", str(tmp_path)) for text in (uri, meant))
    line = _one_line_error(capsys, ["report", "--experiment", "e", "--tracking-uri", uri, "--out", "report"])
    assert line == (f"fineprune report: error: tracking URI {uri}: a path, which MLflow opens as a file store, and "
                    f"only with MLFLOW_ALLOW_FILE_STORE=true; for a SQLite database there give {meant}"), line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,says", [
    (["sweep", "--space", "s.yaml", "--experiment", ""], "argument --experiment: must not be blank, got ''"),
    (["sweep", "--space", "s.yaml", "--experiment", "   "], "argument --experiment: must not be blank, got '   '"),
    (["sweep", "--space", "s.yaml", "--tracking-uri", ""], "argument --tracking-uri: must not be blank, got ''"),
    (["register", "--experiment", "e", "--sweep-run", " "], "argument --sweep-run: must not be blank, got ' '"),
    (["report", "--experiment", "e", "--out", ""], "argument --out: must not be empty (a path)"),
    (["select", "--registered-model", "", "--max-latency-ms", "5"],
     "argument --registered-model: must not be blank, got ''"),
    (["sweep", "--space", "s.yaml", "--resume", ""], "argument --resume: must not be blank, got ''"),
    (["select", "--registered-model", "m", "--max-latency-ms", "inf"],
     "argument --max-latency-ms: must be a finite number > 0, got 'inf'"),
    (["select", "--registered-model", "m", "--max-latency-ms", "nan"],
     "argument --max-latency-ms: must be a finite number > 0, got 'nan'"),
    (["select", "--registered-model", "m", "--max-latency-ms", "0"],
     "argument --max-latency-ms: must be a finite number > 0, got '0'"),
    (["select", "--registered-model", "m", "--max-latency-ms", "fast"],
     "argument --max-latency-ms: not a number of milliseconds: 'fast'"),
])
def test_a_blank_name_uri_or_path_and_a_budget_that_is_none_are_refused_not_defaulted(capsys, monkeypatch, tmp_path,
                                                                                      argv, says):
    """An unset shell variable ("$URI") made `--tracking-uri ""` the default store, `--experiment ""` the space's name
    and `report --out ""` write into the current directory; `--experiment "   "` made an experiment and directories
    of blanks; `select --max-latency-ms inf` aliased the most accurate version as within a budget."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.splitlines()[-1] == f"fineprune {argv[0]}: error: {says}", err
    assert list(tmp_path.iterdir()) == []


def test_eval_predictions_never_replace_the_data_or_the_model_they_come_from(capsys, masked_checkpoint, tmp_path):
    """`eval --predictions` given the --eval-data file (or a path to it, or the file a link given as the data names)
    replaced the SQuAD file with the predictions, and given a file of the model directory (its config.json) broke
    the model; both are refused in one line and left as they were."""
    data = json.loads(squad_file("dev").read_text())
    data["data"] = data["data"][:1]
    data["data"][0]["paragraphs"] = data["data"][0]["paragraphs"][:1]
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(data))
    (tmp_path / "link.json").symlink_to(questions)
    model = tmp_path / "model"
    shutil.copytree(masked_checkpoint, model)
    config = (model / "config.json").read_text()
    for given, predictions in ((questions, questions), (questions, tmp_path / "." / "questions.json"),
                               (tmp_path / "link.json", questions)):
        line = _one_line_error(capsys, ["eval", str(model), "--eval-data", str(given), "--eval-limit", "2",
                                        "--no-progress", "--predictions", str(predictions)])
        assert line.endswith(f"error: --predictions {predictions}: is the --eval-data file {given} the questions are "
                             "read from, which the predictions would replace; write them to another file"), line
    line = _one_line_error(capsys, ["eval", str(model), "--eval-data", str(questions), "--eval-limit", "2",
                                    "--no-progress", "--predictions", str(model / "config.json")])
    assert line.endswith(f"error: --predictions {model / 'config.json'}: is a file of the model directory {model} "
                         "evaluated, which the predictions would replace; write them to another file"), line
    # A link is kept and the file it names is written: a link to the data or to a model file is refused as they are.
    (tmp_path / "to_config.json").symlink_to(model / "config.json")
    for link, what in ((tmp_path / "link.json", "the --eval-data file"), (tmp_path / "to_config.json", "a file of")):
        line = _one_line_error(capsys, ["eval", str(model), "--eval-data", str(questions), "--eval-limit", "2",
                                        "--no-progress", "--predictions", str(link)])
        assert f"error: --predictions {link}: is {what}" in line, line
    assert json.loads(questions.read_text()) == data and (model / "config.json").read_text() == config
    assert cli.main(["eval", str(model), "--eval-data", str(questions), "--eval-limit", "2", "--no-progress",
                     "--predictions", str(model / "predictions.json")]) == 0  # a new file beside the model is fine
    assert len(json.loads((model / "predictions.json").read_text())) == 2


@pytest.mark.parametrize("under", ["", "new"])
def test_eval_predictions_that_cannot_be_written_are_one_line_before_the_evaluation(capsys, masked_checkpoint,
                                                                                   unwritable_dir, under):
    """`eval --predictions` into a directory that takes no new files evaluated every question, then stopped with
    status 1 when it came to write them; it is now refused before the model is loaded, one line naming the flag and
    the file (exit 2)."""
    predictions = unwritable_dir / under / "predictions.json" if under else unwritable_dir / "predictions.json"
    line = _one_line_error(capsys, ["eval", str(masked_checkpoint), "--eval-limit", "2", "--no-progress",
                                    "--predictions", str(predictions)])
    assert line == (f"fineprune eval: error: --predictions {predictions}: cannot be made ({unwritable_dir} takes no "
                    "new files)"), line
    assert list(unwritable_dir.iterdir()) == []


@pytest.mark.parametrize("under", ["", "out"])
def test_an_output_dir_that_cannot_be_written_is_one_line_before_any_work(capsys, masked_checkpoint, tmp_path,
                                                                          unwritable_dir, under):
    """pack, export, train and prune into a directory without write permission said "[Errno 13] Permission denied:
    '.../.packed.lock'", naming a lock file the user never gave; into such a directory that exists (an empty one),
    they loaded, packed, exported or trained the model and then stopped with status 1 when they came to write it.
    Each is now refused as sweep and report refuse theirs: one line naming the output, before any work (exit 2)."""
    out = unwritable_dir / under if under else unwritable_dir
    problem = (f"cannot be made ({unwritable_dir} takes no new files)" if under
               else "cannot be written (no permission to write into it)")
    dense = tmp_path / "dense.yaml"
    dense.write_text(yaml.safe_dump({"model_config": {"hidden_size": 32, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 64},
                                     "train_data": "dev", "eval_data": "dev", "train_limit": 8, "eval_limit": 4,
                                     "max_steps": 2, "method": "dense"}))
    for argv, flag in ((["pack", str(masked_checkpoint)], "out_dir"), (["export", str(masked_checkpoint)], "out_dir"),
                       (["train", "--config", str(dense), "--no-progress", "--output-dir"], "output_dir"),
                       (["prune", "--config", TINY, "--no-progress", "--output-dir"], "output_dir")):
        line = _one_line_error(capsys, [*argv, str(out)])
        assert line == f"fineprune {argv[0]}: error: {flag} {out}: {problem}", line
    assert list(unwritable_dir.iterdir()) == []


def test_an_output_name_too_long_for_the_name_it_is_first_written_under_is_one_line_before_any_work(
        capsys, masked_checkpoint, tmp_path):
    """A name the filesystem takes, but not with the writer's process, host and a random part added (the name an
    output is written under beside it, then renamed): pack and export made the model, and eval --predictions scored
    every question, then each stopped in "File name too long" (status 1). A run's output directory, not written so,
    keeps such a name."""
    import socket

    name = "N" * (255 - len(f"..{os.getpid()}@{socket.gethostname()}.00000000.tmp") + 1)  # one byte too many
    for argv, flag in ((["pack", str(masked_checkpoint)], "out_dir"), (["export", str(masked_checkpoint)], "out_dir"),
                       (["eval", str(masked_checkpoint), "--eval-limit", "2", "--no-progress", "--predictions"],
                        "--predictions")):
        line = _one_line_error(capsys, [*argv, str(tmp_path / name)])
        assert line == (f"fineprune {argv[0]}: error: {flag} {tmp_path / name}: a name of {len(name)} bytes is too "
                        f"long to write: the name it is written under first, beside it ({255 - len(name) + 1} bytes "
                        "longer on this host), would exceed the 255 the filesystem takes; give a shorter name"), line
    assert not any(tmp_path.glob("*N*"))
    from workflows.user_errors import output_path_problem

    assert output_path_problem(tmp_path / name, directory=True, writable=True, staged=False) is None
    assert output_path_problem(tmp_path / name[:-1], directory=True, writable=True) is None


def test_an_output_dir_whose_own_directory_takes_no_new_files_is_one_line_naming_its_lock(capsys, masked_checkpoint,
                                                                                          tmp_path):
    """pack, export, train and prune into an out_dir that can be written, inside a directory that cannot, passed the
    check of out_dir and stopped with status 1 at the lock file kept beside it, "OUT: cannot write (Operation not
    permitted)", about a directory that could be written. The lock stays beside out_dir (pack and export replace
    out_dir whole from there; a lock inside it would go with it), so each is now one line naming the lock file and
    the directory, before any work (exit 2), and out_dir is left as it was."""
    from conftest import frozen

    parent = tmp_path / "parent"
    out = parent / "out"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("kept")
    dense = tmp_path / "dense.yaml"
    dense.write_text(yaml.safe_dump({"model_config": {"hidden_size": 32, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 64},
                                     "train_data": "dev", "eval_data": "dev", "train_limit": 8, "eval_limit": 4,
                                     "max_steps": 2, "method": "dense"}))
    with frozen(parent):
        for argv, flag in ((["pack", str(masked_checkpoint), "--overwrite"], "out_dir"),
                           (["export", str(masked_checkpoint), "--overwrite"], "out_dir"),
                           (["train", "--config", str(dense), "--no-progress", "--output-dir"], "output_dir"),
                           (["prune", "--config", TINY, "--no-progress", "--output-dir"], "output_dir")):
            line = _one_line_error(capsys, [*argv, str(out)])
            assert line == (f"fineprune {argv[0]}: error: {flag} {out}: its lock file {parent / '.out.lock'} cannot "
                            f"be made ({parent} takes no new files; a command writing a directory holds a lock "
                            "beside it); name a new directory inside it instead"), line
        code = cli.main(["pack", str(masked_checkpoint), str(out / "packed"), "--repeats", "1", "--questions", "2"])
        assert code == 0  # as that line advises: out takes new files and its lock
    assert sorted(p.name for p in parent.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "packed"]


@pytest.mark.parametrize("store", ["mlflow.db", "runs/mlflow.db"])
def test_a_sweeps_tracking_database_where_nothing_can_be_written_is_one_line_before_it_starts(
        capsys, caplog, tmp_path, unwritable_dir, monkeypatch, store):
    """A sweep in a working directory nothing can be written into, with the default tracking store (mlflow.db
    there) or a sqlite:/// one in such a directory, retried opening the database for about a minute and a half and
    then stopped on SQLAlchemy's "unable to open database file"; it is now one line naming the tracking URI and the
    directory, before Ray, MLflow or the teacher start (exit 2)."""
    import ray

    monkeypatch.chdir(unwritable_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    flags = [] if store == "mlflow.db" else ["--tracking-uri", f"sqlite:///{store}"]
    line = _one_line_error(capsys, ["sweep", "--space", str(ROOT / "tune_spaces" / "smoke.yaml"), "--storage-path",
                                    str(tmp_path / "ray"), *flags])
    problem = f"cannot be made ({unwritable_dir} takes no new files)"
    assert line == (f"fineprune sweep: error: tracking URI sqlite:///{store}: the database {store}: {problem} (pass "
                    "another --tracking-uri)")
    assert "SQLAlchemy" not in caplog.text and not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == [unwritable_dir.name]


@pytest.mark.parametrize("argv", [["register", "--experiment", "exp"],
                                  ["select", "--registered-model", "qa", "--max-latency-ms", "5"]],
                         ids=["register", "select"])
def test_register_and_select_on_a_database_they_cannot_write_are_one_line_before_any_work(capsys, caplog, tmp_path,
                                                                                         argv):
    """register and select write (versions, tags, an alias) into a store they also read: on a database they cannot
    write, register ended in seven of MLflow's tracebacks and select timed every version first, then refused to move
    the alias. Now one line naming the tracking URI and the database, before any work (exit 2)."""
    from conftest import frozen

    uri = sqlite_store(tmp_path / "store" / "mlflow.db")
    before = (tmp_path / "store" / "mlflow.db").read_bytes()
    with frozen(tmp_path / "store" / "mlflow.db"):
        line = _one_line_error(capsys, [*argv, "--tracking-uri", uri])
    assert line == (f"fineprune {argv[0]}: error: tracking URI {uri}: the database {tmp_path / 'store' / 'mlflow.db'}"
                    ": cannot be written (no permission to write it) (pass another --tracking-uri)"), line
    assert "Traceback" not in caplog.text
    assert (tmp_path / "store" / "mlflow.db").read_bytes() == before


@pytest.mark.parametrize("flags, says", [
    (["--train-limit", "0"], "--train-limit: must be a positive integer"),
    (["--device", "xpu"], "--device: must be auto"),
    (["--precision", "bf16"], "--precision: bf16 asked for, but"),
], ids=["limit", "device", "precision"])
def test_a_bad_flag_value_is_named_by_the_flag_whatever_the_config_path_and_nothing_is_left(capsys, tmp_path,
                                                                                         monkeypatch, flags, says):
    """The config file named ./c.yaml (or a/../c.yaml) was blamed for a flag's value (the flag's error read as the
    file's, as load_config names it c.yaml), and so were --device and --precision whatever the path; a precision
    refused by the trainer left the output directory's parents behind."""
    from pruning.precision import cpu_supports_bf16

    if "bf16" in flags and cpu_supports_bf16():
        pytest.skip("this CPU computes in bf16")
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(TINY, tmp_path / "c.yaml")
    line = _one_line_error(capsys, ["prune", "--config", "./c.yaml", *flags, "--output-dir", "a/b/run"])
    assert line.startswith(f"fineprune prune: error: {says}"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_a_run_refused_once_the_model_is_known_leaves_no_directories_it_made(capsys, tmp_path, monkeypatch):
    """A block shape that does not fit the model is found by the trainer, after the output directory's parents were
    made for its lock: they stayed, empty."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(Path(TINY).read_text().replace("attention_block: [16, 16]",
                                                                    "attention_block: [48, 48]"))
    line = _one_line_error(capsys, ["prune", "--config", "c.yaml", "--output-dir", "x/y/run", "--no-progress"])
    assert "attention_block" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


@pytest.mark.parametrize("address", ["foo", " ", "http://127.0.0.1:6379", "127.0.0.1:abc", "127.0.0.1:0"])
@pytest.mark.parametrize("check", [True, False], ids=["check", "sweep"])
def test_a_ray_address_ray_does_not_take_is_one_line_before_anything_is_written(capsys, tmp_path, monkeypatch,
                                                                              address, check):
    """An address that is not HOST:PORT passed `sweep --check`; the sweep then stopped with ray.init's traceback
    ("Invalid address format"), its MLflow run left RUNNING and its storage made."""
    import ray

    monkeypatch.chdir(tmp_path)
    line = _one_line_error(capsys, ["sweep", "--space", str(ROOT / "tune_spaces" / "smoke.yaml"), "--address", address,
                                    "--storage-path", str(tmp_path / "ray"), *(["--check"] if check else [])])
    assert line == (f"fineprune sweep: error: Ray address {address!r}: not auto, HOST:PORT or ray://HOST:PORT"), line
    assert list(tmp_path.iterdir()) == [] and not ray.is_initialized()


@pytest.mark.parametrize("held_s", [3, 60])
def test_a_tracking_database_another_process_holds_locked_is_waited_for_not_taken_for_bad_input(
        capsys, caplog, tmp_path, monkeypatch, held_s):
    """A database another process holds locked (a long write) when a command opens it was one line taken for bad
    input (exit 2, "database is locked"), without a retry. It is waited for as a tracking server that does not
    answer: a lock let go in time is not seen (the command goes on: here, to the experiment it does not find), one
    held longer is one line, exit 1."""
    uri = sqlite_store(tmp_path / "mlflow.db")
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               f"db = sqlite3.connect({str(tmp_path / 'mlflow.db')!r}, isolation_level=None)\n"
                               "db.execute('BEGIN EXCLUSIVE'); print('held', flush=True)\n"
                               f"time.sleep({held_s})"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(cli, "REACH_TIMEOUT_S", 8.0)
        if held_s < 8:
            line = _one_line_error(capsys, ["report", "--experiment", "exp", "--out", str(tmp_path / "report"),
                                            "--tracking-uri", uri])
            assert line.startswith("fineprune report: error: experiment 'exp' not found in "), line
        else:
            line = _one_line_error(capsys, ["report", "--experiment", "exp", "--out", str(tmp_path / "report"),
                                            "--tracking-uri", uri], status=1)
            assert "database is locked" in line and uri in line, line
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc filesystem here")
@pytest.mark.parametrize("argv,flag,path", [
    (["sweep", "--space", str(ROOT / "tune_spaces" / "smoke.yaml"), "--tracking-uri",
      "sqlite:////proc/fineprune-test/mlflow.db"],
     "tracking URI sqlite:////proc/fineprune-test/mlflow.db: the database", "/proc/fineprune-test/mlflow.db"),
    (["sweep", "--space", str(ROOT / "tune_spaces" / "smoke.yaml"), "--storage-path", "/proc/fineprune-test"],
     "--storage-path", "/proc/fineprune-test"),
    (["prune", "--config", TINY, "--output-dir", "/proc/fineprune-test"], "output_dir", "/proc/fineprune-test"),
])
def test_an_output_under_proc_is_one_line_before_any_work(capsys, caplog, tmp_path, monkeypatch, argv, flag, path):
    """Permissions let root make files anywhere, yet /proc makes none: a sweep whose tracking database was there
    retried opening it for nearly two minutes, SQLAlchemy's warnings on stderr, before stopping on "unable to open
    database file"; a pruning run's output_dir there failed at its first write with "No such file or directory".
    Whether a directory takes a file is now tried with one, made and removed at once."""
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    extra = [] if "--tracking-uri" in argv or argv[0] == "prune" else [
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    line = _one_line_error(capsys, [*argv, *extra])
    tail = " (pass another --tracking-uri)" if flag.startswith("tracking URI") else ""
    assert line == f"fineprune {argv[0]}: error: {flag} {path}: cannot be made (/proc takes no new files){tail}"
    assert "SQLAlchemy" not in caplog.text and not ray.is_initialized()
    assert list(tmp_path.iterdir()) == []


def test_trying_whether_a_directory_takes_files_leaves_nothing_there(tmp_path):
    from workflows.user_errors import output_path_problem, write_problem

    (tmp_path / "kept").write_text("x")
    assert write_problem(tmp_path) is None and write_problem(tmp_path / "new" / "deeper") is None
    assert output_path_problem(tmp_path / "mlflow.db", directory=False, writable=True) is None
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]


@pytest.mark.parametrize("under", ["", "report"])
def test_a_report_into_a_directory_that_cannot_be_written_is_one_line(capsys, tokenizer, tmp_path, unwritable_dir,
                                                                      under):
    """`report --out DIR` into a directory nothing can be written into said "[Errno 1] Operation not permitted",
    status 1, naming a file of the report rather than --out."""
    from conftest import sweep_record
    from workflows import tracking

    database = tmp_path / "mlflow.db"
    sweep_record(tracking.client_for(f"sqlite:///{database}"), tmp_path / "store", tokenizer, "m", "a",
                 {"t1": (1, 64, 80.0, 0.5, True)})
    out = unwritable_dir / under if under else unwritable_dir
    line = _one_line_error(capsys, ["report", "--experiment", "exp", "--out", str(out), "--tracking-uri",
                                    f"sqlite:///{database}"])
    problem = (f"cannot be made ({unwritable_dir} takes no new files)" if under
               else "cannot be written (no permission to write into it)")
    assert line == f"fineprune report: error: --out {out}: {problem}", line
    assert list(unwritable_dir.iterdir()) == []


def test_pruning_a_packed_model_is_refused_before_training(capsys, masked_checkpoint, tmp_path):
    """`prune --model PACKED` trained for the whole run and wrote a final model and checkpoint that eval, pack and
    --resume could not read (mask scores beside the packed record); it is refused in one line before training."""
    from pruning.checkpoint import load_model
    from pruning.packing import pack_and_verify, save_packed
    from pruning.tokenizer import load_tokenizer

    packed = tmp_path / "packed"
    save_packed(pack_and_verify(load_model(masked_checkpoint), time_latency=False)[0],
                load_tokenizer(masked_checkpoint), packed)
    line = _one_line_error(capsys, ["prune", "--config", TINY, "--model", str(packed), "--output-dir",
                                    str(tmp_path / "run"), "--max-steps", "2", "--train-limit", "8", "--eval-limit",
                                    "2", "--no-progress"])
    assert line.endswith(f"error: {packed}: is a packed model (fineprune_packed in config.json), whose layers "
                         "differ in width; method sigmoid_threshold prunes a model of the original shape: prune the "
                         "model it was packed from (a packed model can be fine-tuned with `fineprune train`)"), line
    assert not (tmp_path / "run").exists()


def test_a_run_directory_or_a_file_given_as_the_model_is_named_as_such(capsys, masked_checkpoint, tmp_path):
    """A training run's output_dir given for its model (`eval runs/x` for `runs/x/final`) said only "not a model
    directory", and pack said "runs/x/config.json: file not found"; pack given a file said "model directory not
    found" while the file was there. Each now says what the path is, and pack names them as the others do."""
    run = tmp_path / "run"
    shutil.copytree(masked_checkpoint, run / "final")
    says = f"error: {run}: not a model directory (no config.json); a training run's directory: its model is {run}/final"
    for argv in (["eval", str(run), "--eval-limit", "2"], ["pack", str(run), str(tmp_path / "packed")],
                 ["export", str(run), str(tmp_path / "onnx")]):
        line = _one_line_error(capsys, argv)
        assert line.endswith(says), line
    weights = run / "final" / "model.safetensors"
    line = _one_line_error(capsys, ["pack", str(weights), str(tmp_path / "packed")])
    assert line.endswith(f"error: {weights}: is a file; a model directory is expected"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

@pytest.fixture
def encoder_dir(tmp_path, tiny_bert_config, tokenizer) -> Path:
    """A pre-trained encoder as it comes (a BertModel: no question-answering head), with its tokenizer."""
    from transformers import BertModel

    path = tmp_path / "encoder"
    BertModel(tiny_bert_config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_a_model_without_a_qa_head_is_refused_where_answers_are_needed(encoder_dir, tmp_path, capsys):
    """A pre-trained encoder evaluated, asked, packed or exported would answer from a freshly drawn random head:
    each command refuses it in one line naming the directory, and writes nothing."""
    expected = f"{encoder_dir}: not a question-answering model (model.safetensors has no qa_outputs.weight"
    for args in (["eval", str(encoder_dir), "--eval-limit", "2", "--no-progress"],
                 ["ask", str(encoder_dir), "--question", "Who?", "--context", "Ann wrote it."],
                 ["pack", str(encoder_dir), str(tmp_path / "packed")],
                 ["export", str(encoder_dir), str(tmp_path / "onnx")]):
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"fineprune {args[0]}: error: {expected}"), err[-1]
    assert not (tmp_path / "packed").exists() and not (tmp_path / "onnx").exists()


def test_a_teacher_without_a_qa_head_is_refused_before_training(encoder_dir, tmp_path, capsys):
    """Distilling from an encoder's random head would train the student towards noise; the student itself may be an
    encoder (a fine-tune gives it its head)."""
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {encoder_dir}\nteacher: {encoder_dir}\ntrain_data: dev\ntrain_limit: 4\n"
                      f"eval_limit: 2\nmax_seq_length: 64\ndoc_stride: 32\nmax_steps: 1\nmethod: topk\n"
                      f"attention_block: [16, 16]\ndevice: cpu\noutput_dir: {tmp_path / 'run'}\n")
    assert cli.main(["prune", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"fineprune prune: error: teacher: {encoder_dir}: not a question-answering model")
    assert not (tmp_path / "run").exists()


DOCS = ["README.md", "docs/reference.md", "docs/cluster.md", "tune_spaces/README.md", *sorted(f"configs/{p.name}" for p in
                                                                     (ROOT / "configs").glob("*.yaml")),
        *sorted(f"tune_spaces/{p.name}" for p in (ROOT / "tune_spaces").glob("*.yaml"))]


def _documented_commands() -> list[tuple[str, str, str]]:
    """(document, sub-command, the rest of its line) of every ``fineprune CMD ...`` the documents show, and of every
    code span that starts with a sub-command's name and a flag (``pack --overwrite``)."""
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    found = []
    for doc in DOCS:
        for line in (ROOT / doc).read_text(encoding="utf-8").splitlines():
            for match in re.finditer(r"fineprune ([a-z]+)([^`]*)", line):
                found.append((doc, match.group(1), match.group(2)))
            for match in re.finditer(r"`([a-z]+)( --[^`]*)`", line):
                if match.group(1) in commands:
                    found.append((doc, match.group(1), match.group(2)))
    return found


def test_every_documented_command_line_names_a_command_and_its_flags():
    """The command lines of the README, the cluster page, the space README and the files' own usage comments: each
    names a sub-command, every flag it shows is one of that sub-command's, and every config it runs exists and is
    of the command's kind (dense for train, a pruning method for prune)."""
    from pruning.config import Method, load_config

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    documented = _documented_commands()
    assert {cmd for _, cmd, _ in documented} >= set(commands) - {"score"}  # the scan sees the command lines
    for doc, cmd, rest in documented:
        assert cmd in commands, f"{doc}: fineprune {cmd}: no such sub-command"
        flags = {o for a in commands[cmd]._actions for o in a.option_strings}
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            assert flag in flags, f"{doc}: fineprune {cmd} {flag}: no such flag"
        config = re.search(r"--config (\S+\.yaml)", rest)
        if config:
            cfg = load_config(ROOT / config.group(1))
            assert (cfg.method is Method.DENSE) == (cmd == "train"), f"{doc}: fineprune {cmd} --config {config[1]}"


def test_the_flags_the_reference_lists_for_train_and_prune_are_theirs():
    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    sentence = re.search(r"`train` and `prune` take (.*?) \(besides", text, re.S)
    assert sentence, "the reference's sentence on the training flags moved: update this test"
    listed = set(re.findall(r"`(--[a-z-]+)", sentence.group(1)))
    assert {"--model", "--train-data", "--resume"} <= listed
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for cmd in ("train", "prune"):
        assert listed <= {o for a in commands[cmd]._actions for o in a.option_strings}


def test_pack_overwrite_keeps_the_other_files_as_its_help_says(capsys, masked_checkpoint, tmp_path):
    """The README says `pack --overwrite` keeps the other files of the directory it writes into; its help said it
    replaced the directory's contents (as export's does)."""
    out = tmp_path / "packed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"an earlier model")
    assert cli.main(["pack", str(masked_checkpoint), str(out), "--overwrite", "--questions", "2",
                     "--repeats", "1"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "model.safetensors").read_bytes() != b"an earlier model"
    text = " ".join(_help_of("pack", capsys).split())
    assert "its model files are replaced, its other files kept" in text
    assert "replace the contents" not in text


def test_packing_over_an_exported_directory_is_refused(capsys, masked_checkpoint, tmp_path):
    """pack --overwrite keeps the other files of its out_dir: over an export, eval and ask would go on running the
    old ONNX model instead of the packed one."""
    exported = tmp_path / "onnx"
    exported.mkdir()
    (exported / "fineprune_export.json").write_text("{}")
    (exported / "model.onnx").write_bytes(b"an earlier export")
    line = _one_line_error(capsys, ["pack", str(masked_checkpoint), str(exported), "--overwrite", "--questions", "2",
                                    "--repeats", "1"])
    assert f"{exported}: holds an exported ONNX model (fineprune_export.json)" in line
    assert sorted(p.name for p in exported.iterdir()) == ["fineprune_export.json", "model.onnx"]


def test_packing_an_exported_directory_names_its_source(capsys, masked_checkpoint, tmp_path):
    exported = tmp_path / "onnx"
    exported.mkdir()
    (exported / "fineprune_export.json").write_text(json.dumps({"source": str(masked_checkpoint), "files": {
        "fp32": "model.onnx"}, "default": "fp32"}))
    (exported / "config.json").write_text(json.dumps({"model_type": "bert", "fineprune_packed": True}))
    line = _one_line_error(capsys, ["pack", str(exported), str(tmp_path / "packed")])
    assert line.endswith(f"{exported}: an exported ONNX model, not a PyTorch checkpoint; pack the model it was "
                         f"exported from ({masked_checkpoint})")
    assert not (tmp_path / "packed").exists()


def test_packing_a_packed_directory_is_refused_not_timed_against_itself(capsys, masked_checkpoint, tmp_path):
    """A packed directory packed again was timed against its own shape and reported speedup ~1 and param_ratio 1.0,
    as if packing had gained nothing; it is refused in one line, as eval, ask and export take it as it is."""
    from pruning.checkpoint import load_model
    from pruning.packing import pack_and_verify, save_packed
    from pruning.tokenizer import load_tokenizer

    packed = tmp_path / "packed"
    save_packed(pack_and_verify(load_model(masked_checkpoint), time_latency=False)[0],
                load_tokenizer(masked_checkpoint), packed)
    line = _one_line_error(capsys, ["pack", str(packed), str(tmp_path / "again"), "--questions", "2",
                                    "--repeats", "1"])
    assert line.endswith(f"{packed}: already a packed model (fineprune_packed in config.json); eval, ask and export "
                         "take it as it is, and its speedup is measured by packing the masked checkpoint it was made "
                         "from")
    assert not (tmp_path / "again").exists()


def test_max_steps_for_a_fisher_run_is_refused_not_ignored(capsys, tmp_path):
    """A fisher run prunes before its first step and trains only its fill_steps: --max-steps would change nothing."""
    config = str(ROOT / "configs" / "prune_fisher50.yaml")
    line = _one_line_error(capsys, ["prune", "--config", config, "--max-steps", "10",
                                    "--output-dir", str(tmp_path / "out")])
    assert line.endswith(f"{config}: --max-steps: has no effect with method fisher (read by dense, topk and "
                         "sigmoid_threshold only; a fisher run trains its fill_steps)")
    assert not (tmp_path / "out").exists()


def test_a_model_with_non_finite_logits_is_one_line_naming_it_in_eval_and_ask(tmp_path, tiny_bert_config, tokenizer,
                                                                              capsys):
    from transformers import BertForQuestionAnswering

    from pruning.checkpoint import save_model

    model = BertForQuestionAnswering(tiny_bert_config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    model_dir = save_model(model, tokenizer, tmp_path / "nan-model")
    for argv in (["eval", str(model_dir), "--eval-limit", "2", "--no-progress"],
                 ["ask", str(model_dir), "--question", "Who?", "--context", "It was written by Ann."]):
        line = _one_line_error(capsys, argv)
        assert f"{model_dir}: the model gave NaN or infinite start/end logits" in line


def test_a_fisher_cut_whose_teacher_gives_non_finite_logits_is_one_line_naming_the_teacher(tmp_path, tiny_bert_config,
                                                                                         tokenizer, capsys):
    """A one-shot cut draws its calibration labels from the teacher's distribution: a teacher whose weights hold NaN
    stopped the run in a traceback from torch.multinomial; now one line naming the teacher, exit 2, nothing written."""
    from transformers import BertForQuestionAnswering

    from pruning.checkpoint import save_model

    student = save_model(BertForQuestionAnswering(tiny_bert_config), tokenizer, tmp_path / "student")
    teacher = BertForQuestionAnswering(tiny_bert_config)
    with torch.no_grad():
        teacher.qa_outputs.bias.fill_(float("nan"))
    teacher_dir = save_model(teacher, tokenizer, tmp_path / "teacher")
    config = tmp_path / "fisher.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(student), "teacher": str(teacher_dir), "train_data": "dev", "eval_data": "dev",
        "train_limit": 8, "eval_limit": 4, "max_seq_length": 96, "doc_stride": 32, "batch_size": 4,
        "method": "fisher", "target_density": 0.5, "attention_block": [16, 64], "calibration_samples": 8,
        "mask_tuning_samples": 4, "fill_steps": 0, "output_dir": str(tmp_path / "out")}))
    line = _one_line_error(capsys, ["prune", "--config", str(config), "--no-progress"])
    assert line.endswith(f"teacher {teacher_dir}: the model gave NaN or infinite start/end logits on a calibration "
                         "window of the Fisher pass, so no span can be sampled from its distribution"), line
    assert not (tmp_path / "out" / "final").exists()


def test_eval_data_is_read_for_its_answer_texts_only(capsys, masked_checkpoint, tmp_path):
    """Evaluation data whose answer_start values are off (hand-made data) is taken wherever only the questions or
    the answer texts are read: `eval`, `pack` and a training run's evaluation, as `score` takes it."""
    dev = squad.load_squad(squad_file("dev"), limit=4)
    data = tmp_path / "drift.json"
    data.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": ex.context, "qas": [{"id": ex.id, "question": ex.question, "answers": [
            {"text": ex.answers[0], "answer_start": ex.answer_starts[0] + 1}]}]} for ex in dev]}]}))
    with pytest.raises(squad.SquadFormatError, match="is not at answer_start"):
        squad.load_squad(data)  # what training on it still refuses
    assert cli.main(["eval", str(masked_checkpoint), "--eval-data", str(data), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["questions"] == 4
    assert cli.main(["pack", str(masked_checkpoint), str(tmp_path / "packed"), "--eval-data", str(data),
                     "--questions", "2", "--repeats", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["max_logit_diff"] <= 1e-3
    run = tmp_path / "run"
    assert cli.main(["prune", "--config", TINY, "--eval-data", str(data), "--max-steps", "2", "--output-dir",
                     str(run), "--no-progress"]) == 0
    assert (run / "final" / "config.json").is_file()


def _on_a_terminal(*args: str) -> tuple[int, str, str]:
    """``fineprune`` with its stderr on a terminal (a pseudo-terminal read here): its status, stdout and stderr."""
    import fcntl
    import pty
    import struct
    import termios

    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a new one is 0 wide
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", *args], stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    chunks: list[bytes] = []

    def read() -> None:  # as it comes: a terminal holds a few kilobytes before the writer waits
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the last writer closed it
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
        os.close(main)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def test_a_line_logged_during_training_is_not_glued_to_the_progress_bar(tmp_path):
    # The trainer logs the loss and EM/F1 while its progress bar is drawn on a terminal: each record must start a
    # line of its own (tqdm clears the bar first), not follow the bar's text on the bar's line.
    status, out, err = _on_a_terminal("prune", "--config", TINY, "--max-steps", "4", "--train-limit", "8",
                                      "--eval-limit", "4", "--output-dir", str(tmp_path / "run"))
    assert status == 0, err
    assert re.search(r"train: +\d+%\|", err), err[-3000:]  # the bar is drawn
    logged = [seg for seg in re.split(r"[\r\n]", err) if " INFO pruning.trainer: step " in seg]
    assert logged, err
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", seg) for seg in logged), logged
    json.loads(out)


def test_no_progress_bar_is_drawn_into_a_file_or_a_pipe(tmp_path):
    """Written to a file or a pipe (a CI log, `2> run.log`), a progress bar kept every redraw: hundreds of frames
    joined by carriage returns, a log line read back as a kilobyte of them. Bars are drawn on a terminal only."""
    proc = fineprune("prune", "--config", TINY, "--max-steps", "4", "--train-limit", "8", "--eval-limit", "4",
                     "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert " INFO pruning.trainer: step " in proc.stderr
    assert "\r" not in proc.stderr and not re.search(r"\d+%\|", proc.stderr), proc.stderr[-3000:]
    json.loads(proc.stdout)


def test_a_speedup_or_latency_timed_on_few_passes_is_said_to_be_noise(capsys, caplog, masked_checkpoint, tmp_path):
    """pack --repeats 2 printed a speedup that another run of the same command gave anywhere from 0.8 to 5, without
    a word; fewer than 5 passes now warn, in pack and in select, and the help says so."""
    with caplog.at_level(logging.WARNING, logger="fineprune"):
        assert cli.main(["pack", str(masked_checkpoint), str(tmp_path / "few"), "--questions", "1",
                         "--repeats", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["speedup"] > 0  # still packed and timed
    warnings = [r.getMessage() for r in caplog.records if r.name == "fineprune"]
    assert warnings == ["--repeats 2: each model's latency in the speedup is the median of 2 timed passes, which one "
                        "slowed pass moves; give 5 or more (default 10) for a figure to compare"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fineprune"):
        assert cli.main(["pack", str(masked_checkpoint), str(tmp_path / "enough"), "--questions", "1",
                         "--repeats", "5"]) == 0
    capsys.readouterr()
    assert not [r for r in caplog.records if "--repeats" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fineprune"):  # a command refused is not warned about first
        assert cli.main(["pack", str(tmp_path / "few"), str(tmp_path / "again"), "--repeats", "2"]) == 2
        assert cli.main(["select", "--registered-model", "m", "--max-latency-ms", "10", "--repeats", "1",
                         "--alias", "a b"]) == 2
    capsys.readouterr()
    assert not [r for r in caplog.records if "--repeats" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fineprune"):  # said once the store is open, before the timing
        cli.main(["select", "--registered-model", "m", "--max-latency-ms", "10", "--repeats", "1",
                  "--tracking-uri", sqlite_store(tmp_path / "mlflow.db")])
    capsys.readouterr()
    assert any(r.getMessage().startswith("--repeats 1: each version's latency is the median of 1 timed pass,")
               for r in caplog.records)
    for command in ("pack", "select"):
        assert "noise below 5" in " ".join(_help_of(command, capsys).split())


def test_the_exit_statuses_the_help_and_the_readme_list_are_the_ones_commands_end_with(capsys):
    """`fineprune --help` and the README's table list every exit status; the sweep's, the registration's and the
    signals' are the values the commands return."""
    import signal as signals

    assert cli.INCOMPLETE_SWEEP in cli.EXIT_STATUSES and cli.NO_CHAMPION in cli.EXIT_STATUSES
    assert {128 + signals.SIGINT, 128 + signals.SIGTERM} <= set(cli.EXIT_STATUSES)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for code, meaning in cli.EXIT_STATUSES.items():
        assert f"{int(code)} {meaning}" in shown
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| ([\d, ]+) \| (.+) \|$", readme, re.M))
    listed = {int(code) for codes in rows for code in codes.split(",")}
    assert listed == {int(code) for code in cli.EXIT_STATUSES}
    assert "`sweep`" in rows[str(cli.INCOMPLETE_SWEEP)] and "`register`" in rows[str(cli.NO_CHAMPION)]


def test_version_prints_the_installed_release_and_the_checkouts_commit_and_exits_0(capsys):
    from workflows.record import fineprune_version

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    release = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert out == f"fineprune {fineprune_version()}\n" and out.startswith(f"fineprune {release}")
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():  # the tests run in a checkout: its commit is the local version label
        head = subprocess.run([git, "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True)
        if head.returncode == 0:
            assert out.startswith(f"fineprune {release}+g{head.stdout.strip()}")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_checkouts_commit_is_read_with_dirty_for_changed_tracked_files_only(tmp_path):
    from workflows.record import _checkout_commit

    assert _checkout_commit(tmp_path) is None  # no repository: an installed package

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "--short=12", "HEAD")
    assert _checkout_commit(tmp_path) == head
    (tmp_path / "notes.txt").write_text("untracked\n")  # outputs beside the code do not make it another code
    assert _checkout_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert _checkout_commit(tmp_path) == f"{head}.dirty"


def test_a_sweep_under_a_ray_job_refuses_a_store_in_the_jobs_temporary_directory(capsys, tmp_path, monkeypatch):
    """`ray job submit` without --tracking-uri (nor MLFLOW_TRACKING_URI): the sweep ran to its end with its whole
    record in sqlite:///mlflow.db of the job's uploaded copy of the working directory, which Ray deletes after the
    job, and its summary named that relative store. Refused before anything runs; an absolute path is kept."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg"}}))
    space = str(ROOT / "tune_spaces" / "smoke.yaml")
    for given in ([], ["--tracking-uri", "sqlite:///records/mlflow.db"]):
        line = _one_line_error(capsys, ["sweep", "--space", space, "--check", *given])
        uri = given[1] if given else "sqlite:///mlflow.db"
        assert line.startswith(f"fineprune sweep: error: tracking URI {uri}: under `ray job submit` a relative "
                               "database is made in the job's temporary copy"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert cli.main(["sweep", "--space", space, "--check", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 0
    assert json.loads(capsys.readouterr().out)["check"] == "passed"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert cli.main(["sweep", "--space", space, "--check"]) == 0  # outside a job, the default store is kept
    capsys.readouterr()


def test_sweep_check_says_what_the_sweep_would_run_and_starts_or_writes_nothing(capsys, tmp_path, monkeypatch):
    """`fineprune sweep --check`: the space, paths, data and resources checked as the sweep checks them before it
    starts, and its plan printed (trials, how many at once here, the teacher reused or to be trained), with no
    store, storage directory or Ray made."""
    from workflows.space import load_space
    from workflows.preflight import trials_at_once

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # an earlier command in this process may have set it
    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    space.update(algorithm="grid", num_samples=2, scheduler=None,
                 search={"target_density": {"type": "grid", "values": [0.3, 0.5, 0.7]},
                         "temperature": {"type": "choice", "values": [1, 2]}})
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(space))
    assert cli.main(["sweep", "--space", "grid.yaml", "--check"]) == 0
    plan = json.loads(capsys.readouterr().out)
    fingerprint = plan["teacher"]["fingerprint"]
    final = tmp_path / "runs" / "ray" / "teachers" / fingerprint / "final"
    assert plan == {
        "check": "passed", "space": "grid.yaml", "experiment": "smoke",
        "tracking_uri": "sqlite:///mlflow.db", "ray": "a private local Ray", "algorithm": "grid",
        "trials": 12, "configurations": 6,  # num_samples of each of the 6 grid points; 6 of them distinct
        "searched": {"target_density": {"type": "grid", "values": [0.3, 0.5, 0.7]},
                     "temperature": {"type": "choice", "values": [1, 2]}},
        "objectives": [["f1", "max"], ["linear_density", "min"]],
        "trials_at_once": min(12, trials_at_once(load_space(tmp_path / "grid.yaml"))),
        "teacher": {"fingerprint": fingerprint, "directory": str(final), "reused": False}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]  # no mlflow.db, no runs/

    # The teacher an earlier sweep of the same settings trained is found; one trial at a time where asked.
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final.parent / "metrics.json").write_text("{}")
    space.update(max_concurrent=1)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(space))
    assert cli.main(["sweep", "--space", "grid.yaml", "--check", "--experiment", "other"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["teacher"]["reused"] is True and plan["trials_at_once"] == 1 and plan["experiment"] == "other"
    (final.parent / "metrics.json").write_text("[]")  # metrics the sweep would not trust: it trains the teacher again
    assert cli.main(["sweep", "--space", "grid.yaml", "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["teacher"]["reused"] is False
    (final.parent / "metrics.json").write_text("{}")

    line = _one_line_error(capsys, ["sweep", "--space", "grid.yaml", "--check", "--resume"])
    assert line == ("fineprune sweep: error: --check checks a new sweep, and reads nothing of the tracking store; "
                    "--resume reads it, when the sweep starts")
    space["base"]["eval_data"] = "dve"
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(space))
    line = _one_line_error(capsys, ["sweep", "--space", "grid.yaml", "--check"])
    assert line.endswith("base.eval_data: dve: SQuAD data file not found; did you mean 'dev'?"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml", "runs"]  # the teacher made above, alone


def test_a_model_output_whose_name_is_not_utf8_under_the_locale_is_one_line_before_any_work(masked_checkpoint,
                                                                                            tmp_path):
    """Under a locale that is not UTF-8 (Python's UTF-8 mode off), a name that is not ASCII is held as other text
    than its UTF-8 bytes, which the tokenizer library writes a model's files by: pack and export stopped in a
    traceback once the model was made, and prune after its whole training, saving nothing. Each is now one line
    before any work; a predictions file, which Python writes, is written as before (its check of the name's length
    stopped in a UnicodeEncodeError)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LC_", "LANG"))}
    env.update(LC_ALL="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0", PYTHONPATH=str(ROOT))
    code = "import sys\nfrom workflows import cli\nsys.exit(cli.main(sys.argv[1:]))"
    said = ("its name is not UTF-8 under this process's locale (file names are ascii), and the tokenizer library "
            "saves a model's files by UTF-8 names; run with a UTF-8 locale (LANG=C.UTF-8) or PYTHONUTF8=1, or give "
            "an ASCII name")
    for argv, flag in ((["pack", str(masked_checkpoint)], "out_dir"), (["export", str(masked_checkpoint)], "out_dir"),
                       (["prune", "--config", TINY, "--no-progress", "--output-dir"], "output_dir")):
        out = tmp_path / f"{argv[0]}_ü"
        done = subprocess.run([sys.executable, "-c", code, *argv, str(out)], capture_output=True, env=env,
                              cwd=tmp_path, timeout=300)
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        assert done.returncode == 2 and "Traceback" not in done.stderr.decode("utf-8", "replace"), lines[-5:]
        shown = str(out).replace("ü", "\\udcc3\\udcbc")  # the bytes the locale could not decode, as Python shows them
        assert lines[-1] == f"fineprune {argv[0]}: error: {flag} {shown}: {said}", lines[-1]
        assert not out.exists()
    predictions = tmp_path / "preds_ü.json"
    done = subprocess.run([sys.executable, "-c", code, "eval", str(masked_checkpoint), "--eval-limit", "2",
                           "--no-progress", "--predictions", str(predictions)], capture_output=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads(predictions.read_text(encoding="utf-8"))) == 2


def test_a_question_typed_under_a_locale_that_is_not_utf8_is_read_as_its_utf8_bytes(masked_checkpoint, tmp_path):
    """Under a locale that is not UTF-8 (Python's UTF-8 mode off), `ask` refused every question and context that was
    not ASCII, as holding "a lone surrogate": Python holds each byte it cannot decode so. Their bytes are UTF-8, and
    are read as such; bytes that are not UTF-8 are still named."""
    assert cli._argv_text("Wer ist in \udcc3\udcbcber?") == "Wer ist in über?"  # ü's two bytes, as Python holds them
    for kept in ("Wer \udcff?", "Wer \ud83d?", "Wer ist da?"):
        assert cli._argv_text(kept) == kept
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LC_", "LANG"))}
    env.update(LC_ALL="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0", PYTHONPATH=str(ROOT))
    code = "import sys\nfrom workflows import cli\nsys.exit(cli.main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "ask", str(masked_checkpoint), "--question", "Wo liegt 東京?",
                           "--context", "東京 liegt in Japan, am Meer."], capture_output=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["answer"] in "東京 liegt in Japan, am Meer."
    done = subprocess.run([sys.executable, "-c", code, "ask", str(masked_checkpoint), "--question", b"Wer \xff?",
                           "--context", "Bob ist da."], capture_output=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and done.stderr.decode().splitlines()[-1] == (
        "fineprune ask: error: question holds a lone surrogate \\udcff at character 4, which is not a character "
        "(half of a surrogate pair, or a byte that is not UTF-8)"), done.stderr[-2000:]


def test_verbose_shows_fineprune_s_debug_lines_and_no_other_library_s(tmp_path):
    """-v was the root logger's DEBUG: other libraries' lines (hundreds of matplotlib's font matching for `report`)
    and none of fineprune's own. It is fineprune's: here the run's whole config."""
    proc = fineprune("-v", "prune", "--config", TINY, "--max-steps", "2", "--train-limit", "8", "--eval-limit", "2",
                     "--output-dir", str(tmp_path / "run"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    debug = [line for line in proc.stderr.splitlines() if " DEBUG " in line]
    assert [line for line in debug if " DEBUG pruning.trainer: run config {" in line], proc.stderr[-3000:]
    assert all(re.search(r" DEBUG (pruning|workflows|fineprune)[.:]", line) for line in debug), debug
    json.loads(proc.stdout)
    quiet = fineprune("prune", "--config", TINY, "--max-steps", "2", "--train-limit", "8", "--eval-limit", "2",
                      "--output-dir", str(tmp_path / "quiet"), "--no-progress")
    assert quiet.returncode == 0 and " DEBUG " not in quiet.stderr, quiet.stderr[-3000:]
