"""How much of the teacher's F1 does each pruning method keep within the dense run's compute?

One protocol for every method. The teacher is the dense fine-tune of ``configs/dense_minilm.yaml`` (2,000 training
questions, 192-token windows, 384 steps of batch 16); it is trained here unless ``--teacher DIR`` names one. Every
pruned model starts from the teacher, is distilled from it (0.1 CE + 0.9 KL at T = 2, as in
``configs/prune_topk50.yaml``), is scored on the same first 500 dev questions and may use at most the dense run's
compute: 384 steps of batch 16, where a calibration pass over N windows counts as N / 16 steps (a Fisher pass
costs a forward and an activation-only backward, about 2.2 forwards a window; a mask-tuning pass about 3.8; a
distilled training step about 4: the teacher's forward, the student's forward and backward).

``--budget flops`` counts the same budget in matrix-product FLOPs instead (``F``: one dense forward of a window of
``max_seq_length`` tokens, :func:`pruning.bench.linear_flops`): the dense run's 384 x 16 windows at ``3F`` each
(forward and backward); each calibration or tuning window ``3F``; each training window ``3F_s`` for the student
and ``F`` for the teacher's forward, both at the width of its batch (the trainer cuts a batch to its longest
window; with ``--set group_by_length=true`` batches hold windows of similar length, so most are shorter than
``max_seq_length``; the steps are counted in the run's own batch order). A masked student costs ``F_s = F``
(masks skip no work); a packed recovery (``--set fill_packed=true``) costs what the packed model costs, bounded
before the cut by the target's share of the linear FLOPs plus every head's attention products. With ``--set
teacher_cache=true`` the teacher runs once per distinct window (counted as once per training window of the data).
Every row reports ``compute``, what it used as a share of the budget, counted this way from its final structure,
whichever budget set its steps.

Rows, at linear densities 0.5 and 0.3 (``--densities``):

* ``topk``: movement pruning with topk, scores from 0 (``configs/prune_topk50.yaml``), 384 steps;
* ``topk_fisher``: the same with ``mask_init: fisher`` (the calibration pass replaces the first steps);
* ``fisher``: one-shot structured pruning (``method: fisher``: Fisher importance, search, mask tuning), no training;
  the tuning fits the kept weights (``mask_tuning: auto`` with no recovery);
* ``fisher_recovery``: the same, then the rest of the budget as a distilled recovery fine-tune of the fixed
  structure (``fill_steps``; the tuning fits one scale per kept head and neuron), with a hidden-state MSE term of
  weight ``--alpha-hidden``; with ``--stages K`` the cut is made in K stages with the recovery split between them
  (``fisher_stages``).

Columns: EM, F1, retention (pruned F1 / teacher F1), linear density, heads removed, packed speed-up (dense teacher
against the packed model, batch 1, 192 tokens, interleaved medians), steps, compute (FLOPs used / the budget's),
and the wall time of the pruning itself (calibration, search and tuning) and of the training. Finished rows are
kept in ``--json``; a rerun skips them.

The last line is ``accuracy_budget retention@0.5 = X.XXX retention@0.3 = Y.YYY``: the best method at each density
of ``--densities``.

Usage:
    python bench/accuracy_budget.py --teacher runs/dense_minilm/final            # every row (hours on 2 cores)
    python bench/accuracy_budget.py --teacher DIR --rows fisher fisher_recovery --densities 0.5
    python bench/accuracy_budget.py                                              # trains the teacher first
    python bench/accuracy_budget.py --teacher DIR --rows fisher_recovery --budget flops --alpha-hidden 0 \
        --set fill_packed=true --set teacher_cache=true        # the packed, cached recovery in the FLOP budget
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from pruning import atomic, squad
from pruning.batches import micro_batches
from pruning.bench import linear_flops
from pruning.checkpoint import load_model
from pruning.tokenizer import load_tokenizer
from pruning import config as run_config
from pruning.config import ConfigError, RunConfig, config_from_dict, load_config
from pruning.importance import structure_costs
from pruning.packing import pack_and_verify
from pruning.resources import resolve_data, resolve_model
from pruning.trainer import evaluate, train, train_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_input import InputError, check_output, one_line_errors, read_json, require  # noqa: E402

logger = logging.getLogger("accuracy_budget")

ROOT = Path(__file__).resolve().parents[1]
DENSE_CONFIG = ROOT / "configs" / "dense_minilm.yaml"
PRUNE_CONFIG = ROOT / "configs" / "prune_topk50.yaml"
ROWS = ("topk", "topk_fisher", "fisher", "fisher_recovery")
BUDGET_STEPS = 384
BUDGET_BATCH = 16  # the budget's steps are of this batch, whatever batch a row runs with


def calibration_windows(cfg: RunConfig) -> int:
    """Windows that calibration passes go through before (or between) the training steps."""
    if cfg.method.value == "fisher":
        return cfg.fisher_stages * (cfg.calibration_samples + cfg.mask_tuning_samples)
    if getattr(cfg.mask_init, "value", None) == "fisher":
        return cfg.calibration_samples
    return 0


def calibration_steps(cfg: RunConfig) -> int:
    """Steps of batch 16 of the budget that calibration passes take (a pass over N windows counts N / 16)."""
    return math.ceil(calibration_windows(cfg) / BUDGET_BATCH)


def training_steps_left(cfg: RunConfig, budget_steps: int) -> int:
    """Optimizer steps of the run's own batch (``batch_size x grad_accum``) that fit in the rest of the budget."""
    windows = budget_steps * BUDGET_BATCH - calibration_steps(cfg) * BUDGET_BATCH
    return windows // (cfg.batch_size * cfg.grad_accum)


