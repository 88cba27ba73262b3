"""DistilBERT directories, read as the BERT model that computes the same function (pruning.distilbert), through
loading, training, pruning, packing, export and evaluation.

The models are tiny and random, saved by transformers' own DistilBERT classes, with the shipped WordPiece tokenizer
named as DistilBERT's (whose inputs leave out token types).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from transformers import (BertForQuestionAnswering, DistilBertConfig, DistilBertForMaskedLM,
                          DistilBertForQuestionAnswering)

from pruning import squad
from pruning.checkpoint import CheckpointError, load_config, load_model
from pruning.config import ConfigError, RunConfig
from pruning.distilbert import bert_name
from pruning.tokenizer import load_tokenizer
from workflows import cli

from conftest import (dev_windows, loading_refused, no_qa_head_line, pack_export_and_score, qa_logits,
                      save_read_as_model)

ROOT = Path(__file__).resolve().parents[1]
DIM, LAYERS, HEADS, HIDDEN_DIM = 32, 2, 4, 64


def distilbert_dir(path: Path, model_class: type = DistilBertForQuestionAnswering, seed: int = 0,
                   dtype: torch.dtype = torch.float32, **config) -> Path:
    """A random tiny DistilBERT model of ``model_class`` saved by transformers in ``path``, with non-trivial biases
    and norms, and the shipped WordPiece vocabulary as its tokenizer (``DistilBertTokenizer``)."""
    torch.manual_seed(seed)
    values = dict(dim=DIM, n_layers=LAYERS, n_heads=HEADS, hidden_dim=HIDDEN_DIM, max_position_embeddings=128)
    model = model_class(DistilBertConfig(**{**values, **config}))
    return save_read_as_model(model, path, "DistilBertTokenizer", dtype)


class _WithoutTokenTypes(nn.Module):
    """DistilBERT as the evaluation calls a model: its forward takes no token types."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


@pytest.fixture(scope="module")
def distil(tmp_path_factory) -> Path:
    return distilbert_dir(tmp_path_factory.mktemp("distilbert") / "qa")


@pytest.fixture(scope="module")
def windows(distil, dev_subset) -> squad.EvalFeatures:
    return dev_windows(distil, dev_subset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_distilbert_directory_opens_as_the_bert_model_that_answers_the_same(distil, windows, dtype, tmp_path):
    directory = distil if dtype == torch.float32 else distilbert_dir(tmp_path / "bf16", dtype=dtype)
    stock = DistilBertForQuestionAnswering.from_pretrained(str(directory), dtype=torch.float32).eval()
    model = load_model(directory, qa_head=True)
    assert type(model) is BertForQuestionAnswering and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    config = model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.type_vocab_size) == ("bert", DIM, LAYERS, HEADS, HIDDEN_DIM, 2)
    assert load_config(directory).to_dict() == config.to_dict()
    inputs = windows.model_inputs()
    assert inputs["token_type_ids"].any() and not inputs["attention_mask"].all()  # contexts of type 1, padding
    torch.testing.assert_close(qa_logits(model, inputs), qa_logits(_WithoutTokenTypes(stock), inputs), atol=1e-5,
                               rtol=0)
    assert not model.bert.embeddings.token_type_embeddings.weight.any()


def test_every_distilbert_tensor_has_a_bert_place_and_none_is_left_out(distil):
    state = load_file(str(distil / "model.safetensors"))
    names = {bert_name(name) for name in state}
    assert None not in names and len(names) == len(state)
    bert = set(BertForQuestionAnswering(load_config(distil)).state_dict())
    assert bert - names == {"bert.embeddings.token_type_embeddings.weight"}
    assert names <= bert


def test_a_distilbert_encoder_gets_a_fresh_head_to_fine_tune_and_is_no_model_to_evaluate(tmp_path):
    directory = distilbert_dir(tmp_path / "mlm", DistilBertForMaskedLM)
    stock = DistilBertForMaskedLM.from_pretrained(str(directory)).eval()
    model = load_model(directory)
    torch.testing.assert_close(model.bert.encoder.layer[1].intermediate.dense.weight,
                               stock.distilbert.transformer.layer[1].ffn.lin1.weight, atol=0, rtol=0)
    assert model.qa_outputs.weight.shape == (2, DIM)
    with pytest.raises(CheckpointError) as err:
        load_model(directory, qa_head=True)
    assert str(err.value) == no_qa_head_line(directory)


