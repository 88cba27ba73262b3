"""Dense versus packed latency for packed shapes recorded in a results file, measured one model pair at a time.

Latency depends on the shapes of the matrices only, not on their values, so the packed shapes recorded by
``bench/gpu_reference.py`` (heads kept and FFN width per layer) are rebuilt from a randomly initialised dense
model of the same configuration: the heads and FFN dimensions to drop are zeroed and the model is packed with
``pruning.packing.pack``. Pairs are timed interleaved, with nothing else running on the device.

    python bench/gpu_latency.py --results gpu_reference.json --config .carry/minilm/config.json --out latency.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import BertConfig, BertForQuestionAnswering  # noqa: E402

from pruning.bench import compare_latency, flop_ratio  # noqa: E402
from pruning.packing import pack  # noqa: E402


def packed_shape(dense: torch.nn.Module, heads_kept: list[int], ffn_kept: list[int]) -> torch.nn.Module:
    """A packed model with the given number of heads and FFN dimensions per layer (the first ones kept)."""
    model = BertForQuestionAnswering(dense.config)
    model.load_state_dict(dense.state_dict())
    head_dim = dense.config.hidden_size // dense.config.num_attention_heads
    with torch.no_grad():
        for layer, heads, width in zip(model.bert.encoder.layer, heads_kept, ffn_kept):
            value = layer.attention.self.value
            value.weight[heads * head_dim:] = 0
            value.bias[heads * head_dim:] = 0
            first = layer.intermediate.dense
            first.weight[width:] = 0
            first.bias[width:] = 0
    return pack(model).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True)
    parser.add_argument("--config", required=True, help="config.json of the dense model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    results = json.loads(Path(args.results).read_text())
    torch.manual_seed(0)
    dense = BertForQuestionAnswering(BertConfig.from_pretrained(args.config)).eval()
    rows = []
    for student in results["students"]:
        packed = packed_shape(dense, student["heads_kept_per_layer"], student["ffn_kept_per_layer"])
        row = {"index": student["index"], "linear_density": student["linear_density"],
               "flop_limit": flop_ratio(dense, packed, seq_len=args.seq_len)}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if name == "bf16" and args.device == "cpu":
                continue
            a = dense.to(device=args.device, dtype=dtype)
            b = packed.to(device=args.device, dtype=dtype)
            timing = compare_latency(a, b, batch_size=args.batch_size, seq_len=args.seq_len, repeats=args.repeats,
                                     warmup=5)
            row[name] = {"dense_ms": timing["median_a_s"] * 1e3, "packed_ms": timing["median_b_s"] * 1e3,
                         "speedup": timing["ratio"]}
        dense.to(device="cpu", dtype=torch.float32)
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                                          "batch_size": args.batch_size, "seq_len": args.seq_len,
                                          "students": rows}, indent=2))


if __name__ == "__main__":
    main()
