"""The RoBERTa family (RoBERTa, XLM-RoBERTa, CamemBERT) through the whole path: windows from a byte-level BPE
tokenizer, masks, packing, checkpoints, training, ONNX export and serving; ELECTRA (embeddings projected to the
hidden size) through masks, packing, checkpoints and export.

The models are tiny and random; the RoBERTa tokenizer is a byte-level BPE trained here, offline, on a few dev
contexts, and ELECTRA takes the shipped WordPiece tokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from tokenizers import ByteLevelBPETokenizer
from transformers import RobertaTokenizerFast

from pruning import masks, squad
from pruning.checkpoint import CheckpointError, load_model, save_model
from pruning.config import ConfigError, RunConfig
from pruning.export import FILES, OrtQAModel, export_model
from pruning.packing import load_packed, pack, pack_and_verify, save_packed
from pruning.resources import shipped_model_dir
from pruning.sparsity import sparsity_report
from pruning.structure import ARCHITECTURES, config_class, encoder_layers, max_positions, position_ids, qa_model_class
from pruning.tokenizer import load_tokenizer
from pruning.trainer import build_model, train
from workflows.cli import main as cli_main
from workflows.logged_model import export_for_serving, log_qa_model, serve_settings

from conftest import sqlite_store

HIDDEN, LAYERS, HEADS, INTER = 32, 2, 4, 64
HEAD_DIM = HIDDEN // HEADS
FAMILY = ("roberta", "xlm-roberta", "camembert")
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: cls 0, pad 1, sep 2


@pytest.fixture(scope="module")
def bpe_tokenizer(dev_subset, tmp_path_factory) -> RobertaTokenizerFast:
    """A byte-level BPE of 600 tokens trained on the dev subset, as a RoBERTa tokenizer (saved, then loaded)."""
    texts = sorted({ex.context for ex in dev_subset}) + [ex.question for ex in dev_subset]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=600, min_frequency=2, special_tokens=SPECIALS, show_progress=False)
    directory = tmp_path_factory.mktemp("bpe")
    bpe.save_model(str(directory))
    tokenizer = RobertaTokenizerFast.from_pretrained(str(directory))
    assert (tokenizer.cls_token_id, tokenizer.pad_token_id, tokenizer.sep_token_id) == (0, 1, 2)
    return tokenizer


def tiny_config(model_type: str = "roberta", positions: int = 130):
    if model_type == "electra":  # the shipped WordPiece vocabulary, embeddings half as wide as the layers
        extra = dict(vocab_size=30522, embedding_size=HIDDEN // 2, type_vocab_size=2, pad_token_id=0)
    else:
        extra = dict(vocab_size=600, type_vocab_size=1, pad_token_id=1)
    return config_class(model_type)(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    intermediate_size=INTER, max_position_embeddings=positions,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)


def tiny_model(model_type: str = "roberta", seed: int = 0, positions: int = 130):
    """A random tiny QA model of ``model_type`` with non-trivial biases and norms."""
    torch.manual_seed(seed)
    model = qa_model_class(model_type)(tiny_config(model_type, positions=positions)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def pruned_model(model_type: str = "roberta", method: str = "sigmoid_threshold", seed: int = 0):
    """A masked tiny model: layer 0 keeps no head and part of its FFN, layer 1 keeps heads 1 and 3 (or fewer) and no
    FFN dimension, and a random fifth of the remaining blocks is masked too (topk: more, to its global quota)."""
    model = masks.apply_masks_(tiny_model(model_type, seed), method, (8, 8), 5.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for score in masks.mask_score_parameters(model):
            sign = torch.where(torch.rand(score.shape, generator=g) < 0.2, -1.0, 1.0)
            score.copy_(sign * (5.0 + torch.rand(score.shape, generator=g)))
        first, second = encoder_layers(model)
        for linear in (first.attention.self.query, first.attention.self.key, first.attention.self.value):
            linear.mask_scores.fill_(-5.0)
        for h in (0, 2):
            for linear in (second.attention.self.query, second.attention.self.key, second.attention.self.value):
                linear.mask_scores[h * HEAD_DIM // 8:(h + 1) * HEAD_DIM // 8] = -5.0
        first.intermediate.dense.mask_scores[: INTER // 2] = -5.0
        second.intermediate.dense.mask_scores.fill_(-5.0)
    if method == "topk":  # the top 20% of all weights: only positive scores, and no head kept by a per-matrix quota
        masks.set_threshold(model, 0.2, global_topk=True)
    else:
        masks.set_threshold(model, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def windows(bpe_tokenizer, dev_subset) -> squad.EvalFeatures:
    """Real dev windows of the BPE tokenizer: several per long context, the short ones padded on the right."""
    return squad.prepare_eval_features(dev_subset[:8], bpe_tokenizer, max_seq_length=128, doc_stride=48)


@pytest.fixture(scope="module")
def wordpiece_windows(tokenizer, dev_subset) -> squad.EvalFeatures:
    """Real dev windows of the shipped WordPiece tokenizer, for ELECTRA."""
    return squad.prepare_eval_features(dev_subset[:8], tokenizer, max_seq_length=128, doc_stride=48)


def windows_for(model_type: str, request) -> squad.EvalFeatures:
    return request.getfixturevalue("wordpiece_windows" if model_type == "electra" else "windows")


def logits(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**inputs)
    return torch.stack([out.start_logits, out.end_logits])


def test_bpe_windows_put_cls_first_pad_right_and_map_answers_back(bpe_tokenizer, dev_subset, windows):
    ids, mask = windows.input_ids, windows.attention_mask
    assert (ids[:, 0] == bpe_tokenizer.cls_token_id).all()
    assert (windows.token_type_ids == 0).all()  # the one segment a RoBERTa model embeds
    lengths = mask.sum(dim=1)
    assert (lengths < ids.shape[1]).any(), "some window must be padded"
    for row, length in zip(range(len(windows)), lengths.tolist()):
        assert (mask[row, :length] == 1).all() and (mask[row, length:] == 0).all()  # padding on the right
        assert (ids[row, length:] == bpe_tokenizer.pad_token_id).all()
        assert (ids[row, :length] != bpe_tokenizer.pad_token_id).all()
    # Offsets: question, special and padding tokens are not context; the train windows' answer tokens cut the gold
    # answer back out of the context.
    assert not windows.context_mask[:, 0].any()
    train = squad.prepare_train_features(dev_subset[:8], bpe_tokenizer, max_seq_length=128, doc_stride=48)
    assert torch.equal(train["input_ids"], windows.input_ids)  # the same windows, row for row
    found = 0
    for row in range(train["input_ids"].shape[0]):
        start, end = int(train["start_positions"][row]), int(train["end_positions"][row])
        if start == 0:
            continue
        example = dev_subset[int(windows.example_index[row])]
        offsets = windows.token_offsets(row)
        text = example.context[offsets[start][0]:offsets[end][1]]
        assert text.strip() == example.answers[0].strip()
        found += 1
    assert found >= 4


@pytest.mark.parametrize("model_type", FAMILY)
def test_position_ids_and_window_limit_are_the_models(model_type, windows):
    model = tiny_model(model_type, positions=40)
    config = model.config
    assert max_positions(config) == 40 - 2  # positions 0 and 1 (the pad id) are never a token's
    inputs = windows.model_inputs(slice(0, 4))
    inputs = {k: v[:, :38] for k, v in inputs.items()}
    embeddings = model.roberta.embeddings
    expected = embeddings.create_position_ids_from_input_ids(inputs["input_ids"], embeddings.padding_idx)
    assert torch.equal(position_ids(config, inputs["input_ids"]), expected)
    logits(model, inputs)  # a window of max_positions tokens fits
    assert max_positions(qa_model_class("bert")(config_class("bert")(max_position_embeddings=40)).config) == 40


@pytest.mark.parametrize("model_type", [*FAMILY, "electra"])
@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
def test_packed_logits_equal_masked_logits_with_empty_heads_and_ffn(model_type, method, request):
    windows = windows_for(model_type, request)
    model = pruned_model(model_type, method)
    report = sparsity_report(model)
    assert report.layers[0].heads_kept.sum() == 0 and report.layers[1].ffn_kept.sum() == 0
    packed = pack(model)
    heads = packed.config.fineprune_heads_kept
    assert heads[0] == [] and len(heads[1]) < HEADS and packed.config.fineprune_ffn_widths[1] == 0
    assert type(packed).__name__ == ARCHITECTURES[model_type].qa_class
    inputs = windows.model_inputs(slice(0, 8))
    torch.testing.assert_close(logits(packed, inputs), logits(model, inputs), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in packed.parameters()) < sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith("mask_scores"))


def test_masked_checkpoint_saves_loads_packs_and_the_packed_directory_loads(bpe_tokenizer, windows, tmp_path):
    model = pruned_model("roberta", "topk")
    inputs = windows.model_inputs(slice(0, 8))
    expected = logits(model, inputs)
    directory = save_model(model, bpe_tokenizer, tmp_path / "masked")
    assert json.loads((directory / "config.json").read_text())["model_type"] == "roberta"
    loaded = load_model(directory)
    assert type(loaded).__name__ == "RobertaForQuestionAnswering" and masks.is_masked(loaded)
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=0, rtol=0)
    packed, report = pack_and_verify(loaded, inputs, time_latency=False, tolerance=1e-5)
    assert report.heads_removed == HEADS + 2 and report.max_logit_diff <= 1e-5
    save_packed(packed, load_tokenizer(directory), tmp_path / "packed")
    again = load_model(tmp_path / "packed")
    torch.testing.assert_close(logits(again, inputs), expected, atol=1e-5, rtol=0)
    assert type(load_packed(tmp_path / "packed")).__name__ == "RobertaForQuestionAnswering"
    # A dense RoBERTa directory loads as the RoBERTa QA class, with its own weights.
    dense = tiny_model("roberta")
    save_model(dense, bpe_tokenizer, tmp_path / "dense")
    torch.testing.assert_close(logits(load_model(tmp_path / "dense"), inputs), logits(dense, inputs))


def test_a_masked_electra_checkpoint_loads_and_packs(tokenizer, wordpiece_windows, tmp_path):
    model = pruned_model("electra", "sigmoid_threshold")
    assert model.electra.embeddings_project.in_features == HIDDEN // 2
    inputs = wordpiece_windows.model_inputs(slice(0, 8))
    loaded = load_model(save_model(model, tokenizer, tmp_path / "masked"))
    assert type(loaded).__name__ == "ElectraForQuestionAnswering" and masks.is_masked(loaded)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=0, rtol=0)
    save_packed(pack(loaded), tokenizer, tmp_path / "packed")
    torch.testing.assert_close(logits(load_model(tmp_path / "packed"), inputs), logits(model, inputs), atol=1e-5,
                               rtol=0)


def test_an_unsupported_model_type_is_one_line_naming_config_json_and_the_field(tmp_path):
    save_model(tiny_model("roberta"), None, tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    raw = json.loads(config_file.read_text())
    for bad in ("gpt2", ["roberta"]):
        config_file.write_text(json.dumps({**raw, "model_type": bad}))
        with pytest.raises(CheckpointError) as err:
            load_model(tmp_path / "m")
        message = str(err.value)
        assert message.startswith(f"{config_file}: model_type {bad!r} is not supported (")
        assert "roberta" in message and "bert" in message and "\n" not in message


def test_a_random_model_config_builds_the_model_type_with_the_tokenizers_pad_id(bpe_tokenizer, tmp_path):
    bpe_tokenizer.save_pretrained(str(tmp_path / "tok"))
    cfg = RunConfig(model_config={"model_type": "roberta", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                                  "num_attention_heads": HEADS, "intermediate_size": INTER,
                                  "max_position_embeddings": 130, "type_vocab_size": 1},
                    tokenizer=str(tmp_path / "tok"), method="topk", attention_block=(8, 8))
    model, tokenizer = build_model(cfg)
    assert type(model).__name__ == "RobertaForQuestionAnswering" and masks.is_masked(model)
    assert model.config.pad_token_id == tokenizer.pad_token_id and model.config.vocab_size == len(tokenizer)
    with pytest.raises(ConfigError, match=r"model_config\.model_type: 'gpt2' is not supported \(.*roberta"):
        RunConfig(model_config={"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="unknown key 'hiden_size'.*RobertaConfig has no such field"):
        RunConfig(model_config={"model_type": "roberta", "hiden_size": 8})


@pytest.mark.parametrize("model_type", [*FAMILY, "electra"])
def test_export_logits_equal_the_models_and_attention_is_fused(model_type, request, tmp_path):
    windows = windows_for(model_type, request)
    packed = pack(pruned_model(model_type, "sigmoid_threshold"))
    inputs = windows.model_inputs()
    assert (inputs["attention_mask"] == 0).any()  # padded windows: positions and masks are both exercised
    report = export_model(packed, tmp_path, quantize="int8", inputs=inputs)
    assert report.max_logit_diff["fp32"] <= 1e-4
    # ORT fuses RoBERTa's (and ELECTRA's) attention and layer norms; its embedding fusion does not take RoBERTa's
    # positions (nor ELECTRA's projection), so they stay as the traced graph computes them.
    assert report.attention_fused and report.fused_attention_heads == [h for h in report.heads_per_layer if h]
    exported = OrtQAModel(tmp_path / FILES["fp32"], packed.config)
    got = logits(exported, inputs).numpy()
    want = logits(packed, inputs).numpy()
    real = inputs["attention_mask"].bool().numpy()
    assert np.abs(got - want)[:, real].max() <= 1e-4


def test_end_to_end_from_the_command_line(bpe_tokenizer, tmp_path, capsys):
    """train (dense) -> prune (topk) -> pack -> eval -> export -> eval of a tiny RoBERTa model directory."""
    base = tmp_path / "roberta"
    save_model(tiny_model("roberta", positions=100), bpe_tokenizer, base)
    config = tmp_path / "run.yaml"
    config.write_text("train_data: dev\neval_data: dev\ntrain_limit: 16\neval_limit: 8\nmax_seq_length: 96\n"
                      "doc_stride: 32\nbatch_size: 8\nmax_steps: 4\neval_every: 4\nlearning_rate: 1.0e-3\n"
                      "method: dense\n")

    def run(argv: list[str]) -> dict:
        assert cli_main(argv) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    dense = run(["train", "--config", str(config), "--model", str(base), "--output-dir", str(tmp_path / "dense"),
                 "--no-progress"])
    config.write_text(config.read_text().replace("method: dense", "method: topk\nattention_block: [8, 8]\n"
                                                 "target_density: 0.5\nfill_steps: 2\nmask_lr: 0.1"))
    pruned = run(["prune", "--config", str(config), "--model", dense["model_dir"], "--output-dir",
                  str(tmp_path / "pruned"), "--no-progress"])
    assert type(load_model(pruned["model_dir"])).__name__ == "RobertaForQuestionAnswering"
    packed = run(["pack", pruned["model_dir"], str(tmp_path / "packed"), "--questions", "4", "--repeats", "1"])
    assert packed["max_logit_diff"] <= 1e-3
    scored = run(["eval", str(tmp_path / "packed"), "--eval-limit", "8", "--max-seq-length", "96", "--doc-stride",
                  "32", "--device", "cpu", "--no-progress"])
    assert 0 <= scored["exact_match"] <= scored["f1"] <= 100 and scored["questions"] == 8
    assert scored["f1"] == pytest.approx(pruned["f1"], abs=1e-6)  # the packed model answers as the masked one
    # Windows longer than the model takes are cut to its 98 positions (100 less RoBERTa's pad id + 1), not to 100.
    longest = run(["eval", str(tmp_path / "packed"), "--eval-limit", "2", "--max-seq-length", "384", "--device", "cpu",
                   "--no-progress"])
    assert longest["max_seq_length"] == 98
    run(["export", str(tmp_path / "packed"), str(tmp_path / "onnx"), "--questions", "4"])
    exported = run(["eval", str(tmp_path / "onnx"), "--eval-limit", "8", "--max-seq-length", "96", "--doc-stride",
                    "32", "--no-progress"])
    assert exported["f1"] == pytest.approx(scored["f1"], abs=1e-6)


def test_fisher_with_packed_recovery_trains_a_roberta_model(bpe_tokenizer, tmp_path):
    bpe_tokenizer.save_pretrained(str(tmp_path / "tok"))
    cfg = RunConfig(model_config={"model_type": "roberta", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                                  "num_attention_heads": HEADS, "intermediate_size": INTER,
                                  "max_position_embeddings": 130, "type_vocab_size": 1},
                    tokenizer=str(tmp_path / "tok"), method="fisher", attention_block=(HEAD_DIM, HIDDEN),
                    target_density=0.5, fill_steps=3, fill_packed=True, train_data="dev", eval_data="dev",
                    train_limit=12, eval_limit=6, max_seq_length=96, doc_stride=32, batch_size=4,
                    output_dir=str(tmp_path / "run"))
    metrics = train(cfg, progress=False)
    model = load_model(metrics["model_dir"])
    assert type(model).__name__ == "RobertaForQuestionAnswering" and masks.is_masked(model)
    assert metrics["linear_density"] < 0.9


def test_a_roberta_model_serves_from_the_registry_through_torch_and_onnx(bpe_tokenizer, dev_subset, tmp_path):
    model_dir = save_packed(pack(pruned_model("roberta")), bpe_tokenizer, tmp_path / "packed")
    onnx_dir, exported = export_for_serving(model_dir, tmp_path / "onnx")
    assert onnx_dir is not None, exported
    uri = sqlite_store(tmp_path / "mlflow.db")
    experiment = MlflowClient(tracking_uri=uri).create_experiment("roberta",
                                                                  artifact_location=(tmp_path / "art").as_uri())
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment):
            info = log_qa_model(model_dir, serve_settings({"max_seq_length": "96", "doc_stride": "32"}), onnx_dir)
        records = pd.DataFrame({"question": [ex.question for ex in dev_subset[:3]],
                                "context": [ex.context for ex in dev_subset[:3]]})
        answers = {}
        for variant in ("fp32", "none"):
            served = mlflow.pyfunc.load_model(info.model_uri, model_config={"onnx_variant": variant})
            answers[variant] = list(pd.DataFrame(served.predict(records))["answer"])
    finally:
        mlflow.set_tracking_uri(before)
    assert answers["fp32"] == answers["none"] and all(isinstance(a, str) for a in answers["none"])


def test_a_sweep_space_times_a_random_roberta_model_within_its_positions(tmp_path):
    import yaml

    from workflows.space import SpaceError, load_space

    base = {"model_config": {"model_type": "roberta", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                             "num_attention_heads": HEADS, "intermediate_size": INTER, "max_position_embeddings": 130},
            "train_data": "dev", "eval_data": "dev", "max_seq_length": 64, "doc_stride": 32, "max_steps": 4,
            "method": "topk", "attention_block": [8, 8], "device": "cpu"}
    space = {"base": base, "search": {"target_density": {"type": "uniform", "low": 0.2, "high": 0.8}}}
    path = tmp_path / "space.yaml"
    # The shipped tokenizer pads with id 0, so the trials' model counts 130 - 0 - 1 = 129 positions.
    path.write_text(yaml.safe_dump({**space, "speedup": {"seq_len": 129}}))
    assert load_space(path).speedup["seq_len"] == 129
    path.write_text(yaml.safe_dump({**space, "speedup": {"seq_len": 130}}))
    with pytest.raises(SpaceError, match=r"speedup\.seq_len: 130 exceeds the 129 positions the model takes"):
        load_space(path)
    # A model directory: its own config.json (pad id 1, so 128 positions).
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(tiny_config("roberta").to_json_string())
    directory_base = {k: v for k, v in base.items() if k != "model_config"} | {"model": str(model_dir)}
    path.write_text(yaml.safe_dump({**space, "base": directory_base, "speedup": {"seq_len": 129}}))
    with pytest.raises(SpaceError, match=r"speedup\.seq_len: 129 exceeds the 128 positions the model takes"):
        load_space(path)
    path.write_text(yaml.safe_dump({**space, "base": directory_base | {"model": str(tmp_path / "elsewhere")},
                                    "speedup": {"seq_len": 129}}))
    assert load_space(path).speedup["seq_len"] == 129  # a directory only the cluster's machines have: not checked


def test_a_tokenizer_with_more_token_types_than_the_model_is_refused():
    """The shipped BERT tokenizer marks the context with token type 1; a RoBERTa model embeds type 0 alone."""
    cfg = RunConfig(model_config={"model_type": "roberta", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                                  "num_attention_heads": HEADS, "intermediate_size": INTER,
                                  "max_position_embeddings": 130, "type_vocab_size": 1})
    with pytest.raises(ConfigError, match=r"^tokenizer: the shipped tokenizer \(minilm\) does not fit model_config: "
                                          r"type_vocab_size 1, but the tokenizer gives the context token type 1: use "
                                          r"the model's own tokenizer$"):
        build_model(cfg)
    two_types = RunConfig(model_config={**cfg.model_config, "type_vocab_size": 2})
    assert build_model(two_types)[0].config.type_vocab_size == 2


def test_the_feature_cache_follows_a_tokenizer_retrained_in_the_same_directory(dev_subset, tmp_path):
    """A tokenizer directory rewritten by a second BPE training (the same size, other merges) must not get the
    first tokenizer's cached windows: they would train the model on ids its evaluation never gives."""
    from pruning.tokenizer import load_tokenizer
    from pruning.trainer import train_features

    def trained(texts: list[str]) -> RobertaTokenizerFast:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=SPECIALS, show_progress=False)
        scratch = tmp_path / f"bpe{len(list(tmp_path.iterdir()))}"
        scratch.mkdir()
        bpe.save_model(str(scratch))
        return RobertaTokenizerFast.from_pretrained(str(scratch))

    contexts = sorted({ex.context for ex in dev_subset})
    directory = tmp_path / "tok"
    cfg = RunConfig(train_data="dev", train_limit=4, max_seq_length=64, doc_stride=24,
                    cache_dir=str(tmp_path / "cache"))
    for texts in (contexts[: len(contexts) // 2], contexts[len(contexts) // 2:]):
        trained(texts).save_pretrained(str(directory))
        tokenizer = load_tokenizer(directory)
        assert len(tokenizer) == 400
        expected = squad.prepare_train_features(dev_subset[:4], tokenizer, max_seq_length=64, doc_stride=24)
        cached = train_features(cfg, dev_subset[:4], tokenizer)
        assert torch.equal(cached["input_ids"], expected["input_ids"])


def test_bf16_weights_bench_refuses_a_length_past_a_roberta_models_positions(bench_script, bpe_tokenizer, tmp_path,
                                                                             capsys):
    """130 position embeddings are 128 positions: a length of 130 was let through and failed as an IndexError
    traceback inside the embeddings."""
    checkpoint = save_model(pruned_model("roberta"), bpe_tokenizer, tmp_path / "masked")
    assert bench_script("bf16_weights").main(["--checkpoint", str(checkpoint), "--seq-lens", "130"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    assert err[-1] == f"bf16_weights: --seq-lens 130: {checkpoint} has 128 positions"


def test_a_bare_tokenizers_file_is_refused_in_one_line_naming_the_directory(dev_subset, tmp_path, capsys):
    """A BPE saved by the tokenizers library alone (``Tokenizer.save``) loads without pad or CLS token and without a
    pair template: as a model's ``tokenizer:`` it failed as a traceback at the first padded window (or, with
    ``type_vocab_size: 1``, was blamed on its token types)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sorted({ex.context for ex in dev_subset}), vocab_size=400, min_frequency=1,
                            special_tokens=SPECIALS, show_progress=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    bpe.save(str(bare / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=rf"^{bare}: the tokenizer \(\w+\) has no pad token: save it with "):
        load_tokenizer(bare)
    config = tmp_path / "run.yaml"
    config.write_text(f"model_config: {{model_type: roberta, hidden_size: {HIDDEN}, num_hidden_layers: {LAYERS}, "
                      f"num_attention_heads: {HEADS}, intermediate_size: {INTER}, max_position_embeddings: 130}}\n"
                      f"tokenizer: {bare}\ntrain_data: dev\neval_data: dev\ntrain_limit: 4\neval_limit: 2\n"
                      "max_seq_length: 64\ndoc_stride: 24\nmax_steps: 1\nmethod: dense\n")
    assert cli_main(["train", "--config", str(config), "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    assert err[-1].startswith(f"fineprune train: error: {bare}: the tokenizer (") and "no pad token" in err[-1]
    assert not (tmp_path / "run").exists()


def test_a_roberta_pad_id_other_than_the_tokenizers_is_refused(bpe_tokenizer, tmp_path):
    """A RoBERTa model counts positions from its pad id: with pad_token_id 0 (the BPE's <s>) and windows padded
    with id 1, every window's CLS token was taken for padding (the zero position embedding) without a word."""
    bpe_tokenizer.save_pretrained(str(tmp_path / "tok"))
    shape = {"model_type": "roberta", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
             "num_attention_heads": HEADS, "intermediate_size": INTER, "max_position_embeddings": 130,
             "type_vocab_size": 1}
    cfg = RunConfig(model_config={**shape, "pad_token_id": 0}, tokenizer=str(tmp_path / "tok"))
    with pytest.raises(ConfigError, match=rf"^model_config\.pad_token_id: 0 is not the pad id of the tokenizer "
                                          rf"{tmp_path / 'tok'} \(1\): a roberta model counts positions"):
        build_model(cfg)
    assert build_model(RunConfig(model_config={**shape, "pad_token_id": 1},
                                 tokenizer=str(tmp_path / "tok")))[0].config.pad_token_id == 1
    model = tiny_model("roberta")
    model.config.pad_token_id = 0
    save_model(model, bpe_tokenizer, tmp_path / "dense")
    with pytest.raises(ConfigError, match=rf"^tokenizer: {tmp_path / 'dense'} pads with id 1, but "
                                          rf"{tmp_path / 'dense' / 'config.json'} has pad_token_id 0"):
        build_model(RunConfig(model=str(tmp_path / "dense")))
    # ELECTRA (and BERT) count positions by index: their pad id is not checked.
    electra = tiny_model("electra")
    electra.config.pad_token_id = 5
    save_model(electra, None, tmp_path / "electra")
    build_model(RunConfig(model=str(tmp_path / "electra"), tokenizer=str(shipped_model_dir())))


@pytest.mark.parametrize("question", ["Which team won the game and " * 20, "日本語の質問です" * 40,
                                      "emoji 🎉🎉🎉 and more " * 30])
def test_a_long_question_is_cut_to_max_query_length_with_byte_level_bpe(bpe_tokenizer, dev_subset, question):
    cut = squad.cut_question(bpe_tokenizer, question, 16)
    assert question.startswith(cut)
    assert 0 < len(bpe_tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 16
    example = dev_subset[0]
    features = squad.prepare_eval_features([squad.Example("q", "", example.context, question)], bpe_tokenizer, 96,
                                           32, max_query_length=16)
    by_hand = squad.prepare_eval_features([squad.Example("q", "", example.context, cut)], bpe_tokenizer, 96, 32)
    assert torch.equal(features.input_ids, by_hand.input_ids)


TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and its largest city.",
         "Question answering windows map answers through offsets.", "Zoë went to Köln in 1998 by train."]


def unigram_directory(directory: Path, tokenizer_class: str = "XLMRobertaTokenizer", unknown_first: bool = False,
                      normalizer=None, edit=None) -> Path:
    """A Unigram (SentencePiece-style) tokenizer of about 120 pieces trained here on TEXTS, saved as the tokenizers
    library writes it (``Tokenizer.save``) beside a ``tokenizer_config.json`` naming ``tokenizer_class``; ``edit``
    changes the saved JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "<pad>", "</s>", "<mask>"] if unknown_first else SPECIALS
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(TEXTS * 3, trainers.UnigramTrainer(vocab_size=120, special_tokens=specials,
                                                                      unk_token="<unk>", show_progress=False))
    cls, sep = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                             special_tokens=[("<s>", cls), ("</s>", sep)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    if edit is not None:
        recorded = json.loads((directory / "tokenizer.json").read_text())
        edit(recorded)
        (directory / "tokenizer.json").write_text(json.dumps(recorded))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
    return directory


def _set(part: str, field: str, value):
    def edit(recorded: dict) -> None:
        recorded[part][field] = value
    return edit


def _score_of_entry(index: int, value):
    def edit(recorded: dict) -> None:
        recorded["model"]["vocab"][index][1] = value
    return edit


@pytest.mark.parametrize("edit, says", [
    (_set("model", "unk_id", "3"), 'model: invalid type: string "3", expected usize'),
    (_set("model", "byte_fallback", "no"), 'model: invalid type: string "no", expected a boolean'),
    (_score_of_entry(40, "low"), 'model: invalid type: string "low", expected f64'),
    (_set("pre_tokenizer", "prepend_scheme", 3), "pre_tokenizer: invalid type: integer `3`"),
], ids=["unk-id-in-quotes", "byte-fallback-a-string", "a-score-a-string", "prepend-scheme-a-number"])
@pytest.mark.parametrize("tokenizer_class", ["XLMRobertaTokenizer", "CamembertTokenizer"])
def test_a_unigram_tokenizer_json_field_of_the_wrong_type_is_one_line_naming_it(tmp_path, edit, says,
                                                                                tokenizer_class):
    # the tokenizers library's refusal came out of transformers as a traceback (a bare Exception)
    directory = unigram_directory(tmp_path / "tok", tokenizer_class, edit=edit)
    with pytest.raises(CheckpointError) as caught:
        load_tokenizer(directory)
    message = str(caught.value)
    assert message.startswith(f"{directory / 'tokenizer.json'}: not a tokenizer file (") and says in message, message


def _with_byte_pieces(recorded: dict) -> None:
    """Byte fallback, with the 256 byte pieces it reads a character outside the vocabulary as."""
    recorded["model"]["byte_fallback"] = True
    recorded["model"]["vocab"] += [[f"<0x{byte:02X}>", -20.0] for byte in range(256)]


@pytest.mark.parametrize("tokenizer_class", ["XLMRobertaTokenizer", "CamembertTokenizer"])
@pytest.mark.parametrize("setting", ["unk-id-0", "byte-fallback"])
def test_a_unigram_tokenizer_reads_characters_outside_its_vocabulary_as_its_file_says(tmp_path, tokenizer_class,
                                                                                   setting):
    # XLM-R's class gave the unknown id 3 (here </s>, a separator in the middle of a context) and neither class
    # read such a character as its bytes
    directory = unigram_directory(tmp_path / "tok", tokenizer_class, unknown_first=setting == "unk-id-0",
                                  edit=_with_byte_pieces if setting == "byte-fallback" else None)
    tokenizer = load_tokenizer(directory)
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    question, context = "Where is Würzburg?", "Würzburg (€ 5) is on the Main."
    for pair in [(context,), (question, context)]:
        assert tokenizer(*pair)["input_ids"] == reference.encode(*pair).ids
    ids = tokenizer(question, context)["input_ids"]
    if setting == "unk-id-0":
        assert tokenizer.sep_token_id not in ids[1:ids.index(tokenizer.sep_token_id)]
    else:
        assert "<0xE2>" in tokenizer.convert_ids_to_tokens(ids)  # the first byte of €
    tokenizer.save_pretrained(tmp_path / "saved")  # as a run saves it with its model
    assert load_tokenizer(tmp_path / "saved")(question, context)["input_ids"] == ids


def bpe_directory(directory: Path, lowercase: bool = False, prefix_space: bool = False, post_processor=None,
                  config: dict | None = None) -> Path:
    """A byte-level BPE trained here on TEXTS (as ``ByteLevelBPETokenizer`` builds it: ``lowercase`` gives it a
    lower-casing normalizer, ``prefix_space`` a pre-tokenizer that adds a space before the first word), with
    ``post_processor`` (by default the tokenizers library's ``RobertaProcessing``), saved as the tokenizers library
    writes it beside a ``tokenizer_config.json`` naming RobertaTokenizer (and holding ``config``)."""
    from tokenizers import Tokenizer, processors

    bpe = ByteLevelBPETokenizer(lowercase=lowercase, add_prefix_space=prefix_space)
    bpe.train_from_iterator(TEXTS * 3, vocab_size=300, min_frequency=1, special_tokens=SPECIALS,
                            show_progress=False)
    tokenizer = Tokenizer.from_str(bpe._tokenizer.to_str())
    tokenizer.post_processor = post_processor or processors.RobertaProcessing(("</s>", 2), ("<s>", 0),
                                                                              add_prefix_space=prefix_space)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer",
                                                                 **(config or {})}))
    return directory


def _encodings_agree(directory: Path, tokenizer, texts) -> None:
    """The ids, offsets and sequence of each token ``tokenizer`` gives each text (or question-context pair) are the
    ones the tokenizers library gives reading ``directory``'s tokenizer.json."""
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    for text in texts:
        pair = (text,) if isinstance(text, str) else text
        expected, got = reference.encode(*pair), tokenizer(*pair, return_offsets_mapping=True)
        assert (got["input_ids"], [tuple(o) for o in got["offset_mapping"]], got.sequence_ids()) == (
            expected.ids, expected.offsets, expected.sequence_ids), pair


def _windows_agree(directory: Path, tokenizer, examples, max_seq_length: int = 40, doc_stride: int = 12) -> None:
    """The SQuAD windows of ``examples`` (ids and context offsets) are the ones the tokenizers library makes from
    ``directory``'s tokenizer.json, truncating the context with the same stride."""
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    reference.enable_truncation(max_seq_length, stride=doc_stride, strategy="only_second")
    features = squad.prepare_eval_features(examples, tokenizer, max_seq_length=max_seq_length,
                                           doc_stride=doc_stride)
    expected = []
    for ex in examples:
        first = reference.encode(ex.question, ex.context)
        expected += [first, *first.overflowing]
    assert len(features) == len(expected)
    for row, encoding in enumerate(expected):
        width = len(encoding.ids)
        assert features.input_ids[row, :width].tolist() == encoding.ids, row
        context = [offsets if piece == 1 else None for offsets, piece in zip(encoding.offsets,
                                                                              encoding.sequence_ids)]
        assert features.token_offsets(row)[:width] == context, row


_CONTEXT = ("Paris is the capital of France and its largest city. The quick brown fox jumps over the lazy dog. "
            "Zoë went to Köln in 1998 by train.")
_EXAMPLES = [squad.Example("q0", "t", _CONTEXT, "What is the capital of France?", ("Paris",), (0,)),
             squad.Example("q1", "t", _CONTEXT, "Where did Zoë go in 1998?", ("Köln",), (_CONTEXT.index("Köln"),))]
_TEXTS = ["Paris is the capital of France.", " The quick  fox.", ("Where is Paris?", " Paris is in France."),
          ("What is the capital?", "PARIS  is the capital of France")]


def _with_whitespace_pieces(recorded: dict) -> None:
    recorded["model"]["vocab"] += [["\t", -5.0], ["\n", -5.0]]


def test_a_vocabulary_with_whitespace_pieces_is_not_said_to_hold_capitals(tmp_path, caplog):
    """A SentencePiece-style vocabulary holding "\t" and "\n" (the tokenizer produces them) was said to hold
    "capitals or accents, which the tokenizer never produces" on every command: its normalizer's output was compared
    stripped of its whitespace."""
    from tokenizers import normalizers

    directory = unigram_directory(tmp_path / "tok", normalizer=normalizers.NFKC(), edit=_with_whitespace_pieces)
    with caplog.at_level(logging.WARNING):
        tokenizer = load_tokenizer(directory)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("x", "one\ttwo\nthree")["input_ids"])
    assert "\t" in tokens and "\n" in tokens


@pytest.mark.parametrize("case", ["roberta-untrimmed-offsets", "roberta-prefix-space", "roberta-lowercase",
                                  "roberta-one-separator", "xlm-roberta-lowercase", "camembert-lowercase"])
def test_a_roberta_family_tokenizer_json_reads_texts_pairs_and_windows_as_its_file_says(tmp_path, case, caplog):
    # transformers' classes rebuilt the normalizer (none), pre-tokenizer, decoder and post-processor from their
    # defaults: trimmed offsets, no prefix space, "Paris" read with capitals a lower-cased vocabulary never has,
    # two </s> between the texts
    from tokenizers import normalizers, processors

    directory = tmp_path / "tok"
    if case == "roberta-untrimmed-offsets":
        bpe_directory(directory, post_processor=processors.RobertaProcessing(("</s>", 2), ("<s>", 0),
                                                                             trim_offsets=False))
    elif case == "roberta-prefix-space":
        bpe_directory(directory, prefix_space=True)
    elif case == "roberta-lowercase":
        bpe_directory(directory, lowercase=True)
    elif case == "roberta-one-separator":
        bpe_directory(directory, post_processor=processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]))
    else:
        xlm = case.startswith("xlm")  # CamemBERT's with byte fallback: its byte pieces (<0xC3>) are not text
        unigram_directory(directory, "XLMRobertaTokenizer" if xlm else "CamembertTokenizer",
                          normalizer=normalizers.Lowercase(), edit=None if xlm else _with_byte_pieces)
    with caplog.at_level(logging.WARNING, logger="pruning.checkpoint"):
        tokenizer = load_tokenizer(directory)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no "tokens the tokenizer never produces"
    _encodings_agree(directory, tokenizer, _TEXTS)
    _windows_agree(directory, tokenizer, _EXAMPLES)
    train = squad.prepare_train_features(_EXAMPLES, tokenizer, max_seq_length=40, doc_stride=12)
    features = squad.prepare_eval_features(_EXAMPLES, tokenizer, max_seq_length=40, doc_stride=12)
    held = train["start_positions"] > 0
    assert held.any()
    for row in torch.nonzero(held).flatten().tolist():  # every window that holds an answer points at its characters
        ex = _EXAMPLES[int(features.example_index[row])]
        start, end = int(train["start_positions"][row]), int(train["end_positions"][row])
        text = ex.context[features.offsets[row, start, 0]:features.offsets[row, end, 1]]
        assert text.strip() == ex.answers[0], (row, text)
    tokenizer.save_pretrained(tmp_path / "saved")  # as a run saves it with its model: read the same again
    _encodings_agree(directory, load_tokenizer(tmp_path / "saved"), _TEXTS)


def test_tokenizer_config_add_prefix_space_and_trim_offsets_decide_over_a_roberta_tokenizer_json(tmp_path):
    """As in transformers, where tokenizer_config.json gives add_prefix_space or trim_offsets they decide; the rest
    of the file's pipeline (here its one-separator template) is kept."""
    from tokenizers import processors

    template = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B </s>",
                                             special_tokens=[("<s>", 0), ("</s>", 2)])
    directory = bpe_directory(tmp_path / "tok", post_processor=template, config={"add_prefix_space": True})
    tokenizer = load_tokenizer(directory)
    ids = tokenizer("Paris", "France")["input_ids"]
    assert ids.count(2) == 2  # the file's template: one </s> between the texts
    assert tokenizer.convert_ids_to_tokens(ids)[1].startswith("Ġ")  # a space before the first word
    directory = bpe_directory(tmp_path / "tok2", post_processor=processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=False), config={"trim_offsets": True})
    offsets = load_tokenizer(directory)("Paris is", return_offsets_mapping=True)["offset_mapping"]
    assert all(start == end or " " not in "Paris is"[start:end] for start, end in offsets)  # trimmed


def test_a_camembert_tokenizer_json_gets_no_tokens_past_its_vocabulary(tmp_path):
    """transformers' CamemBERT class added <s>NOTUSED, </s>NOTUSED and <unk>NOTUSED to a tokenizer.json without them,
    past its vocabulary: a random model sized to the vocabulary was refused ("model_config.vocab_size: N is smaller
    than the tokenizer's N+3 tokens", a size no one gave), as was a teacher embedding the file's vocabulary."""
    directory = unigram_directory(tmp_path / "tok", "CamembertTokenizer")
    size = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    tokenizer = load_tokenizer(directory)
    assert len(tokenizer) == tokenizer.vocab_size == size
    config = RunConfig(model_config={"model_type": "camembert", "hidden_size": HIDDEN, "num_hidden_layers": 1,
                                     "num_attention_heads": HEADS, "intermediate_size": INTER,
                                     "max_position_embeddings": 130},
                       tokenizer=str(directory), train_data="dev", eval_data="dev", method="dense",
                       max_seq_length=64, doc_stride=24)
    model, _ = build_model(config)
    assert model.config.vocab_size == size
    tokenizer.save_pretrained(tmp_path / "saved")  # as a run saves it with its model
    assert len(load_tokenizer(tmp_path / "saved")) == size

    def with_unused(recorded: dict) -> None:  # a vocabulary that holds them (camembert-base's) keeps them
        recorded["model"]["vocab"] += [[token, 0.0] for token in ("<s>NOTUSED", "</s>NOTUSED", "<unk>NOTUSED")]
    directory = unigram_directory(tmp_path / "unused", "CamembertTokenizer", edit=with_unused)
    tokenizer = load_tokenizer(directory)
    assert len(tokenizer) == size + 3 and "<unk>NOTUSED" in tokenizer.all_special_tokens


@pytest.mark.parametrize("case", ["xlm-roberta-metaspace", "roberta-untrimmed-offsets"])
def test_an_answer_read_through_offsets_that_hold_a_space_does_not_begin_with_it(tmp_path, case):
    """A SentencePiece tokenizer.json's Metaspace alone (XLM-R's own) and a byte-level BPE with trim_offsets false
    give a word's token the space before it: the answer cut by those offsets began with a space (" Köln")."""
    from tokenizers import processors

    if case.startswith("xlm"):
        directory = unigram_directory(tmp_path / "tok")
    else:
        directory = bpe_directory(tmp_path / "tok", post_processor=processors.RobertaProcessing(
            ("</s>", 2), ("<s>", 0), trim_offsets=False))
    tokenizer = load_tokenizer(directory)
    example = _EXAMPLES[1]
    begin = example.answer_starts[0]
    features = squad.prepare_eval_features([example], tokenizer, max_seq_length=128, doc_stride=32)
    assert len(features) == 1
    offsets = features.offsets[0]
    start = int(np.flatnonzero(offsets[:, 0] == begin - 1)[0])  # the token that holds the space before the answer
    end = int(np.flatnonzero(offsets[:, 1] == begin + len("Köln"))[0])
    start_logits, end_logits = np.zeros((1, 128), np.float32), np.zeros((1, 128), np.float32)
    start_logits[0, start], end_logits[0, end] = 10.0, 10.0
    answer = squad.postprocess_predictions([example], features, start_logits, end_logits)[example.id]
    assert (answer.text, answer.start, answer.end) == ("Köln", begin, begin + len("Köln"))
