"""Training-step overhead of the masks: masked versus dense, same model, same batch, interleaved.

One step = forward, span loss (+ score regularisation for the masked model), backward, AdamW step. The two models
alternate step by step so that machine noise hits both alike; the ratio of medians is printed. The mask work is
O(weights) against O(tokens x weights) for the matrix products, so the target is <= 1.10.

    python bench/train_overhead.py            # BERT-base shape (random weights) and the shipped MiniLM
    python bench/train_overhead.py --quick    # fewer repeats

Last line: ``train_overhead masked/dense = X.XX`` for the BERT-base shape.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
from transformers import BertConfig, BertForQuestionAnswering

from pruning import masks
from pruning.checkpoint import load_model
from pruning.distill import qa_ce_loss
from pruning.resources import shipped_model_dir

logger = logging.getLogger("train_overhead")


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], masked: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step() -> float:
        started = time.perf_counter()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = qa_ce_loss(out.start_logits, out.end_logits, batch["start"], batch["end"])
        if masked:
            loss = loss + masks.regularization_loss(model, 1.0, 1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return step


def measure(name: str, dense: torch.nn.Module, batch_size: int, seq_len: int, repeats: int, warmup: int,
            method: str) -> float:
    torch.manual_seed(0)
    masked = copy.deepcopy(dense)
    masks.apply_masks_(masked, method, (32, 32))
    masks.set_threshold(masked, 0.5 if method == "topk" else 0.0)
    vocab = dense.config.vocab_size
    batch = {
        "input_ids": torch.randint(0, vocab, (batch_size, seq_len)),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "start": torch.randint(0, seq_len, (batch_size,)),
        "end": torch.randint(0, seq_len, (batch_size,)),
    }
    steps = {"dense": make_step(dense, batch, False), "masked": make_step(masked, batch, True)}
    times: dict[str, list[float]] = {"dense": [], "masked": []}
    for i in range(warmup + repeats):
        for key in ("dense", "masked") if i % 2 == 0 else ("masked", "dense"):
            elapsed = steps[key]()
            if i >= warmup:
                times[key].append(elapsed)
    d, m = statistics.median(times["dense"]), statistics.median(times["masked"])
    print(f"{name:<28} {method:<18} dense {d * 1000:8.1f} ms   masked {m * 1000:8.1f} ms   ratio {m / d:5.3f}")
    return m / d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch_size} x seq {args.seq_len}, {args.repeats} repeats, {torch.get_num_threads()} threads")

    minilm = load_model(shipped_model_dir())
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


if __name__ == "__main__":
    main()
