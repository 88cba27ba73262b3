"""End-to-end serving speed on CPU: PyTorch eager against ONNX Runtime (fp32 and dynamic int8) for packed models.

One question at a time (batch 1), end to end as a server answers it: tokenize the question and its context into a
window, run the model, search the span and cut the answer text (:func:`pruning.inference.answer`). Contexts are cut
so that each question fills one window of about 384 (then 128) tokens. Five ways of serving are timed interleaved
(one question each, in rotating order, repeated; medians):

  dense eager      the unpruned-shape model in PyTorch (its pruned structure as zeros)
  packed eager     the packed model in PyTorch
  packed ort fp32  the packed model exported, fused by ORT's transformer optimizer, run by ONNX Runtime
  packed ort int8  the same graph quantized dynamically to int8
  packed eager bf16  the packed model in PyTorch under bf16 autocast (``precision: bf16``), only where the CPU
                   has bf16 matrix instructions

on two models: the BERT-base reference pattern (96 of 144 heads, 36% of the encoder's linear weights, random
weights: speed only) and a real pruned MiniLM checkpoint (speed, and EM/F1 of every row on the first dev questions).

The last line of the output is
``serve_speedup dense_eager/packed_int8 = X.XX (bert-base pattern), f1_drop_int8 = Y.YY (minilm)``: the speed-up at
sequence 384 on BERT-base, and the F1 the int8 model loses against the same packed model in fp32 (ORT).

On 500 questions that F1 difference is mostly which few answers int8 happens to flip: on a pruned MiniLM it ranged
from -1.9 to +2.2 over the 21 blocks of 500 dev questions while the mean over the whole dev set was 0.16.
``--drop-questions N`` also scores the two ORT rows on the first N dev questions (``all``: the 10,570 of the dev set)
and reports the paired mean F1 drop with its standard error; the last line then gives that mean.

Usage:
    python bench/serve_speed.py --checkpoint runs/prune_topk30/final --threads 2    # about 20 minutes
    python bench/serve_speed.py --checkpoint CKPT --quick                           # a few repeats, 50 questions
    python bench/serve_speed.py --checkpoint CKPT --no-bert-base --drop-questions all  # + int8 F1 drop, whole dev
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import BertConfig, BertForQuestionAnswering

from pruning import masks as mask_lib
from pruning import squad
from pruning.checkpoint import load_model
from pruning.export import OrtQAModel, export_model
from pruning.inference import answer
from pruning.packing import is_packed, pack
from pruning.precision import Bf16Inference, cpu_supports_bf16
from pruning.resources import resolve_data, shipped_model_dir
from pruning.structure import max_positions
from pruning.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other bench scripts, as when run from bench/
from pack_speed import REFERENCE, bert_base_patterns, ffn_width_for, warn_if_busy, zero_structure_  # noqa: E402
from script_input import InputError, check_output, one_line_errors, write_text  # noqa: E402

logger = logging.getLogger("serve_speed")

EVAL_WINDOW = 384  # the windows (stride 128) every row's F1 is measured on, and the check inputs' length
ROWS = ("dense eager", "packed eager", "packed ort fp32", "packed ort int8", "packed eager bf16")


@dataclass
class Row:
    model: str
    row: str
    seq_len: int
    median_ms: float
    speedup: float  # dense eager median / this row's median, same model and sequence length
    exact_match: float | None = None
    f1: float | None = None


@dataclass
class Int8Drop:
    """F1 of packed ORT fp32 minus packed ORT int8, question by question, over the first ``questions``."""
    questions: int
    mean: float
    standard_error: float
    block_means: list[float]  # the mean over each whole block of 500 questions


def per_question_f1(model: torch.nn.Module, tokenizer, examples: list[squad.Example],
                    known: dict[str, str] | None = None) -> list[float]:
    """The official F1 (percent) of each question's prediction; ``known`` predictions (by question id) are reused."""
    known = known or {}
    todo = [ex for ex in examples if ex.id not in known]
    predictions = dict(known)
    if todo:
        predictions.update(squad.evaluate_model(model, tokenizer, todo, max_seq_length=EVAL_WINDOW,
                                                doc_stride=128, batch_size=16, progress=False)[1])
    return squad.question_f1(examples, predictions)