def forward_flops(config: Any, seq_len: int, linear_share: float = 1.0) -> float:
    """FLOPs of one forward over a window (as :func:`pruning.bench.linear_flops` counts them) of a model that keeps
    ``linear_share`` of the linear FLOPs and every head's attention products: at ``1.0`` the dense model, below an
    upper bound for any structure with that share of the linear weights (removed heads only lower it)."""
    total = structure_costs(config, "flops", seq_len).total
    linear = 2 * seq_len * structure_costs(config, "density").total  # two FLOPs per weight and token
    return linear_share * linear + (total - linear)


def student_share(cfg: RunConfig) -> float:
    """Linear share the student's training steps pay for: the target with a packed recovery, else all of it."""
    if not cfg.fill_packed:
        return 1.0
    return cfg.target_flops if cfg.target_flops is not None else cfg.target_density


def budget_flops(cfg: RunConfig, config: Any, budget_steps: int) -> float:
    """The dense run's compute: ``budget_steps`` steps of batch 16, forward and backward."""
    return budget_steps * BUDGET_BATCH * 3 * forward_flops(config, cfg.max_seq_length)


def row_features(cfg: RunConfig, teacher: str) -> dict[str, torch.Tensor]:
    """The training windows a row's run will see (tokenized once, then read from the row's feature cache)."""
    examples = squad.load_squad(resolve_data(cfg.train_data), limit=cfg.train_limit)
    return train_features(cfg, examples, load_tokenizer(teacher))


def step_widths(cfg: RunConfig, features: dict[str, torch.Tensor], steps: int | None = None) -> Iterator[Counter]:
    """For each of the run's first ``steps`` optimizer steps (every step when None), how many windows it trains on
    at each batch width: the trainer cuts every batch to its longest window, in the order of
    :func:`pruning.batches.micro_batches`."""
    mask = features["attention_mask"]
    batches = micro_batches(features, cfg)
    for _ in itertools.count() if steps is None else range(steps):
        widths: Counter = Counter()
        for _ in range(cfg.grad_accum):
            index = next(batches)
            widths[squad.batch_width(mask[index])] += int(index.numel())
        yield widths


def training_flops(cfg: RunConfig, widths: Counter, student: Callable[[int], float],
                   dense: Callable[[int], float]) -> float:
    """FLOPs of training windows counted by batch width: the student's forward and backward (``3 x student(w)``)
    and, without ``teacher_cache``, the teacher's forward at the same width."""
    teacher = dense if cfg.teacher is not None and not cfg.teacher_cache else (lambda w: 0.0)
    return sum(n * (3 * student(w) + teacher(w)) for w, n in widths.items())


def compute_used(cfg: RunConfig, config: Any, widths: Counter, student: Callable[[int], float],
                 teacher_windows: float) -> float:
    """FLOPs a row spent: calibration and tuning windows at full width, the student's training windows at their
    batches' widths (``widths``, windows per width; forward and backward at ``student(width)`` each) and the
    teacher's forwards (``teacher_windows`` of full width when they are cached, else one per training window)."""
    dense = functools.partial(forward_flops, config)
    full = dense(cfg.max_seq_length)
    cached = full * teacher_windows if cfg.teacher_cache else 0.0
    return 3 * full * calibration_windows(cfg) + training_flops(cfg, widths, student, dense) + cached


