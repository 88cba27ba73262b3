"""How much faster is a packed model than its dense original on CPU?

BERT-base shape (random weights, BertConfig defaults) with the reference pattern of hybrid fine-pruning - 96 of
144 heads kept and the FFN cut so that 36% of the encoder's linear weights remain - plus a few other densities,
and the shipped MiniLM at its own densities. Each pruned model is made by zeroing whole heads and FFN dimensions of
a dense copy and packing it with :func:`pruning.packing.pack`; dense and packed models are then timed interleaved
on the same random input (batch 1 and batch 8, sequence 384) and compared with the encoder's FLOP ratio, the
speed-up limit.

The last line of the output is ``pack_speedup dense/packed = X.XX (flop limit Y.YY)`` for the reference pattern at
batch 1.

Usage:
    python bench/pack_speed.py                 # the full table, about 4 minutes on 2 cores
    python bench/pack_speed.py --quick         # reference pattern and one MiniLM pattern, batch 1 only
    python bench/pack_speed.py --json out.json --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers import BertConfig, BertForQuestionAnswering

from pruning.bench import compare_latency, flop_ratio, random_inputs
from pruning.packing import max_logit_diff, pack
from pruning.resources import ResourceError, shipped_model_dir
from pruning.sparsity import sparsity_report
from pruning.structure import architecture_for, encoder_layers, get_module

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from script_input import check_output, one_line_errors, write_text  # noqa: E402

logger = logging.getLogger("pack_speed")

REFERENCE = "bert-base 96/144 heads, 36%"


@dataclass(frozen=True)
class Pattern:
    """Heads kept in each layer (by count) and the share of the encoder's linear weights that remains."""

    name: str
    heads_per_layer: tuple[int, ...]
    density: float


@dataclass
class Row:
    model: str
    pattern: str
    heads_kept: int
    heads_total: int
    ffn_width: int
    linear_density: float
    params_dense_m: float
    params_packed_m: float
    max_logit_diff: float
    batch_size: int
    dense_ms: float
    packed_ms: float
    speedup: float
    flop_limit: float

    @property
    def of_limit(self) -> float:
        return self.speedup / self.flop_limit