def int8_drop(fp32: torch.nn.Module, int8: torch.nn.Module, tokenizer, examples: list[squad.Example],
              block: int = 500, known: dict[str, dict[str, str]] | None = None) -> Int8Drop:
    """The paired F1 drop of int8 against fp32 on ``examples``: mean, standard error and means by block.

    ``known``: predictions already made (``{"fp32": {id: text}, "int8": {...}}``), not computed again.
    """
    known = known or {}
    diffs = [a - b for a, b in zip(per_question_f1(fp32, tokenizer, examples, known.get("fp32")),
                                   per_question_f1(int8, tokenizer, examples, known.get("int8")))]
    n = len(diffs)
    sd = statistics.stdev(diffs) if n > 1 else float("nan")
    blocks = [statistics.fmean(diffs[i:i + block]) for i in range(0, n - block + 1, block)]
    return Int8Drop(n, statistics.fmean(diffs), sd / math.sqrt(n), blocks)


def window_questions(examples: list[squad.Example], tokenizer, seq_len: int, count: int) -> list[tuple[str, str]]:
    """(question, context) pairs whose context is cut so that the pair fills one window of ``seq_len`` tokens.

    The cut falls at the end of the last whole word that fits, so the window is full to within a few tokens.
    """
    pairs = []
    for ex in examples:
        encoding = squad.tokenize_text(tokenizer, ex.question, ex.context, truncation="only_second",
                                       max_length=seq_len, return_offsets_mapping=True)
        if len(encoding["input_ids"]) < seq_len:
            continue  # the context is too short to fill the window
        context_ends = [end for (start, end), seq in zip(encoding["offset_mapping"], encoding.sequence_ids())
                        if seq == 1]
        cut = ex.context.rfind(" ", 0, context_ends[-1])
        if cut <= 0:
            continue
        pairs.append((ex.question, ex.context[:cut]))
        if len(pairs) == count:
            break
    if not pairs:
        raise ValueError(f"no dev context fills a window of {seq_len} tokens")
    return pairs