def flop_steps_left(cfg: RunConfig, config: Any, budget_steps: int, features: dict[str, torch.Tensor]) -> int:
    """Optimizer steps whose FLOPs fit in the budget left after calibration, in the run's own batch order (each batch
    at its width), with the student's cost bounded by :func:`student_share` and the teacher's forwards paid once
    per window of the data with ``teacher_cache``."""
    full = forward_flops(config, cfg.max_seq_length)
    student = functools.lru_cache(maxsize=None)(lambda w: forward_flops(config, w, student_share(cfg)))
    dense = functools.lru_cache(maxsize=None)(lambda w: forward_flops(config, w))
    left = budget_flops(cfg, config, budget_steps) - 3 * full * calibration_windows(cfg)
    if cfg.teacher_cache and cfg.teacher is not None:
        left -= full * int(features["input_ids"].shape[0])
    steps = 0
    for widths in step_widths(cfg, features):  # every step costs more than 0, so this ends
        left -= training_flops(cfg, widths, student, dense)
        if left < 0:
            return steps
        steps += 1
    return steps


def override(item: str) -> tuple[str, Any]:
    """One ``--set KEY=VALUE`` as ``(key, value)``; the value is read as a YAML scalar (``0``, ``1e-4``, ``true``)."""
    import yaml

    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE")
    if key not in {field.name for field in dataclasses.fields(RunConfig)}:
        raise argparse.ArgumentTypeError(f"{item!r}: {key!r} is not a run-config key")
    return key, yaml.safe_load(value)


