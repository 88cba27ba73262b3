"""ONNX Runtime export: packed models with uneven heads, empty layers, real dev windows, the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from pruning import masks
from pruning.config import RunConfig
from pruning.export import (
    FILES,
    ExportError,
    OrtQAModel,
    export_model,
    fused_attention_heads,
    is_exported_dir,
    load_exported,
    to_onnx,
)
from pruning.inference import answer_batch
from pruning.packing import pack
from pruning.squad import compute_logits, prepare_eval_features
from pruning.trainer import build_model
from workflows.cli import main as cli_main

HIDDEN, HEADS, HEAD_DIM, INTER = 64, 4, 16, 128


def pruned_model(heads_removed: list[list[int]], ffn_kept: list[int], seed: int = 0) -> BertForQuestionAnswering:
    """A tiny random BERT whose listed heads and FFN dimensions are zeroed, with non-trivial biases and norms."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=len(heads_removed),
                        num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=512,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForQuestionAnswering(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # random biases and LayerNorm weights, so no two initializers coincide
            p.add_(0.05 * torch.randn_like(p))
        for layer, heads, width in zip(model.bert.encoder.layer, heads_removed, ffn_kept):
            for h in heads:
                rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                layer.attention.self.value.weight[rows] = 0
                layer.attention.self.value.bias[rows] = 0
            layer.intermediate.dense.weight[width:] = 0
            layer.intermediate.dense.bias[width:] = 0
    return model


@pytest.fixture(scope="module")
def dev_windows(tokenizer, dev_subset):
    """Real SQuAD dev windows (several per long context, padded on the right)."""
    return prepare_eval_features(dev_subset[:12], tokenizer, max_seq_length=256, doc_stride=64)


def logits_of(model, features) -> np.ndarray:
    return np.stack(compute_logits(model, features, batch_size=8, progress=False))


@pytest.mark.parametrize("heads_removed,ffn_kept", [
    ([[1, 3], [0, 1, 2, 3], [0], []], [INTER, 40, 0, 7]),  # uneven heads, a layer without heads, one without FFN
    ([[], [], []], [INTER, INTER, INTER]),  # nothing pruned: a dense model packed as is
    ([[0, 1, 2, 3], [0, 1, 2, 3]], [INTER, 9]),  # no heads left at all: the graph reads no attention mask
])
def test_packed_model_exports_fused_per_layer_and_matches_pytorch(heads_removed, ffn_kept, dev_windows, tmp_path):
    packed = pack(pruned_model(heads_removed, ffn_kept))
    expected_heads = [HEADS - len(h) for h in heads_removed]
    report = export_model(packed, tmp_path, quantize="int8", inputs=dev_windows.model_inputs(slice(0, 6)))

    assert report.heads_per_layer == expected_heads
    # Every layer that has heads got one fused attention node, with its own head count, in both files.
    fused = [h for h in expected_heads if h]
    assert report.fused_attention_heads == fused and report.attention_fused
    assert fused_attention_heads(tmp_path / FILES["fp32"]) == fused
    quantized = onnx.load(str(tmp_path / FILES["int8"]))
    assert [n.op_type for n in quantized.graph.node if "Attention" in n.op_type] == ["QAttention"] * len(fused)
    assert fused_attention_heads(tmp_path / FILES["int8"]) == fused
    for name in FILES.values():
        graph = onnx.load(str(tmp_path / name)).graph
        assert all(0 not in init.dims for init in graph.initializer), name
    assert report.max_logit_diff["fp32"] <= 1e-4

    # All real dev windows, batched with dynamic padding: other batch sizes and lengths than the traced ones.
    reference = logits_of(packed, dev_windows)
    fp32 = logits_of(OrtQAModel(tmp_path / FILES["fp32"], packed.config), dev_windows)
    real = np.broadcast_to(dev_windows.attention_mask.numpy().astype(bool), reference.shape)
    assert np.abs(fp32 - reference)[real].max() <= 1e-4
    # The benchmarks' sessions, whose threads do not spin between calls, compute the same logits.
    quiet = OrtQAModel(tmp_path / FILES["fp32"], packed.config, spin=False)
    spinning = quiet.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    assert spinning == "0"
    np.testing.assert_array_equal(logits_of(quiet, dev_windows), fp32)
    int8 = logits_of(OrtQAModel(tmp_path / FILES["int8"], packed.config, variant="int8"), dev_windows)
    assert np.isfinite(int8).all() and not np.array_equal(int8, fp32)  # really another model, still close
    assert np.abs(int8 - reference)[real].max() < 0.1 * np.abs(reference)[real].max() + 0.05


@pytest.mark.parametrize("heads_removed,no_query_key", [
    ([[0, 1, 2], [0, 1, 2]], [1]),  # one head a layer, as a smoke sweep's champion: the last layer's Q/K pruned
    ([[1, 3], [0], [0, 1, 2], []], [0, 2]),  # uneven heads, the first layer and a one-head layer without Q/K
])
def test_a_layer_whose_query_and_key_are_pruned_is_fused(heads_removed, no_query_key, dev_windows, tmp_path):
    # Block pruning masks Q and K apart from V and O: a kept head (its values and outputs) can lose all its query
    # and key weights. Its scores are then constant and its attention an average of the values: an ordinary
    # attention that must be fused like any other, with the layer's own head count.
    model = pruned_model(heads_removed, [INTER] * len(heads_removed))
    with torch.no_grad():
        for i in no_query_key:
            attention = model.bert.encoder.layer[i].attention.self
            for linear in (attention.query, attention.key):
                linear.weight.zero_()
                linear.bias.zero_()
    packed = pack(model)
    expected = [HEADS - len(h) for h in heads_removed]
    assert packed.config.fineprune_heads_kept and [len(k) for k in packed.config.fineprune_heads_kept] == expected
    report = export_model(packed, tmp_path, quantize="int8", inputs=dev_windows.model_inputs(slice(0, 6)))

    assert report.fused_attention_heads == expected and report.attention_fused
    assert fused_attention_heads(tmp_path / FILES["int8"]) == expected
    assert report.max_logit_diff["fp32"] <= 1e-4


def test_a_masked_model_is_packed_before_export(dev_windows, tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(RunConfig(model_config=dict(hidden_size=HIDDEN, num_hidden_layers=2,
                                                       num_attention_heads=HEADS, intermediate_size=INTER),
                                     method="topk", attention_block=(16, 16)))
    with torch.no_grad():
        for score in masks.mask_score_parameters(model):
            score.copy_(torch.randn_like(score))
    masks.set_threshold(model, 0.3)
    model.eval()
    report = export_model(model, tmp_path, inputs=dev_windows.model_inputs(slice(0, 4)))
    assert report.packed_on_export and report.max_logit_diff["fp32"] <= 1e-4
    assert report.heads_per_layer == [len(k) for k in pack(model).config.fineprune_heads_kept]
    with pytest.raises(ExportError, match="masked"):
        to_onnx(model, tmp_path / "raw.onnx")


def test_exported_answers_are_the_pytorch_answers(tokenizer, dev_subset, tmp_path):
    packed = pack(pruned_model([[0], [2, 3]], [100, INTER]))
    export_model(packed, tmp_path)
    exported = OrtQAModel(tmp_path / FILES["fp32"], packed.config)
    questions = [e.question for e in dev_subset[:8]]
    contexts = [e.context for e in dev_subset[:8]]
    ours = answer_batch(exported, tokenizer, questions, contexts, max_seq_length=192, doc_stride=64, batch_size=3)
    theirs = answer_batch(packed, tokenizer, questions, contexts, max_seq_length=192, doc_stride=64, batch_size=3)
    assert [(a.text, a.start, a.end) for a in ours] == [(a.text, a.start, a.end) for a in theirs]
    assert [a.score for a in ours] == pytest.approx([a.score for a in theirs], abs=2e-4)


@pytest.mark.parametrize("training", [False, True])
def test_export_gives_the_model_back_in_its_mode(training, dev_windows, tmp_path):
    # With dropout, a model left in train mode answers differently on every call.
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                        intermediate_size=INTER, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = BertForQuestionAnswering(config).train(training)
    inputs = dev_windows.model_inputs(slice(0, 2))
    export_model(model, tmp_path, inputs=inputs)
    assert all(module.training == training for module in model.modules())
    if not training:
        with torch.no_grad():
            first, second = model(**inputs).start_logits, model(**inputs).start_logits
        assert torch.equal(first, second)


@pytest.mark.parametrize("model_type, positions", [("bert", 12), ("roberta", 14)])
def test_a_model_with_fewer_positions_than_the_traced_window_exports(model_type, positions, tmp_path):
    """The trace ran on 16-token windows, which a model with fewer positions cannot take: export failed with a shape
    error naming a temporary file. It traces on windows the model takes (a RoBERTa-family model counts positions
    from its pad id, so 14 embeddings give 12), and the graph answers the longest of them as PyTorch does."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=1,
                                  num_attention_heads=HEADS, intermediate_size=INTER, pad_token_id=1,
                                  max_position_embeddings=positions)
    model = AutoModelForQuestionAnswering.from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(3, 100, (2, 12), generator=g),
              "attention_mask": torch.ones(2, 12, dtype=torch.long),
              "token_type_ids": torch.zeros(2, 12, dtype=torch.long)}
    report = export_model(model, tmp_path, inputs=inputs)
    assert report.max_logit_diff["fp32"] < 1e-4


def test_bad_opset_and_quantize_are_refused(tmp_path):
    model = pruned_model([[]], [INTER])
    with pytest.raises(ExportError, match=r"^opset: must be an integer from 14 to 20 .*, got 9$"):
        export_model(model, tmp_path, opset=9)
    with pytest.raises(ExportError, match=r"^quantize: only 'int8' is supported, got 'int4'$"):
        export_model(model, tmp_path, quantize="int4")


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------

def fineprune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True, timeout=600)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``fineprune ARGS`` in this process (the models load much faster than in a fresh one)."""
    code = cli_main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(result: tuple[int, str, str]) -> dict:
    code, out, err = result
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("fineprune ")
    return last


def cli_error(capsys, *args: str) -> str:
    code, _, err = run_cli(capsys, *args)
    return one_line_error(code, err)


def test_export_eval_and_ask_from_the_command_line(masked_checkpoint, tmp_path, capsys):
    out = tmp_path / "onnx"
    proc = fineprune("export", str(masked_checkpoint), str(out), "--quantize", "int8", "--questions", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["packed_on_export"] and report["attention_fused"]
    assert report["max_logit_diff"]["fp32"] <= 1e-4 and set(report["files"]) == {"fp32", "int8"}
    assert is_exported_dir(out) and (out / "tokenizer.json").is_file()
    assert load_exported(out).variant == "int8" and load_exported(out, "fp32").variant == "fp32"
    assert "already exported" in cli_error(capsys, "export", str(out), str(tmp_path / "again"))
    # Given where a PyTorch model is read (train/prune --model, a teacher, pack): named for what it is.
    from pruning.checkpoint import CheckpointError, load_model
    with pytest.raises(CheckpointError, match=f"^{out}: is an ONNX export \\(fineprune_export.json\\)"):
        load_model(out)
    # The trainer's evaluate() counts a PyTorch model's sparsity: it stopped in a bare StopIteration.
    from pruning.config import RunConfig
    from pruning.trainer import evaluate
    with pytest.raises(TypeError, match=r"^OrtQAModel has no parameters: evaluate\(\) scores a PyTorch model and "
                                        r"counts its sparsity; score an exported model with "
                                        r"pruning\.squad\.evaluate_model$"):
        evaluate(load_exported(out, "fp32"), None, [], RunConfig())
    # Nothing already written is lost: a second export into the same directory is refused.
    assert "not an empty directory" in cli_error(capsys, "export", str(masked_checkpoint), str(out))

    window = ("--limit", "6", "--max-seq-length", "128", "--doc-stride", "32", "--no-progress")
    torch_metrics = last_json(run_cli(capsys, "eval", str(masked_checkpoint), *window))
    fp32_metrics = last_json(run_cli(capsys, "eval", str(out), "--variant", "fp32", *window))
    int8_metrics = last_json(run_cli(capsys, "eval", str(out), *window))
    assert (fp32_metrics["exact_match"], fp32_metrics["f1"]) == (torch_metrics["exact_match"], torch_metrics["f1"])
    assert fp32_metrics["variant"] == "fp32" and int8_metrics["variant"] == "int8"
    assert fp32_metrics["questions"] == int8_metrics["questions"] == 6
    assert "precision" in cli_error(capsys, "eval", str(out), "--precision", "bf16", *window)

    context = "Paris is the capital of France."
    answer = last_json(run_cli(capsys, "ask", str(out), "--question", "What is the capital of France?",
                               "--context", context))
    assert answer["answer"] == context[answer["start"]:answer["end"]] and answer["answer"]
    assert "--variant" in cli_error(capsys, "ask", str(masked_checkpoint), "--variant", "int8", "--question", "q?",
                                    "--context", context)

    # A corrupted ONNX file: one line naming it, exit 2, from a fresh process as a user meets it.
    (out / FILES["int8"]).write_bytes(b"\x08\x07 not an onnx model")
    proc = fineprune("eval", str(out), *window)
    line = one_line_error(proc.returncode, proc.stderr)
    assert FILES["int8"] in line and "corrupted" in line
    assert last_json(run_cli(capsys, "eval", str(out), "--variant", "fp32", *window))["f1"] == fp32_metrics["f1"]


def test_eval_of_an_export_reports_the_precision_of_the_variant_it_ran(masked_checkpoint, tmp_path, capsys):
    """The int8 model computes in int8, as the served model reports it: not ``"precision": "fp32"``."""
    from pruning.export import export_checkpoint

    out = tmp_path / "onnx"
    export_checkpoint(masked_checkpoint, out, quantize="int8", questions=2)
    window = ("--limit", "2", "--max-seq-length", "128", "--doc-stride", "32", "--no-progress")
    for given, variant in ((), "int8"), (("--variant", "fp32"), "fp32"), (("--variant", "int8"), "int8"):
        metrics = last_json(run_cli(capsys, "eval", str(out), *given, *window))
        assert (metrics["variant"], metrics["precision"]) == (variant, variant), given


def test_the_exported_directory_gets_the_mode_mkdir_gives(masked_checkpoint, tmp_path):
    import os
    import stat

    from pruning.export import export_checkpoint

    old = os.umask(0o022)
    try:
        result = export_checkpoint(masked_checkpoint, tmp_path / "exported", questions=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "exported").stat().st_mode) == 0o755
    assert is_exported_dir(result["out_dir"])


def test_an_int8_export_leaves_a_root_logger_without_handlers_without_them(dev_windows, tmp_path):
    """ONNX Runtime's quantizer warns through ``logging.warning``, which gives a root logger without handlers one of
    its own: a program that exported first found its own ``logging.basicConfig`` after it doing nothing."""
    import logging

    root = logging.getLogger()
    kept = list(root.handlers)  # pytest's own, put back after
    for handler in kept:
        root.removeHandler(handler)
    try:
        export_model(pack(pruned_model([[0], [1, 2]], [64, 96])), tmp_path, quantize="int8",
                     inputs=dev_windows.model_inputs(slice(0, 2)))
        assert (tmp_path / FILES["int8"]).is_file()
        assert root.handlers == []
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in kept:
            root.addHandler(handler)


@pytest.mark.parametrize("kwargs,said", [
    (dict(quantize=True), r"^quantize: only 'int8' is supported, got True$"),
    (dict(questions=0), r"^questions: must be a positive integer \(questions whose logits are checked\), got 0$"),
])
def test_export_checkpoint_names_its_own_arguments(masked_checkpoint, tmp_path, kwargs, said):
    """Called from Python, a bad argument was named as the command line's flag (`--quantize`) or as another
    function's (`limit must be a positive integer`), after the model was loaded."""
    from pruning.export import export_checkpoint

    with pytest.raises(ExportError, match=said):
        export_checkpoint(masked_checkpoint, tmp_path / "onnx", **kwargs)
    assert not (tmp_path / "onnx").exists()
