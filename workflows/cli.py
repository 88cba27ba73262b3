"""``fineprune``: the command line, a thin front over the library and the orchestration.

Every sub-command that fails on user input (a bad config, a malformed SQuAD file, a missing model directory, a
corrupted checkpoint, an invalid search space) prints one line naming the file and the field and exits with 2.
Heavy imports (torch, transformers, Ray, MLflow) happen inside the sub-commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from workflows.retry import TrackingUnavailable
from workflows.sweep import RayUnavailable, ResumeError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("fineprune")


class UserError(Exception):
    """Raised for bad input; printed as one line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from pruning.checkpoint import CheckpointError
    from pruning.config import ConfigError
    from pruning.resources import ResourceError
    from workflows.record import RecordError

    errors: list[type[BaseException]] = [UserError, ConfigError, CheckpointError, ResourceError, RecordError]
    try:
        from pruning.squad import SquadFormatError

        errors.append(SquadFormatError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from pruning.packing import PackingError

        errors.append(PackingError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from pruning.export import ExportError

        errors.append(ExportError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from workflows.space import SpaceError

        errors.append(SpaceError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from workflows.registry import SelectionError

        errors.append(SelectionError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("train_limit", "eval_limit", "max_steps", "output_dir", "model", "teacher", "device", "precision"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    if getattr(args, "data", None) is not None:
        out["train_data"] = args.data
    if getattr(args, "eval_data", None) is not None:
        out["eval_data"] = args.eval_data
    return out


def _run_training(args: argparse.Namespace, method_required: bool) -> int:
    from pruning.config import ConfigError, Method, load_config
    from pruning.trainer import train

    cfg = load_config(args.config, _overrides(args))
    if method_required and cfg.method is Method.DENSE:
        raise UserError(f"{args.config}: method: `fineprune prune` needs topk, sigmoid_threshold or fisher "
                        "(use `fineprune train` for a dense fine-tune)")
    if not method_required and cfg.method is not Method.DENSE:
        raise UserError(f"{args.config}: method: {cfg.method.value} is a pruning method; use `fineprune prune`")
    try:
        metrics = train(cfg, report=None, resume_from=args.resume, progress=not args.no_progress)
    except ConfigError as err:  # found once the model is known (e.g. a block shape that does not fit it)
        raise UserError(f"{args.config}: {err}") from None
    _emit(metrics)
    return 0


def _emit(values: dict[str, Any]) -> None:
    """The command's result, as one JSON line on stdout (the last line)."""
    clean = {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool, list, dict)) or v is None}
    sys.stdout.write(json.dumps(clean, sort_keys=True) + "\n")
    sys.stdout.flush()


def cmd_train(args: argparse.Namespace) -> int:
    return _run_training(args, method_required=False)


def cmd_prune(args: argparse.Namespace) -> int:
    return _run_training(args, method_required=True)


def _load_any(model_dir: str, variant: str | None = None):
    """A PyTorch model directory, or an exported one (run by ONNX Runtime), with its tokenizer."""
    from pruning.checkpoint import load_model, load_tokenizer
    from pruning.export import is_exported_dir, load_exported
    from pruning.resources import resolve_model

    path = resolve_model(model_dir)
    if is_exported_dir(path):
        return load_exported(path, variant=variant), load_tokenizer(path)
    if variant is not None:
        raise UserError(f"{path}: --variant applies to exported directories (see `fineprune export`)")
    return load_model(path), load_tokenizer(path)


def _check_exported_precision(precision: str) -> None:
    if precision == "bf16":
        raise UserError("--precision bf16: an exported model runs at the precision it was exported with "
                        "(--variant fp32 or int8)")


def cmd_eval(args: argparse.Namespace) -> int:
    from pruning import squad
    from pruning.config import RunConfig
    from pruning.export import OrtQAModel
    from pruning.resources import resolve_data
    from pruning.trainer import evaluate, resolve_device

    model, tokenizer = _load_any(args.model_dir, args.variant)
    examples = squad.load_squad(resolve_data(args.data), limit=args.limit)
    cfg = RunConfig(max_seq_length=args.max_seq_length, doc_stride=args.doc_stride, eval_batch_size=args.batch_size,
                    precision=args.precision)
    if isinstance(model, OrtQAModel):
        # The same windows, span search and metric as for a PyTorch model; ONNX Runtime runs on the CPU.
        if args.device not in ("auto", "cpu"):
            raise UserError(f"--device {args.device}: an exported model runs on the CPU")
        _check_exported_precision(args.precision)
        metrics, _ = squad.evaluate_model(model, tokenizer, examples, max_seq_length=cfg.max_seq_length,
                                          doc_stride=cfg.doc_stride, batch_size=cfg.eval_batch_size,
                                          max_answer_length=cfg.max_answer_length, n_best=cfg.n_best,
                                          progress=not args.no_progress)
        metrics["variant"] = model.variant
    else:
        device = resolve_device(args.device)
        model.to(device)
        metrics = evaluate(model, tokenizer, examples, cfg, device=device, progress=not args.no_progress)
    metrics["questions"] = len(examples)
    _emit(metrics)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from pruning.export import OrtQAModel, is_exported_dir
    from pruning.inference import answer
    from pruning.precision import autocast, resolve_precision
    from pruning.resources import resolve_model

    # Settings are checked before any weights are read.
    if is_exported_dir(resolve_model(args.model_dir)):
        _check_exported_precision(args.precision)
        precision = "fp32"
    else:
        precision = resolve_precision(args.precision, "cpu")
    model, tokenizer = _load_any(args.model_dir, args.variant)
    if isinstance(model, OrtQAModel):
        result = answer(model, tokenizer, args.question, args.context)
    else:
        with autocast(precision, "cpu"):
            result = answer(model, tokenizer, args.question, args.context)
    _emit({"answer": result.text, "score": float(result.score), "start": result.start, "end": result.end})
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pruning.squad import score_files

    _emit(score_files(args.data, args.predictions))
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from pruning.packing import pack_checkpoint

    report = pack_checkpoint(args.checkpoint, args.out_dir, data=args.data, questions=args.questions,
                             overwrite=args.overwrite, precision=args.precision)
    _emit(report)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pruning.export import export_checkpoint

    _emit(export_checkpoint(args.model_dir, args.out_dir, quantize=args.quantize, opset=args.opset, data=args.data,
                            questions=args.questions, overwrite=args.overwrite))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from workflows.sweep import run_sweep

    summary = run_sweep(args.space, experiment=args.experiment, tracking_uri=args.tracking_uri,
                        address=args.address, resume=args.resume or False, storage_path=args.storage_path,
                        tracking_timeout=args.tracking_timeout)
    _emit(summary)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from workflows.registry import register_from_experiment

    result = register_from_experiment(args.experiment, tracking_uri=args.tracking_uri, space=args.space,
                                      frontier=args.frontier)
    _emit(result)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from workflows import record, tracking
    from workflows.registry import select_by_latency

    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--repeats", args.repeats)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    client = tracking.client_for(record.tracking_uri(args.tracking_uri))
    result = select_by_latency(client, args.model, args.max_latency_ms, batch_size=args.batch_size,
                               seq_len=args.seq_len, threads=args.threads, alias=args.alias, repeats=args.repeats)
    _emit(result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from workflows.report import write_report

    paths = write_report(args.experiment, out_dir=args.out, tracking_uri=args.tracking_uri)
    _emit({k: str(v) for k, v in paths.items()})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fineprune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def training(name: str, func: Callable, help_text: str) -> None:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, help="YAML run config")
        p.add_argument("--model", help="student model directory (or 'minilm'); overrides the config")
        p.add_argument("--teacher", help="teacher QA model directory; overrides the config")
        p.add_argument("--data", help="training SQuAD JSON (or 'train'/'dev'); overrides the config")
        p.add_argument("--eval-data", help="evaluation SQuAD JSON (or 'train'/'dev')")
        p.add_argument("--train-limit", type=int, help="use the first N training questions")
        p.add_argument("--eval-limit", type=int, help="evaluate on the first N questions")
        p.add_argument("--max-steps", type=int)
        p.add_argument("--output-dir")
        p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
        p.add_argument("--precision", choices=["fp32", "bf16", "auto"], help="overrides the config's precision")
        p.add_argument("--resume", help="training checkpoint directory to continue from")
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=func)

    training("train", cmd_train, "dense fine-tune (teacher and baseline)")
    training("prune", cmd_prune, "one masked fine-pruning run")

    variant_help = "which model of an exported directory to run (default: int8 when it was quantized)"
    p = sub.add_parser("eval", help="EM/F1 of a dense, masked, packed or exported model")
    p.add_argument("model_dir")
    p.add_argument("--data", default="dev", help="SQuAD JSON, or 'dev'/'train' (default dev)")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-seq-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="fp32, bf16 (autocast; on a CPU only with bf16 matrix instructions) or auto (default fp32)")
    p.add_argument("--variant", choices=("fp32", "int8"), help=variant_help)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ask", help="answer one question from a context")
    p.add_argument("model_dir")
    p.add_argument("--question", required=True)
    p.add_argument("--context", required=True)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="fp32, bf16 (autocast; on a CPU only with bf16 matrix instructions) or auto (default fp32)")
    p.add_argument("--variant", choices=("fp32", "int8"), help=variant_help)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("score", help="official SQuAD v1.1 EM/F1 of a predictions file")
    p.add_argument("data")
    p.add_argument("predictions")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("pack", help="pack a pruned checkpoint into a smaller dense model")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--data", default="dev", help="questions for the logit check (default: shipped dev)")
    p.add_argument("--questions", type=int, default=16, help="how many dev questions to compare on")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="fp32, bf16 (autocast; on a CPU only with bf16 matrix instructions) or auto for the latency timing (default fp32)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("export", help="export a packed (or dense) model to ONNX for ONNX Runtime")
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--quantize", choices=("int8",), help="also write a dynamically quantized int8 model")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14 to 20 (default 17)")
    p.add_argument("--data", default="dev", help="questions for the logit check (default: shipped dev)")
    p.add_argument("--questions", type=int, default=16, help="how many dev questions to compare on")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="Ray Tune sweep with MLflow tracking")
    p.add_argument("--space", required=True, help="tune_spaces/*.yaml")
    p.add_argument("--experiment", help="MLflow experiment name (default: the space's)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default RAY_ADDRESS; without it, a private local Ray)")
    p.add_argument("--storage-path", help="shared storage for trial checkpoints (default ./runs/ray)")
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN_ID",
                   help="continue the experiment's last sweep started (or the sweep with this MLflow parent run)")
    p.add_argument("--tracking-timeout", type=float, metavar="SECONDS",
                   help="how long the tracking server may be away before the sweep stops (default 300)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("register", help="register the best trial's packed model")
    p.add_argument("--experiment", required=True)
    p.add_argument("--tracking-uri")
    p.add_argument("--space", help="space file whose selection policy to use (default: the one the sweep logged)")
    p.add_argument("--frontier", action="store_true",
                   help="also register every Pareto point of the sweep as a version (idempotent)")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("select", help="time the registered versions here and alias the best within a latency budget")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--max-latency-ms", type=float, required=True, help="budget per forward pass, in milliseconds")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, help="torch threads while timing (default: torch's default here)")
    p.add_argument("--alias", default="champion", help="alias to point at the chosen version (default champion)")
    p.add_argument("--repeats", type=int, default=10, help="timed passes per version (medians are compared)")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("report", help="HTML and Markdown report of a sweep")
    p.add_argument("--experiment", required=True)
    p.add_argument("--tracking-uri")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return int(args.func(args) or 0)
    except (UserError, RayUnavailable, ResumeError) as err:  # before _user_errors(), which imports torch
        sys.stderr.write(f"fineprune {args.command}: error: {err}\n")
        return 2
    except _user_errors() as err:
        sys.stderr.write(f"fineprune {args.command}: error: {err}\n")
        return 2
    except TrackingUnavailable as err:  # the environment, not the input: exit 1, still one line
        sys.stderr.write(f"fineprune {args.command}: error: {err}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
