"""Passes over many batches read their results back from a GPU once, not once a batch.

A read of a device value on the host (``.item()``, ``float()``, ``.cpu()``, ``.numpy()``, boolean-mask indexing,
``nonzero``...) waits until the GPU has run everything queued before it, so the GPU idles while the host prepares
the next batch. Without a GPU the CPU stands in for one (:class:`GpuStandIn`): what is copied to ``cuda``, made
there or computed from the model's weights counts as on the device, and every read of such a value back to the host
by the code under test is recorded. Reads that transformers' own forward pass makes (whether the attention mask
can be skipped) are the model's and are not counted. The values are those the passes compute on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_flatten
from transformers import BertConfig, BertForQuestionAnswering

from conftest import StandInGpu
from pruning import importance as imp
from pruning.inference import run_windows, torch_runner
from pruning.squad import EvalFeatures, NonFiniteLogits, compute_logits, length_sorted_batches, window_batch

CUDA = torch.device("cuda")
TORCH_DIR = str(Path(torch.__file__).parent)
# Reads of a value into the host, and operations whose result's size depends on the values (they wait the same).
READS = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "nonzero", "argwhere",
         "masked_select", "unique", "unique_consecutive", "bincount", "multinomial"}


def _is_cuda(value) -> bool:
    return isinstance(value, (str, torch.device)) and torch.device(value).type == "cuda"


class GpuStandIn(StandInGpu):
    """The CPU standing in for a GPU, recording the reads of device values back to the host.

    A tensor is on the (stand-in) device when it was copied to ``cuda``, made with ``device=cuda``, given as
    ``on_device`` (a model's weights), or computed from such a tensor; a copy to the CPU or a read of its values is
    recorded in ``reads`` (function name and the caller's line), unless transformers' code asked for it.
    """

    def __init__(self, *on_device: torch.Tensor) -> None:
        super().__init__()
        self.kept: list[torch.Tensor] = []  # alive, so that no other tensor takes one's identity
        self.device: set[int] = set()
        self.reads: list[str] = []
        for tensor in on_device:
            self._mark(tensor)

    def _mark(self, tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            self.kept.append(tensor)
            self.device.add(id(tensor))

    def _on_device(self, value) -> bool:
        return isinstance(value, torch.Tensor) and id(value) in self.device

    def _record(self, name: str) -> None:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
            frame = frame.f_back
        where = "?" if frame is None else f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        if frame is not None and "/transformers/" in frame.f_code.co_filename:
            return  # the model's own forward pass
        self.reads.append(f"{name} at {where}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        from_device = any(self._on_device(t) for t in inputs)
        made_there = _is_cuda(kwargs.get("device"))
        if made_there:
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if name == "pin_memory":
            return args[0].clone()
        if name in ("to", "cuda") and isinstance(args[0], torch.Tensor):
            targets = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
            if name == "cuda" or (targets and _is_cuda(targets[0])):
                out = args[0].clone()
                self._mark(out)
                return out
            if from_device and targets and torch.device(targets[0]).type == "cpu":
                self._record(name)
                return func(*args, **kwargs).clone()  # a copy on the host, as from a GPU
        if name == "copy_" and self._on_device(args[1]) and not self._on_device(args[0]):
            self._record("copy_ to the host" + (" (non_blocking)" if kwargs.get("non_blocking") else ""))
        elif name in READS and from_device:
            self._record(name)
            if name == "cpu":
                return func(*args, **kwargs).clone()
        elif name in ("__getitem__", "__setitem__", "index_put_") and any(
                self._on_device(t) and t.dtype == torch.bool for t in inputs[1:]):
            self._record(f"{name} with a boolean mask")
        out = func(*args, **kwargs)
        if (from_device or made_there) and name not in READS and name != "copy_":
            for tensor in tree_flatten(out)[0]:
                self._mark(tensor)
        elif name == "copy_" and self._on_device(args[1]):
            pass  # a copy into host memory stays on the host
        elif from_device and name == "copy_":
            self._mark(out)
        return out


def tiny_model(seed: int = 0) -> BertForQuestionAnswering:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForQuestionAnswering(config).eval()


def windows(n: int, width: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 120, (n, width), generator=g) * mask
    start = (torch.rand(n, generator=g) * (lengths - 1)).long()
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), start_positions=start,
                end_positions=torch.minimum(start + 2, lengths - 1))


def weights(*models: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in models for t in (*m.parameters(), *m.buffers())]


# --- Fisher importance ------------------------------------------------------------------------------------------


def fisher_reads(n: int, teacher: bool) -> list[str]:
    model, other = tiny_model(), tiny_model(seed=5)
    with GpuStandIn(*weights(model, other)) as gpu:
        imp.fisher_importance(model, windows(n), torch.arange(n), batch_size=2, labels="sampled",
                              teacher=other if teacher else None, device=CUDA)
    return gpu.reads


@pytest.mark.parametrize("teacher", [False, True])
def test_the_fisher_pass_with_sampled_labels_reads_from_the_gpu_once(teacher):
    """The labels are drawn where the logits are; the sums, and whether every distribution was finite, come back
    at the end of the pass, however many batches it has."""
    few, many = fisher_reads(4, teacher), fisher_reads(12, teacher)
    assert len(few) == len(many) <= 3, many


def test_the_fisher_pass_with_gold_labels_reads_only_its_sums():
    model = tiny_model()
    with GpuStandIn(*weights(model)) as gpu:
        imp.fisher_importance(model, windows(6), torch.arange(6), batch_size=2, device=CUDA)
    assert len(gpu.reads) == 2, gpu.reads


def test_sampled_labels_are_each_windows_own_draws_on_the_host_made_noise():
    """The labels a sampled pass draws are each window's own (its draws made on the host, from the seed and the
    window's index): a pass over batches of 4 has the importance of a gold pass given as spans the draws made for
    each window alone."""
    model, features = tiny_model(), windows(13, seed=4)
    index = torch.randperm(13, generator=torch.Generator().manual_seed(0))[:11]
    sampled = imp.fisher_importance(model, features, index, batch_size=4, labels="sampled", seed=3)
    drawn = {k: v.clone() for k, v in features.items()}
    for window in index.tolist():
        rows = torch.tensor([window])
        batch = window_batch(features, rows)
        with torch.no_grad():
            out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
        draws = imp._window_draws(3, rows, int(batch["attention_mask"].shape[1]))
        for key, logits, noise in (("start_positions", out.start_logits, draws[0]),
                                   ("end_positions", out.end_logits, draws[1])):
            drawn[key][rows] = imp._sampled_positions(logits, batch["attention_mask"], noise)[0]
    gold = imp.fisher_importance(model, drawn, index, batch_size=4, labels="gold")
    assert torch.allclose(sampled.heads, gold.heads, rtol=1e-6) and torch.allclose(sampled.neurons, gold.neurons,
                                                                                    rtol=1e-6, atol=1e-15)
    assert sampled.heads.abs().sum() > 0


def test_the_draws_follow_the_distribution_and_never_pick_padding():
    """The largest p / q over exponential draws q is a draw from p: over 20,000 windows each position is drawn as
    often as its probability says (within four standard deviations), and a padded position never."""
    n, width = 20_000, 6
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0, 9.0]]).expand(n, width)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]]).expand(n, width)
    start, end = imp._window_draws(7, torch.arange(n), width)
    probs = torch.softmax(logits[0, :5], dim=-1)
    for noise in (start, end):
        positions, finite = imp._sampled_positions(logits, mask, noise)
        counts = torch.bincount(positions, minlength=width).double()
        assert counts[5] == 0 and bool(finite)
        sigma = (n * probs * (1 - probs)).sqrt()
        assert torch.all((counts[:5] - n * probs).abs() <= 4 * sigma), (counts, n * probs)
    # The start and end draws of a window are two streams, and each window's are its own.
    assert not torch.equal(start, end) and not torch.equal(start[0], start[1])
    assert torch.equal(imp._window_draws(7, torch.tensor([3]), 4)[0][0], start[3, :4])


def test_a_model_with_non_finite_logits_stops_the_sampled_pass():
    model = tiny_model()
    with torch.no_grad():
        model.qa_outputs.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLogits, match="NaN or infinite start/end logits on a calibration window"):
        imp.fisher_importance(model, windows(4), torch.arange(4), batch_size=2, labels="sampled")


# --- mask tuning and the layer errors ---------------------------------------------------------------------------


def pruned_pair() -> tuple[BertForQuestionAnswering, BertForQuestionAnswering, torch.Tensor, torch.Tensor]:
    """A dense model and a copy with some heads and FFN neurons zeroed."""
    dense, pruned = tiny_model(), tiny_model()
    head_keep = torch.ones(2, 4, dtype=torch.bool)
    head_keep[0, 1] = head_keep[1, 3] = False
    neuron_keep = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) > 0.4
    with torch.no_grad():
        imp.zero_removed_(pruned, head_keep, neuron_keep)
    return dense, pruned, head_keep, neuron_keep


def tuning_reads(n: int, mode: str) -> list[str]:
    dense, pruned, head_keep, neuron_keep = pruned_pair()
    with GpuStandIn(*weights(pruned, dense)) as gpu:
        imp.tune_masks_(pruned, dense, windows(n), torch.arange(n), head_keep, neuron_keep, batch_size=2,
                        device=CUDA, mode=mode)
    return gpu.reads


@pytest.mark.parametrize("mode", ["scales", "weights"])
def test_mask_tuning_reads_from_the_gpu_per_layer_not_per_batch(mode):
    """The normal equations and the squared errors add up on the device and the real tokens of a batch are picked
    by positions found on the host: the host reads the device when it solves a layer's systems, not every batch."""
    few, many = tuning_reads(4, mode), tuning_reads(12, mode)
    assert len(few) == len(many), many


def host_errors(pruned, dense, features, index, dtype: torch.dtype) -> tuple[list[list[float]], int]:
    """Every layer's attention and FFN sum errors between ``pruned`` and ``dense`` (their difference taken in
    ``dtype``, as the pass does), each batch's squared error over its real tokens read to the host as a float and
    added there (as the passes did before), and the tokens."""
    sums: dict[tuple[str, int, str], torch.Tensor] = {}
    hooks = []
    for name, m in (("pruned", pruned), ("dense", dense)):
        for i, layer in enumerate(m.bert.encoder.layer):
            for part, norm in (("att", layer.attention.output.LayerNorm), ("ffn", layer.output.LayerNorm)):
                hooks.append(norm.register_forward_pre_hook(
                    lambda mod, args, key=(name, i, part): sums.__setitem__(key, args[0])))
    errors, tokens = [[0.0, 0.0], [0.0, 0.0]], 0
    with torch.no_grad():
        for rows in imp.length_batches(features, index, 4):
            batch = window_batch(features, rows)
            for m in (pruned, dense):
                m(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
            real = batch["attention_mask"].reshape(-1).bool()
            for i in range(2):
                for j, part in enumerate(("att", "ffn")):
                    a, b = (sums[(name, i, part)].flatten(0, 1)[real] for name in ("pruned", "dense"))
                    errors[i][j] += float((b.to(dtype) - a.to(dtype)).double().pow(2).sum())
            tokens += int(real.sum())
    for hook in hooks:
        hook.remove()
    return errors, tokens


def test_the_tuning_errors_are_the_sums_over_the_batches_of_the_real_tokens():
    """The first layer's error before tuning, summed batch by batch over the real tokens on the host as a float, is
    the one mask tuning reports, to the last bit."""
    dense, pruned, head_keep, neuron_keep = pruned_pair()
    features, index = windows(9, seed=6), torch.arange(9)
    errors, tokens = host_errors(pruned, dense, features, index, torch.float32)
    tuned = imp.tune_masks_(pruned, dense, features, index, head_keep, neuron_keep, batch_size=4)
    assert tuned[0].attention_before == errors[0][0] / (tokens * 32) and errors[0][0] > 0


def layer_error_reads(n: int) -> list[str]:
    dense, pruned, _, _ = pruned_pair()
    with GpuStandIn(*weights(pruned, dense)) as gpu:
        imp.reconstruction_errors(pruned, dense, windows(n), torch.arange(n), batch_size=2, device=CUDA)
    return gpu.reads


def test_the_layer_errors_are_read_from_the_gpu_once():
    few, many = layer_error_reads(4), layer_error_reads(12)
    assert len(few) == len(many) == 1, many


def test_the_layer_errors_are_the_sums_over_the_batches_of_the_real_tokens():
    """Every layer's two errors, summed batch by batch over the real tokens on the host as floats: the same to the
    last bit."""
    dense, pruned, _, _ = pruned_pair()
    features, index = windows(9, seed=6), torch.arange(9)
    errors, tokens = host_errors(pruned, dense, features, index, torch.float64)
    expected = [(a / (tokens * 32), f / (tokens * 32)) for a, f in errors]
    assert imp.reconstruction_errors(pruned, dense, features, index, batch_size=4) == expected
    assert all(a > 0 and f > 0 for a, f in expected)


# --- evaluation -------------------------------------------------------------------------------------------------


def eval_features(n: int, seed: int = 1) -> EvalFeatures:
    w = windows(n, seed=seed)
    return EvalFeatures(w["input_ids"], w["attention_mask"], w["token_type_ids"], np.arange(n),
                        [str(i) for i in range(n)], np.zeros((n, 16, 2), dtype=np.int32))


# The two passes that turn windows into logits: evaluation, and answer()/answer_batch()/the served model (which run
# their windows through run_windows and torch_runner); both gather them in squad.HostLogits.
LOGIT_PASSES = {
    "evaluation": lambda model, features, device=None: compute_logits(
        model, features, batch_size=2, device=device, progress=False),
    "answering": lambda model, features, device=None: run_windows(
        torch_runner(model, device), features, batch_size=2),
}


@pytest.mark.parametrize("name", LOGIT_PASSES)
def test_a_pass_reads_its_logits_from_the_gpu_once(name):
    run = LOGIT_PASSES[name]

    def reads(n: int) -> list[str]:
        model = tiny_model()
        with GpuStandIn(*weights(model)) as gpu:
            run(model, eval_features(n), CUDA)
        return gpu.reads

    few, many = reads(4), reads(12)
    assert len(few) == len(many) == 1, many


def test_the_logits_of_an_evaluation_are_each_batchs_own_padded_to_the_window_width():
    model, features = tiny_model(), eval_features(11, seed=7)
    start, end = compute_logits(model, features, batch_size=4, progress=False)
    assert start.dtype == end.dtype == np.float32 and start.shape == end.shape == (11, 16)
    batches = length_sorted_batches(features.attention_mask.sum(dim=1).numpy(), 4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(11))  # every window once
    with torch.inference_mode():
        for rows in batches:
            batch = features.model_inputs(torch.from_numpy(rows))
            used = int(batch["attention_mask"].sum(dim=1).max())
            out = model(**{k: v[:, :used] for k, v in batch.items()})
            for ours, theirs in ((start, out.start_logits), (end, out.end_logits)):
                expected = np.pad(theirs.float().numpy(), ((0, 0), (0, 16 - used)), constant_values=-1e4)
                assert np.array_equal(ours[rows], expected)
    assert compute_logits(model, eval_features(0), progress=False)[0].shape == (0, 16)


def test_an_evaluation_batches_windows_of_similar_length():
    """Windows in the file's order, batched as they come, are padded to each batch's longest: 1.65 times the real
    tokens for SQuAD's dev windows at a batch of 64. Batched by length, the padding is at most a quarter of the real
    tokens (each window at least 0.8 of its batch's longest), and the logits are each window's own."""
    model, features = tiny_model(), eval_features(64, seed=9)
    lengths = features.attention_mask.sum(dim=1)
    computed = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: computed.append(kwargs["input_ids"].numel()),
                                           with_kwargs=True)
    try:
        start, _ = compute_logits(model, features, batch_size=16, progress=False)
    finally:
        hook.remove()
    in_order = sum(16 * int(lengths[i:i + 16].max()) for i in range(0, 64, 16))
    assert sum(computed) <= 1.25 * int(lengths.sum()) < in_order
    with torch.inference_mode():
        for i in (0, 17, 63):
            alone = model(**{k: v[i:i + 1, :int(lengths[i])] for k, v in features.model_inputs().items()})
            assert torch.allclose(torch.from_numpy(start[i, :int(lengths[i])]), alone.start_logits[0], atol=1e-5)


def test_answering_gives_the_logits_of_a_runner_that_returns_them_on_the_host():
    model, features = tiny_model(), eval_features(11, seed=8)

    def on_host(batch):
        with torch.inference_mode():
            out = model(**batch)
        return out.start_logits.float().numpy(), out.end_logits.float().numpy()

    expected = run_windows(on_host, features, batch_size=3)
    got = run_windows(torch_runner(model), features, batch_size=3)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert (expected[0] == -1e4).any() and (expected[0] != -1e4).any()


@pytest.mark.parametrize("name", LOGIT_PASSES)
def test_a_pass_longer_than_the_logits_kept_on_the_device_copies_them_back_as_they_fill(monkeypatch, name):
    from pruning import squad

    run = LOGIT_PASSES[name]
    model, features = tiny_model(), eval_features(12, seed=9)
    expected = run(model, features)
    monkeypatch.setattr(squad, "_LOGITS_KEPT_ON_DEVICE", 2 * 2 * 16 * 4 * 2)  # two batches' logits
    with GpuStandIn(*weights(model)) as gpu:
        got = run(model, features, CUDA)
    # Evaluation fills it every two batches; answering every 4 or 5 windows, by how the lengths batch.
    assert len(gpu.reads) == 3 if name == "evaluation" else 3 <= len(gpu.reads) <= 6, gpu.reads
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