def row_config(row: str, density: float, teacher: str, out_dir: Path, args: argparse.Namespace) -> RunConfig:
    """The run config of one row: ``configs/prune_topk50.yaml`` with the teacher, the density and the method, then
    the ``--set`` values (last, so that they may name keys of the row's method and override the row's own)."""
    budget = args.steps
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"
    base = load_config(PRUNE_CONFIG, {"model": teacher, "teacher": teacher, "target_density": density,
                                      "output_dir": str(out_dir / f"{row}_{density:g}{suffix}"),
                                      "eval_limit": args.eval_limit, "cache_dir": str(out_dir / "cache"),
                                      "precision": args.precision,
                                      **({"train_limit": args.train_limit} if args.train_limit else {}),
                                      **({"seed": args.seed} if args.seed is not None else {})})
    config = load_model(teacher).config if row.startswith("fisher") or args.budget == "flops" else None
    head_block = None
    if row.startswith("fisher"):
        head_block = [config.hidden_size // config.num_attention_heads, config.hidden_size]
    values: dict[str, Any]
    if row == "topk":
        values = {"max_steps": budget}
    elif row == "topk_fisher":
        values = {"mask_init": "fisher", "calibration_samples": args.calibration, "mask_init_scale": args.init_scale}
    elif row == "fisher":
        values = {"method": "fisher", "attention_block": head_block, "calibration_samples": args.calibration,
                  "mask_tuning_samples": args.tuning, "mask_rearrange": args.rearrange}
    elif row == "fisher_recovery":
        values = {"method": "fisher", "attention_block": head_block, "calibration_samples": args.calibration,
                  "mask_tuning_samples": args.tuning, "mask_rearrange": args.rearrange,
                  "alpha_hidden": args.alpha_hidden, "fill_learning_rate": args.recovery_lr,
                  "fisher_stages": args.stages, "fill_steps": budget}  # fill_steps: the rest, set below
    else:
        raise ValueError(f"unknown row {row!r}")
    cfg = config_from_dict(values, source=row, base=base)
    if args.set:
        cfg = config_from_dict(dict(args.set), source="--set", base=cfg)
    if args.budget == "flops":
        steps_left = flop_steps_left(cfg, config, budget, row_features(cfg, teacher))
    else:
        steps_left = training_steps_left(cfg, budget)
    if steps_left < 1:
        raise InputError(f"--calibration, --tuning, --stages, --steps: the calibration of {row} takes "
                         f"{calibration_steps(cfg)} of the {budget} steps")
    if row in ("topk", "topk_fisher"):
        cfg = dataclasses.replace(cfg, max_steps=steps_left)
    elif row == "fisher_recovery":
        cfg = dataclasses.replace(cfg, fill_steps=steps_left)
    return cfg


# What the teacher's score depends on beside the teacher: the questions, the windows (with the question's cut) and
# the span search, and the precision.
EVALUATION_KEYS = ("eval_data", "eval_limit", *run_config.EVALUATION_KEYS, "precision")


def teacher_f1(teacher: str, cfg: RunConfig, cache: Path) -> dict[str, float]:
    """The teacher's EM/F1 on the protocol's dev questions, evaluated as ``cfg`` evaluates (kept in ``cache``, and
    taken from it only when it was scored the same way)."""
    settings = {key: getattr(cfg, key) for key in EVALUATION_KEYS}
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("teacher") == teacher and all(stored.get(k) == v for k, v in settings.items()):
            return stored
    model = load_model(teacher)
    examples = squad.load_squad(resolve_data(cfg.eval_data), limit=cfg.eval_limit)
    metrics = evaluate(model, load_tokenizer(teacher), examples, cfg, progress=False)
    stored = {"teacher": teacher, **settings, "exact_match": metrics["exact_match"], "f1": metrics["f1"]}
    atomic.write_text(cache, json.dumps(stored, indent=2))
    return stored


def run_row(row: str, density: float, cfg: RunConfig, teacher_scores: dict[str, float],
            args: argparse.Namespace) -> dict[str, Any]:
    steps = cfg.fill_steps if cfg.method.value == "fisher" else cfg.max_steps
    logger.info("%s at %.2f: %d training steps + %d calibration steps", row, density, steps, calibration_steps(cfg))
    started = time.time()
    metrics = train(cfg, progress=False)
    wall = time.time() - started
    masked = load_model(metrics["model_dir"])
    packed, packing = pack_and_verify(masked, batch_size=1, seq_len=cfg.max_seq_length, repeats=args.repeats)
    one_shot = float(metrics.get("prune_seconds", 0.0))
    config = masked.config  # the student starts from the teacher: the same shape
    trained = packed if cfg.fill_packed else masked
    widths = sum(step_widths(cfg, row_features(cfg, cfg.model), steps), Counter())
    used = compute_used(cfg, config, widths, functools.partial(linear_flops, trained),
                        float(metrics.get("teacher_forward_windows", 0.0)))
    return {
        "row": row, "density_target": density, "exact_match": metrics["exact_match"], "f1": metrics["f1"],
        "retention": metrics["f1"] / teacher_scores["f1"] if teacher_scores["f1"] else math.nan,
        "linear_density": metrics["linear_density"],
        "heads_removed": int(metrics["heads_removed"]), "speedup": packing.speedup,
        "steps": int(steps), "calibration_steps": calibration_steps(cfg), "prune_seconds": one_shot,
        "budget": args.budget, "compute": used / budget_flops(cfg, config, args.steps),
        "prune_cpu_seconds": float(metrics.get("prune_cpu_seconds", 0.0)), "threads": torch.get_num_threads(),
        "train_seconds": float(metrics.get("train_seconds", 0.0)) if steps else 0.0, "wall_seconds": wall,
        "tuning_error_before": metrics.get("tuning_error_before"),
        "tuning_error_after": metrics.get("tuning_error_after"),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                   if k in ("calibration_samples", "mask_tuning_samples", "mask_rearrange", "alpha_hidden",
                            "fill_learning_rate", "mask_init_scale", "max_steps", "fill_steps", "precision",
                            "fisher_stages", "train_limit", "seed", "batch_size", "grad_accum", "alpha_ce",
                            "alpha_distil", "temperature", "learning_rate", "fill_packed", "teacher_cache")}
                  | {"mask_tuning": cfg.tuning_mode.value, "overrides": dict(args.set)},
    }


def save_row(path: Path, teacher_scores: dict[str, float], result: dict[str, Any]) -> list[dict[str, Any]]:
    """Add ``result`` to the results file (replacing the same row and density), re-read just before writing so
    that several runs of this script with different rows can share one file; returns this teacher's rows."""
    stored = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    def same(r: dict[str, Any]) -> bool:
        return (r["row"] == result["row"] and r.get("teacher") == result["teacher"]
                and abs(r["density_target"] - result["density_target"]) < 1e-9)

    rows = [r for r in stored["rows"] if not same(r)] + [result]
    # Whole and on the disk before it replaces the file: it holds every finished row (hours of training each).
    atomic.write_text(path, json.dumps({"teacher_scores": teacher_scores, "rows": rows}, indent=2))
    return [r for r in rows if r.get("teacher") == result["teacher"]]


