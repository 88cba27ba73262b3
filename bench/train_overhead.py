"""Training-step overhead of the masks: masked versus dense, same model, same batch, interleaved.

One step = forward, span loss (+ score regularisation for the masked model), backward, AdamW step. The two models
alternate step by step so that machine noise hits both alike; the ratio of medians is printed. The mask work is
O(weights) against O(tokens x weights) for the matrix products, so the target is <= 1.10.

    python bench/train_overhead.py            # BERT-base shape (random weights) and the shipped MiniLM
    python bench/train_overhead.py --quick    # fewer repeats
    python bench/train_overhead.py --precision   # fp32 versus bf16 autocast, dense and masked steps
    python bench/train_overhead.py --recovery 0.5 --batch-size 16 --seq-len 192   # a distilled recovery step
    python bench/train_overhead.py --optimizer --batch-size 16 --seq-len 192      # AdamW: torch's loop vs fused

``--recovery D`` times one distilled recovery step (0.1 CE + 0.9 KL to the dense teacher, AdamW) of MiniLM cut to
linear density ``D`` (whole heads and FFN dimensions, chosen by a seeded random importance, so no checkpoint is
needed) three ways: the masked model with the teacher's forward (the recovery before ``fill_packed``), the packed
model with the teacher's forward (``fill_packed``), and the packed model with the teacher's logits cached
(``fill_packed`` and ``teacher_cache``, once every window has been seen). Each is printed next to its FLOP limit
(``(3F + F) / (3F_s + F)`` and ``(3F + F) / 3F_s``, ``F`` the dense forward, ``F_s`` the packed one).

``--optimizer`` times the same steps with the two AdamW implementations of torch, interleaved: the loop over
parameters (torch's default on CPU) and the fused kernel (what the trainer uses where torch has it,
:func:`pruning.trainer.fused_adamw`): a dense MiniLM step and a recovery step of MiniLM packed to ``--recovery``
(default 0.5) with cached teacher logits, where the optimizer's share of the step is largest.

Last line: ``train_overhead masked/dense = X.XX`` for the BERT-base shape; with ``--precision``,
``train_overhead fp32/bf16 = X.XX`` for the masked BERT-base-shaped step; with ``--recovery``,
``train_overhead recovery masked/packed_cached = X.XX``; with ``--optimizer``,
``train_overhead adamw loop/fused = X.XX`` for the packed recovery step.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForQuestionAnswering

from pruning import importance, masks
from pruning.bench import linear_flops
from pruning.checkpoint import load_model
from pruning.config import RunConfig
from pruning.packing import pack_for_training
from pruning.distill import qa_ce_loss
from pruning.precision import autocast, resolve_precision
from pruning.resources import shipped_model_dir
from pruning.teacher_cache import TeacherOutputs
from pruning.trainer import fused_adamw, training_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_input import one_line_errors  # noqa: E402

logger = logging.getLogger("train_overhead")


def adamw(params: list[torch.nn.Parameter], loop: bool = False) -> torch.optim.AdamW:
    """AdamW as the trainer builds it, or (``loop``) with torch's loop over parameters."""
    if loop:
        return torch.optim.AdamW(params, lr=1e-5, foreach=False)
    return torch.optim.AdamW(params, lr=1e-5, fused=fused_adamw(params))


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], masked: bool, precision: str = "fp32",
              loop: bool = False):
    optimizer = adamw(list(model.parameters()), loop)
    model.train()

    def step() -> float:
        started = time.perf_counter()
        with autocast(precision, "cpu"):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = qa_ce_loss(out.start_logits.float(), out.end_logits.float(), batch["start"], batch["end"])
            if masked:
                loss = loss + masks.regularization_loss(model, 1.0, 1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return step


def random_batch(vocab: int, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, vocab, (batch_size, seq_len)),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "start": torch.randint(0, seq_len, (batch_size,)),
        "end": torch.randint(0, seq_len, (batch_size,)),
    }


def masked_copy(dense: torch.nn.Module, method: str) -> torch.nn.Module:
    masked = copy.deepcopy(dense)
    masks.apply_masks_(masked, method, (32, 32))
    masks.set_threshold(masked, 0.5 if method == "topk" else 0.0)
    return masked


