"""GPU reference run: the EM/F1-versus-density frontier of MiniLM on full SQuAD v1.1, without Ray or MLflow.

Phases (each bounded in wall time, so the whole run fits a fixed GPU budget):
  1. stage: the model (shipped in float16 to travel light) and SQuAD (xz-compressed) are unpacked into a work dir;
  2. teacher: the dense MiniLM is fine-tuned on the training set; its number of steps is calibrated from a short
     timed run so that training takes ``--teacher-seconds``;
  3. students: fine-pruned from the teacher with topk at several density targets and distilled from it, all in
     parallel on the one GPU, each calibrated the same way to ``--student-seconds``;
  4. every model is evaluated on the dev set, each student is packed, and dense vs packed latency is measured
     (batch 32, sequence 384, fp32 and bf16);
  5. results JSON, a Markdown report with the frontier, and a plot are written to ``--out``.

Used by ``bench/gpu_reference.sh``; rehearsed on a CPU with ``--rehearsal`` (tiny limits, a few steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import lzma
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from script_input import InputError, check_output_dir, one_line_errors, write_text  # noqa: E402

logger = logging.getLogger("gpu_reference")

# (topk density target, attention block): "heads" = one head's rows of q/k/v and its columns of the output.
DEFAULT_STUDENTS = "0.15:heads,0.25:32,0.33:heads,0.40:32,0.50:heads,0.60:32"


def parse_students(text: str) -> list[tuple[float, str]]:
    """``--students``: comma-separated ``TARGET[:BLOCK]`` (target density in (0, 1], block ``heads`` or a size)."""
    students = []
    for item in text.split(","):
        target, _, block = item.strip().partition(":")
        block = block or "32"
        try:
            density = float(target)
        except ValueError:
            density = math.nan
        if not 0 < density <= 1 or not (block == "heads" or (block.isdigit() and int(block) > 0)):
            raise InputError(f"--students: {item.strip()!r}: expected TARGET:BLOCK, a density in (0, 1] and heads "
                             "or a block size")
        students.append((density, block))
    return students


def check_carry(carry: Path, work: Path) -> None:
    """Refuse, before any work, a run whose model or data is neither staged in ``work`` nor carried in ``carry``."""
    needed = [("minilm/model.safetensors", "minilm/model.safetensors"), ("minilm/config.json", "minilm/config.json"),
              ("train-v1.1.json.xz", "train-v1.1.json"), ("dev-v1.1.json.xz", "dev-v1.1.json")]
    missing = [str(carry / carried) for carried, staged in needed
               if not (work / staged).exists() and not (carry / carried).is_file()]
    if missing:
        raise InputError(f"--carry {carry}: no {', '.join(missing)} (make them with `bash bench/gpu_reference.sh "
                         "--prepare`)")


def stage(carry: Path, work: Path) -> tuple[Path, Path, Path]:
    """Unpack the carried model and data; returns (model dir, train json, dev json)."""
    import torch
    from safetensors.torch import load_file, save_file

    model_dir = work / "minilm"
    if not (model_dir / "model.safetensors").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        for item in (carry / "minilm").iterdir():
            if item.name != "model.safetensors":
                shutil.copy(item, model_dir / item.name)
        weights = {k: v.to(torch.float32) if v.is_floating_point() else v
                   for k, v in load_file(str(carry / "minilm" / "model.safetensors")).items()}
        save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    paths = []
    for split in ("train", "dev"):
        target = work / f"{split}-v1.1.json"
        if not target.exists():
            with lzma.open(carry / f"{split}-v1.1.json.xz") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        paths.append(target)
    return model_dir, paths[0], paths[1]


class _StepTimes(logging.Handler):
    """When the trainer logged each "step N/M loss" line: after that step, before its evaluation or checkpoint."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("step %d/%d loss"):
            self.marks.append((int(record.args[0]), time.perf_counter()))


