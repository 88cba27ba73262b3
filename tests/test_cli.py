"""The command line as a user runs it: one JSON line on stdout, one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruning import masks
from pruning.checkpoint import save_model
from pruning.config import RunConfig
from pruning.trainer import build_model


def fineprune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def masked_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = RunConfig(model_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=128),
                    method="topk", attention_block=(16, 16))
    model, tokenizer = build_model(cfg)
    with torch.no_grad():
        for score in masks.mask_score_parameters(model):
            score.copy_(torch.randn_like(score))
    masks.set_threshold(model, 0.4)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "masked")


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


def test_pack_eval_and_ask_on_a_packed_directory(masked_checkpoint, tmp_path):
    out = tmp_path / "packed"
    proc = fineprune("pack", str(masked_checkpoint), str(out), "--questions", "4")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["max_logit_diff"] <= 1e-4
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    again = fineprune("pack", str(masked_checkpoint), str(out))  # nothing already written is overwritten
    assert again.returncode == 2 and "not empty" in again.stderr

    masked_eval = fineprune("eval", str(masked_checkpoint), "--limit", "6", "--max-seq-length", "128",
                            "--doc-stride", "32", "--no-progress")
    packed_eval = fineprune("eval", str(out), "--limit", "6", "--max-seq-length", "128", "--doc-stride", "32",
                            "--no-progress")
    assert masked_eval.returncode == 0 and packed_eval.returncode == 0, packed_eval.stderr
    m, p = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (masked_eval, packed_eval))
    assert (m["exact_match"], m["f1"]) == (p["exact_match"], p["f1"])

    context = "Paris is the capital of France."
    ask = fineprune("ask", str(out), "--question", "What is the capital of France?", "--context", context)
    assert ask.returncode == 0, ask.stderr
    answer = json.loads(ask.stdout.strip().splitlines()[-1])
    assert answer["answer"] == context[answer["start"]:answer["end"]]


@pytest.mark.parametrize("args,needle", [
    (["eval", "no/such/model"], "no/such/model: model directory not found"),
    (["train", "--config", "no/such.yaml"], "no/such.yaml: config file not found"),
    (["score", "no/such.json", "p.json"], "no/such.json"),
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
