"""What a sweep checks on this machine before anything starts: which Ray it runs on, and, where that is a private
local Ray (the trials run here), that the space's paths are here, that this machine has the resources a trial asks
for and the precision it trains in, and that the SQuAD files load.

Each check is one line naming the space file and the key (:class:`workflows.space.SpaceError`), with nothing written.
:func:`check_machine` (paths and resources) imports neither MLflow nor the sweep's modules, so that the command line
refuses such a space in the time it takes to read it; the sweep runs it again (in no time) with the data check.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
from ray._private.utils import get_num_cpus

from pruning import squad
from pruning.precision import PrecisionError, resolve_precision
from pruning.resources import first_missing, resolve_data
from workflows.space import SpaceError, SweepSpace, teacher_config

__all__ = ["cluster_address", "check_machine", "check_local_paths", "check_local_resources", "check_local_precision",
           "check_local_data", "largest_train_limit", "trials_at_once"]


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster to join (``--address``, else ``RAY_ADDRESS``), or None for a private local Ray.

    ``local`` also means a private Ray. Without either, the sweep never joins a cluster Ray recorded as the current
    one (which may be dead, or someone else's).
    """
    if address is None:
        address = os.environ.get("RAY_ADDRESS")
    return None if not address or address == "local" else address


def check_local_paths(space: SweepSpace) -> None:
    """The model, tokenizer, data and teacher the space names exist on this machine: a sweep on a private local Ray
    checks them before it starts (on a cluster they need only exist on the workers, where the trials say so).

    Raises:
        SpaceError: one line naming the space file, the key and the path.
    """
    for where, values in (("base", space.base), ("teacher.config", space.teacher.config)):
        missing = first_missing(values, ("model", "tokenizer", "train_data", "eval_data"))
        if missing is not None:
            raise SpaceError(f"{space.path}: {where}.{missing[0]}: {missing[1]}")
    missing = first_missing({"teacher": space.teacher.path}, ("teacher",))
    if missing is not None:
        raise SpaceError(f"{space.path}: teacher.path: {missing[1]}")


def check_local_resources(space: SweepSpace) -> None:
    """Refuse, before anything starts, trial resources the local Ray does not have (a GPU share without a GPU, more
    CPUs than it has): the trials run there, and it would hold the teacher and every trial waiting for them forever
    (its autoscaler saying every half minute that no node fits the request).

    The local Ray is the one already running in this process where the caller started one (which the sweep runs on,
    with the CPUs and GPUs it was given, ``ray.init(num_cpus=...)``), else the private one the sweep starts here, with
    this machine's CPUs (as Ray counts them: a container's) and GPUs."""
    cpu, gpu = _per_trial(space)
    cpus, gpus = _local_capacity(gpu)
    if ray.is_initialized():
        where = "the Ray running in this process has", "the trials run there"
    else:
        where = "this machine has", "the trials run here (a sweep without --address starts a private local Ray)"
    if cpu > cpus:
        raise SpaceError(f"{space.path}: resources.cpu: {cpu:g} per trial, but {where[0]} {cpus:g} and {where[1]}: "
                         f"ask for at most {cpus:g}, or join a cluster with larger nodes with --address")
    if gpu > gpus:
        have = "no GPU" if gpus == 0 else f"{gpus:g} GPU{'s' if gpus > 1 else ''}"
        fix = "set gpu: 0 with base.device cpu or auto" if gpus == 0 else f"ask for at most {gpus:g}"
        raise SpaceError(f"{space.path}: resources.gpu: {gpu:g} per trial, but {where[0]} {have} and {where[1]}: "
                         f"{fix}, or join a cluster with GPUs with --address")


def check_local_precision(space: SweepSpace) -> None:
    """Refuse, before anything starts, bf16 asked of trials (``base``) or of the teacher (``teacher.config``) that
    run on this machine's CPU (no ``gpu`` in ``resources``) where the CPU has no bf16 matrix instructions: the
    teacher would refuse it in its first second, after Ray, MLflow and the sweep's parent run had started. Trials on
    GPUs are checked where they run (probing the GPU here would open a CUDA context in the driver).

    Raises:
        SpaceError: one line naming the space file and the key.
    """
    if _per_trial(space)[1] > 0:
        return
    asked = [("base.precision", space.base_config.precision)]
    if isinstance(space.teacher.config.get("precision"), str):
        asked.append(("teacher.config.precision", space.teacher.config["precision"]))
    for key, precision in asked:
        try:
            resolve_precision(precision, "cpu")
        except PrecisionError as err:
            raise SpaceError(f"{space.path}: {key}: {str(err).removeprefix('precision: ')} (the trials and the "
                             "teacher run on the CPUs here: resources ask for no GPU)") from None


