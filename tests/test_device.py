"""Device discipline on a machine without a GPU: every mask follows ``model.to(...)``, and batches go to a GPU as a
DataLoader with ``pin_memory`` hands them over.

The models are moved to the ``meta`` device, which refuses to mix with CPU tensors as CUDA does: a mask, cut-off or
structure tensor left on the CPU fails a forward or backward pass here as it would on a GPU worker. Every pruning
mode is covered, with and without the filled phase, and so are a reloaded filled checkpoint and its packed model.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import BertConfig, BertForQuestionAnswering

from conftest import StandInGpu
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


# --- batches on their way to a GPU ----------------------------------------------------------------------------

CUDA = torch.device("cuda")


class CudaStandIn(StandInGpu):
    """Code written for a CUDA device, run where there is none: the CPU stands in for the GPU (a copy to ``cuda``
    leaves the tensor where it is) and every copy to ``cuda`` is recorded with whether its source is pinned and
    whether it waits. Pinned memory needs a GPU, so an allocation asked to be pinned is made in ordinary memory and
    remembered as pinned."""

    def __init__(self) -> None:
        super().__init__()
        self.pinned: list[torch.Tensor] = []  # kept alive, so that no other tensor takes one's identity
        self.copies: list[tuple[bool, bool]] = []  # (from pinned memory, non_blocking) of each copy to cuda

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if kwargs.get("pin_memory"):
            out = func(*args, **{**kwargs, "pin_memory": False})
            self.pinned.append(out)
            return out
        if name == "pin_memory":
            out = args[0].clone()
            self.pinned.append(out)
            return out
        if name in ("to", "cuda") and isinstance(args[0], torch.Tensor):
            targets = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
            if name == "cuda" or (targets and torch.device(targets[0]).type == "cuda"):
                source = args[0]
                self.copies.append((any(source is p for p in self.pinned), bool(kwargs.get("non_blocking"))))
                return source
        return func(*args, **kwargs)


def host_windows(n: int = 10, width: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(4, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return dict(input_ids=torch.randint(1, 100, (n, width), generator=g) * mask, attention_mask=mask,
                token_type_ids=torch.zeros(n, width, dtype=torch.long),
                start_positions=torch.randint(0, 4, (n,), generator=g),
                end_positions=torch.randint(4, 8, (n,), generator=g))


def test_a_training_batch_goes_to_a_gpu_through_pinned_memory_without_waiting():
    """As a DataLoader with pin_memory would: the trainer's and the Fisher passes' batches (squad.window_batch) go to
    a CUDA device from page-locked memory with non_blocking copies, with the values they have on the CPU."""
    from pruning.squad import window_batch

    features = host_windows()
    index = torch.tensor([3, 7, 1])
    with CudaStandIn() as gpu:
        batch = window_batch(features, index, CUDA)
    assert gpu.copies == [(True, True)] * len(features)
    expected = window_batch(features, index, "cpu")
    assert batch.keys() == expected.keys() and all(torch.equal(batch[k], expected[k]) for k in batch)


@pytest.mark.parametrize("hidden", [False, True])
def test_cached_teacher_outputs_go_to_a_gpu_through_pinned_memory_without_waiting(hidden):
    """The teacher cache keeps its logits (and hidden states) on the host; a step's share of them, and the windows
    the teacher runs on, go to the GPU from page-locked memory with non_blocking copies."""
    from pruning.teacher_cache import TeacherCache

    features = host_windows()
    teacher = tiny_model(seed=1)  # on the CPU, standing in for the GPU
    index, width = torch.tensor([4, 0, 9]), 12
    with CudaStandIn() as gpu:
        out = TeacherCache(teacher, features, CUDA, batch_size=2, hidden=hidden)(index, width)
    # Two chunks of the three windows' inputs, then the start and end logits and the hidden states.
    assert gpu.copies and all(copy == (True, True) for copy in gpu.copies)
    assert len(gpu.copies) == 2 * 3 + 2 + int(hidden)
    expected = TeacherCache(teacher, features, torch.device("cpu"), batch_size=2, hidden=hidden)(index, width)
    assert torch.equal(out.start_logits, expected.start_logits) and torch.equal(out.end_logits, expected.end_logits)
    assert (out.hidden_states is None) == (not hidden)
    if hidden:
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, expected.hidden_states))


def test_evaluation_batches_go_to_a_gpu_through_pinned_memory_without_waiting():
    """The evaluation's windows (squad.compute_logits) and those of answer() go the same way."""
    import numpy as np

    from pruning.inference import torch_runner
    from pruning.squad import EvalFeatures, compute_logits, length_sorted_batches

    windows = host_windows(n=7)
    features = EvalFeatures(windows["input_ids"], windows["attention_mask"], windows["token_type_ids"],
                            np.arange(7), [str(i) for i in range(7)], np.zeros((7, 16, 2), dtype=np.int32))
    model = tiny_model()
    with CudaStandIn() as gpu:
        start, end = compute_logits(model, features, batch_size=3, device=CUDA, progress=False)
    batches = length_sorted_batches(features.attention_mask.sum(dim=1).numpy(), 3)
    assert gpu.copies == [(True, True)] * 3 * len(batches)  # the three inputs of every batch
    expected = compute_logits(model, features, batch_size=3, device="cpu", progress=False)
    assert np.array_equal(start, expected[0]) and np.array_equal(end, expected[1])
    # The runner of answer() and the served PyTorch model the same way.
    inputs = {k: windows[k][:2] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with CudaStandIn() as gpu:
        start, end = torch_runner(model, CUDA)(inputs)
    assert gpu.copies == [(True, True)] * 3
    assert np.array_equal(start, torch_runner(model, "cpu")(inputs)[0])


def test_batches_to_the_cpu_or_meta_are_not_pinned():
    """Pinning needs a GPU (here it would fail): a batch for the CPU is the host's own tensors, one for another
    device a plain copy."""
    from pruning.squad import window_batch

    features = host_windows()
    index = torch.tensor([3, 7, 1])
    on_cpu = window_batch(features, index, torch.device("cpu"))
    assert torch.equal(on_cpu["input_ids"], features["input_ids"][index, :on_cpu["input_ids"].shape[1]])
    assert all(t.device == META for t in window_batch(features, index, META).values())
