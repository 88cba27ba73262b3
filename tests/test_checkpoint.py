"""Model directories whose weights are not the ones their config describes are refused in one line naming the file,
never loaded with random tensors in their place."""

import shutil

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertModel

from pruning import masks
from pruning.checkpoint import CheckpointError, load_model, save_model


def tiny(layers=2, intermediate=128, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=intermediate, max_position_embeddings=64)
    return BertForQuestionAnswering(config).eval()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("other, says", [
    (dict(layers=1), r"missing: bert\.encoder\.layer\.1\."),
    (dict(layers=3), r"unexpected: bert\.encoder\.layer\.2\."),
    (dict(intermediate=256), r"bert\.encoder\.layer\.0\.intermediate\.dense\.bias has shape \(256,\), the config "
                             r"gives \(128,\)"),
])
def test_weights_of_another_shape_than_the_config_are_refused(tmp_path, masked, other, says):
    """A config.json copied from (or a model.safetensors written by) another model."""
    model, stranger = tiny(), tiny(**other)
    if masked:
        for m in (model, stranger):
            masks.apply_masks_(m, "sigmoid_threshold", (32, 32))
    save_model(model, None, tmp_path / "model")
    save_model(stranger, None, tmp_path / "stranger")
    shutil.copy(tmp_path / "model" / "config.json", tmp_path / "stranger" / "config.json")
    weights = tmp_path / "stranger" / "model.safetensors"
    for qa_head in (False, True):
        with pytest.raises(CheckpointError, match=rf"^{weights}: weights do not match the config \(.*{says}") as err:
            load_model(tmp_path / "stranger", qa_head=qa_head)
        assert "\n" not in str(err.value)


def test_a_pre_trained_encoder_still_loads_with_a_fresh_qa_head(tmp_path):
    """Its missing QA head and its pooler (which the QA model has not) are what such a checkpoint is."""
    encoder = BertModel(tiny().config)  # with a pooler
    encoder.save_pretrained(tmp_path / "encoder")
    model = load_model(tmp_path / "encoder")
    assert torch.equal(model.bert.encoder.layer[1].output.dense.weight, encoder.encoder.layer[1].output.dense.weight)
    with pytest.raises(CheckpointError, match="not a question-answering model"):
        load_model(tmp_path / "encoder", qa_head=True)
    dense = tiny()
    save_model(dense, None, tmp_path / "dense")
    assert torch.equal(load_model(tmp_path / "dense", qa_head=True).qa_outputs.weight, dense.qa_outputs.weight)