def time_rows(models: dict[str, torch.nn.Module], tokenizer, pairs: list[tuple[str, str]], seq_len: int,
              repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per question of every model, timed interleaved (rotating order) on the same questions."""
    names = list(models)
    stride = min(128, seq_len // 2)
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(warmup + repeats):
        question, context = pairs[step % len(pairs)]
        order = names[step % len(names):] + names[:step % len(names)]
        for name in order:
            started = time.perf_counter()
            answer(models[name], tokenizer, question, context, max_seq_length=seq_len, doc_stride=stride)
            elapsed = time.perf_counter() - started
            if step >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def serving_models(dense: torch.nn.Module, packed: torch.nn.Module, work: Path, threads: int,
                   check: dict[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
    """The four rows for one model: dense and packed eager, the packed model exported (fp32 and int8)."""
    report = export_model(packed, work, quantize="int8", inputs=check)
    logger.info("exported: fused heads %s, |dlogit| %s", report.fused_attention_heads, report.max_logit_diff)
    if not report.attention_fused:
        logger.warning("not every layer's attention was fused: the ORT rows are slower than they could be")
    models = {
        "dense eager": dense,
        "packed eager": packed,
        # No spinning: the rows are interleaved, and an ORT session whose threads still spin after its call would
        # slow down the next row (by 2.4x at 384 tokens for a pruned MiniLM).
        "packed ort fp32": OrtQAModel(work / report.files["fp32"], packed.config, "fp32", threads=threads, spin=False),
        "packed ort int8": OrtQAModel(work / report.files["int8"], packed.config, "int8", threads=threads, spin=False),
    }
    if cpu_supports_bf16():
        # As the served model runs with precision bf16: autocast, the linear weights stored in bf16 once.
        models["packed eager bf16"] = Bf16Inference(copy.deepcopy(packed))
    else:
        logger.info("no bf16 row: this CPU has no bf16 matrix instructions")
    return models


def bench_model(label: str, models: dict[str, torch.nn.Module], tokenizer, examples: list[squad.Example],
                seq_lens: list[int], repeats: int, warmup: int, eval_examples: list[squad.Example] | None,
                predictions: dict[str, dict[str, str]] | None = None) -> list[Row]:
    """Timed rows for every model and length, with EM/F1 on ``eval_examples``; each row's predictions by question id
    go into ``predictions`` when given."""
    rows: list[Row] = []
    for seq_len in seq_lens:
        pairs = window_questions(examples, tokenizer, seq_len, count=max(1, repeats))
        medians = time_rows(models, tokenizer, pairs, seq_len, repeats, warmup)
        for name in (name for name in ROWS if name in models):
            rows.append(Row(label, name, seq_len, 1e3 * medians[name], medians["dense eager"] / medians[name]))
            logger.info("%s / seq %d / %s: %.1f ms (x%.2f)", label, seq_len, name, rows[-1].median_ms,
                        rows[-1].speedup)
    if eval_examples:
        for name in (name for name in ROWS if name in models):
            started = time.perf_counter()
            metrics, predicted = squad.evaluate_model(models[name], tokenizer, eval_examples,
                                                      max_seq_length=EVAL_WINDOW, doc_stride=128, batch_size=16,
                                                      progress=False)
            if predictions is not None:
                predictions[name] = predicted
            logger.info("%s / %s: EM %.2f F1 %.2f (%.0f s)", label, name, metrics["exact_match"], metrics["f1"],
                        time.perf_counter() - started)
            for row in rows:
                if row.row == name:
                    row.exact_match, row.f1 = metrics["exact_match"], metrics["f1"]
    return rows


def bert_base_rows(args: argparse.Namespace, tokenizer, examples, work: Path) -> list[Row]:
    torch.manual_seed(args.seed)
    dense = BertForQuestionAnswering(BertConfig()).eval()
    pattern = bert_base_patterns(quick=True)[0]
    assert pattern.name == REFERENCE
    zeroed = copy.deepcopy(dense)
    zero_structure_(zeroed, pattern.heads_per_layer, ffn_width_for(dense.config, pattern.heads_per_layer,
                                                                  pattern.density), args.seed)
    packed = pack(zeroed)
    del zeroed
    check = squad.prepare_eval_features(examples[:4], tokenizer, EVAL_WINDOW, 128).model_inputs()
    models = serving_models(dense, packed, work, args.threads, check)
    return bench_model("bert-base pattern", models, tokenizer, examples, args.seq_lens, args.repeats, args.warmup,
                       None)


def load_checkpoint(path: str) -> tuple[torch.nn.Module, Any]:
    """The pruned checkpoint and its tokenizer; a missing, unreadable or packed one is an input error."""
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    if is_packed(model):
        raise InputError(f"--checkpoint {path}: a packed directory; pass the pruned checkpoint it was packed from "
                         "(the dense-shape row needs it)")
    if max_positions(model.config) < EVAL_WINDOW:
        raise InputError(f"--checkpoint {path}: the model takes {max_positions(model.config)} positions; its F1 is "
                         f"measured on {EVAL_WINDOW}-token windows")
    return model, tokenizer


def check_lengths(seq_lens: list[int], model: torch.nn.Module) -> None:
    """Every timed length within the positions of the checkpoint's model."""
    limit = max_positions(model.config)
    too_long = [n for n in seq_lens if n > limit]
    if too_long:
        raise InputError(f"--seq-lens {too_long[0]}: the checkpoint's model takes {limit} positions")


def minilm_rows(args: argparse.Namespace, model: torch.nn.Module, tokenizer, examples,
                work: Path) -> tuple[list[Row], Int8Drop | None]:
    packed = pack(model)
    dense = mask_lib.remove_masks_(copy.deepcopy(model)).eval() if mask_lib.is_masked(model) else model
    check = squad.prepare_eval_features(examples[:16], tokenizer, EVAL_WINDOW, 128).model_inputs()
    models = serving_models(dense, packed, work, args.threads, check)
    predictions: dict[str, dict[str, str]] = {}
    rows = bench_model("minilm (pruned)", models, tokenizer, examples, args.seq_lens, args.repeats, args.warmup,
                       examples[:args.questions], predictions)
    drop = None
    if args.drop_questions:
        started = time.perf_counter()
        # The questions the rows were scored on are not answered again.
        drop = int8_drop(models["packed ort fp32"], models["packed ort int8"], tokenizer,
                         examples[:args.drop_questions], known={"fp32": predictions.get("packed ort fp32", {}),
                                                                 "int8": predictions.get("packed ort int8", {})})
        logger.info("int8 F1 drop over %d questions: %.2f +- %.2f (blocks of 500: %.2f to %.2f) (%.0f s)",
                    drop.questions, drop.mean, drop.standard_error, min(drop.block_means, default=float("nan")),
                    max(drop.block_means, default=float("nan")), time.perf_counter() - started)
    return rows, drop


def format_table(rows: list[Row]) -> str:
    header = f"{'model':<18} {'seq':>4} {'serving':<18} {'median ms':>9} {'speedup':>7} {'EM':>6} {'F1':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        em = "" if r.exact_match is None else f"{r.exact_match:.2f}"
        f1 = "" if r.f1 is None else f"{r.f1:.2f}"
        lines.append(f"{r.model:<18} {r.seq_len:>4} {r.row:<18} {r.median_ms:>9.1f} {r.speedup:>7.2f} {em:>6} {f1:>6}")
    return "\n".join(lines)


def _question_count(text: str) -> int:
    if text == "all":
        return sys.maxsize
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of questions or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a number of questions or 'all', got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a pruned (masked) MiniLM checkpoint, e.g. runs/prune_topk30/final")
    parser.add_argument("--no-minilm", action="store_true", help="BERT-base pattern only (f1_drop_int8 = nan)")
    parser.add_argument("--no-bert-base", action="store_true", help="MiniLM only (serve_speedup = nan)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=15, help="timed questions per row and length (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--questions", type=int, default=500, help="dev questions for EM/F1 (default 500)")
    parser.add_argument("--drop-questions", type=_question_count, default=0,
                        help="also measure the int8 F1 drop (packed ORT fp32 - int8, paired, with its standard "
                             "error) on this many dev questions, or 'all'; the last line then reports it")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[384, 128])
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warmup round, 50 questions")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.questions = 3, 1, min(args.questions, 50)
    if not args.no_minilm and not args.checkpoint:
        parser.error("--checkpoint is required (or --no-minilm)")
    if args.no_minilm and args.no_bert_base:
        parser.error("--no-minilm and --no-bert-base leave nothing to measure")
    if args.repeats < 1 or args.warmup < 0 or args.questions < 1 or args.threads < 1:
        parser.error("--repeats, --questions and --threads must be >= 1, --warmup >= 0")
    if not all(32 <= n <= 512 for n in args.seq_lens):
        parser.error("--seq-lens must be from 32 to 512 tokens (512: the models' positions)")
    return args


@one_line_errors("serve_speed")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output(args.json, "--json")
    checkpoint = None if args.no_minilm else load_checkpoint(args.checkpoint)  # before the BERT-base rows
    if checkpoint is not None:
        check_lengths(args.seq_lens, checkpoint[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    logger.info("torch %s, %d threads", torch.__version__, torch.get_num_threads())
    warn_if_busy(0.0)
    wanted = max(args.questions, args.drop_questions, 600)
    examples = squad.load_squad(resolve_data("dev"), limit=None if wanted == sys.maxsize else wanted)
    rows: list[Row] = []
    drop: Int8Drop | None = None
    with tempfile.TemporaryDirectory(prefix="serve-speed-") as tmp:
        if not args.no_bert_base:
            (Path(tmp) / "bert").mkdir()
            rows += bert_base_rows(args, load_tokenizer(shipped_model_dir()), examples, Path(tmp) / "bert")
        if not args.no_minilm:
            (Path(tmp) / "minilm").mkdir()
            minilm, drop = minilm_rows(args, *checkpoint, examples, Path(tmp) / "minilm")
            rows += minilm
    warn_if_busy(args.threads)
    print(format_table(rows))
    if args.json:
        record: Any = [asdict(r) for r in rows]
        if drop is not None:
            record = {"rows": record, "int8_drop": asdict(drop)}
        write_text(args.json, json.dumps(record, indent=2))
    reference = next((r.speedup for r in rows if r.model == "bert-base pattern" and r.row == "packed ort int8"
                      and r.seq_len == max(args.seq_lens)), float("nan"))
    f1 = {r.row: r.f1 for r in rows if r.model.startswith("minilm") and r.f1 is not None}
    f1_drop = f1["packed ort fp32"] - f1["packed ort int8"] if f1 else float("nan")
    if drop is not None:
        print(f"int8 F1 drop: {f1_drop:.2f} on the first {args.questions} questions, {drop.mean:.2f} +- "
              f"{drop.standard_error:.2f} (standard error) on the first {drop.questions}")
        f1_drop = drop.mean
    print(f"serve_speedup dense_eager/packed_int8 = {reference:.2f} (bert-base pattern), "
          f"f1_drop_int8 = {f1_drop:.2f} (minilm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
