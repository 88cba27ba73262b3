"""``fineprune``: the command line, a thin front over the library and the orchestration.

Every sub-command that fails on user input (a bad config, a malformed SQuAD file, a missing model directory, a
corrupted checkpoint, an invalid search space) prints one line naming the file and the field and exits with 2.
Each command's result is one strict JSON line on stdout (a value that is not a finite number is ``null``); logs go
to stderr. A flag means the same in every sub-command that takes it, and ``--help`` shows every default.
An output directory that takes no new files (no write permission, an immutable or read-only one) is refused
before any work, exit 2; an output that cannot be written once the work is done (a full disk) is one line and status
1, and the output it would have replaced is left as it was. Ctrl-C (SIGINT) or SIGTERM stops a command with one line and
status 128 + the signal's number.

The library and the orchestration (torch, transformers, Ray, MLflow) are imported inside the sub-commands that use
them, so that ``fineprune --help`` and light commands such as ``score`` start at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from tqdm.contrib.logging import logging_redirect_tqdm

from pruning.errors import interrupt_behind
from workflows.record import RUNTIMES, fineprune_version
from workflows.retry import TrackingUnavailable
from workflows.user_errors import output_path_problem, user_errors, write_problem

__all__ = ["main", "build_parser", "UserError"]

logger = logging.getLogger("fineprune")

PRECISIONS = ("fp32", "bf16", "auto")
FEW_REPEATS = 5  # timed passes below which pack's speedup and select's latencies are noise (a warning says so)
REACH_TIMEOUT_S = 15.0  # how long register, select and report wait for a tracking server that does not answer
PRECISION_HELP = "fp32, bf16 (autocast; on a CPU only with bf16 matrix instructions) or auto (bf16 where supported)"


DESCRIPTION = ("Block movement fine-pruning of BERT-family question-answering models: train or prune a model, pack "
               "it into a smaller dense one, evaluate, export and ask it, and sweep, register and select "
               "pruned models with Ray Tune and MLflow.")
INCOMPLETE_SWEEP = 3  # exit status of a sweep that ended with trials failed or left to run (--resume continues it)
NO_CHAMPION = 4  # exit status of a registration that found no trial (or version) meeting the registry policy
# Every exit status a command ends with, and what it means (the top-level help and the README's table list them).
EXIT_STATUSES = {
    0: "done",
    1: "the work could not be finished (an output that cannot be written, a tracking server that does not answer, "
       "an output directory another command is writing)",
    2: "bad input, before any work (one line naming the file and the field), or a select budget no version meets",
    INCOMPLETE_SWEEP: "a sweep ended with trials failed or left to run, its summary printed (--resume continues it)",
    NO_CHAMPION: "register registered no champion (the alias is left where it was)",
    128 + signal.SIGINT: "interrupted by SIGINT (Ctrl-C)",
    128 + signal.SIGTERM: "interrupted by SIGTERM",
}


class UserError(Exception):
    """Raised for bad input; printed as one line, exit status 2."""


def _plain(value: Any) -> Any:
    """``value`` as strict JSON values: non-finite numbers become None, numpy scalars Python ones."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
        return _plain(value.item())
    return str(value)


# Where results go: the process's stdout, while everything else a command prints (Ray Tune's progress tables, the
# workers' output Ray forwards, any library's print) is sent to stderr by main().
_results: TextIO | None = None


def _emit(values: dict[str, Any]) -> None:
    """The command's result, as one strict JSON line on stdout (the only line)."""
    stream = _results or sys.stdout
    stream.write(json.dumps(_plain(values), sort_keys=True, allow_nan=False) + "\n")
    stream.flush()


