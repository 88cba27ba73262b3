"""Calls from Python (a notebook) with an argument of the wrong kind: one line naming the argument and what to
give, not an error raised deep inside about something else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from pruning import squad

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = "The Eiffel Tower is in Paris."


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BertForQuestionAnswering(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64)).eval()


def _example(qid: str = "a") -> squad.Example:
    return squad.Example(id=qid, title="", context=CONTEXT, question="Where is it?", answers=("Paris",),
                         answer_starts=(23,))


def test_a_run_config_given_as_its_file_or_a_dict_is_named(model, tokenizer):
    """`train("configs/x.yaml")` said "'str' object has no attribute 'seed'"."""
    from pruning.trainer import evaluate, train

    said = r"^cfg must be a RunConfig \(pruning\.config\.load_config\(path\) reads one from YAML, " \
           r"config_from_dict\(values\) makes one of a dict\), got {}$"
    with pytest.raises(TypeError, match=said.format("str")):
        train(str(ROOT / "configs" / "tiny_smoke.yaml"))
    with pytest.raises(TypeError, match=said.format("dict")):
        evaluate(model, tokenizer, [_example()], {"method": "topk"})


@pytest.mark.parametrize("examples,kind", [("dev.json", "str"), (_example(), "Example")])
def test_examples_given_as_a_file_or_one_example_are_named(model, tokenizer, examples, kind):
    """evaluate_model(model, tokenizer, "dev.json") said "'str' object has no attribute 'question'"."""
    with pytest.raises(TypeError, match=rf"^examples must be a list of Example \(pruning\.squad\.load_squad\(path\) "
                                        rf"reads them\), got {kind}$"):
        squad.evaluate_model(model, tokenizer, examples, progress=False)
    with pytest.raises(TypeError, match=r"^examples\[1\] must be an Example, got dict$"):
        squad.prepare_eval_features([_example(), {"question": "Where?"}], tokenizer)


def test_predictions_given_as_answers_are_named(model, tokenizer):
    """evaluate(examples, predict_spans(...)) said "'Answer' object has no attribute 'lower'"."""
    spans = squad.predict_spans(model, tokenizer, [_example()], max_seq_length=64, doc_stride=32, progress=False)
    with pytest.raises(TypeError, match=r"^predictions\['a'\] must be the answer's text, got Answer \(predict\(\) "
                                        r"gives texts; of predict_spans\(\)' answers, give each one's \.text\)$"):
        squad.evaluate([_example()], spans)
    assert squad.evaluate([_example()], {qid: a.text for qid, a in spans.items()})["f1"] >= 0


def test_a_directory_given_where_a_model_goes_and_a_model_where_a_directory_goes_are_named(model, tmp_path):
    """pack("/dir") said "model_type None is not supported"; export_checkpoint(model, out) stopped in "File name
    too long" (the model's printout taken for a path)."""
    from pruning.export import export_checkpoint
    from pruning.packing import pack

    with pytest.raises(TypeError, match=r"^pack\(\) takes a model \(pruning\.checkpoint\.load_model\(directory\) "
                                        r"loads one\), got str$"):
        pack(str(tmp_path))
    with pytest.raises(TypeError, match=r"^model_dir must be a model directory's path \(export_model\(\) exports a "
                                        r"model object\), got BertForQuestionAnswering$"):
        export_checkpoint(model, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_a_loaded_space_given_to_run_sweep_is_named():
    from workflows.space import load_space
    from workflows.sweep import run_sweep

    space = load_space(ROOT / "tune_spaces" / "smoke.yaml")
    with pytest.raises(TypeError, match=r"^space_path must be the path of a search-space YAML file, got SweepSpace$"):
        run_sweep(space)
