"""A packed directory opens with transformers alone: ``AutoModelForQuestionAnswering.from_pretrained(dir,
trust_remote_code=True)`` builds the packed sizes from the directory's packed_modeling.py, in a Python that cannot
import fineprune, with no missing or unexpected weights and the logits of :func:`pruning.packing.load_packed`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pruning import packed_modeling
from pruning.checkpoint import save_model
from pruning.packing import load_packed, pack, save_packed
from pruning.structure import ARCHITECTURES, encoder_layers, qa_model_class

from test_roberta import pruned_model

# Every packed model type the directory's file names a class for: the RoBERTa family shares one position rule.
MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")

# Run with -I (no PYTHONPATH, no script directory, no user site): fineprune is importable only through the
# editable install, which the finder below refuses, so the directory's own file is all that can build the model.
LOADER = textwrap.dedent("""
    import importlib.abc, json, sys, warnings
    import torch

    class NoFineprune(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pruning", "workflows"):
                raise ImportError("fineprune is not installed here: " + name)
            return None

    sys.meta_path.insert(0, NoFineprune())
    from transformers import AutoModelForQuestionAnswering

    inputs = torch.load("inputs.pt")
    result, logits = {}, {}
    for name in sys.argv[1:]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForQuestionAnswering.from_pretrained(name, trust_remote_code=True,
                                                                        output_loading_info=True)
            with torch.no_grad():
                out = model(**inputs[name])
        logits[name] = torch.stack([out.start_logits, out.end_logits])
        result[name] = {"class": type(model).__name__, "training": model.training,
                        "warnings": [str(w.message) for w in caught],
                        **{key: sorted(map(str, value)) for key, value in info.items()}}
    torch.save(logits, "logits.pt")
    result["fineprune imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("pruning", "workflows"))
    print(json.dumps(result))
""")


def _inputs(config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pad = int(config.pad_token_id)
    ids = torch.randint(pad + 2, 600, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = pad
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return torch.stack([out.start_logits, out.end_logits])


def test_from_pretrained_with_remote_code_opens_a_packed_directory_without_fineprune(tmp_path):
    expected, inputs = {}, {}
    for model_type in MODEL_TYPES:
        packed = pack(pruned_model(model_type))
        first, second = encoder_layers(packed)
        # The layers the test is about: no head at all in one, no FFN dimension at all in the other.
        assert first.attention.self.num_attention_heads == 0 and second.intermediate.dense.out_features == 0
        out = save_packed(packed, None, tmp_path / model_type)
        inputs[model_type] = _inputs(packed.config)
        expected[model_type] = _logits(load_packed(out), inputs[model_type])
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-I", "-c", LOADER, *MODEL_TYPES], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for word in ("MISSING", "UNEXPECTED", "MISMATCH", "newly initialized", "not used"):
        assert word.lower() not in run.stderr.lower(), run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result.pop("fineprune imported") == []
    logits = torch.load(tmp_path / "logits.pt")
    for model_type in MODEL_TYPES:
        record = json.loads((tmp_path / model_type / "config.json").read_text())  # every key of the record kept
        assert record["fineprune_packed"] is True and record["fineprune_heads_kept"][0] == []
        assert record["fineprune_ffn_widths"][1] == 0 and record["model_type"] == model_type
        loaded = result[model_type]
        assert loaded["class"].startswith("Packed") and loaded["training"] is False
        assert (loaded["missing_keys"], loaded["unexpected_keys"], loaded["mismatched_keys"],
                loaded["error_msgs"]) == ([], [], [], []), model_type
        assert loaded["warnings"] == [], model_type
        torch.testing.assert_close(logits[model_type], expected[model_type], atol=1e-5, rtol=0)


@pytest.mark.parametrize("edit", ["old directory", "packed class in architectures", "planted code"])
def test_load_packed_builds_with_its_own_code_whatever_the_directory_holds(tmp_path, edit):
    packed = pack(pruned_model("bert"))
    out = save_packed(packed, None, tmp_path / "packed")
    config_file = out / "config.json"
    record = json.loads(config_file.read_text())
    if edit == "old directory":  # written before packed directories held the file
        (out / "packed_modeling.py").unlink()
        del record["auto_map"]
    elif edit == "packed class in architectures":  # saved by a model that from_pretrained built from the file
        record["architectures"] = ["PackedBertForQuestionAnswering"]
    else:  # load_packed never runs a directory's code
        marker = tmp_path / "ran"
        (out / "packed_modeling.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(9)\n")
    config_file.write_text(json.dumps(record))

    loaded = load_packed(out)
    inputs = _inputs(packed.config)
    torch.testing.assert_close(_logits(loaded, inputs), _logits(packed, inputs), atol=0, rtol=0)
    assert not (tmp_path / "ran").exists()
    # What load_packed returns saves (and exports) as a model of its own, not pointing at a file left behind.
    assert "AutoModelForQuestionAnswering" not in (getattr(loaded.config, "auto_map", None) or {})
    assert loaded.config.architectures == ["BertForQuestionAnswering"]  # the class it is, whatever the file named
    save_model(loaded, None, tmp_path / "checkpoint")  # as a run continued from it saves: no class without its file
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["architectures"] == [
        "BertForQuestionAnswering"]
    again = save_packed(loaded, None, tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["auto_map"] == {
        "AutoModelForQuestionAnswering": "packed_modeling.PackedBertForQuestionAnswering"}
    assert (again / "packed_modeling.py").read_text() == Path(packed_modeling.__file__).read_text()


def test_every_supported_model_type_has_a_packed_class_of_its_question_answering_model():
    assert set(packed_modeling.PACKED_CLASSES) == set(ARCHITECTURES)
    for model_type, cls in packed_modeling.PACKED_CLASSES.items():
        assert cls.__bases__ == (qa_model_class(model_type),)


def _open_without_fineprune(tmp_path: Path, names: list[str]) -> dict:
    """Run :data:`LOADER` on the directories ``names`` (relative to ``tmp_path``, beside its ``inputs.pt``)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-I", "-c", LOADER, *names], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result.pop("fineprune imported") == []
    return result


@pytest.mark.parametrize("start", ["packed by fineprune", "saved by transformers", "packed before the file"])
def test_a_training_run_continued_from_a_packed_directory_writes_models_that_open_without_fineprune(tmp_path, start):
    from transformers import AutoModelForQuestionAnswering

    from conftest import random_masked_model
    from pruning.checkpoint import load_model
    from pruning.config import RunConfig
    from pruning.trainer import train

    masked, tokenizer = random_masked_model()
    packed_dir = save_packed(pack(masked), tokenizer, tmp_path / "packed")
    if start == "saved by transformers":  # opened with its modeling file and saved again: a packed class named
        model = AutoModelForQuestionAnswering.from_pretrained(packed_dir, trust_remote_code=True)
        model.save_pretrained(tmp_path / "resaved")
        tokenizer.save_pretrained(tmp_path / "resaved")
        packed_dir = tmp_path / "resaved"
    elif start == "packed before the file":  # an older packed directory: no packed_modeling.py, no auto_map
        (packed_dir / "packed_modeling.py").unlink()
        record = json.loads((packed_dir / "config.json").read_text())
        del record["auto_map"]
        (packed_dir / "config.json").write_text(json.dumps(record))
    cfg = RunConfig(model=str(packed_dir), method="dense", train_data="dev", eval_data="dev", train_limit=4,
                    eval_limit=2, max_seq_length=96, doc_stride=32, batch_size=4, max_steps=1,
                    output_dir=str(tmp_path / "run"), log_every=100)
    train(cfg, progress=False)
    names = ["run/final", "run/checkpoint"]
    inputs = {name: _inputs(masked.config) for name in names}
    torch.save(inputs, tmp_path / "inputs.pt")
    for name in names:
        record = json.loads((tmp_path / name / "config.json").read_text())
        assert record["fineprune_packed"] is True and record["auto_map"] == {
            "AutoModelForQuestionAnswering": "packed_modeling.PackedBertForQuestionAnswering"}
        assert (tmp_path / name / "packed_modeling.py").read_text() == Path(packed_modeling.__file__).read_text()
    result = _open_without_fineprune(tmp_path, names)
    logits = torch.load(tmp_path / "logits.pt")
    for name in names:
        loaded = result[name]
        assert loaded["class"] == "PackedBertForQuestionAnswering", name
        assert (loaded["missing_keys"], loaded["unexpected_keys"], loaded["mismatched_keys"]) == ([], [], []), name
        torch.testing.assert_close(logits[name], _logits(load_model(tmp_path / name), inputs[name]), atol=1e-5,
                                   rtol=0)


def test_a_model_whose_config_names_its_own_code_is_written_without_that_auto_map(tmp_path, tiny_bert_config,
                                                                                    tokenizer):
    """A model directory of a hub repository's own code names its files in config.json's auto_map. fineprune builds
    the stock class of its model_type and copies none of those files, so nothing it writes (a run's checkpoint and
    final model, a packed directory, an export) may name them: from_pretrained(trust_remote_code=True) would look
    for them there."""
    from transformers import BertForQuestionAnswering

    from pruning.checkpoint import load_model
    from workflows import cli

    torch.manual_seed(0)
    dense = tmp_path / "dense"
    BertForQuestionAnswering(tiny_bert_config).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    (dense / "configuration_mybert.py").write_text(
        "from transformers import BertConfig\n\n\nclass MyBertConfig(BertConfig):\n    model_type = 'bert'\n")
    (dense / "modeling_mybert.py").write_text(
        "from transformers import BertForQuestionAnswering\n\nfrom .configuration_mybert import MyBertConfig\n\n\n"
        "class MyBertForQuestionAnswering(BertForQuestionAnswering):\n    config_class = MyBertConfig\n")
    record = json.loads((dense / "config.json").read_text())
    record["auto_map"] = {"AutoConfig": "configuration_mybert.MyBertConfig",
                          "AutoModelForQuestionAnswering": "modeling_mybert.MyBertForQuestionAnswering"}
    (dense / "config.json").write_text(json.dumps(record))

    assert not hasattr(load_model(dense).config, "auto_map")
    save_model(load_model(dense), tokenizer, tmp_path / "trained")  # how a training run writes its models
    assert "auto_map" not in json.loads((tmp_path / "trained" / "config.json").read_text())
    assert cli.main(["pack", str(dense), str(tmp_path / "packed"), "--questions", "2", "--repeats", "1"]) == 0
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["auto_map"] == {
        "AutoModelForQuestionAnswering": "packed_modeling.PackedBertForQuestionAnswering"}
    assert cli.main(["export", str(dense), str(tmp_path / "onnx"), "--questions", "2"]) == 0
    assert "auto_map" not in json.loads((tmp_path / "onnx" / "config.json").read_text())

    inputs = {"packed": _inputs(tiny_bert_config)}
    torch.save(inputs, tmp_path / "inputs.pt")
    result = _open_without_fineprune(tmp_path, ["packed"])
    assert result["packed"]["class"] == "PackedBertForQuestionAnswering"
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt")["packed"],
                               _logits(load_model(tmp_path / "packed"), inputs["packed"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_packed_config_without_architectures_is_built_as_the_question_answering_model_of_its_type(tmp_path,
                                                                                                  model_type):
    """config.json's ``architectures`` is optional (a config edited by hand, a tool that leaves it out): the
    model_type alone says which class a packed directory holds."""
    packed = pack(pruned_model(model_type))
    out = save_packed(packed, None, tmp_path / "packed")
    record = json.loads((out / "config.json").read_text())
    del record["architectures"]
    (out / "config.json").write_text(json.dumps(record))
    _check_loads_as(packed, out, model_type)


@pytest.mark.parametrize("model_type", ["bert", "electra"])
def test_a_packed_config_naming_its_class_without_a_list_is_built_as_that_class(tmp_path, model_type):
    """``"architectures": "BertForQuestionAnswering"``, one name without its list, as transformers opens it."""
    packed = pack(pruned_model(model_type))
    out = save_packed(packed, None, tmp_path / "packed")
    record = json.loads((out / "config.json").read_text())
    record["architectures"] = record["architectures"][0]
    (out / "config.json").write_text(json.dumps(record))
    _check_loads_as(packed, out, model_type)


def _check_loads_as(packed, out: Path, model_type: str) -> None:
    from pruning.checkpoint import load_model

    inputs = _inputs(packed.config)
    for load in (load_packed, load_model):
        loaded = load(out)
        assert type(loaded) is qa_model_class(model_type)
        torch.testing.assert_close(_logits(loaded, inputs), _logits(packed, inputs), atol=0, rtol=0)


def test_fineprune_answers_from_a_packed_directory_whose_config_has_no_architectures(tmp_path, tokenizer, capsys):
    from conftest import packed_tiny_bert
    from workflows import cli

    out = packed_tiny_bert(tmp_path / "packed", tokenizer, heads=1, ffn=64)
    record = json.loads((out / "config.json").read_text())
    del record["architectures"]
    (out / "config.json").write_text(json.dumps(record))
    assert cli.main(["ask", str(out), "--question", "Who wrote it?", "--context", "Ann wrote it."]) == 0
    assert "answer" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_sharded_packed_directory_opens_as_transformers_opens_it(tmp_path, tokenizer):
    """A packed model saved again with save_pretrained(dir, max_shard_size=...) holds model.safetensors.index.json
    and shards instead of model.safetensors: transformers opens it (trust_remote_code=True), and so do load_packed,
    load_model and the commands, with the same logits."""
    from transformers import AutoModelForQuestionAnswering

    from pruning.checkpoint import load_model

    packed = pack(pruned_model("bert"))
    out = save_packed(packed, tokenizer, tmp_path / "packed")
    model = AutoModelForQuestionAnswering.from_pretrained(out, trust_remote_code=True)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    inputs = {"sharded": _inputs(packed.config)}
    torch.save(inputs, tmp_path / "inputs.pt")
    result = _open_without_fineprune(tmp_path, ["sharded"])["sharded"]
    assert (result["missing_keys"], result["unexpected_keys"], result["mismatched_keys"]) == ([], [], [])
    expected = _logits(packed, inputs["sharded"])
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt")["sharded"], expected, atol=1e-5, rtol=0)
    for load in (load_packed, load_model):
        torch.testing.assert_close(_logits(load(tmp_path / "sharded"), inputs["sharded"]), expected, atol=0, rtol=0)


def test_fineprune_answers_from_a_sharded_packed_directory(tmp_path, tokenizer, capsys):
    from transformers import AutoModelForQuestionAnswering

    from conftest import packed_tiny_bert
    from workflows import cli

    out = packed_tiny_bert(tmp_path / "packed", tokenizer, heads=1, ffn=64)
    AutoModelForQuestionAnswering.from_pretrained(out, trust_remote_code=True).save_pretrained(
        tmp_path / "sharded", max_shard_size="500KB")
    tokenizer.save_pretrained(tmp_path / "sharded")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    argv = ["--question", "Who wrote it?", "--context", "Ann wrote it."]
    assert cli.main(["ask", str(out), *argv]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main(["ask", str(tmp_path / "sharded"), *argv]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == expected
