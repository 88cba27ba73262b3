"""ALBERT directories, read as the ELECTRA model with unshared layers that computes the same function
(pruning.albert), through loading, pruning, packing, export and evaluation.

The models are tiny and random, saved by transformers' own ALBERT classes, with the shipped WordPiece tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AlbertConfig, AlbertForMaskedLM, AlbertForQuestionAnswering, ElectraForQuestionAnswering

from pruning import squad
from pruning.albert import unrolled_groups
from pruning.checkpoint import CheckpointError, load_config, load_model
from pruning.config import ConfigError, RunConfig
from pruning.tokenizer import load_tokenizer
from workflows import cli

from conftest import (dev_windows, loading_refused, no_qa_head_line, pack_export_and_score, qa_logits,
                      save_read_as_model)

EMBEDDING, HIDDEN, LAYERS, HEADS, FFN = 16, 32, 3, 4, 64


def albert_dir(path: Path, model_class: type = AlbertForQuestionAnswering, seed: int = 0, **config) -> Path:
    """A random tiny ALBERT model of ``model_class`` saved by transformers in ``path`` (one group of one shared layer
    run ``LAYERS`` times unless ``config`` says otherwise), with non-trivial biases and norms, and the shipped WordPiece
    vocabulary as its tokenizer."""
    torch.manual_seed(seed)
    values = dict(vocab_size=30522, embedding_size=EMBEDDING, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=128, hidden_act="gelu_new",
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return save_read_as_model(model_class(AlbertConfig(**{**values, **config})), path, "BertTokenizer")


@pytest.fixture(scope="module")
def albert(tmp_path_factory) -> Path:
    return albert_dir(tmp_path_factory.mktemp("albert") / "qa")


@pytest.fixture(scope="module")
def windows(albert, dev_subset) -> squad.EvalFeatures:
    return dev_windows(albert, dev_subset)


@pytest.mark.parametrize("groups", [{}, {"num_hidden_groups": 2, "inner_group_num": 2, "num_hidden_layers": 4}])
def test_an_albert_directory_opens_as_the_electra_model_that_answers_the_same(albert, windows, groups, tmp_path):
    directory = albert_dir(tmp_path / "grouped", **groups) if groups else albert
    stock = AlbertForQuestionAnswering.from_pretrained(str(directory), dtype=torch.float32).eval()
    model = load_model(directory, qa_head=True)
    assert type(model) is ElectraForQuestionAnswering and not model.training
    config = model.config
    layers = groups.get("num_hidden_layers", LAYERS) * groups.get("inner_group_num", 1)
    assert (config.model_type, config.embedding_size, config.hidden_size, config.num_hidden_layers,
            config.num_attention_heads, config.intermediate_size) == ("electra", EMBEDDING, HIDDEN, layers, HEADS, FFN)
    assert load_config(directory).to_dict() == config.to_dict()
    inputs = windows.model_inputs()
    assert inputs["token_type_ids"].any() and not inputs["attention_mask"].all()  # contexts of type 1, padding
    torch.testing.assert_close(qa_logits(model, inputs), qa_logits(stock, inputs), atol=1e-5, rtol=0)
    # Each layer holds its own copy of the shared weights it runs: pruning one leaves the others.
    shared = [layer.intermediate.dense.weight for layer in model.electra.encoder.layer]
    assert len({w.data_ptr() for w in shared}) == layers
    place = unrolled_groups(stock.config)
    for index, (group, inner) in enumerate(place):
        torch.testing.assert_close(
            shared[index], stock.albert.encoder.albert_layer_groups[group].albert_layers[inner].ffn.weight,
            atol=0, rtol=0)


def test_unrolled_groups_follow_albert_s_own_order():
    assert unrolled_groups(AlbertConfig(num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2)) == [
        (0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1), (1, 0), (1, 1)]
    assert unrolled_groups(AlbertConfig(num_hidden_layers=3)) == [(0, 0)] * 3


def test_an_albert_encoder_gets_a_fresh_head_to_fine_tune_and_is_no_model_to_evaluate(tmp_path):
    directory = albert_dir(tmp_path / "mlm", AlbertForMaskedLM)
    stock = AlbertForMaskedLM.from_pretrained(str(directory)).eval()
    model = load_model(directory)
    torch.testing.assert_close(model.electra.encoder.layer[2].intermediate.dense.weight,
                               stock.albert.encoder.albert_layer_groups[0].albert_layers[0].ffn.weight, atol=0, rtol=0)
    assert model.qa_outputs.weight.shape == (2, HIDDEN)
    with pytest.raises(CheckpointError) as err:
        load_model(directory, qa_head=True)
    assert str(err.value) == no_qa_head_line(directory)


def test_an_albert_directory_that_cannot_be_read_as_electra_is_one_line_naming_the_file(albert, tmp_path):
    directory = tmp_path / "m"
    shutil.copytree(albert, directory)
    weights = directory / "model.safetensors"
    state = load_file(str(weights))
    config = json.loads((albert / "config.json").read_text())

    def refused(edited: dict, values: dict | None = None) -> str:
        return loading_refused(directory, edited, values or config)

    renamed = {name.replace(".ffn.", ".lin1."): tensor for name, tensor in state.items()}
    assert refused(renamed) == (f"{weights}: not the weights of an ALBERT model (unexpected: "
                                "albert.encoder.albert_layer_groups.0.albert_layers.0.lin1.bias and 1 more)")
    # A layer the config does not have (a second group where it gives one) is not the config's model either.
    extra = {**state, **{name.replace("albert_layer_groups.0", "albert_layer_groups.1"): tensor.clone()
                         for name, tensor in state.items() if "albert_layer_groups.0" in name}}
    assert refused(extra).startswith(f"{weights}: not the weights of an ALBERT model (unexpected: "
                                     "albert.encoder.albert_layer_groups.1.")
    assert refused(state, {**config, "intermediate_size": 48}) == (
        f"{weights}: weights do not match the config (electra.encoder.layer.0.intermediate.dense.bias has shape (64,), "
        "the config gives (48,))")
    assert refused(state, {**config, "embedding_size": HIDDEN}) == (
        f"{directory / 'config.json'}: invalid albert config (embedding_size equals hidden_size ({HIDDEN}): an ALBERT "
        "model is read as ELECTRA, which projects its embeddings only where they are narrower than its layers)")


def test_an_albert_model_prunes_packs_exports_and_answers_from_the_command_line(albert, dev_subset, tmp_path, capsys):
    """eval (as ALBERT answers) -> prune (topk, distilled from the ALBERT directory) -> pack -> eval -> export ->
    eval; every directory written is an ELECTRA one."""
    def run(argv: list[str]) -> dict:
        assert cli.main(argv) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    window = ["--max-seq-length", "96", "--doc-stride", "32"]
    run(["eval", str(albert), "--eval-limit", "8", *window, "--device", "cpu", "--no-progress",
         "--predictions", str(tmp_path / "predictions.json")])
    stock = AlbertForQuestionAnswering.from_pretrained(str(albert)).eval()
    expected = squad.predict(stock, load_tokenizer(albert), dev_subset[:8], max_seq_length=96, doc_stride=32,
                             progress=False)
    assert json.loads((tmp_path / "predictions.json").read_text()) == expected

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "train_data": "dev", "eval_data": "dev", "train_limit": 16, "eval_limit": 8, "max_seq_length": 96,
        "doc_stride": 32, "batch_size": 8, "max_steps": 4, "eval_every": 4, "learning_rate": 1.0e-3,
        "method": "topk", "attention_block": [8, 8], "target_density": 0.5, "fill_steps": 2, "mask_lr": 0.1}))
    pruned = run(["prune", "--config", str(config), "--model", str(albert), "--teacher", str(albert),
                  "--output-dir", str(tmp_path / "pruned"), "--no-progress"])
    assert pruned["linear_density"] < 1
    pack_export_and_score(run, pruned, tmp_path, window)
    for written in ("pruned/final", "packed"):
        assert json.loads((tmp_path / written / "config.json").read_text())["model_type"] == "electra"


def test_a_random_albert_model_config_says_to_give_electras_values():
    with pytest.raises(ConfigError) as err:
        RunConfig(model_config={"model_type": "albert", "hidden_size": 32})
    assert str(err.value).endswith("model_config.model_type: 'albert' is read from a model directory only (as the "
                                   "electra model that computes the same); a random model is given as electra's "
                                   "config values")
