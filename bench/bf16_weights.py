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
import statistics
import sys
import time

import torch

from pruning.checkpoint import load_model
from pruning.packing import is_packed, pack
from pruning.precision import Bf16Inference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a masked or packed QA checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[384, 128])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    packed = (model if is_packed(model) else pack(model)).eval()
    stored = Bf16Inference(copy.deepcopy(packed)).eval()

    def autocast_call(inputs):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return packed(**inputs)

    def stored_call(inputs):
        with torch.inference_mode():
            return stored(**inputs)

    ratio = float("nan")
    for seq in sorted(args.seq_lens, reverse=True):
        inputs = dict(input_ids=torch.randint(1000, 2000, (1, seq)),
                      attention_mask=torch.ones(1, seq, dtype=torch.long))
        if not torch.equal(autocast_call(inputs).start_logits, stored_call(inputs).start_logits):
            raise SystemExit("bf16_weights: the stored-bf16 model's logits differ from autocast's")
        times: dict[str, list[float]] = {"autocast": [], "stored": []}
        for _ in range(3):
            autocast_call(inputs), stored_call(inputs)
        for _ in range(args.repeats):
            for name, call in (("autocast", autocast_call), ("stored", stored_call)):
                started = time.perf_counter()
                call(inputs)
                times[name].append(time.perf_counter() - started)
        a, b = (statistics.median(times[k]) * 1e3 for k in ("autocast", "stored"))
        print(f"seq {seq}: autocast over fp32 weights {a:.1f} ms, bf16 weights stored once {b:.1f} ms, "
              f"ratio {a / b:.2f}, logits bitwise equal")
        if seq == max(args.seq_lens):
            ratio = a / b
    print(f"bf16_weights autocast/stored = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