def test_weights_that_are_not_the_distilbert_models_of_the_config_are_one_line_naming_the_file(distil, tmp_path):
    directory = tmp_path / "m"
    shutil.copytree(distil, directory)
    weights = directory / "model.safetensors"
    state = load_file(str(weights))

    def refused(edited: dict, config: dict | None = None) -> str:
        return loading_refused(directory, edited, config)

    renamed = {name.replace("q_lin", "query"): tensor for name, tensor in state.items()}
    assert refused(renamed) == (f"{weights}: not the weights of a DistilBERT model (unexpected: "
                                "distilbert.transformer.layer.0.attention.query.bias and 3 more)")
    partial = {k: v for k, v in state.items() if not k.startswith("distilbert.transformer.layer.1.ffn.lin2.")}
    assert refused(partial) == (f"{weights}: weights do not match the config (missing: "
                                "bert.encoder.layer.1.output.dense.bias and 1 more)")
    config = json.loads((distil / "config.json").read_text())
    assert refused(state, {**config, "hidden_dim": 48}) == (
        f"{weights}: weights do not match the config (bert.encoder.layer.0.intermediate.dense.bias has shape (64,), "
        "the config gives (48,))")
    integers = {**state, "qa_outputs.weight": state["qa_outputs.weight"].to(torch.int8)}
    assert refused(integers, config) == (f"{weights}: tensor 'qa_outputs.weight' has dtype int8, where the model holds "
                                         "float32")
    assert refused(state, {**config, "n_heads": 5}) == (
        f"{directory / 'config.json'}: BertForQuestionAnswering cannot be built from it (ValueError: The hidden size "
        "(32) is not a multiple of the number of attention heads (5))")
    assert refused(state, {**config, "n_layers": "two"}).startswith(f"{directory / 'config.json'}: invalid distilbert "
                                                                    "config (")


def test_a_distilbert_model_trains_prunes_packs_exports_and_answers_from_the_command_line(distil, windows, dev_subset,
                                                                                        tmp_path, capsys):
    """eval (as DistilBERT answers) -> train (dense) -> prune (topk, distilled from the DistilBERT directory) -> pack
    -> eval -> export -> eval, and a one-shot fisher prune; every directory written is a BERT one."""
    def run(argv: list[str]) -> dict:
        assert cli.main(argv) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    window = ["--max-seq-length", "96", "--doc-stride", "32"]
    scored = run(["eval", str(distil), "--eval-limit", "8", *window, "--device", "cpu", "--no-progress",
                  "--predictions", str(tmp_path / "predictions.json")])
    stock = _WithoutTokenTypes(DistilBertForQuestionAnswering.from_pretrained(str(distil)).eval())
    expected = squad.predict(stock, load_tokenizer(distil), dev_subset[:8], max_seq_length=96, doc_stride=32,
                             progress=False)
    assert json.loads((tmp_path / "predictions.json").read_text()) == expected and scored["questions"] == 8

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "train_data": "dev", "eval_data": "dev", "train_limit": 16, "eval_limit": 8, "max_seq_length": 96,
        "doc_stride": 32, "batch_size": 8, "max_steps": 4, "eval_every": 4, "learning_rate": 1.0e-3,
        "method": "dense"}))
    dense = run(["train", "--config", str(config), "--model", str(distil), "--output-dir", str(tmp_path / "dense"),
                 "--no-progress"])
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, "method": "topk", "attention_block": [8, 8], "target_density": 0.5,
                                      "fill_steps": 2, "mask_lr": 0.1}))
    pruned = run(["prune", "--config", str(config), "--model", dense["model_dir"], "--teacher", str(distil),
                  "--output-dir", str(tmp_path / "pruned"), "--no-progress"])
    assert pruned["linear_density"] < 1
    pack_export_and_score(run, pruned, tmp_path, window)
    fisher_config = tmp_path / "fisher.yaml"  # the README's one-shot recipe, on a few short windows
    fisher_config.write_text(yaml.safe_dump({
        **yaml.safe_load((ROOT / "configs" / "prune_fisher50.yaml").read_text()), "max_seq_length": 96,
        "doc_stride": 32, "calibration_samples": 16, "mask_tuning_samples": 16, "fill_steps": 2}))
    fisher = run(["prune", "--config", str(fisher_config), "--model", str(distil), "--teacher", str(distil),
                  "--train-limit", "16", "--eval-data", "dev", "--eval-limit", "8",
                  "--output-dir", str(tmp_path / "fisher"), "--no-progress"])
    assert fisher["heads_removed"] > 0
    for written in ("dense/final", "pruned/final", "packed", "fisher/final"):
        assert json.loads((tmp_path / written / "config.json").read_text())["model_type"] == "bert"


def test_a_sweep_space_over_a_distilbert_model_is_checked_against_its_sizes(distil, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    del space["base"]["model_config"]
    space["base"].update(model=str(distil), attention_block=[8, 8])
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert cli.main(["sweep", "--space", "space.yaml", "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["check"] == "passed"
    space["base"]["attention_block"] = [7, 7]
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert cli.main(["sweep", "--space", "space.yaml", "--check"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fineprune sweep: error: space.yaml: base.attention_block: 7x7 does not divide the 32x32 attention matrices "
        f"of the model {distil} (hidden_size {DIM})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_a_random_distilbert_model_config_says_to_give_berts_values():
    with pytest.raises(ConfigError) as err:
        RunConfig(model_config={"model_type": "distilbert", "dim": 32})
    assert str(err.value).endswith("model_config.model_type: 'distilbert' is read from a model directory only (as "
                                   "the bert model that computes the same); a random model is given as bert's config "
                                   "values")