def calibrated_steps(cfg, seconds: float, probe_steps: int) -> tuple[int, float]:
    """Steps that fit ``seconds``, from a timed probe run (tokenization cached, start-up excluded).

    The probe logs its loss three times and evaluates only after the last; the rate between the first and the last
    line leaves out CUDA start-up and the first allocations, which would make the estimate several times too slow,
    and every evaluation and checkpoint (each a model and its optimizer state written), which on a GPU take longer
    than the steps between them.
    """
    from pruning import trainer

    every = max(1, probe_steps // 3)
    probe = replace(cfg, max_steps=3 * every, eval_limit=8, output_dir=str(Path(cfg.output_dir) / "probe"),
                    fill_steps=0, initial_warmup=0, final_warmup=0, eval_every=None, save_every=None,
                    log_every=every)
    times, level = _StepTimes(), trainer.logger.level
    trainer.logger.addHandler(times)
    trainer.logger.setLevel(logging.INFO)
    try:
        trainer.train(probe, progress=False)
    finally:
        trainer.logger.removeHandler(times)
        trainer.logger.setLevel(level)
    (first_step, first_time), (last_step, last_time) = times.marks[0], times.marks[-1]
    per_step = (last_time - first_time) / max(1, last_step - first_step)
    shutil.rmtree(probe.output_dir, ignore_errors=True)
    return max(probe_steps, int(seconds / per_step)), per_step


def train_teacher(args, model_dir: Path, train_json: Path, dev_json: Path, work: Path) -> dict[str, Any]:
    from pruning.config import RunConfig
    from pruning.trainer import train

    cfg = RunConfig(model=str(model_dir), train_data=str(train_json), eval_data=str(dev_json),
                    train_limit=args.train_limit, eval_limit=args.eval_limit, max_seq_length=args.seq_len,
                    doc_stride=args.doc_stride, batch_size=args.batch_size, eval_batch_size=256,
                    learning_rate=args.teacher_lr, warmup_ratio=0.1, weight_decay=0.01, epochs=1,
                    output_dir=str(work / "teacher"), cache_dir=str(work / "cache"), device=args.device,
                    precision=args.precision, log_every=100)
    steps, per_step = calibrated_steps(cfg, args.teacher_seconds, args.probe_steps)
    logger.info("teacher: %.3f s/step -> %d steps", per_step, steps)
    started = time.time()
    metrics = train(replace(cfg, max_steps=steps), progress=False)
    metrics["wall_seconds"] = time.time() - started
    metrics["steps"] = steps
    return metrics


def student_config(args, index: int, target: float, teacher_dir: str, train_json: Path, dev_json: Path, work: Path,
                   block: str = "32"):
    from pruning.config import RunConfig
    from transformers import BertConfig

    config = BertConfig.from_pretrained(teacher_dir)
    head_dim = config.hidden_size // config.num_attention_heads
    attention_block = (head_dim, config.hidden_size) if block == "heads" else (int(block), int(block))

    return RunConfig(model=teacher_dir, teacher=teacher_dir, train_data=str(train_json), eval_data=str(dev_json),
                     train_limit=args.train_limit, eval_limit=args.eval_limit, max_seq_length=args.seq_len,
                     doc_stride=args.doc_stride, batch_size=args.batch_size, eval_batch_size=256,
                     learning_rate=args.student_lr, mask_lr=1e-2, warmup_ratio=0.05, epochs=1,
                     method="topk", target_density=target, attention_block=attention_block, initial_warmup=0.05,
                     final_warmup=0.3, alpha_ce=0.1, alpha_distil=0.9, temperature=2.0,
                     output_dir=str(work / f"student-{index}"), cache_dir=str(work / "cache"), device=args.device,
                     precision=args.precision, log_every=100)


def run_student(args) -> None:
    """One student, in its own process: calibrate, fine-prune, pack, evaluate, time."""
    from pruning import squad
    from pruning.bench import flop_ratio
    from pruning.checkpoint import load_model
    from pruning.packing import pack_and_verify, save_packed
    from pruning.sparsity import sparsity_report
    from pruning.tokenizer import load_tokenizer
    from pruning.trainer import evaluate, resolve_device, train

    work = Path(args.work)
    cfg = student_config(args, args.index, args.target, args.teacher_dir, work / "train-v1.1.json",
                         work / "dev-v1.1.json", work, block=args.block)
    steps, per_step = calibrated_steps(cfg, args.student_seconds, args.probe_steps)
    logger.info("student %d (target %.2f): %.3f s/step -> %d steps", args.index, args.target, per_step, steps)
    started = time.time()
    metrics = train(replace(cfg, max_steps=steps), progress=False)
    train_wall = time.time() - started

    device = resolve_device(args.device)
    masked = load_model(metrics["model_dir"])
    tokenizer = load_tokenizer(metrics["model_dir"])
    examples = squad.load_squad(cfg.eval_data, limit=cfg.eval_limit)
    # Packed and checked here; timed later, one pair at a time with the device otherwise idle (measure_latency).
    packed, packing = pack_and_verify(masked, squad.check_windows(examples[:16], tokenizer,
                                                                  masked.config.max_position_embeddings),
                                      time_latency=False)
    packed_dir = work / f"packed-{args.index}"
    save_packed(packed, tokenizer, packed_dir, overwrite=True)
    report = sparsity_report(masked)
    packed_metrics = evaluate(packed.to(device), tokenizer, examples, cfg, device=device, progress=False)

    dense = load_model(args.teacher_dir)
    out = {
        "index": args.index,
        "target_density": args.target,
        "attention_block": list(cfg.attention_block),
        "steps": steps,
        "train_wall_seconds": train_wall,
        "masked_exact_match": metrics["exact_match"],
        "masked_f1": metrics["f1"],
        "exact_match": packed_metrics["exact_match"],
        "f1": packed_metrics["f1"],
        "linear_density": report.linear_density,
        "total_density": report.total_density,
        "heads_removed": report.heads_removed,
        "heads_kept_per_layer": report.heads_kept_per_layer,
        "ffn_kept_per_layer": report.ffn_kept_per_layer,
        "flop_limit": flop_ratio(dense, packed.cpu(), seq_len=args.seq_len),
        "packed_dir": str(packed_dir),
        "params_after": packing.params_after,
        "max_logit_diff": packing.max_logit_diff,
    }
    (work / f"student-{args.index}.json").write_text(json.dumps(out, indent=2))


def measure_latency(args, teacher_dir: str, students: list[dict[str, Any]]) -> None:
    """Dense versus packed latency, one pair at a time with the device otherwise idle (fp32, and bf16 on CUDA)."""
    import torch

    from pruning.bench import compare_latency
    from pruning.checkpoint import load_model
    from pruning.trainer import resolve_device

    device = resolve_device(args.device)
    dense = load_model(teacher_dir)
    for student in students:
        packed = load_model(student["packed_dir"])
        timing = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if name == "bf16" and device.type != "cuda":
                continue
            a, b = dense.to(device=device, dtype=dtype), packed.to(device=device, dtype=dtype)
            result = compare_latency(a, b, batch_size=args.latency_batch, seq_len=args.seq_len,
                                     repeats=args.repeats, warmup=5)
            timing[name] = {"dense_ms": result["median_a_s"] * 1e3, "packed_ms": result["median_b_s"] * 1e3,
                            "speedup": result["ratio"]}
        dense.to(device="cpu", dtype=torch.float32)
        student["latency"] = timing
        student["speedup"] = timing["fp32"]["speedup"]


def write_report(out_dir: Path, results: dict[str, Any]) -> None:
    """Write the run's results, with its frontier, to ``gpu_reference.json`` first, then their table
    (``gpu_reference.md``) and plot: a write that fails (a full disk) is one line, status 1, and leaves what was
    already written, the results above all, which took the whole run."""
    from workflows.frontier import pareto_front

    dense = results["teacher"]
    students = results["students"]
    points = [{"name": "dense", "f1": dense["f1"], "linear_density": 1.0, "speedup": 1.0},
              *[{"name": f"student-{s['index']}", **s} for s in students]]
    front = pareto_front(points, [("f1", "max"), ("linear_density", "min")])
    results["frontier"] = [points[i]["name"] for i in front]
    write_text(out_dir / "gpu_reference.json", json.dumps(results, indent=2))
    lines = [
        "# GPU reference: MiniLM on SQuAD v1.1",
        "",
        f"Device: {results['device']}. Train questions: {results['train_questions']}, dev questions: "
        f"{results['dev_questions']}. Total wall time {results['wall_seconds']:.0f} s.",
        "",
        f"Dense teacher: EM {dense['exact_match']:.2f} / F1 {dense['f1']:.2f} ({dense['steps']} steps, "
        f"{dense['wall_seconds']:.0f} s).",
        "",
        "| model | target | block | linear density | heads removed | EM | F1 | F1 - dense | speedup fp32 | "
        "speedup bf16 | FLOP limit | frontier |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(students, key=lambda s: s["linear_density"]):
        lat = s["latency"]
        name = f"student-{s['index']}"
        lines.append(
            f"| student-{s['index']} | {s['target_density']:.2f} | {'x'.join(map(str, s['attention_block']))} | "
            f"{s['linear_density']:.3f} | {s['heads_removed']} | "
            f"{s['exact_match']:.2f} | {s['f1']:.2f} | {s['f1'] - dense['f1']:+.2f} | "
            f"{lat['fp32']['speedup']:.2f} | {lat.get('bf16', {}).get('speedup', float('nan')):.2f} | "
            f"{s['flop_limit']:.2f} | {'yes' if name in results['frontier'] else ''} |")
    write_text(out_dir / "gpu_reference.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([s["linear_density"] for s in students], [s["f1"] for s in students], label="packed students")
        ax.axhline(dense["f1"], color="gray", linestyle="--", label="dense teacher")
        fp = sorted((points[i] for i in front), key=lambda p: p["linear_density"])
        ax.plot([p["linear_density"] for p in fp], [p["f1"] for p in fp], "r-", label="frontier")
        ax.set_xlabel("linear density")
        ax.set_ylabel("F1 (dev)")
        ax.legend()
        fig.savefig(out_dir / "gpu_reference.png", dpi=110, bbox_inches="tight")
    except Exception as err:  # the numbers matter more than the picture
        logger.warning("no plot: %s", err)


def rehearse(args: argparse.Namespace) -> None:
    """Tiny settings for every phase, on the CPU unless ``--device`` names another: a rehearsal checks the script,
    not the accelerator's time."""
    args.train_limit, args.eval_limit = args.train_limit or 64, args.eval_limit or 32
    args.seq_len, args.doc_stride, args.batch_size = 128, 32, 8
    args.teacher_seconds, args.student_seconds, args.probe_steps = 20, 15, 6
    args.latency_batch, args.repeats = 2, 3
    if args.device == "auto":
        args.device = "cpu"
    if getattr(args, "precision", None) is None:
        args.precision = "auto"  # a CPU without bf16 rehearses in fp32


@one_line_errors("gpu_reference")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "student"])
    parser.add_argument("--carry", default=str(ROOT / ".carry"))
    parser.add_argument("--work", default="/tmp/fineprune-gpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-reference-out"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", help="fp32, bf16 or auto (default: bf16; a rehearsal's default: auto)")
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--student-lr", type=float, default=5e-5)
    parser.add_argument("--teacher-seconds", type=float, default=120)
    parser.add_argument("--student-seconds", type=float, default=170)
    parser.add_argument("--probe-steps", type=int, default=60)
    parser.add_argument("--students", default=DEFAULT_STUDENTS, help="comma-separated TARGET:BLOCK (BLOCK: heads or N)")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--latency-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rehearsal", action="store_true",
                        help="tiny run of every phase, on the CPU unless --device names another")
    # student mode
    parser.add_argument("--index", type=int)
    parser.add_argument("--target", type=float)
    parser.add_argument("--block", default="32")
    parser.add_argument("--teacher-dir")
    args = parser.parse_args(argv)
    from pruning.precision import resolve_precision
    from pruning.trainer import check_device, resolve_device

    check_device(args.device, "--device")
    if args.mode == "student" and (args.index is None or args.target is None or args.teacher_dir is None):
        parser.error("student mode needs --index, --target and --teacher-dir")
    students_spec = parse_students(args.students)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.rehearsal:
        rehearse(args)
    elif args.precision is None:
        args.precision = "bf16"
    if args.mode == "student":
        run_student(args)
        return 0

    import torch

    started = time.time()
    work, out = Path(args.work), Path(args.out)
    check_output_dir(work, "--work")
    check_output_dir(out, "--out")
    check_carry(Path(args.carry), work)
    resolve_precision(args.precision, resolve_device(args.device))  # a GPU without bf16 is told before staging
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, train_json, dev_json = stage(Path(args.carry), work)
    logger.info("staged in %.0f s", time.time() - started)

    teacher = train_teacher(args, model_dir, train_json, dev_json, work)
    teacher_dir = teacher["model_dir"]
    logger.info("teacher: EM %.2f F1 %.2f", teacher["exact_match"], teacher["f1"])

    targets = [target for target, _ in students_spec]
    procs = []
    common = [sys.executable, str(Path(__file__).resolve()), "student", "--work", str(work), "--teacher-dir",
              teacher_dir]
    for flag in ("device", "precision", "seq_len", "doc_stride", "batch_size", "student_lr", "student_seconds",
                 "probe_steps", "train_limit", "eval_limit", "latency_batch", "repeats"):
        value = getattr(args, flag)
        if value is not None:
            common += [f"--{flag.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // max(1, len(targets))))}
    for index, (target, block) in enumerate(students_spec):
        log = open(work / f"student-{index}.log", "w")
        procs.append((subprocess.Popen(common + ["--index", str(index), "--target", str(target), "--block", block],
                                       stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for proc, log in procs:
        proc.wait()
        log.close()
    with open(out / "students.log", "w") as merged:  # one file: what comes back from a run is counted in files
        for index in range(len(procs)):
            merged.write(f"===== student {index} =====\n")
            merged.write((work / f"student-{index}.log").read_text(errors="replace"))
    students = []
    for index in range(len(targets)):
        path = work / f"student-{index}.json"
        if path.exists():
            students.append(json.loads(path.read_text()))
        else:
            logger.error("student %d produced no result; see students.log", index)

    measure_latency(args, teacher_dir, students)
    from pruning import squad

    results = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "train_questions": len(squad.load_squad(train_json, limit=args.train_limit)),
        "dev_questions": len(squad.load_squad(dev_json, limit=args.eval_limit)),
        "teacher": {k: v for k, v in teacher.items() if isinstance(v, (int, float, str))},
        "students": students,
        "args": vars(args),
        "wall_seconds": time.time() - started,
    }
    write_report(out, results)
    logger.info("done in %.0f s; results in %s", time.time() - started, out)
    print((out / "gpu_reference.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