# --------------------------------------------------------------------------------------------------------------
# Sub-commands
# --------------------------------------------------------------------------------------------------------------


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("train_data", "eval_data", "train_limit", "eval_limit", "max_steps", "output_dir", "model", "teacher",
                "device", "precision"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    if "model" in out:  # the model named on the command line, not the config's random one
        out["model_config"] = None
    return out


def _run_training(args: argparse.Namespace, method_required: bool) -> int:
    from pruning.config import ConfigError, Method, check_keys_apply, load_config

    overrides = _overrides(args)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:  # a bad value of a flag ("max_steps: must be ...") is named by the flag, not the file
        # (the file as load_config names it: ./c.yaml is c.yaml there)
        key, _, problem = str(err).removeprefix(f"{Path(args.config)}: ").partition(": ")
        if key in overrides and key != "model_config":
            raise UserError(f"{_flag(key)}: {problem}") from None
        raise
    try:
        check_keys_apply(cfg, overrides)
    except ConfigError as err:  # "max_steps: has no effect ..." about the flag that gave it
        key, _, problem = str(err).partition(": ")
        raise UserError(f"{args.config}: {_flag(key)}: {problem}") from None
    if method_required and cfg.method is Method.DENSE:
        raise UserError(f"{args.config}: method: `fineprune prune` needs topk, sigmoid_threshold or fisher "
                        "(use `fineprune train` for a dense fine-tune)")
    if not method_required and cfg.method is not Method.DENSE:
        raise UserError(f"{args.config}: method: {cfg.method.value} is a pruning method; use `fineprune prune`")
    _check_device(cfg.device, _given_by("device", overrides, args.config))
    _check_precision(cfg, overrides, args.config)
    _check_inputs(cfg, overrides, args.config)
    out = Path(cfg.output_dir)
    _check_output_path(out, "output_dir", directory=True, writable=True, staged=False, utf8=True)
    if cfg.cache_dir is not None:  # optional: a cache that cannot be written is warned of, one under a file refused
        _check_output_path(cfg.cache_dir, f"{args.config}: cache_dir", directory=True)
    _check_reads_outside(cfg, overrides, args.config, out)
    with _writing(out, "output_dir"):
        return _train_into(args, cfg, out)


def _train_into(args: argparse.Namespace, cfg: Any, out: Path) -> int:
    """The run of :func:`_run_training` once it holds ``out``'s lock: checked against what ``out`` holds, then
    trained."""
    from pruning import atomic
    from pruning.config import ConfigError
    from pruning.config import CHECKPOINT_DIR, FINAL_DIR
    from pruning.trainer import train

    checkpoint = out / CHECKPOINT_DIR
    if out.is_dir():  # a write of final/ or checkpoint/ killed outright: its leftovers cleared, a moved-aside one back
        for name in (FINAL_DIR, CHECKPOINT_DIR):
            atomic.tidy(out / name, restore=True)
    # --resume continues the run of output_dir; another run's checkpoint resumed there would write over this one.
    # (A path that is no checkpoint, or one inside output_dir, is named by the trainer's checks instead.)
    foreign = (args.resume is not None and Path(args.resume).is_dir()
               and not Path(args.resume).resolve().is_relative_to(out.resolve()))
    if (args.resume is None or foreign) and not args.overwrite and out.is_dir() and any(out.iterdir()):
        if foreign:
            raise UserError(f"{out}: output_dir holds another run than the checkpoint {args.resume} (pass the "
                            "--output-dir that checkpoint's run wrote to, --overwrite to replace this one, or "
                            "another --output-dir)")
        resume = f"--resume {shlex.quote(str(checkpoint))}" if checkpoint.is_dir() else "--resume CHECKPOINT_DIR"
        raise UserError(f"{out}: output_dir holds an earlier run (pass --overwrite to replace it, {resume} to "
                        "continue it, or another --output-dir)")
    existed = out.exists()
    try:
        metrics = train(cfg, report=None, resume_from=args.resume, progress=_progress_bars(args))
    except ConfigError as err:  # found once the model is known (e.g. a block shape that does not fit it)
        raise UserError(f"{args.config}: {err}") from None
    finally:
        if not existed and out.is_dir() and not any(out.iterdir()):  # a run that wrote nothing leaves nothing
            out.rmdir()
    _emit(metrics)
    return 0


def _check_precision(cfg: Any, overrides: dict[str, Any], config: str) -> None:
    """A one-line error, before any work, for a precision the run's device cannot compute in (bf16 on a CPU without
    bf16 instructions), named by the flag or the config key that gave it."""
    from pruning.precision import PrecisionError, resolve_precision
    from pruning.trainer import resolve_device

    try:
        resolve_precision(cfg.precision, resolve_device(cfg.device))
    except PrecisionError as err:
        raise UserError(f"{_given_by('precision', overrides, config)}: "
                        f"{str(err).removeprefix('precision: ')}") from None


def _flag(key: str) -> str:
    """The command-line flag of the run-config key ``key``."""
    return f"--{key.replace('_', '-')}"


def _given_by(key: str, overrides: dict[str, Any], config: str) -> str:
    """Where the run's ``key`` came from: its flag, else the config file's key."""
    return _flag(key) if key in overrides else f"{config}: {key}"


def _input_keys(cfg: Any) -> tuple[str, ...]:
    """The run-config keys that name what a run reads (its model only where no model_config builds one)."""
    return ("model",) * (cfg.model_config is None) + ("tokenizer", "train_data", "eval_data", "teacher")


def _check_inputs(cfg: Any, overrides: dict[str, Any], config: str) -> None:
    """The run's model, teacher and data files exist, before any work; a missing one is named by the flag or the
    config key that gave it."""
    from pruning.resources import first_missing

    keys = _input_keys(cfg)
    missing = first_missing({key: getattr(cfg, key) for key in keys}, keys)
    if missing is not None:
        key, err = missing
        raise UserError(f"{_given_by(key, overrides, config)}: {err}")


def _check_reads_outside(cfg: Any, overrides: dict[str, Any], config: str, out: Path) -> None:
    """Refuse an output_dir whose final/ or checkpoint/ holds the run's student, teacher or tokenizer directory, or
    its training or evaluation data: the run replaces them (with --overwrite, before it trains), and would remove
    what it reads."""
    from pruning.resources import resolve_input
    from pruning.config import CHECKPOINT_DIR, FINAL_DIR

    replaced = [(out / name).resolve() for name in (FINAL_DIR, CHECKPOINT_DIR)]
    for key in _input_keys(cfg):
        value = getattr(cfg, key)
        if value is None:
            continue
        source = resolve_input(key, value).resolve()
        if any(source.is_relative_to(path) for path in replaced):
            where = _given_by(key, overrides, config)
            what = "file" if key.endswith("_data") else "directory"
            raise UserError(f"output_dir {out}: holds the {key} {what} {value} the run reads ({where}), which "
                            "the run would replace; pass another --output-dir")


def cmd_train(args: argparse.Namespace) -> int:
    return _run_training(args, method_required=False)


def cmd_prune(args: argparse.Namespace) -> int:
    return _run_training(args, method_required=True)


def _load_any(model_dir: str, precision: str, variant: str | None, device: str = "cpu"):
    """A PyTorch model directory (on ``device``), or an exported one (run by ONNX Runtime on the CPU): the model,
    its tokenizer, the resolved precision (an exported model's: its variant, ``fp32`` or ``int8``) and the device.
    The settings are checked before any weights are read."""
    from pruning.averaging import holds_average
    from pruning.checkpoint import load_model
    from pruning.export import is_exported_dir, load_exported
    from pruning.precision import resolve_precision
    from pruning.resources import resolve_model
    from pruning.tokenizer import check_tokenizer_fits, load_tokenizer
    from pruning.trainer import resolve_device

    path = resolve_model(model_dir)
    if is_exported_dir(path):
        if device not in ("auto", "cpu"):
            raise UserError(f"--device {device}: an exported model runs on the CPU")
        if precision == "bf16":
            raise UserError("--precision bf16: an exported model runs at the precision it was exported with "
                            "(--variant fp32 or int8)")
        model = load_exported(path, variant=variant)
        tokenizer = load_tokenizer(path)
        check_tokenizer_fits(path, model.config, tokenizer)
        # It computes in its variant (fp32 or int8), as the served model reports its precision.
        return model, tokenizer, model.variant, resolve_device("cpu")
    if variant is not None:
        raise UserError(f"{path}: --variant applies to exported directories (see `fineprune export`)")
    if precision is None:  # no --precision: the one the run that wrote the model evaluated it in, where it runs
        precision = _recorded_precision(path, device)
    if holds_average(path):
        logger.warning("%s is a training checkpoint of a run with ema_decay: these are its live weights, while the "
                       "run evaluated their average, which its final model holds; use the final model for the "
                       "run's figures", path)
    run_device = resolve_device(device)
    precision = resolve_precision(precision, run_device)
    model, tokenizer = load_model(path, qa_head=True), load_tokenizer(path)
    check_tokenizer_fits(path, model.config, tokenizer)
    return model.to(run_device), tokenizer, precision, run_device


def _warn_live_weights(model_dir: str | Path, command: str) -> None:
    """One warning where ``model_dir`` is a training checkpoint of a run with ``ema_decay``: ``command`` (pack,
    export) takes its live weights, while the run's evaluations and its final model are of their average."""
    from pruning.averaging import holds_average
    from pruning.config import FINAL_DIR

    path = Path(model_dir)
    if holds_average(path):
        logger.warning("%s is a training checkpoint of a run with ema_decay: %s takes its live weights, while the run "
                       "evaluated their average, which its final model %s holds; %s that one for the model the run "
                       "scored", path, command, path.parent / FINAL_DIR, command)


def _recorded_precision(path: Path, device: str) -> str:
    """The precision ``path`` records of its run's evaluations (:func:`pruning.checkpoint.read_precision`), as
    ``device`` can run it: ``bf16`` where it has bf16 matrix units, else ``fp32`` with a warning (the figures may
    differ slightly from the run's); ``fp32`` for a model without the record."""
    from pruning.checkpoint import read_precision
    from pruning.precision import resolve_precision
    from pruning.trainer import resolve_device

    if read_precision(path) != "bf16":
        return "fp32"
    if resolve_precision("auto", resolve_device(device)) == "bf16":
        logger.info("%s records that its run evaluated it in bf16: running it in bf16", path / "config.json")
        return "bf16"
    logger.warning("%s records that its run evaluated it in bf16, but %s has no bf16 matrix units: running it in fp32 "
                   "(the figures may differ slightly from the run's)", path / "config.json", device)
    return "fp32"


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    """Every named option that is set is an integer >= 1 (before any work)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"{_flag(name)} must be >= 1, got {value}")


def _warn_few_repeats(repeats: int, figure: str) -> None:
    """Warn that ``figure``, a median of ``repeats`` timed passes, is noise when they are fewer than
    :data:`FEW_REPEATS`: one pass that another process or the clock's ramp slowed moves it by more than packing
    gains (a tiny model packed with 2 passes: speedups from 0.8 to 5; with 20, 1.0 to 1.07)."""
    if repeats < FEW_REPEATS:
        logger.warning("--repeats %d: %s is the median of %d timed pass%s, which one slowed pass moves; give %d or "
                       "more (default 10) for a figure to compare", repeats, figure, repeats,
                       "" if repeats == 1 else "es", FEW_REPEATS)


def _check_device(name: str | None, what: str) -> None:
    """A one-line error (ConfigError) for a device this machine cannot run on, before any work."""
    from pruning.trainer import check_device

    check_device(name, what)


def _check_output_path(path: str | Path, flag: str, directory: bool, writable: bool = False,
                       staged: bool = True, utf8: bool = False) -> None:
    """A one-line error, before any work, for an output that cannot be made: a file where a directory goes, a
    directory where a file goes, or a path under a file; with ``writable``, also a directory (or the one it would be
    made in) that takes no new files; with ``utf8`` (a model is saved into it), a name the locale does not write as
    UTF-8."""
    problem = output_path_problem(path, directory, writable, staged, utf8)
    if problem is not None:
        raise UserError(f"{flag} {path}: {problem}")


def _writing(out: str | Path, flag: str) -> contextlib.AbstractContextManager:
    """Hold ``out``'s lock (a file beside it) while a command checks and writes it: a second command writing the
    same directory meanwhile is refused in one line naming it, rather than both passing the check for an earlier
    output and the later one silently replacing (or mixing its files into) the first one's.

    The lock stays beside ``out``, never inside it: a directory replaced whole (pack, export) would take a lock
    inside it away, and one kept in either place by whether the parent takes new files (which can differ between
    two users) would let two commands each hold a lock of their own. So ``out`` in a directory that takes no new
    files is refused here, before any work, as an ``out`` that cannot be written is (named by ``flag``)."""
    from pruning import atomic

    given, out = out, Path(out).resolve()
    lock = out.with_name(f".{out.name}.lock")
    if out.parent.exists() and write_problem(out.parent) is not None:
        inside = out.is_dir() and write_problem(out) is None  # a volume mounted on a read-only root, say
        raise UserError(f"{flag} {given}: its lock file {lock} cannot be made ({out.parent} takes no new files; "
                        "a command writing a directory holds a lock beside it)"
                        + ("; name a new directory inside it instead" if inside else ""))
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # innermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    return _removing_if_unwritten(atomic.locked(lock, str(out)), out, made)


@contextlib.contextmanager
def _removing_if_unwritten(lock: contextlib.AbstractContextManager, out: Path, made: list[Path]) -> Iterator[None]:
    """``lock`` held; then, where the command stopped (refused its input, failed) without writing ``out``, the
    directories made to hold it removed, as long as they are empty: refused input leaves nothing behind."""
    try:
        with lock:
            yield
    except BaseException:
        if not out.exists():
            for directory in made:
                try:
                    directory.rmdir()
                except OSError:  # something else was written there meanwhile
                    break
        raise


def _check_not_inside(source: str | Path, out: str | Path, flag: str) -> None:
    """Refuse an output directory that is, holds or lies inside the model directory it is made from."""
    source, out = Path(source).resolve(), Path(out).resolve()
    if out == source or source.is_relative_to(out) or out.is_relative_to(source):
        raise UserError(f"{flag} {out}: is or overlaps the model directory {source} it is made from")


def _recorded_settings(args: argparse.Namespace) -> None:
    """Fill in each window and span-search option not given (None) from what the model directory records of the run
    that wrote it (:func:`pruning.checkpoint.read_evaluation`), else the run config's default, so that a run's own
    model is scored as the run scored it; a given flag wins. ``args.null_answers``: whether the model answers "no
    answer" (:func:`pruning.checkpoint.read_null_answers`).

    A ``--doc-stride`` given that is not shorter than the window is refused, as a run config refuses it: halved, it
    would be a stride the user never gave, and lowering it a little would only widen the overlap."""
    from pruning.checkpoint import read_evaluation, read_null_answers
    from pruning.config import EVALUATION_KEYS, RunConfig
    from pruning.resources import resolve_model

    path = resolve_model(args.model_dir)
    args.null_answers = read_null_answers(path)
    served = getattr(args, "served_settings", None)  # a registered version's: the settings it serves with
    recorded = served if served is not None else read_evaluation(path)
    stride_given, seq_given = args.doc_stride is not None, args.max_seq_length is not None
    taken = {}
    for key in EVALUATION_KEYS:
        if getattr(args, key) is None:
            value = recorded.get(key)
            if value is not None:
                taken[key] = value
            else:
                value = RunConfig.__dataclass_fields__[key].default
            setattr(args, key, value)
    if taken:
        logger.info("%s: %s", f"{args.model_label} serves with" if served is not None else
                    f"{path / 'config.json'} records the settings its run evaluated with",
                    ", ".join(f"{key} {value}" for key, value in taken.items()))
    if stride_given and args.doc_stride >= args.max_seq_length:
        window = ("" if seq_given else " as " + ("the model directory records it" if "max_seq_length" in taken
                                                  else "the default"))
        raise UserError(f"--doc-stride {args.doc_stride}: must be smaller than --max-seq-length "
                        f"({args.max_seq_length}{window}): it is the overlap of consecutive windows")
    if args.null_threshold is None:
        args.null_threshold = 0.0
    elif not math.isfinite(args.null_threshold):
        raise UserError(f"--null-threshold {args.null_threshold}: must be a finite number of logits")
    elif not args.null_answers:
        raise UserError(f"--null-threshold: {getattr(args, 'model_label', args.model_dir)} answers every question "
                        "with a span (it was not trained on unanswerable questions: its config.json has no "
                        "fineprune_evaluation.null_answers), so no threshold applies")


def _windows(args: argparse.Namespace, model, tokenizer) -> tuple[int, int]:
    """``--max-seq-length`` and ``--doc-stride`` cut to the model (see :func:`pruning.squad.fit_windows`), with a
    one-line error, before any work, for windows that leave no room for a question."""
    from pruning.squad import fit_windows, longest_question
    from pruning.structure import max_positions

    seq, stride = fit_windows(args.max_seq_length, args.doc_stride, max_positions(model.config))
    if longest_question(tokenizer, seq, stride) < 1:
        advice = ("raise --max-seq-length or lower --doc-stride" if seq == args.max_seq_length
                  else f"cut to the model's {seq} position embeddings, which no --max-seq-length lengthens: lower "
                       "--doc-stride")
        raise UserError(f"--max-seq-length {args.max_seq_length}, --doc-stride {args.doc_stride}: windows of {seq} "
                        f"tokens overlapping by {stride} leave no room for a question ({advice})")
    return seq, stride


@contextlib.contextmanager
def _names_model(model_dir: str):
    """A model's logits that are not finite, as a one-line error naming the model directory."""
    from pruning.squad import NonFiniteLogits

    try:
        yield
    except NonFiniteLogits as err:
        raise UserError(f"{model_dir}: {err}") from None


def _tracking_client(uri: str | None, writes: bool = False):
    """A client of the tracking store, once it answers (a server that does not: exit 1 in seconds); with
    ``writes``, a ``sqlite:///`` database the command cannot write (it registers versions, moves an alias) is
    refused first, rather than by MLflow's tracebacks once the work is done."""
    from workflows import record, tracking

    uri = record.tracking_uri(uri)
    tracking.check_readable_store(uri)  # these commands read a sweep's record: an absent database holds none
    if writes:
        tracking.check_writable_store(uri)
    client = tracking.client_for(uri, limit=REACH_TIMEOUT_S)
    tracking.check_reachable(client, REACH_TIMEOUT_S)  # a URI with no store behind it: TrackingStoreError
    return client


def _write_json(path: Path, values: dict[str, Any]) -> None:
    """Write a JSON file whole or not at all; a failure names ``path``."""
    from pruning.atomic import write_text

    write_text(path, json.dumps(values, ensure_ascii=False, indent=1, sort_keys=True) + "\n")


def cmd_eval(args: argparse.Namespace) -> int:
    _check_positive(args, "eval_limit", "max_seq_length", "doc_stride", "max_query_length", "batch_size",
                    "max_answer_length", "n_best")
    _check_device(args.device, "--device")
    if args.predictions is not None:
        _check_output_path(args.predictions, "--predictions", directory=False, writable=True)
        _check_predictions_replace_no_input(args)
    with _model_source(args) as source:
        return _evaluate(args, source)


def _evaluate(args: argparse.Namespace, source: dict[str, str]) -> int:
    """:func:`cmd_eval` once its model is a local directory (``source``: the registered version it is, if one)."""
    from pruning import squad
    from pruning.export import OrtQAModel
    from pruning.precision import autocast
    from pruning.resources import resolve_data
    from pruning.sparsity import sparsity_report

    model, tokenizer, precision, device = _load_any(args.model_dir, args.precision, args.variant, args.device)
    _recorded_settings(args)
    data = resolve_data(args.eval_data)
    examples = squad.load_squad(data, limit=args.eval_limit, spans=False)
    # The same windows, span search and metric for every kind of model, cut to what the model takes.
    seq, stride = _windows(args, model, tokenizer)
    with (_names_model(args.model_dir), squad.questions_of(data), squad.windows_cut(args.max_seq_length, seq),
          autocast(precision, device)):
        answers = squad.predict_spans(model, tokenizer, examples, max_seq_length=seq, doc_stride=stride,
                                      batch_size=args.batch_size, max_answer_length=args.max_answer_length,
                                      n_best=args.n_best, device=device, progress=_progress_bars(args),
                                      max_query_length=args.max_query_length, null_answers=args.null_answers,
                                      null_threshold=args.null_threshold)
    # SQuAD v2.0: with the answerable split, and the official script's best_exact / best_f1 with their thresholds
    metrics, predictions = squad.evaluate_answers(examples, answers, args.null_answers)
    unanswerable = metrics.get("no_answer_questions", 0)
    if unanswerable and not args.null_answers:
        logger.warning("%d of the %d questions are unanswerable, and %s was not trained on unanswerable questions: "
                       "it answers each with a span, scored as a wrong answer", unanswerable, len(examples),
                       getattr(args, "model_label", args.model_dir))
    if isinstance(model, OrtQAModel):
        metrics["variant"] = model.variant
    else:
        metrics.update(sparsity_report(model).metrics())
    if args.predictions is not None:
        _write_json(Path(args.predictions), predictions)
        metrics["predictions"] = str(args.predictions)
    metrics.update(questions=len(examples), max_seq_length=seq, doc_stride=stride,
                   max_query_length=args.max_query_length, max_answer_length=args.max_answer_length,
                   n_best=args.n_best, null_answers=args.null_answers, precision=precision, **source,
                   **({"null_threshold": args.null_threshold} if args.null_answers else {}))
    _emit(metrics)
    return 0


def _check_predictions_replace_no_input(args: argparse.Namespace) -> None:
    """Refuse a ``--predictions`` file that would replace what eval reads: its ``--eval-data`` file, or a file of the
    model directory (its config.json, say), which the predictions would take the place of."""
    from pruning.resources import ResourceError, resolve_data, resolve_model

    def entry(path: str | Path) -> Path:  # the directory entry a write replaces (a link, not what it points at)
        path = Path(path)
        return path.parent.resolve() / path.name

    target = Path(args.predictions).resolve()  # a link stays: the file it points at is what the predictions replace
    try:
        data = resolve_data(args.eval_data)
    except ResourceError:  # named when the data is read
        data = None
    if data is not None and target in (entry(data), data.resolve()):  # the file, or the one its link names
        raise UserError(f"--predictions {args.predictions}: is the --eval-data file {args.eval_data} the questions "
                        "are read from, which the predictions would replace; write them to another file")
    try:
        model = resolve_model(args.model_dir).resolve()
    except ResourceError:  # named when the model is loaded
        return
    if target.exists() and target.is_relative_to(model):
        raise UserError(f"--predictions {args.predictions}: is a file of the model directory {args.model_dir} "
                        "evaluated, which the predictions would replace; write them to another file")


def cmd_ask(args: argparse.Namespace) -> int:
    from pruning.inference import answer
    from pruning.precision import autocast

    _check_positive(args, "max_seq_length", "doc_stride", "max_query_length", "max_answer_length", "n_best")
    with _model_source(args) as source:
        model, tokenizer, precision, device = _load_any(args.model_dir, args.precision, args.variant)
        _recorded_settings(args)
        seq, stride = _windows(args, model, tokenizer)
        with _names_model(args.model_dir), autocast(precision, device):
            result = answer(model, tokenizer, args.question, args.context, max_seq_length=seq, doc_stride=stride,
                            max_answer_length=args.max_answer_length, n_best=args.n_best,
                            max_query_length=args.max_query_length, null_answers=args.null_answers,
                            null_threshold=args.null_threshold)
    margin = {}
    if result.null_margin is not None and math.isfinite(result.null_margin):  # a model answering "no answer"
        margin["null_margin"] = result.null_margin
        if result.span is not None:  # "no answer" won: the span it beat
            margin["best_span"] = result.span.text
    _emit({"answer": result.text, "score": float(result.score), "start": result.start, "end": result.end, **margin,
           **source})
    return 0


@contextlib.contextmanager
def _model_source(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """``args.model_dir`` as a local model directory while the block runs: itself, or for a registered version
    (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, in ``--tracking-uri``'s registry) the files that run it as it
    serves, downloaded into a scratch directory (its ONNX export in the variant it serves, unless ``--variant``
    says otherwise; else its packed model), with ``args.model_dir`` and ``args.variant`` set to them. Yields what
    the result tells of the version (``model_uri``, ``version``), nothing for a directory. Errors name the version,
    not the scratch directory, which is gone by the time one reads them."""
    from workflows.record import MODELS_SCHEME  # the standard library only

    uri = args.model_dir
    if not uri.startswith(MODELS_SCHEME):
        if args.tracking_uri is not None:  # a registry read for nothing: the user meant a version, or another flag
            raise UserError(f"--tracking-uri {args.tracking_uri}: names the registry of a {MODELS_SCHEME} version, and "
                            f"{uri} is a model directory; drop --tracking-uri, or give "
                            f"{MODELS_SCHEME}NAME@ALIAS or {MODELS_SCHEME}NAME/VERSION")
        yield {}
        return
    from pruning import atomic
    from workflows.version_files import fetch_version

    client = _tracking_client(args.tracking_uri)
    with atomic.scratch_dir("download") as tmp:
        local, version, variant, args.served_settings = fetch_version(client, uri, tmp, args.variant)
        logger.info("%s is version %s: running its %s", uri, version,
                    f"ONNX Runtime {variant} export" if variant else "packed PyTorch model")
        args.model_dir, args.variant, args.model_label = str(local), variant, f"{uri} (version {version})"
        try:
            yield {"model_uri": uri, "version": version}
        except user_errors(UserError) as err:
            message = str(err).replace(str(local), args.model_label).replace(str(tmp), args.model_label)
            if message == str(err):
                raise
            try:
                renamed = type(err)(message)
            except TypeError:  # an error class that takes other arguments: as it is
                raise err from None
            raise renamed from None


def cmd_score(args: argparse.Namespace) -> int:
    from pruning.resources import resolve_data
    from pruning.squad_metric import score_files  # the metric alone: scoring needs no torch

    _emit(score_files(resolve_data(args.data), args.predictions))
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from pruning.precision import resolve_precision
    from pruning.resources import resolve_model

    _check_positive(args, "questions", "repeats")
    resolve_model(args.checkpoint)  # a file, or a run's directory, named as such as the other commands name them
    out = Path(args.out_dir)
    precision = resolve_precision(args.precision, "cpu")  # settings first, then the work
    _check_output_path(out, "out_dir", directory=True, writable=True, utf8=True)
    _check_not_inside(args.checkpoint, out, "out_dir")
    with _writing(out, "out_dir"):
        return _pack_into(args, out, precision)


def _pack_into(args: argparse.Namespace, out: Path, precision: str) -> int:
    """:func:`cmd_pack` once it holds ``out``'s lock."""
    from pruning import squad
    from pruning.checkpoint import load_model
    from pruning.export import MANIFEST_NAME, is_exported_dir, read_manifest
    from pruning.packing import PACKED_FLAG, is_packed_dir, pack_and_verify, save_packed, weights_bytes
    from pruning.resources import resolve_data
    from pruning.structure import max_positions
    from pruning.tokenizer import check_tokenizer_fits, load_tokenizer

    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out}: directory exists and is not empty (pass --overwrite to replace it)")
    if is_exported_dir(out):  # --overwrite keeps the other files: eval, ask and export would read the old export
        raise UserError(f"{out}: holds an exported ONNX model ({MANIFEST_NAME}), which eval, ask and export would "
                        "go on reading instead of the packed one; pack into another out_dir")
    if is_exported_dir(args.checkpoint):
        source = read_manifest(args.checkpoint).get("source")
        raise UserError(f"{args.checkpoint}: an exported ONNX model, not a PyTorch checkpoint; pack the model it was "
                        "exported from" + (f" ({source})" if source else ""))
    if is_packed_dir(args.checkpoint):
        # Packed again it would be timed against itself (its own shape as the "dense" one): a speedup of about 1.
        raise UserError(f"{args.checkpoint}: already a packed model ({PACKED_FLAG} in config.json); eval, ask and "
                        "export take it as it is, and its speedup is measured by packing the masked checkpoint it "
                        "was made from")
    _warn_live_weights(args.checkpoint, "pack")
    _warn_few_repeats(args.repeats, "each model's latency in the speedup")  # once the refusals above are past
    masked = load_model(args.checkpoint, qa_head=True)
    tokenizer = load_tokenizer(args.checkpoint)
    check_tokenizer_fits(args.checkpoint, masked.config, tokenizer)
    limit = max_positions(masked.config)
    data = resolve_data(args.eval_data)
    with squad.questions_of(data):
        inputs = squad.check_windows(squad.load_squad(data, limit=args.questions, spans=False), tokenizer, limit)
    # The dense shape against the packed model at batch 1 and the longest window the model takes (at most 384).
    packed, report = pack_and_verify(masked, inputs, batch_size=1, seq_len=min(384, limit), repeats=args.repeats,
                                     precision=precision)
    save_packed(packed, tokenizer, out, overwrite=args.overwrite)
    report.dense_file_bytes, report.packed_file_bytes = weights_bytes(args.checkpoint), weights_bytes(out)
    _emit({**report.to_dict(), "out_dir": str(out)})
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pruning.export import OPSETS, export_checkpoint

    _check_positive(args, "questions")
    _check_output_path(args.out_dir, "out_dir", directory=True, writable=True, utf8=True)
    _check_not_inside(args.model_dir, args.out_dir, "out_dir")
    _warn_live_weights(args.model_dir, "export")
    if args.opset is not None and args.opset not in OPSETS:
        raise UserError(f"--opset: must be an integer from {OPSETS[0]} to {OPSETS[-1]} (the TorchScript exporter's "
                        f"range), got {args.opset}")
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise UserError(f"{out}: exists and is not an empty directory (pass --overwrite to replace it)")
    with _writing(args.out_dir, "out_dir"):
        _emit(export_checkpoint(args.model_dir, args.out_dir, quantize=args.quantize, opset=args.opset,
                                data=args.eval_data, questions=args.questions, overwrite=args.overwrite))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    # How the sweep's driver prints its workers' lines, set before anything here imports Ray (which reads the first
    # when imported), unless the user set them. Ray folds like lines of different workers into one "[repeated Nx
    # across cluster]", printed seconds later and out of order: some trials' lines (each names its trial) were only
    # counted. And it colours each line's "(trial_main pid=...)" prefix: written to a file or a pipe (a CI log,
    # `2> sweep.log`, `| tee`), the colour codes are noise; kept on a terminal.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    from workflows.preflight import check_machine
    from workflows.retry import outage_limit
    from workflows.space import load_space, name_problem

    # It stands for the space's name: the sweep's directory under --storage-path and its report's under reports/.
    if args.experiment is not None and (problem := name_problem(args.experiment)) is not None:
        raise UserError(f"--experiment {problem}")
    timeout = None if args.tracking_timeout is None else outage_limit(args.tracking_timeout, "--tracking-timeout")
    # A space that does not validate, or names a path or asks for resources that a private local Ray does not have
    # here, is refused before the sweep's modules (MLflow, the trainer, the report) are imported: in two or three
    # seconds rather than ten. run_sweep checks it again, at little cost once what it reads is loaded.
    check_machine(load_space(args.space), args.address)
    if args.check:
        if args.resume or args.warm_start:
            raise UserError(f"--check checks a new sweep, and reads nothing of the tracking store; "
                            f"{'--resume' if args.resume else '--warm-start'} reads it, when the sweep starts")
        from workflows.sweep import check_sweep

        _emit(check_sweep(args.space, experiment=args.experiment, tracking_uri=args.tracking_uri,
                          address=args.address, storage_path=args.storage_path))
        return 0
    from workflows.sweep import run_sweep

    summary = run_sweep(args.space, experiment=args.experiment, tracking_uri=args.tracking_uri,
                        address=args.address, resume=args.resume or False, storage_path=args.storage_path,
                        tracking_timeout=timeout, warm_start=args.warm_start,
                        warm_start_tracking_uri=args.warm_start_tracking_uri)
    _emit(summary)
    # The summary is printed either way; a script must still tell a sweep to resume from one that is done.
    return INCOMPLETE_SWEEP if summary.get("status") == "interrupted" else 0


def cmd_register(args: argparse.Namespace) -> int:
    from workflows.registry import register_from_experiment

    _tracking_client(args.tracking_uri, writes=True)
    result = register_from_experiment(args.experiment, tracking_uri=args.tracking_uri, space=args.space,
                                      frontier=args.frontier, onnx=False if args.no_onnx else None,
                                      sweep_run_id=args.sweep_run)
    _emit(result)
    # The result is printed either way (with --frontier, the versions it registered); a script must still tell a
    # registration that left the alias where it was from one that moved it.
    return 0 if result.get("registered") else NO_CHAMPION


def cmd_select(args: argparse.Namespace) -> int:
    _check_positive(args, "batch_size", "seq_len", "repeats", "threads")
    from workflows.registry import check_alias, select_by_latency

    check_alias(args.alias)  # the arguments first, then the store
    client = _tracking_client(args.tracking_uri, writes=True)
    _warn_few_repeats(args.repeats, "each version's latency")
    result = select_by_latency(client, args.registered_model, args.max_latency_ms, batch_size=args.batch_size,
                               seq_len=args.seq_len, threads=args.threads, alias=args.alias, repeats=args.repeats,
                               runtime=args.runtime)
    _emit(result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from workflows.record import ARTIFACT_REPORT_HTML, ARTIFACT_REPORT_MARKDOWN
    from workflows.report import write_report

    out = Path(args.out)
    _check_output_path(out, "--out", directory=True, writable=True, staged=False)  # its files are
    for name in (ARTIFACT_REPORT_HTML, ARTIFACT_REPORT_MARKDOWN):  # a directory in a file's place, say
        _check_output_path(out / name, "--out", directory=False, writable=True)
    _tracking_client(args.tracking_uri)
    paths = write_report(args.experiment, out_dir=args.out, tracking_uri=args.tracking_uri,
                         sweep_run_id=args.sweep_run)
    _emit({k: str(v) for k, v in paths.items()})
    return 0


# --------------------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------------------


def _argv_text(value: str) -> str:
    """Text on the command line. Under a locale that is not UTF-8 (Python's UTF-8 mode off), Python holds each byte
    of a non-ASCII character as a lone surrogate; text whose bytes are UTF-8 is read as such. Bytes that are not
    UTF-8 stay as they are, for the question's check to name."""
    try:
        value.encode("utf-8")
        return value  # every character read
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(value).decode("utf-8")  # the bytes as given
    except UnicodeError:  # not bytes the locale held as surrogates, or bytes that are not UTF-8
        return value


def _user_path(value: str) -> str:
    """A path on the command line as a shell reads it: ``~`` is the home directory, also where the shell left it
    as typed (``--out=~/report``, a quoted path), as in the paths of a run config or search space. An empty one
    (an unset shell variable) is refused, not taken for the current directory."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty (a path)")
    from pruning.config import ConfigError, home_path  # pure and light: yaml and the standard library

    try:
        return home_path(value)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _milliseconds(value: str) -> float:
    """A latency budget: a finite number of milliseconds above 0 (an infinite one is no budget)."""
    try:
        budget = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {value!r}") from None
    if not (budget > 0 and math.isfinite(budget)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value!r}")
    return budget


def _given(value: str) -> str:
    """A name, id or URI on the command line: an empty or blank one (an unset shell variable) is refused, not taken
    for the option's default."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"must not be blank, got {value!r}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: the value, ``off`` for a flag; an option without a default value
    (None) says in its own words what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or not action.option_strings or "default" in text
                or action.default in (None, argparse.SUPPRESS)):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


class _PrintVersion(argparse.Action):
    """``--version``: the release (:func:`workflows.record.fineprune_version`), read only when asked, as it may ask
    git for the checkout's commit."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        sys.stdout.write(f"fineprune {fineprune_version()}\n")  # on stdout, as argparse's own version action
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit status: " + "; ".join(f"{int(code)} {meaning}" for code, meaning in EXIT_STATUSES.items()) + "."
    parser = argparse.ArgumentParser(prog="fineprune", description=DESCRIPTION, epilog=epilog,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="fineprune's debug lines too (a run's whole config, its feature cache file, each timed "
                             "pass); other libraries' stay out")
    parser.add_argument("--version", action=_PrintVersion, help="print fineprune's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        p.set_defaults(func=func)
        return p

    # One meaning per flag in every sub-command that takes it.
    def eval_data(p: argparse.ArgumentParser, default: str | None, what: str) -> None:
        p.add_argument("--eval-data", default=default, metavar="PATH", type=_user_path,
                       help=f"SQuAD v1.1 or v2.0 JSON, or 'dev'/'train' for the shipped files: {what}")

    def precision(p: argparse.ArgumentParser, what: str, default: str | None = "fp32") -> None:
        given = (f"default: {default}" if default else
                 "default: the precision the model directory records of its run where this device runs it, else fp32")
        p.add_argument("--precision", default=default, choices=PRECISIONS, help=f"{PRECISION_HELP}, {what} ({given})")

    def variant(p: argparse.ArgumentParser) -> None:
        p.add_argument("--variant", choices=("fp32", "int8"),
                       help="which model of an exported directory to run (default: int8 when it was quantized)")

    # Without the flag: the value the model directory records of the run that wrote it, else the run config's
    # default (see _recorded_settings).
    def recorded(key: str) -> str:
        from pruning.config import RunConfig  # pure and light: yaml and the standard library

        default = RunConfig.__dataclass_fields__[key].default
        return f"(default: what the model directory records of its run, else {default})"

    def windows(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-seq-length", type=int,
                       help="tokens per window, cut to the model's position embeddings " + recorded("max_seq_length"))
        p.add_argument("--doc-stride", type=int,
                       help="context tokens that consecutive windows of one context share (their overlap), "
                            "smaller than --max-seq-length; at most half a window when the window is cut to the "
                            "model, as is a recorded or default stride not shorter than the window "
                            + recorded("doc_stride"))
        p.add_argument("--max-query-length", type=int,
                       help="a longer question is cut to this many tokens (the run config's max_query_length) "
                            + recorded("max_query_length"))

    def span_search(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-answer-length", type=int,
                       help="longest answer in tokens (the run config's max_answer_length) "
                            + recorded("max_answer_length"))
        p.add_argument("--n-best", type=int,
                       help="start and end positions of each window tried (the run config's n_best) "
                            + recorded("n_best"))
        p.add_argument("--null-threshold", type=float, metavar="LOGITS",
                       help="for a model trained on unanswerable questions (SQuAD v2.0): answer \"no answer\" "
                            "where it scores more than this above the best span (default: 0, as it was trained; "
                            "eval on such questions reports the best threshold)")

    def training(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> None:
        p = command(name, func, help_text)
        p.add_argument("--config", required=True, metavar="YAML", type=_user_path, help="run config (see configs/)")
        p.add_argument("--model", metavar="DIR", type=_user_path,
                       help="student model directory or 'minilm' (default: the config's)")
        p.add_argument("--teacher", metavar="DIR", type=_user_path,
                       help="teacher QA model directory (default: the config's)")
        p.add_argument("--train-data", metavar="PATH", type=_user_path,
                       help="SQuAD v1.1 or v2.0 JSON, or 'train'/'dev' for the shipped files: the training questions "
                            "(default: the config's)")
        eval_data(p, None, "the questions evaluated on (default: the config's)")
        p.add_argument("--train-limit", type=int, metavar="N",
                       help="use the first N training questions (default: the config's)")
        p.add_argument("--eval-limit", type=int, metavar="N",
                       help="evaluate on the first N questions (default: the config's)")
        p.add_argument("--max-steps", type=int, metavar="N",
                       help="training steps, before the config's fill_steps of the filled phase; method fisher "
                            "trains its fill_steps only (default: the config's)")
        p.add_argument("--output-dir", metavar="DIR", type=_user_path,
                       help="where the run writes (default: the config's)")
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's)")
        p.add_argument("--precision", choices=PRECISIONS, help=f"{PRECISION_HELP} (default: the config's)")
        p.add_argument("--resume", metavar="DIR", type=_user_path,
                       help="training checkpoint directory to continue from (default: start afresh)")
        p.add_argument("--overwrite", action="store_true",
                       help="write over an output_dir that holds an earlier run, whose final model and "
                            "checkpoint are removed when training starts (default: refuse it)")
        p.add_argument("--no-progress", action="store_true",
                       help="no progress bars (drawn only where stderr is a terminal)")

    training("train", cmd_train, "dense fine-tune (teacher and baseline)")
    training("prune", cmd_prune, "one fine-pruning run (topk, sigmoid_threshold or fisher)")

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("model_dir", type=_user_path,
                       help="question-answering model directory (dense, masked, packed or exported), or a registered "
                            "version: models:/NAME@ALIAS or models:/NAME/VERSION, run as it serves")
        p.add_argument("--tracking-uri", metavar="URI", type=_given,
                       help="MLflow tracking/registry URI of a models:/ version (default: MLFLOW_TRACKING_URI, else "
                            "sqlite:///mlflow.db)")

    p = command("eval", cmd_eval, "EM/F1 of a dense, masked, packed, exported or registered model")
    model_arg(p)
    eval_data(p, "dev", "the questions evaluated on")
    p.add_argument("--eval-limit", "--limit", dest="eval_limit", type=int, metavar="N",
                   help="evaluate on the first N questions (default: all)")
    windows(p)
    span_search(p)
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    precision(p, "for the forward passes", default=None)
    variant(p)
    p.add_argument("--predictions", metavar="PATH", type=_user_path,
                   help="also write the predictions as the official {question id: answer} JSON (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only where stderr is a terminal)")

    p = command("ask", cmd_ask, "answer one question from a context")
    model_arg(p)
    p.add_argument("--question", required=True, type=_argv_text, help="the question")
    p.add_argument("--context", required=True, type=_argv_text, help="the text holding the answer")
    windows(p)
    span_search(p)
    precision(p, "for the forward passes", default=None)
    variant(p)

    p = command("score", cmd_score, "official SQuAD v1.1 (or v2.0) EM/F1 of a predictions file")
    p.add_argument("data", type=_user_path,
                   help="SQuAD v1.1 or v2.0 JSON with the gold answers, or 'dev'/'train' for the shipped files")
    p.add_argument("predictions", type=_user_path, help="JSON of {question id: answer}")

    p = command("pack", cmd_pack, "pack a pruned checkpoint into a smaller dense model")
    p.add_argument("checkpoint", type=_user_path, help="masked (or dense) model directory")
    p.add_argument("out_dir", type=_user_path, help="where the packed model goes (must be empty unless --overwrite)")
    eval_data(p, "dev", "the questions whose windows the logits are compared on")
    p.add_argument("--questions", type=int, default=16, metavar="N", help="how many questions to compare on")
    p.add_argument("--repeats", type=int, default=10, metavar="N",
                   help="timed passes of each model; the speedup is the ratio of their medians, noise below "
                        f"{FEW_REPEATS} (a warning says so; 1 packs and checks the model fastest)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty out_dir: its model files are replaced, its other files kept")
    precision(p, "for the latency timing")

    p = command("export", cmd_export, "export a packed (or dense) model to ONNX for ONNX Runtime")
    p.add_argument("model_dir", type=_user_path, help="packed, dense or masked (packed first) model directory")
    p.add_argument("out_dir", type=_user_path, help="where the exported model goes (must be empty unless --overwrite)")
    p.add_argument("--quantize", choices=("int8",), help="also write a dynamically quantized int8 model "
                                                         "(default: fp32 only)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14 to 20")
    eval_data(p, "dev", "the questions whose windows the logits are compared on")
    p.add_argument("--questions", type=int, default=16, metavar="N", help="how many questions to compare on")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty out_dir")

    p = command("sweep", cmd_sweep, "Ray Tune sweep with MLflow tracking")
    p.epilog = (f"Exit status 0 when the sweep finished (with --check: when every check passed); {INCOMPLETE_SWEEP} "
                "when it ended with trials failed or left to run (Ctrl-C), its summary printed all the same: --resume "
                "continues it.")
    p.add_argument("--space", required=True, metavar="YAML", type=_user_path, help="search space (see tune_spaces/)")
    p.add_argument("--experiment", type=_given, help="MLflow experiment name (default: the space's name)")
    p.add_argument("--tracking-uri", metavar="URI", type=_given,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: RAY_ADDRESS; without it, a private local Ray)")
    p.add_argument("--storage-path", metavar="PATH", type=_user_path,
                   help="shared storage for trial checkpoints (default: ./runs/ray)")
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN_ID", type=_given,
                   help="continue the experiment's last sweep started, or the sweep with this MLflow parent run "
                        "(default: start a new sweep)")
    p.add_argument("--warm-start", metavar="SWEEP", type=_given,
                   help="an earlier sweep (its MLflow parent run id, or an experiment: its last sweep) whose trials "
                        "the Optuna sampler learns from before its first trial (default: it starts from nothing)")
    p.add_argument("--warm-start-tracking-uri", metavar="URI", type=_given,
                   help="the tracking store of the earlier sweep, only read (default: the one this sweep records to)")
    p.add_argument("--tracking-timeout", type=float, metavar="SECONDS",
                   help="how long the tracking server may be away before the sweep stops (default: "
                        "FINEPRUNE_TRACKING_TIMEOUT, else 300)")
    p.add_argument("--check", action="store_true",
                   help="check the space, paths, data and resources as the sweep does before it starts, print "
                        "what it would run (trials, teacher reused or trained), and start nothing")

    p = command("register", cmd_register, "register the best trial's packed model")
    p.epilog = (f"Exit status 0 when the champion was registered; {NO_CHAMPION} when no trial meets the registry "
                "policy (no version within the budget, for best_f1_under_latency): nothing is registered as "
                "champion and the alias is left where it was, the result (\"registered\": false) printed all the "
                "same.")
    p.add_argument("--experiment", required=True, type=_given, help="MLflow experiment of the sweep")
    p.add_argument("--tracking-uri", metavar="URI", type=_given,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--space", metavar="YAML", type=_user_path,
                   help="search space whose registry section to use, its model name included (default: the one "
                        "the sweep logged)")
    p.add_argument("--frontier", action="store_true",
                   help="also register every Pareto point of the sweep as a version (idempotent)")
    p.add_argument("--no-onnx", action="store_true",
                   help="register new versions without their ONNX Runtime export: they serve through PyTorch "
                        "(default: the policy's onnx, true unless the space says false)")
    p.add_argument("--sweep-run", metavar="RUN_ID", type=_given,
                   help="the sweep's parent run, for an experiment that holds several sweeps (default: its latest)")

    p = command("select", cmd_select, "time the registered versions here and alias the best within a latency budget")
    p.add_argument("--registered-model", required=True, metavar="NAME", type=_given, help="registered model name")
    p.add_argument("--max-latency-ms", type=_milliseconds, required=True,
                   help="budget per forward pass, in milliseconds")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the timed input")
    p.add_argument("--seq-len", type=int, default=128, help="tokens of the timed input")
    p.add_argument("--threads", type=int,
                   help="threads of torch and ONNX Runtime while timing (default: torch's default here)")
    p.add_argument("--alias", default="champion", help="alias to point at the chosen version")
    p.add_argument("--repeats", type=int, default=10,
                   help=f"timed passes per version (medians are compared; noise below {FEW_REPEATS}, with a warning)")
    p.add_argument("--runtime", choices=RUNTIMES, default=RUNTIMES[0],
                   help="time each version as it serves (ONNX Runtime when it carries the exported model; default) "
                        "or its packed PyTorch model")
    p.add_argument("--tracking-uri", metavar="URI", type=_given,
                   help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")

    p = command("report", cmd_report, "HTML and Markdown report of a sweep")
    p.add_argument("--experiment", required=True, type=_given, help="MLflow experiment of the sweep")
    p.add_argument("--tracking-uri", metavar="URI", type=_given,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--out", required=True, metavar="DIR", type=_user_path, help="output directory")
    p.add_argument("--sweep-run", metavar="RUN_ID", type=_given,
                   help="the sweep's parent run, for an experiment that holds several sweeps (default: its latest)")
    return parser


def _progress_bars(args: argparse.Namespace) -> bool:
    """Whether a command draws its progress bars: where stderr is a terminal, unless ``--no-progress``. Written to a
    file or a pipe (a CI log, ``2> run.log``), every redraw of a bar is kept: hundreds of frames joined by carriage
    returns, a log line read back as a kilobyte of them."""
    return not args.no_progress and sys.stderr.isatty()


@contextlib.contextmanager
def _logs_above_progress_bars() -> Iterator[None]:
    """Log records written to the console through ``tqdm.write`` while a command runs: a line logged while a
    progress bar is drawn (a training step's loss, an evaluation's EM/F1) goes on its own line above the bar instead
    of being glued to the bar's end. Does nothing where the records go to no console stream (a caller's handlers)."""
    consoles = [h for h in logging.root.handlers
                if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)]
    if not consoles:
        yield
        return
    with logging_redirect_tqdm():
        yield


# MLflow draws a progress bar on stderr for every artifact download (several for one `register`, `select` or `report`,
# of a file or two each): among a command's own lines they read as noise. Set in the environment, it is kept.
_ARTIFACT_BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@contextlib.contextmanager
def _no_artifact_progress_bars() -> Iterator[None]:
    """MLflow's artifact progress bars off while a command runs, unless ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` is
    set (``true`` shows them)."""
    if _ARTIFACT_BARS in os.environ:
        yield
        return
    os.environ[_ARTIFACT_BARS] = "false"
    try:
        yield
    finally:
        os.environ.pop(_ARTIFACT_BARS, None)


_signalled: int | None = None  # the signal (SIGINT or SIGTERM) that is stopping the command, once one came


def _stop(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM, raised where the command is as a KeyboardInterrupt, so that it stops as on Ctrl-C: what it
    was writing is removed, the runs it had open are ended, and the output it replaces is left as it was. (Raised in
    Ray's or Tune's code, it may come out as another KeyboardInterrupt: the flag says which signal it was.)"""
    global _signalled
    _signalled = signum
    raise KeyboardInterrupt


