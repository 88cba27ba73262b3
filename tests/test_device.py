"""Device discipline on a machine without a GPU: every mask follows ``model.to(...)``.

The models are moved to the ``meta`` device, which refuses to mix with CPU tensors as CUDA does: a mask, cut-off or
structure tensor left on the CPU fails a forward or backward pass here as it would on a GPU worker. Every pruning
mode is covered, with and without the filled phase, and so are a reloaded filled checkpoint and its packed model.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import BertConfig, BertForQuestionAnswering

from pruning import masks
from pruning.checkpoint import load_model, save_model
from pruning.config import RunConfig
from pruning.packing import pack
from pruning.trainer import enter_fill_phase, training_loss

META = torch.device("meta")
TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# (method, global topk, density or threshold)
MODES = [("topk", False, 0.5), ("topk", True, 0.4), ("sigmoid_threshold", False, 0.5)]


def tiny_model(seed: int = 0) -> BertForQuestionAnswering:
    torch.manual_seed(seed)
    return BertForQuestionAnswering(BertConfig(**TINY)).eval()


def masked_model(method: str, global_topk: bool, value: float) -> BertForQuestionAnswering:
    model = tiny_model()
    masks.apply_masks_(model, method, (16, 16))
    with torch.no_grad():
        for score in masks.mask_score_parameters(model):
            score.copy_(torch.randn_like(score))
    masks.set_threshold(model, value, global_topk=global_topk)
    return model


def meta_batch(batch: int = 2, seq: int = 12) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    values = dict(input_ids=torch.randint(0, 100, (batch, seq), generator=g),
                  token_type_ids=torch.zeros(batch, seq, dtype=torch.long),
                  start_positions=torch.tensor([1, 3]), end_positions=torch.tensor([2, 5]))
    out: dict[str, torch.Tensor | None] = {k: v.to(META) for k, v in values.items()}
    # transformers reads an attention mask's values to decide whether it can be skipped, which a meta tensor
    # cannot give; windows without padding need no mask.
    out["attention_mask"] = None
    return out


def forward_backward_on_meta(model: torch.nn.Module, method: str, teacher: torch.nn.Module | None = None) -> None:
    """One training step's loss (distillation and score penalty included) and its backward pass, on ``meta``."""
    model.to(META).train()
    if teacher is not None:
        teacher.to(META)
    cfg = RunConfig(method=method if method != "dense" else "dense", model_config=TINY)
    loss = training_loss(model, meta_batch(), cfg, teacher, lambda_attention=1.0, lambda_ffn=1.0)[0]
    assert loss.device == META
    loss.backward()
    for name, param in model.named_parameters():
        assert param.device == META, name
        if param.grad is not None:
            assert param.grad.device == META, name
    for name, buffer in model.named_buffers():
        assert buffer.device == META, name


@pytest.mark.parametrize("method,global_topk,value", MODES)
def test_pruning_modes_run_on_another_device(method, global_topk, value):
    model = masked_model(method, global_topk, value)
    model.to(META)
    # The schedule moves the threshold every step on the training device; global topk finds its cut-off there.
    masks.set_threshold(model, value, global_topk=global_topk)
    forward_backward_on_meta(model, method, teacher=tiny_model(seed=1))
    assert all(s.grad is not None for s in masks.mask_score_parameters(model))


class HostToDevice(TorchFunctionMode):
    """Records the tensors made from host values on another device, and the copies from the CPU to it: on a GPU
    each one waits for the work queued before it (reads back to the host fail on ``meta`` by themselves)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        device = kwargs.get("device")
        if name in ("tensor", "as_tensor") and device is not None and torch.device(device).type != "cpu":
            self.copies.append(f"torch.{name}(..., device={device})")
        out = func(*args, **kwargs)
        if name in ("to", "copy_") and args and isinstance(out, torch.Tensor):
            source = args[1] if name == "copy_" else args[0]
            if isinstance(source, torch.Tensor) and source.device.type == "cpu" and out.device.type != "cpu":
                self.copies.append(f"Tensor.{name} from the CPU")
        return out


@pytest.mark.parametrize("method,global_topk,value", MODES)
def test_a_pruning_step_copies_nothing_from_the_host_to_the_device(method, global_topk, value):
    """Setting the schedule's threshold (global topk's cut-off too), the loss and its backward pass of a step run
    on the training device from its batch alone."""
    model = masked_model(method, global_topk, value).to(META)
    teacher = tiny_model(seed=1).to(META)
    batch = meta_batch()
    cfg = RunConfig(method=method, model_config=TINY, teacher="teacher", alpha_hidden=1.0)
    with HostToDevice() as watch:
        masks.set_threshold(model, value * 0.9, global_topk=global_topk)
        loss = training_loss(model.train(), batch, cfg, teacher, lambda_attention=1.0, lambda_ffn=1.0)[0]
        loss.backward()
    assert watch.copies == []


@pytest.mark.parametrize("method,global_topk,value", MODES)
def test_filled_phase_checkpoint_and_packed_model_run_on_another_device(method, global_topk, value, tmp_path):
    model = masked_model(method, global_topk, value)
    enter_fill_phase(model)
    save_model(model, None, tmp_path / "filled")
    forward_backward_on_meta(model, method, teacher=tiny_model(seed=1))

    reloaded = load_model(tmp_path / "filled")  # the filled structure is rebuilt from the scores
    assert all(m.mode == "fixed" for _, m in masks.masked_modules(reloaded))
    packed = pack(reloaded)
    forward_backward_on_meta(reloaded, method)
    forward_backward_on_meta(packed, "dense")


def test_the_weight_average_stays_on_the_training_device():
    from pruning.averaging import WeightAverage

    model = masked_model("topk", False, 0.5)
    enter_fill_phase(model)
    model.to(META)
    average = WeightAverage(model, decay=0.9)
    forward_backward_on_meta(model, "topk")
    average.update(model)
    assert all(t.device == META for t in average.shadow.values())
    with average.applied(model):  # evaluation runs on the averaged weights, in place
        forward_backward_on_meta(model, "topk")
    average.copy_to(model)
    forward_backward_on_meta(model, "topk")


@pytest.mark.parametrize("alpha_hidden", [0.0, 1.0])
def test_a_packed_recovery_step_with_cached_teacher_logits_stays_on_the_training_device(alpha_hidden):
    from pruning.packing import pack_for_training
    from pruning.teacher_cache import HIDDEN_DTYPE, TeacherOutputs

    model = masked_model("topk", False, 0.4)
    enter_fill_phase(model)
    packed = pack_for_training(model).to(META)
    hidden = (tuple(torch.randn(2, 12, TINY["hidden_size"], dtype=HIDDEN_DTYPE).to(META)
                    for _ in range(TINY["num_hidden_layers"])) if alpha_hidden else None)
    logits = TeacherOutputs(torch.randn(2, 12).to(META), torch.randn(2, 12).to(META), hidden)
    cfg = RunConfig(method="fisher", attention_block=(16, 64), model_config=TINY, fill_steps=1, fill_packed=True,
                    teacher="teacher", teacher_cache=True, alpha_hidden=alpha_hidden)
    loss, _, _, hidden_loss, _ = training_loss(packed, meta_batch(), cfg, None, cached_teacher=logits)
    assert loss.device == META and hidden_loss.device == META
    loss.backward()
    assert all(p.grad is not None and p.grad.device == META for p in packed.parameters() if p.requires_grad)
