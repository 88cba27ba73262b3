"""Every pruning mode end to end on one device, in fp32 and bf16, from the repository alone.

Needs only torch and transformers (no Ray, no MLflow, no installed model or data): a tiny random BERT, a WordPiece
vocabulary built from the fixture's own text, and 23 SQuAD v1.1 dev questions in ``bench/fixtures/squad_mini.json``.
For each precision it trains a dense teacher, then for each pruning mode (topk per matrix, global topk,
sigmoid_threshold; topk warm-started from the fisher importance and distilled with the hidden-state loss from the
teacher cache over two micro-batches a step; a fisher cut recovered on the packed model with a weight average, and a
fisher cut in two rearranged stages): prunes with a filled phase, stops inside the filled phase and resumes from that
checkpoint, packs the result, evaluates the masked and the packed model (their EM/F1 must be equal) and answers a
question.

    python bench/gpu_smoke.py                 # cuda when available
    python bench/gpu_smoke.py --device cpu    # what CI runs

bf16 runs by default where the device supports it (a GPU with bf16, a CPU with bf16 matrix instructions); the
masked and packed models are evaluated in the run's precision.

One line per stage; the last line is ``gpu_smoke stages passed = N/N``. Exit status 0 only when all passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import BertTokenizer
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout, nothing installed

from pruning import squad  # noqa: E402
from pruning.checkpoint import load_model  # noqa: E402
from pruning.config import FINAL_DIR, RunConfig  # noqa: E402
from pruning.errors import typed_error_line  # noqa: E402
from pruning.inference import answer  # noqa: E402
from pruning.masks import masked_modules  # noqa: E402
from pruning.packing import pack_and_verify, save_packed  # noqa: E402
from pruning.precision import autocast, bf16_supported  # noqa: E402
from pruning.tokenizer import load_tokenizer  # noqa: E402
from pruning.trainer import check_device, resolve_device, train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_input import check_output_dir, one_line_errors  # noqa: E402

logger = logging.getLogger("gpu_smoke")

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "squad_mini.json"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128)
WINDOW = dict(max_seq_length=96, doc_stride=32)
PRUNE_STEPS, FILL_STEPS = 8, 4
CALIBRATION = dict(calibration_samples=16, mask_tuning_samples=16)  # windows of the importance passes and tuning
HEAD_BLOCK = [TINY["hidden_size"] // TINY["num_attention_heads"], TINY["hidden_size"]]  # fisher cuts whole heads
# (name, config overrides)
MODES = [
    ("topk", dict(method="topk", target_density=0.5)),
    ("topk_global", dict(method="topk", target_density=0.4, topk_scope="global")),
    ("sigmoid_threshold", dict(method="sigmoid_threshold", final_threshold=0.5, lambda_attention=1.0,
                               lambda_ffn=1.0, mask_lr=0.1)),
    # Scores warm-started from the fisher importance; the teacher's logits and layer outputs kept between steps for
    # the hidden-state loss; two micro-batches a step.
    ("topk_distil", dict(method="topk", target_density=0.5, mask_init="fisher", teacher_cache=True,
                         alpha_hidden=0.5, grad_accum=2, **CALIBRATION)),
    # Fisher cuts (tuned) and their recoveries, as many steps as the others, all of them filled: one cut whose
    # recovery trains the packed model with a weight average, and two rearranged cuts, the second one mid-recovery.
    ("fisher_packed", dict(method="fisher", target_density=0.5, attention_block=HEAD_BLOCK, fill_packed=True,
                           ema_decay=0.9, fill_steps=PRUNE_STEPS + FILL_STEPS, **CALIBRATION)),
    ("fisher_staged", dict(method="fisher", target_density=0.5, attention_block=HEAD_BLOCK, fisher_stages=2,
                           mask_rearrange=True, fill_steps=PRUNE_STEPS + FILL_STEPS, **CALIBRATION)),
]


class StopInFill(Exception):
    """Raised by the report callback once a checkpoint inside the filled phase exists."""


def build_tokenizer(out_dir: Path) -> Path:
    """A lowercasing WordPiece tokenizer whose vocabulary covers every word and character of the fixture."""
    probe = BertTokenizer(vocab={token: i for i, token in enumerate(SPECIALS)}, do_lower_case=True)
    backend = probe.backend_tokenizer
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    texts = [p["context"] for a in data["data"] for p in a["paragraphs"]]
    texts += [q["question"] for a in data["data"] for p in a["paragraphs"] for q in p["qas"]]
    words: dict[str, None] = {}
    chars: dict[str, None] = {}
    for text in texts:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            words[word] = None
            chars.update(dict.fromkeys(word))
    vocab = SPECIALS + sorted(chars) + [f"##{c}" for c in sorted(chars)] + sorted(set(words) - set(chars))
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


CHAIN = ("prune", "resume", "pack", "eval masked = packed", "ask")  # the stages of one pruning mode


class Smoke:
    """Runs named stages, prints one line each, and counts the ones that passed.

    ``total`` is fixed up front: a stage that cannot run because an earlier one failed counts as not passed.
    """

    def __init__(self, precisions: list[str], modes: list[str]) -> None:
        self.passed = 0
        self.total = len(precisions) * (1 + len(modes) * len(CHAIN))

    def stage(self, name: str, fn: Callable[[], str]) -> bool:
        started = time.perf_counter()
        try:
            detail = fn()
        except Exception as err:  # a smoke test reports every failure and goes on with the next stage
            print(f"gpu_smoke {name}: FAILED ({typed_error_line(err)})", flush=True)
            logger.debug("%s", traceback.format_exc())
            return False
        self.passed += 1
        print(f"gpu_smoke {name}: ok in {time.perf_counter() - started:.1f} s ({detail})", flush=True)
        return True


def base_config(args: argparse.Namespace, tokenizer_dir: Path, out_dir: Path, precision: str,
                **overrides: Any) -> RunConfig:
    values: dict[str, Any] = dict(
        model_config=TINY, tokenizer=str(tokenizer_dir), train_data=str(FIXTURE), eval_data=str(FIXTURE),
        batch_size=8, eval_batch_size=32, learning_rate=1e-3, warmup_ratio=0.0, log_every=100,
        device=args.device, precision=precision, output_dir=str(out_dir), seed=0, **WINDOW)
    values.update(overrides)
    return RunConfig(**values)


def evaluate_dir(model_dir: Path, device: str, examples: list, precision: str) -> dict[str, float]:
    model = load_model(model_dir).to(device)
    with autocast(precision, device):
        metrics, _ = squad.evaluate_model(model, load_tokenizer(model_dir), examples, batch_size=32, device=device,
                                          progress=False, **WINDOW)
    return metrics


def run(args: argparse.Namespace) -> Smoke:
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="gpu_smoke.") as tmp:  # removed afterwards, pass or fail
            return run_in(args, Path(tmp))
    return run_in(args, Path(args.out))


def run_in(args: argparse.Namespace, work: Path) -> Smoke:
    smoke = Smoke(args.precisions, args.modes)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = build_tokenizer(work / "tokenizer")
    examples = squad.load_squad(FIXTURE)
    print(f"gpu_smoke device={args.device} torch={torch.__version__} questions={len(examples)} work={work}",
          flush=True)
    for precision in args.precisions:
        root = work / precision
        dense_dir = root / "dense" / FINAL_DIR

        def dense() -> str:
            cfg = base_config(args, tokenizer_dir, root / "dense", precision, method="dense", max_steps=12)
            metrics = train(cfg, progress=False)
            return f"f1 {metrics['f1']:.2f}"

        if not smoke.stage(f"{precision} dense", dense):
            continue
        for name, overrides in MODES:
            if name not in args.modes:
                continue
            run_dir = root / name
            common = dict(model=str(dense_dir), teacher=str(dense_dir), model_config=None, tokenizer=None,
                          max_steps=PRUNE_STEPS,
                          fill_steps=FILL_STEPS, initial_warmup=1, final_warmup=2, eval_every=PRUNE_STEPS + 2)
            common.update(overrides)
            cfg = base_config(args, tokenizer_dir, run_dir, precision, **common)
            state: dict[str, Any] = {}

            def prune_until_fill(cfg=cfg, state=state) -> str:
                def report(metrics: dict[str, float], checkpoint: str | None) -> None:
                    if metrics["phase_fill"] and checkpoint is not None:
                        state["checkpoint"] = checkpoint
                        state["density"] = metrics["linear_density"]
                        raise StopInFill

                try:
                    train(cfg, report=report, progress=False)
                except StopInFill:
                    pass
                if "checkpoint" not in state:
                    raise RuntimeError("no checkpoint inside the filled phase")
                return f"stopped in the filled phase at step {PRUNE_STEPS + 2}, linear density {state['density']:.3f}"

            def resume(cfg=cfg, state=state) -> str:
                metrics = train(cfg, resume_from=state["checkpoint"], progress=False)
                final = load_model(metrics["model_dir"])
                modes = {m.mode for _, m in masked_modules(final)}
                if modes != {"fixed"}:
                    raise RuntimeError(f"final model's masks are {sorted(modes)}, expected fixed")
                state["final"] = Path(metrics["model_dir"])
                return f"step {metrics['step']}, f1 {metrics['f1']:.2f}, heads removed {metrics['heads_removed']:.0f}"

            def pack_it(run_dir=run_dir, state=state, precision=precision) -> str:
                # On the run's device, in its precision: the logit check, then the dense shape timed against it.
                masked = load_model(state["final"]).to(args.device)
                tokenizer = load_tokenizer(state["final"])
                inputs = squad.check_windows(examples[:8], tokenizer, TINY["max_position_embeddings"])
                packed, report = pack_and_verify(masked, inputs, tolerance=1e-4, seq_len=WINDOW["max_seq_length"],
                                                 repeats=2, precision=precision)
                save_packed(packed.cpu(), tokenizer, run_dir / "packed", overwrite=True)
                state["packed"] = run_dir / "packed"
                return (f"params {report.params_before} -> {report.params_after}, "
                        f"max |dlogit| {report.max_logit_diff:.1e}, speedup {report.speedup:.2f} ({report.precision})")

            def evaluate_both(state=state, precision=precision) -> str:
                masked = evaluate_dir(state["final"], args.device, examples, precision)
                packed = evaluate_dir(state["packed"], args.device, examples, precision)
                if masked != packed:
                    raise RuntimeError(f"masked {masked} != packed {packed}")
                return f"masked = packed: em {masked['exact_match']:.2f} f1 {masked['f1']:.2f}"

            def ask(state=state) -> str:
                model = load_model(state["packed"]).to(args.device)
                example = examples[0]
                result = answer(model, load_tokenizer(state["packed"]), example.question, example.context,
                                device=args.device, **WINDOW)
                if example.context[result.start:result.end] != result.text:
                    raise RuntimeError("the answer is not the span of the context it points to")
                return f"{example.question!r} -> {result.text[:40]!r}"

            for stage_name, fn in zip(CHAIN, (prune_until_fill, resume, pack_it, evaluate_both, ask)):
                if not smoke.stage(f"{precision} {name} {stage_name}", fn):
                    break  # the rest of this mode's chain needs what the failed stage makes
    return smoke


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on: auto, cpu, cuda or cuda:N "
                             "(default: cuda when available, else cpu)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                        help="precisions to run (default: fp32, and bf16 where the device supports it)")
    parser.add_argument("--modes", nargs="+", default=[name for name, _ in MODES], choices=[name for name, _ in MODES],
                        help="pruning modes to run (default: all)")
    parser.add_argument("--out", default=None,
                        help="work directory, kept afterwards (default: a temporary directory, removed at the end)")
    parser.add_argument("--verbose", action="store_true", help="log the library's progress and failures' tracebacks")
    args = parser.parse_args(argv)
    check_device(args.device, "--device")
    args.device = str(resolve_device(args.device))  # auto: cuda when available, as the trainer takes it
    if args.precisions is None:
        args.precisions = ["fp32", "bf16"] if bf16_supported(args.device) else ["fp32"]
    return args


@one_line_errors("gpu_smoke")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is not None:
        check_output_dir(args.out, "--out")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    smoke = run(args)
    print(f"gpu_smoke wall {time.perf_counter() - started:.1f} s", flush=True)
    print(f"gpu_smoke stages passed = {smoke.passed}/{smoke.total}", flush=True)
    return 0 if smoke.passed == smoke.total else 1


if __name__ == "__main__":
    sys.exit(main())