def format_table(teacher_scores: dict[str, float], rows: list[dict[str, Any]]) -> str:
    lines = ["| method | target | steps (+ calibration) | linear density | heads removed | EM | F1 | retention | "
             "packed speedup | compute | one-shot s | training s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| dense teacher | 1.0 | {BUDGET_STEPS} | 1.000 | 0 | {teacher_scores['exact_match']:.2f} | "
             f"{teacher_scores['f1']:.2f} | 1.000 | 1.00 | 1.00 | - | - |"]
    for r in sorted(rows, key=lambda r: (-r["density_target"], ROWS.index(r["row"]))):
        compute = f"{r['compute']:.2f}" if "compute" in r else "-"  # rows recorded before it was measured
        lines.append(f"| {r['row']} | {r['density_target']:g} | {r['steps']} (+ {r['calibration_steps']}) | "
                     f"{r['linear_density']:.3f} | {r['heads_removed']} | {r['exact_match']:.2f} | {r['f1']:.2f} | "
                     f"{r['retention']:.3f} | {r['speedup']:.2f} | {compute} | {r['prune_seconds']:.0f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def summary_line(rows: list[dict[str, Any]], densities: list[float]) -> str:
    parts = []
    for density in densities:
        best = [r["retention"] for r in rows if abs(r["density_target"] - density) < 1e-9]
        parts.append(f"retention@{density:g} = " + (f"{max(best):.3f}" if best else "n/a"))
    return "accuracy_budget " + " ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="dense QA teacher directory (default: train configs/dense_minilm.yaml)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.3],
                        help="linear density targets (target_density of every row), each in (0, 1]")
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "accuracy_budget"))
    parser.add_argument("--json", help="results file (default: OUT_DIR/results.json); finished rows are skipped")
    parser.add_argument("--eval-limit", type=int, default=500)
    parser.add_argument("--steps", type=int, default=BUDGET_STEPS, help="the budget in steps of batch 16 (the dense "
                                                                          "run's 384; smaller only for a smoke test)")
    parser.add_argument("--budget", choices=("steps", "flops"), default="steps",
                        help="how the budget sets each row's training steps: the dense run's steps of batch 16 "
                             "(calibration windows counted as 1/16 step each), or its FLOPs, with the teacher's "
                             "forwards and the packed student's smaller steps counted (module docstring)")
    parser.add_argument("--calibration", type=int, default=512,
                        help="calibration windows (calibration_samples; default 512: on this protocol 2,048 pick "
                             "the same heads and cost 96 recovery steps)")
    parser.add_argument("--tuning", type=int, default=256, help="mask tuning windows (mask_tuning_samples)")
    parser.add_argument("--rearrange", action="store_true", help="mask rearrangement (mask_rearrange)")
    parser.add_argument("--stages", type=int, default=1,
                        help="fisher_stages of the recovery row: the cut in this many stages, each followed by its "
                             "share of the recovery (every stage's calibration counts against the budget)")
    parser.add_argument("--alpha-hidden", type=float, default=1.0, help="hidden-state MSE weight in the recovery")
    parser.add_argument("--recovery-lr", type=float, default=None, help="fill_learning_rate of the recovery")
    parser.add_argument("--init-scale", type=float, default=1.0, help="mask_init_scale of the fisher warm start")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="training questions the pruned models see (default: the teacher's 2,000). The budget "
                             "is steps, so more questions mean fewer repeats of each window, not more compute")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the pruning runs (calibration windows, sampled labels, data order); default: "
                             "the config's. Repeat a row with other seeds (and its own --out-dir) to see its spread")
    parser.add_argument("--set", action="append", default=[], type=override, metavar="KEY=VALUE",
                        help="any other run-config key for every row, e.g. --set alpha_ce=0 --set batch_size=8 "
                             "(the budget stays 384 x 16 windows: batch 8 gets twice the steps)")
    parser.add_argument("--repeats", type=int, default=10, help="latency pairs per packed model")
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                        help="precision of the pruning runs (the teacher is used as it is); keep bf16 rows in their "
                             "own --json file, since rows are keyed by method and density")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rerun", action="store_true", help="run rows again even when the results file has them")
    args = parser.parse_args(argv)
    # Before any training: the latency pairs are timed only after a row has trained.
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be >= 1")
    for density in args.densities:  # else refused as the target_density of a row config the user never wrote
        if not 0 < density <= 1:
            raise InputError(f"--densities {density:g}: a linear density must be in (0, 1]")
    for flag, value in (("--eval-limit", args.eval_limit), ("--train-limit", args.train_limit)):
        if value is not None and value < 1:  # a --train-limit of 0 was taken for none given
            raise InputError(f"{flag} {value}: must be a number of questions >= 1")
    for flag, value, least in (("--steps", args.steps, 1), ("--calibration", args.calibration, 1),
                               ("--tuning", args.tuning, 0), ("--stages", args.stages, 1)):
        if value < least:  # else refused as a row config's key, or (--steps) as a budget the calibration overruns
            raise InputError(f"{flag} {value}: must be an integer >= {least}")
    for flag, value, positive in (("--alpha-hidden", args.alpha_hidden, False), ("--init-scale", args.init_scale, True),
                                  ("--recovery-lr", args.recovery_lr, True)):
        if value is not None and not (value > 0 if positive else value >= 0):  # nan fails both
            raise InputError(f"{flag} {value:g}: must be a number {'> 0' if positive else '>= 0'}")
    return args