def _unraisable(report: Any) -> None:
    """Python's report of an exception it cannot raise, but not of the KeyboardInterrupt of :func:`_stop` landing in
    a finalizer (a ``__del__`` run by the garbage collector): Python prints it as a traceback and goes on, and
    :func:`main` says the command was interrupted once it returns."""
    if _signalled is not None and issubclass(report.exc_type, KeyboardInterrupt):
        return
    sys.__unraisablehook__(report)


# The loggers whose debug lines `-v` shows: the library's, the commands' and the command line's own.
_OWN_LOGGERS = ("pruning", "workflows", "fineprune")


@contextlib.contextmanager
def _debug_lines(verbose: bool) -> Iterator[None]:
    """With ``verbose``, fineprune's own debug lines while a command runs (the levels are put back after). Not the
    root logger's DEBUG: that is every library's too (for ``report``, hundreds of lines of matplotlib's font
    matching around one line of its own)."""
    loggers = [logging.getLogger(name) for name in _OWN_LOGGERS] if verbose else []
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)


def _interrupted(command: str, signum: int) -> int:
    """The one line of a command stopped by ``signum``, and the shell's status for it."""
    sys.stderr.write(f"fineprune {command}: interrupted by {signal.Signals(signum).name}\n")
    return 128 + int(signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    global _results, _signalled
    _results, _signalled = sys.stdout, None
    handlers: dict[int, Any] = {}
    hook = sys.unraisablehook
    if threading.current_thread() is threading.main_thread():  # where Python lets a handler be set
        handlers = {signum: signal.signal(signum, _stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        sys.unraisablehook = _unraisable
    try:
        with contextlib.redirect_stdout(sys.stderr), _logs_above_progress_bars(), _no_artifact_progress_bars(), \
                _debug_lines(args.verbose):
            status = int(args.func(args) or 0)
        if _signalled is not None:  # its KeyboardInterrupt was lost (in a finalizer): the command was stopped all
            return _interrupted(args.command, _signalled)  # the same, though what it was doing got done
        return status
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: one line, and the shell's status for the signal
        return _interrupted(args.command, _signalled or signal.SIGINT)
    except Exception as err:
        if _signalled is not None or interrupt_behind(err) is not None:  # an error a Ctrl-C caused (see
            return _interrupted(args.command, _signalled or signal.SIGINT)  # pruning.errors.interrupt_behind)
        if isinstance(err, user_errors(UserError)):  # some are OSErrors too (a file that is not there)
            status = 2
        elif isinstance(err, (TrackingUnavailable, OSError)):  # the environment (a full disk, a tracking server
            status = 1                                            # away), not the input
        else:
            raise
        sys.stderr.write(f"fineprune {args.command}: error: {err}\n")
        return status
    finally:
        _results = None
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        sys.unraisablehook = hook


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