def ffn_width_for(config: BertConfig, heads_per_layer: tuple[int, ...], density: float) -> int:
    """The FFN width (same in every layer) at which ``density`` of the linear weights remain.

    Kept heads are dense: each costs four ``hidden x head_dim`` blocks (query, key, value rows, output columns);
    each FFN dimension costs one row and one column of ``hidden``.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = hidden // config.num_attention_heads
    total = layers * (4 * hidden * hidden + 2 * hidden * config.intermediate_size)
    attention = sum(4 * hidden * head_dim * h for h in heads_per_layer)
    width = round((density * total - attention) / (2 * hidden * layers))
    if not 0 <= width <= config.intermediate_size:
        raise ValueError(f"density {density} is out of reach with heads {heads_per_layer} (FFN width {width})")
    return width


@torch.no_grad()
def zero_structure_(model: torch.nn.Module, heads_per_layer: tuple[int, ...], ffn_width: int, seed: int) -> None:
    """Zero randomly chosen whole heads and FFN dimensions, leaving the given counts untouched, in place."""
    arch = architecture_for(model)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(seed)
    for layer, keep in zip(encoder_layers(model), heads_per_layer, strict=True):
        dropped = torch.randperm(config.num_attention_heads, generator=generator)[keep:]
        rows = (dropped[:, None] * head_dim + torch.arange(head_dim)).flatten()
        for path in arch.qkv:
            linear = get_module(layer, path)
            linear.weight[rows] = 0
            linear.bias[rows] = 0
        get_module(layer, arch.attention_output).weight[:, rows] = 0
        dims = torch.randperm(config.intermediate_size, generator=generator)[ffn_width:]
        first = get_module(layer, arch.ffn_in)
        first.weight[dims] = 0
        first.bias[dims] = 0
        get_module(layer, arch.ffn_out).weight[:, dims] = 0


def bench_pattern(label: str, dense: torch.nn.Module, pattern: Pattern, batch_sizes: list[int], seq_len: int,
                  repeats: dict[int, int], warmup: int, seed: int) -> list[Row]:
    width = ffn_width_for(dense.config, pattern.heads_per_layer, pattern.density)
    zeroed = copy.deepcopy(dense)
    zero_structure_(zeroed, pattern.heads_per_layer, width, seed)
    started = time.perf_counter()
    packed = pack(zeroed)
    logger.info("%s / %s: packed in %.1f s", label, pattern.name, time.perf_counter() - started)
    report = sparsity_report(zeroed)
    check = random_inputs(dense, 2, min(seq_len, 128), seed=seed + 1)
    diff = max_logit_diff(zeroed, packed, check)
    del zeroed
    limit = flop_ratio(dense, packed, seq_len)
    params_dense = sum(p.numel() for p in dense.parameters()) / 1e6
    params_packed = sum(p.numel() for p in packed.parameters()) / 1e6
    rows = []
    for batch in batch_sizes:
        result = compare_latency(dense, packed, batch, seq_len, repeats=repeats[batch], warmup=warmup, seed=seed)
        rows.append(Row(label, pattern.name, report.heads_total - report.heads_removed, report.heads_total, width,
                        report.linear_density, params_dense, params_packed, diff, batch,
                        1e3 * result["median_a_s"], 1e3 * result["median_b_s"], result["ratio"], limit))
        logger.info("%s / %s / batch %d: %.1f ms -> %.1f ms, x%.2f (limit %.2f)", label, pattern.name, batch,
                    rows[-1].dense_ms, rows[-1].packed_ms, rows[-1].speedup, limit)
    return rows


def bert_base_patterns(quick: bool) -> list[Pattern]:
    layers = BertConfig().num_hidden_layers
    patterns = [Pattern(REFERENCE, (8,) * layers, 0.36)]
    if not quick:
        patterns += [
            Pattern("bert-base 144/144 heads, 60%", (12,) * layers, 0.60),
            Pattern("bert-base 72/144 heads, 20%", (6,) * layers, 0.20),
            Pattern("bert-base 36/144 heads, 10%", (3,) * layers, 0.10),
        ]
    return patterns


def minilm_patterns(quick: bool) -> list[Pattern]:
    patterns = [Pattern("minilm 48/72 heads, 36%", (8,) * 6, 0.36)]
    if not quick:
        patterns += [
            Pattern("minilm 60/72 heads, 50%", (10,) * 6, 0.50),
            # Uneven, as hybrid pruning tends to leave it: late layers lose more heads, the last one all of them.
            Pattern("minilm 36/72 heads uneven, 20%", (10, 8, 8, 6, 4, 0), 0.20),
        ]
    return patterns


def format_table(rows: list[Row]) -> str:
    header = (f"{'model / pattern':<36} {'heads':>7} {'ffn':>5} {'dens':>5} {'Mparams':>13} {'|dlogit|':>8} "
              f"{'batch':>5} {'dense ms':>9} {'packed ms':>9} {'speedup':>7} {'limit':>6} {'of lim':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.pattern:<36} {r.heads_kept:>3}/{r.heads_total:<3} {r.ffn_width:>5} {r.linear_density:>5.2f} "
                     f"{r.params_dense_m:>6.1f}>{r.params_packed_m:<6.1f} {r.max_logit_diff:>8.1e} {r.batch_size:>5} "
                     f"{r.dense_ms:>9.1f} {r.packed_ms:>9.1f} {r.speedup:>7.2f} {r.flop_limit:>6.2f} "
                     f"{r.of_limit:>6.2f}")
    return "\n".join(lines)


def warn_if_busy(own_load: float) -> None:
    """Timings mean little when other processes compete for the cores; say so rather than hide it.

    ``own_load`` is what this process adds to the one-minute load average itself (0 before it starts working).
    """
    load = os.getloadavg()[0]
    if load > own_load + 1.0:
        logger.warning("load average %.1f (this benchmark accounts for about %.0f): other processes compete for "
                       "the cores, so the ratios will be off", load, own_load)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed dense/packed pairs at batch 1 (default 15)")
    parser.add_argument("--repeats-batch8", type=int, default=3, help="timed pairs at batch 8 (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed pairs before timing (default 1)")
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="reference pattern and one MiniLM pattern, batch 1, 3 repeats")
    parser.add_argument("--no-minilm", action="store_true", help="skip the shipped MiniLM")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.repeats_batch8 < 1 or args.warmup < 0:
        parser.error("--repeats and --repeats-batch8 must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if not 1 <= args.seq_len <= BertConfig().max_position_embeddings:
        parser.error(f"--seq-len must be from 1 to {BertConfig().max_position_embeddings} (the models' positions)")
    return args


@one_line_errors("pack_speed")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output(args.json, "--json")  # before the measurements, not after them
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    transformers.logging.set_verbosity_error()  # the shipped encoder gets a fresh QA head; that is expected here
    if args.threads:
        torch.set_num_threads(args.threads)
    logger.info("torch %s, %d threads", torch.__version__, torch.get_num_threads())
    warn_if_busy(0.0)
    batch_sizes = [1] if args.quick else [1, 8]
    repeats = {1: 3 if args.quick else args.repeats, 8: args.repeats_batch8}

    torch.manual_seed(args.seed)
    # The default attention implementation (SDPA) is used for both models, as a deployment would.
    bert_base = BertForQuestionAnswering(BertConfig()).eval()
    rows: list[Row] = []
    for pattern in bert_base_patterns(args.quick):
        rows += bench_pattern("bert-base", bert_base, pattern, batch_sizes, args.seq_len, repeats, args.warmup,
                              args.seed)
    del bert_base

    if not args.no_minilm:
        try:
            minilm = BertForQuestionAnswering.from_pretrained(str(shipped_model_dir())).eval()
        except ResourceError as error:
            logger.warning("skipping MiniLM: %s", error)
        else:
            for pattern in minilm_patterns(args.quick):
                rows += bench_pattern("minilm", minilm, pattern, batch_sizes, args.seq_len, repeats, args.warmup,
                                      args.seed)

    warn_if_busy(torch.get_num_threads())
    print(format_table(rows))
    if args.json:
        write_text(args.json, json.dumps([asdict(r) | {"of_limit": r.of_limit} for r in rows], indent=2))
    reference = next(r for r in rows if r.pattern == REFERENCE and r.batch_size == 1)
    print(f"pack_speedup dense/packed = {reference.speedup:.2f} (flop limit {reference.flop_limit:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