def read_results(path: Path, flag: str) -> dict[str, Any]:
    """The results file of earlier runs (empty when there is none), or a one-line error naming it."""
    if not path.exists():
        return {"rows": []}
    stored = read_json(path, flag)
    require(stored, {"rows": list}, f"{flag} {path}")
    for i, row in enumerate(stored["rows"]):
        require(row, {"row": str, "density_target": (int, float)}, f"{flag} {path}: rows[{i}]")
    return stored


@one_line_errors("accuracy_budget")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    results_path = Path(args.json) if args.json else out_dir / "results.json"
    flag = "--json" if args.json else "results file"
    check_output(results_path, flag)
    stored = read_results(results_path, flag)  # a malformed file fails here, not after the first row's training
    teacher = args.teacher
    try:  # every row's config, before any training: a bad --set value fails here, in one line
        if teacher is None:
            dense_cfg = load_config(DENSE_CONFIG, {"output_dir": str(out_dir / "teacher"),
                                                   "eval_limit": args.eval_limit})
            final = out_dir / "teacher" / "final"
            if not (final / "config.json").is_file():
                # Checked against the model the teacher is trained from (the same shape), not after its training.
                stand_in = str(resolve_model(dense_cfg.model))
                for density in args.densities:
                    for row in args.rows:
                        row_config(row, density, stand_in, out_dir, args)
                final = Path(train(dense_cfg, progress=False)["model_dir"])
            teacher = str(final)
        configs = {(row, density): row_config(row, density, teacher, out_dir, args)
                   for density in args.densities for row in args.rows}
    except ConfigError as err:
        print(f"accuracy_budget: {err}", file=sys.stderr)
        return 2
    base = configs[args.rows[0], args.densities[0]]  # the teacher is scored with the rows' evaluation settings
    teacher_scores = teacher_f1(teacher, base, out_dir / "teacher_scores.json")
    logger.info("teacher %s: EM %.2f F1 %.2f", teacher, teacher_scores["exact_match"], teacher_scores["f1"])

    rows = [r for r in stored["rows"] if r.get("teacher") == teacher]
    for density in args.densities:
        for row in args.rows:
            done = [r for r in rows if r["row"] == row and abs(r["density_target"] - density) < 1e-9]
            if done and not args.rerun:
                logger.info("%s at %.2f: already in %s", row, density, results_path)
                continue
            result = run_row(row, density, configs[row, density], teacher_scores, args)
            result["teacher"] = teacher
            rows = save_row(results_path, teacher_scores, result)
            logger.info("%s at %.2f: F1 %.2f (retention %.3f)", row, density, result["f1"], result["retention"])
    chosen = [r for r in rows if r["row"] in args.rows and any(abs(r["density_target"] - d) < 1e-9
                                                               for d in args.densities)]
    print(format_table(teacher_scores, chosen))
    print(summary_line(chosen, args.densities))
    return 0


if __name__ == "__main__":
    sys.exit(main())