def interleaved(steps: dict[str, object], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each step function, run in alternating order so that machine noise hits all alike."""
    keys = list(steps)
    times: dict[str, list[float]] = {key: [] for key in keys}
    for i in range(warmup + repeats):
        for key in keys if i % 2 == 0 else keys[::-1]:
            elapsed = steps[key]()
            if i >= warmup:
                times[key].append(elapsed)
    return {key: statistics.median(values) for key, values in times.items()}


def measure(name: str, dense: torch.nn.Module, batch_size: int, seq_len: int, repeats: int, warmup: int,
            method: str) -> float:
    torch.manual_seed(0)
    masked = masked_copy(dense, method)
    batch = random_batch(dense.config.vocab_size, batch_size, seq_len)
    medians = interleaved({"dense": make_step(dense, batch, False), "masked": make_step(masked, batch, True)},
                          repeats, warmup)
    d, m = medians["dense"], medians["masked"]
    print(f"{name:<28} {method:<18} dense {d * 1000:8.1f} ms   masked {m * 1000:8.1f} ms   ratio {m / d:5.3f}")
    return m / d


def measure_precision(name: str, dense: torch.nn.Module, batch_size: int, seq_len: int, repeats: int,
                      warmup: int, masked: bool) -> float:
    """fp32 step time / bf16 step time for one model, both steps on identical copies and batches."""
    torch.manual_seed(0)
    model = masked_copy(dense, "sigmoid_threshold") if masked else dense
    batch = random_batch(dense.config.vocab_size, batch_size, seq_len)
    medians = interleaved({"fp32": make_step(model, batch, masked, "fp32"),
                           "bf16": make_step(copy.deepcopy(model), batch, masked, "bf16")}, repeats, warmup)
    f, b = medians["fp32"], medians["bf16"]
    kind = "masked step" if masked else "dense step"
    print(f"{name:<28} {kind:<18} fp32 {f * 1000:8.1f} ms   bf16 {b * 1000:8.1f} ms   fp32/bf16 {f / b:5.3f}")
    return f / b


def cut(dense: torch.nn.Module, density: float, seed: int = 0) -> torch.nn.Module:
    """A masked copy of ``dense`` keeping whole heads and FFN dimensions at linear density ``density``."""
    config = dense.config
    g = torch.Generator().manual_seed(seed)
    costs = importance.structure_costs(config, "density")
    # Random importance per weight, so that heads and FFN dimensions are cut alike.
    heads = torch.rand(config.num_hidden_layers, config.num_attention_heads, generator=g) * costs.head
    neurons = torch.rand(config.num_hidden_layers, config.intermediate_size, generator=g) * costs.neuron
    head_keep, neuron_keep = importance.search_mask(heads, neurons, costs, int(density * costs.total))
    model = copy.deepcopy(dense)
    importance.zero_removed_(model, head_keep, neuron_keep)
    return importance.apply_structure_(model, head_keep, neuron_keep)


def recovery_step(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, torch.Tensor],
                  cached: TeacherOutputs | None, loop: bool = False):
    cfg = RunConfig(teacher="teacher", alpha_ce=0.1, alpha_distil=0.9, temperature=2.0)
    optimizer = adamw([p for p in student.parameters() if p.requires_grad], loop)
    student.train()

    def step() -> float:
        started = time.perf_counter()
        loss = training_loss(student, batch, cfg, teacher, cached_teacher=cached)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return step


def recovery_setup(dense: torch.nn.Module, density: float, batch_size: int, seq_len: int):
    """The frozen teacher, the masked and the packed student at ``density``, a batch and its teacher logits."""
    torch.manual_seed(0)
    teacher = copy.deepcopy(dense).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    masked = cut(dense, density)
    packed = pack_for_training(masked)
    raw = random_batch(dense.config.vocab_size, batch_size, seq_len)
    batch = {"input_ids": raw["input_ids"], "attention_mask": raw["attention_mask"],
             "token_type_ids": torch.zeros_like(raw["input_ids"]), "start_positions": raw["start"],
             "end_positions": raw["end"]}
    with torch.no_grad():
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return teacher, masked, packed, batch, TeacherOutputs(out.start_logits, out.end_logits)


def measure_optimizer(dense: torch.nn.Module, density: float, batch_size: int, seq_len: int, repeats: int,
                      warmup: int) -> float:
    """Step time with torch's loop AdamW / with the fused one: a dense step and a packed, cached recovery step."""
    teacher, _, packed, batch, logits = recovery_setup(dense, density, batch_size, seq_len)
    raw = random_batch(dense.config.vocab_size, batch_size, seq_len)
    ratio = 0.0
    for name, steps in (
            ("MiniLM dense step", {"loop": make_step(copy.deepcopy(dense), raw, False, loop=True),
                                   "fused": make_step(copy.deepcopy(dense), raw, False)}),
            (f"packed {density:g} recovery, cached", {
                "loop": recovery_step(copy.deepcopy(packed), teacher, batch, logits, loop=True),
                "fused": recovery_step(copy.deepcopy(packed), teacher, batch, logits)})):
        medians = interleaved(steps, repeats, warmup)
        ratio = medians["loop"] / medians["fused"]
        print(f"{name:<32} loop AdamW {medians['loop'] * 1000:7.0f} ms   fused {medians['fused'] * 1000:7.0f} ms"
              f"   loop/fused {ratio:5.2f}")
    return ratio


def measure_recovery(dense: torch.nn.Module, density: float, batch_size: int, seq_len: int, repeats: int,
                     warmup: int) -> float:
    """Masked / packed step-time ratios of a distilled recovery step, and their FLOP limits."""
    teacher, masked, packed, batch, logits = recovery_setup(dense, density, batch_size, seq_len)
    medians = interleaved({"masked": recovery_step(masked, teacher, batch, None),
                           "packed": recovery_step(packed, teacher, batch, None),
                           "packed_cached": recovery_step(packed, teacher, batch, logits)}, repeats, warmup)
    f, fs = linear_flops(dense, seq_len), linear_flops(packed, seq_len)
    limits = {"packed": (4 * f) / (3 * fs + f), "packed_cached": (4 * f) / (3 * fs)}
    m = medians["masked"]
    print(f"MiniLM cut to {density:g} (packed FLOPs {fs / f:.3f} of dense): masked step {m * 1000:.0f} ms")
    for key in ("packed", "packed_cached"):
        print(f"  {key:<14} {medians[key] * 1000:8.0f} ms   masked/{key} {m / medians[key]:5.2f}   "
              f"FLOP limit {limits[key]:5.2f}")
    return m / medians["packed_cached"]


@one_line_errors("train_overhead")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--recovery", type=float, default=None, metavar="DENSITY",
                        help="time distilled recovery steps of MiniLM cut to this linear density: masked, packed, "
                             "packed with cached teacher logits")
    parser.add_argument("--optimizer", action="store_true",
                        help="compare torch's loop AdamW with the fused one (dense and packed recovery steps)")
    parser.add_argument("--precision", action="store_true",
                        help="compare fp32 and bf16 autocast steps instead of dense and masked ones")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.seq_len < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch-size, --seq-len and --repeats must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.seq_len > BertConfig().max_position_embeddings:
        parser.error(f"--seq-len {args.seq_len}: the models have {BertConfig().max_position_embeddings} positions")
    if args.recovery is not None and not 0 < args.recovery < 1:
        parser.error(f"--recovery {args.recovery}: a linear density between 0 and 1")
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch_size} x seq {args.seq_len}, {args.repeats} repeats, {torch.get_num_threads()} threads")

    minilm = load_model(shipped_model_dir())
    if args.optimizer:
        density = 0.5 if args.recovery is None else args.recovery
        ratio = measure_optimizer(minilm, density, args.batch_size, args.seq_len, args.repeats, args.warmup)
        print(f"train_overhead adamw loop/fused = {ratio:.2f}")
        return 0
    if args.recovery is not None:
        ratio = measure_recovery(minilm, args.recovery, args.batch_size, args.seq_len, args.repeats, args.warmup)
        print(f"train_overhead recovery masked/packed_cached = {ratio:.2f}")
        return 0
    if args.precision:
        resolve_precision("bf16", "cpu")  # one clear line on a CPU without bf16 matrix instructions
        torch.manual_seed(0)
        base = BertForQuestionAnswering(BertConfig())
        for name, model in (("MiniLM (shipped)", minilm), ("BERT-base shape (random)", base)):
            for masked in (False, True):
                ratio = measure_precision(name, model, args.batch_size, args.seq_len, args.repeats, args.warmup,
                                          masked)
        print(f"train_overhead fp32/bf16 = {ratio:.2f}")
        return 0
    for method in ("sigmoid_threshold", "topk"):
        measure("MiniLM (shipped)", copy.deepcopy(minilm), args.batch_size, args.seq_len, args.repeats,
                args.warmup, method)
    torch.manual_seed(0)
    base = BertForQuestionAnswering(BertConfig()).eval()
    measure("BERT-base shape (random)", copy.deepcopy(base), args.batch_size, args.seq_len, args.repeats,
            args.warmup, "topk")
    ratio = measure("BERT-base shape (random)", base, args.batch_size, args.seq_len, args.repeats, args.warmup,
                    "sigmoid_threshold")
    print(f"train_overhead masked/dense = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
