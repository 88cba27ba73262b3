"""Dense versus packed latency for packed shapes recorded in a results file, measured one model pair at a time.

Latency depends on the shapes of the matrices only, not on their values, so the packed shapes recorded by
``bench/gpu_reference.py`` (heads kept and FFN width per layer) are rebuilt from a randomly initialised dense
model of the same configuration: the heads and FFN dimensions to drop are zeroed and the model is packed with
``pruning.packing.pack``. Pairs are timed interleaved, with nothing else running on the device.

    python bench/gpu_latency.py --results $OUT/gpu_reference.json --config .carry/minilm/config.json \
        --out $OUT/gpu_latency.json
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
from pruning.trainer import check_device  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from script_input import (InputError, check_output, one_line_errors, read_json, require,  # noqa: E402
                          write_text)


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


def read_students(path: str, config: BertConfig) -> list[dict]:
    """The students of a ``gpu_reference.json`` whose packed shapes fit ``config``, or an :class:`InputError`."""
    results = read_json(path, "--results")
    require(results, {"students": list}, f"--results {path}")
    for i, student in enumerate(results["students"]):
        where = f"--results {path}: students[{i}]"
        require(student, {"index": int, "linear_density": (int, float), "heads_kept_per_layer": list,
                          "ffn_kept_per_layer": list}, where)
        for field, most in (("heads_kept_per_layer", config.num_attention_heads),
                            ("ffn_kept_per_layer", config.intermediate_size)):
            counts = student[field]
            if len(counts) != config.num_hidden_layers or not all(
                    isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= most for c in counts):
                raise InputError(f"{where}: {field} must hold {config.num_hidden_layers} counts from 0 to {most} "
                                 f"(the --config model's), got {counts}")
    return results["students"]


def read_config(path: str) -> BertConfig:
    """The dense model's configuration (a config.json, or a directory holding one), or an :class:`InputError`."""
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    require(read_json(file, "--config"), {"hidden_size": int, "num_hidden_layers": int,
                                           "num_attention_heads": int, "intermediate_size": int}, f"--config {file}")
    return BertConfig.from_json_file(str(file))


@one_line_errors("gpu_latency")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True)
    parser.add_argument("--config", required=True, help="config.json of the dense model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.seq_len < 1 or args.repeats < 1:
        parser.error("--batch-size, --seq-len and --repeats must be >= 1")
    check_device(args.device, "--device")
    check_output(args.out, "--out")
    config = read_config(args.config)
    if args.seq_len > config.max_position_embeddings:
        raise InputError(f"--seq-len {args.seq_len}: the --config model has {config.max_position_embeddings} "
                         "positions")
    students = read_students(args.results, config)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    torch.manual_seed(0)
    dense = BertForQuestionAnswering(config).eval()
    rows = []
    for student in students:
        packed = packed_shape(dense, student["heads_kept_per_layer"], student["ffn_kept_per_layer"])
        row = {"index": student["index"], "linear_density": student["linear_density"],
               "flop_limit": flop_ratio(dense, packed, seq_len=args.seq_len)}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if name == "bf16" and device.type != "cuda":
                continue
            a = dense.to(device=device, dtype=dtype)
            b = packed.to(device=device, dtype=dtype)
            timing = compare_latency(a, b, batch_size=args.batch_size, seq_len=args.seq_len, repeats=args.repeats,
                                     warmup=5)
            row[name] = {"dense_ms": timing["median_a_s"] * 1e3, "packed_ms": timing["median_b_s"] * 1e3,
                         "speedup": timing["ratio"]}
        dense.to(device="cpu", dtype=torch.float32)
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write_text(args.out, json.dumps({"device": name, "batch_size": args.batch_size, "seq_len": args.seq_len,
                                     "students": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