def trials_at_once(space: SweepSpace) -> int:
    """How many trials the local Ray runs at once (:func:`check_local_resources`'s): as many as its CPUs and GPUs
    hold of what each trial asks for, and no more than ``max_concurrent``."""
    cpu, gpu = _per_trial(space)
    cpus, gpus = _local_capacity(gpu)
    fits = [int(cpus // cpu) if cpu > 0 else None, int(gpus // gpu) if gpu > 0 else None, space.max_concurrent]
    return max(1, min((n for n in fits if n is not None), default=1))


def _per_trial(space: SweepSpace) -> tuple[float, float]:
    return float(space.resources.get("cpu", 1) or 0), float(space.resources.get("gpu", 0) or 0)


def _local_capacity(gpu: float) -> tuple[float, float]:
    """The CPUs and GPUs of the largest node of the Ray running in this process, else of this machine (its GPUs
    counted only where a trial asks for ``gpu``)."""
    if ray.is_initialized():
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        return (max((float(node.get("CPU", 0)) for node in nodes), default=0.0),
                max((float(node.get("GPU", 0)) for node in nodes), default=0.0))
    return float(get_num_cpus()), _gpus_here() if gpu > 0 else 0.0


def _gpus_here() -> float:
    """The GPUs this machine has (torch is imported only for a space that asks for one)."""
    import torch

    return float(torch.cuda.device_count())


def largest_train_limit(space: SweepSpace) -> int | None:
    """The most training questions a trial reads: the base ``train_limit``, or the largest one searched (None: all)."""
    spec = space.search.get("train_limit")
    if spec is None:
        return space.base_config.train_limit
    if spec.values is not None:
        return None if None in spec.values else max(int(v) for v in spec.values)
    return int(spec.high)


def check_local_data(space: SweepSpace) -> None:
    """The SQuAD files the teacher and the trials read load as they will read them, before Ray starts: a malformed
    file (a SQuAD v2 question without answers, an answer_start off its text, ...) is one line, not a teacher
    fine-tuned for nothing and then every trial failed. Evaluation questions that are training questions too are
    said here once (for the trials at their largest ``train_limit``, and for a teacher trained on other data: the
    dense baseline is scored on the trials' questions), rather than by the teacher and again by every trial.

    Raises:
        SpaceError: one line naming the space file, the key, the data file and the question.
    """
    from pruning.trainer import warn_if_not_held_out  # transformers: only a sweep that starts reads the data

    teacher = teacher_config(space, "-")
    base = space.base_config
    reads: list[tuple[str, str, int | None, bool]] = []  # (key, file, limit, spans)
    if space.teacher.path is None:
        where = "teacher.config" if "train_data" in space.teacher.config else "base"
        reads.append((f"{where}.train_data", teacher.train_data, teacher.train_limit, True))
    where = "teacher.config" if "eval_data" in space.teacher.config else "base"
    reads.append((f"{where}.eval_data", teacher.eval_data, teacher.eval_limit, False))
    reads.append(("base.train_data", base.train_data, largest_train_limit(space), True))
    reads.append(("base.eval_data", base.eval_data, base.eval_limit, False))
    loaded: dict[tuple[Path, int | None, bool], list[squad.Example]] = {}
    examples: list[list[squad.Example]] = []  # in the order of `reads`; a file read twice is the same list
    for key, name, limit, spans in reads:
        path = resolve_data(name)
        if (path, limit, spans) not in loaded:
            try:
                loaded[path, limit, spans] = squad.load_squad(path, limit=limit, spans=spans)
            except squad.SquadFormatError as err:
                raise SpaceError(f"{space.path}: {key}: {err}") from None
        examples.append(loaded[path, limit, spans])
    *teacher_reads, trials_train, trials_eval = examples
    warn_if_not_held_out(trials_train, trials_eval, scored="the trials")
    if len(teacher_reads) == 2 and teacher_reads[0] is not trials_train:
        warn_if_not_held_out(teacher_reads[0], trials_eval, scored="the dense teacher")


def check_machine(space: SweepSpace, address: str | None) -> str | None:
    """The cluster the sweep joins (:func:`cluster_address`), or None for a private local Ray, after checking, for
    the latter, that the space's paths are here and the trials' resources too (the data is checked apart:
    :func:`check_local_data`, which reads every file).

    Raises:
        SpaceError: a path, or a resource, that is not here.
    """
    cluster = cluster_address(address)
    if cluster is None:
        check_local_paths(space)  # on a cluster they need only exist on the workers
        check_local_resources(space)
        check_local_precision(space)
    return cluster
