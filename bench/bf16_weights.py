"""Served bf16: autocast over fp32 weights against the linear weights stored in bf16 once (``Bf16Inference``).

Both give bitwise the same logits (checked here); the bench times them interleaved on one packed checkpoint at
batch 1 and prints the ratio per sequence length. Last line: ``bf16_weights autocast/stored = X.XX`` (at the
longest length).

Usage:
    python bench/bf16_weights.py --checkpoint runs/ab_04/fisher_recovery_0.4_bf16/final --threads 2
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from pruning.bench import compare_latency, random_inputs
from pruning.checkpoint import load_model
from pruning.packing import is_packed, pack
from pruning.precision import Bf16Inference, autocast
from pruning.structure import max_positions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_input import InputError, one_line_errors  # noqa: E402


@one_line_errors("bf16_weights")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a masked or packed QA checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[384, 128])
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    limit = max_positions(model.config)  # a RoBERTa-family model has fewer than its position embeddings
    too_long = [n for n in args.seq_lens if not 1 <= n <= limit]
    if too_long:
        raise InputError(f"--seq-lens {too_long[0]}: {args.checkpoint} has {limit} positions")
    packed = (model if is_packed(model) else pack(model)).eval()
    stored = Bf16Inference(copy.deepcopy(packed)).eval()
    ratio = float("nan")
    for seq in sorted(args.seq_lens, reverse=True):
        inputs = random_inputs(packed, 1, seq)
        with torch.inference_mode(), autocast("bf16", "cpu"):
            if not torch.equal(packed(**inputs).start_logits, stored(**inputs).start_logits):
                raise SystemExit("bf16_weights: the stored-bf16 model's logits differ from autocast's")
        # Both under bf16 autocast (a no-op around the stored model, which enters it itself), interleaved.
        timing = compare_latency(packed, stored, batch_size=1, seq_len=seq, repeats=args.repeats, warmup=3,
                                 precision="bf16")
        a, b = timing["median_a_s"] * 1e3, timing["median_b_s"] * 1e3
        print(f"seq {seq}: autocast over fp32 weights {a:.1f} ms, bf16 weights stored once {b:.1f} ms, "
              f"ratio {timing['ratio']:.2f}, logits bitwise equal")
        if seq == max(args.seq_lens):
            ratio = timing["ratio"]
    print(f"bf16_weights autocast/stored = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
