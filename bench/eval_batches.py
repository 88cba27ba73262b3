"""Evaluation's batches: windows in the file's order against windows batched by length, side by side.

Each batch runs only up to its longest window (the rest of the 384 positions are padding). In the file's order a
batch holds windows of every length; :func:`pruning.squad.length_sorted_batches` (what evaluation and serving use)
groups windows of similar length. Two figures, on the same windows:

1. the positions each way computes, over every window of the questions (default: all of SQuAD dev), against the
   real tokens: exact counts, no timing;
2. the wall time of the shipped MiniLM evaluating ``--questions`` of them (spread evenly over the file) each way,
   interleaved ``--repeats`` times (medians), on ``--threads`` threads; the answers of the two ways are compared.

    python bench/eval_batches.py                   # all of dev for the counts, 200 questions timed
    python bench/eval_batches.py --questions 50 --repeats 1 --limit 500

Last line: ``eval_batches file_order/length_sorted = X.XX`` (the ratio of the timed medians).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from pruning.squad import (HostLogits, compute_logits, length_sorted_batches, load_squad, postprocess_predictions,
                           prepare_eval_features, to_device)
from pruning.tokenizer import load_tokenizer
from pruning.checkpoint import load_model
from pruning.resources import resolve_data, shipped_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_input import one_line_errors  # noqa: E402

logger = logging.getLogger("eval_batches")

MODEL_POSITIONS = 512  # the shipped MiniLM's position embeddings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="dev", help="SQuAD JSON, or 'dev'/'train' for the shipped files")
    parser.add_argument("--limit", type=int, help="count the windows of the first N questions (default: all)")
    parser.add_argument("--questions", type=int, default=200, help="questions whose evaluation is timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations each way, interleaved")
    parser.add_argument("--batch-size", type=int, default=64, help="windows a batch (evaluation's default)")
    parser.add_argument("--seq-len", type=int, default=384, help="tokens a window")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    args = parser.parse_args(argv)
    for flag in ("limit", "questions", "repeats", "batch_size", "seq_len", "threads"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.seq_len > MODEL_POSITIONS:
        parser.error(f"--seq-len {args.seq_len}: the shipped model has {MODEL_POSITIONS} positions")
    return args


def in_file_order(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The windows batched as they come: what evaluation did before it batched by length."""
    return [np.arange(first, min(first + batch_size, len(lengths))) for first in range(0, len(lengths), batch_size)]


def computed_positions(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    return int(sum(len(rows) * lengths[rows].max() for rows in batches))


def logits_in_order(model: torch.nn.Module, features, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation's logits with the windows batched in the file's order."""
    logits = HostLogits(len(features), features.input_ids.shape[1])
    lengths = features.attention_mask.sum(dim=1).numpy()
    with torch.inference_mode():
        for rows in in_file_order(lengths, batch_size):
            used = int(lengths[rows].max())
            batch = features.model_inputs(torch.from_numpy(rows))
            out = model(**{k: to_device(v[:, :used], "cpu") for k, v in batch.items()})
            logits.add(rows, out.start_logits, out.end_logits)
    return logits.arrays()


@one_line_errors("eval_batches")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    examples = load_squad(resolve_data(args.data), limit=args.limit)
    tokenizer = load_tokenizer(str(shipped_model_dir()))
    stride = min(128, args.seq_len // 2)
    features = prepare_eval_features(examples, tokenizer, max_seq_length=args.seq_len, doc_stride=stride,
                                     progress=False)
    lengths = features.attention_mask.sum(dim=1).numpy()
    real = int(lengths.sum())
    for name, batches in (("file order", in_file_order(lengths, args.batch_size)),
                          ("length sorted", length_sorted_batches(lengths, args.batch_size))):
        positions = computed_positions(lengths, batches)
        print(f"{name:14s} {len(batches):5d} batches  {positions:11,d} positions  {positions / real:.2f} x the "
              f"{real:,d} real tokens of {len(features):,d} windows ({len(examples):,d} questions, batch "
              f"{args.batch_size}, {args.seq_len} tokens)")

    timed = examples[::max(1, len(examples) // args.questions)][:args.questions]  # spread over the file
    timed_features = prepare_eval_features(timed, tokenizer, max_seq_length=args.seq_len, doc_stride=stride,
                                           progress=False)
    torch.manual_seed(0)  # the shipped encoder gets a fresh QA head (the same in both ways): timing needs no other
    model = load_model(shipped_model_dir()).eval()
    ways = {"file order": lambda: logits_in_order(model, timed_features, args.batch_size),
            "length sorted": lambda: compute_logits(model, timed_features, args.batch_size, progress=False)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    answers = {}
    for _ in range(args.repeats):
        for name, run in ways.items():
            started = time.perf_counter()
            start, end = run()
            seconds[name].append(time.perf_counter() - started)
            answers[name] = {k: a.text for k, a in postprocess_predictions(timed, timed_features, start, end).items()}
    same = sum(answers["file order"][k] == answers["length sorted"][k] for k in answers["file order"])
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, median in medians.items():
        print(f"{name:14s} {median:8.2f} s median of {args.repeats} ({len(timed)} questions, "
              f"{len(timed_features)} windows, {args.threads} thread(s))")
    timed_lengths = timed_features.attention_mask.sum(dim=1).numpy()
    for name, batches in (("file order", in_file_order(timed_lengths, args.batch_size)),
                          ("length sorted", length_sorted_batches(timed_lengths, args.batch_size))):
        print(f"{name:14s} timed: {computed_positions(timed_lengths, batches) / timed_lengths.sum():.2f} x the real "
              f"tokens")
    print(f"same answer for {same} of {len(timed)} questions")
    print(f"eval_batches file_order/length_sorted = {medians['file order'] / medians['length sorted']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
