"""Timing registered versions as they serve on this machine, beside the dense shapes they were pruned from.

:func:`time_versions` loads each version as it serves (ONNX Runtime, or its packed PyTorch model), times them
round-robin with the benches' helper (loaded until they fill half the memory free, then timed) and gives each
version's latency, its dense shape's and their ratio (or why it was not timed);
:func:`workflows.registry.select_by_latency` chooses among them (``fineprune select``, and a sweep's
``best_f1_under_latency`` policy, with :func:`latency_settings`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from pruning import atomic
from pruning.spread import JUDGED_PASSES, NOISY_SPREAD, spread
from pruning.memory import available_memory
from pruning.errors import error_line, raise_interrupt_behind
from workflows import record
from workflows.int8_check import checked_f1, variant_run
from workflows.record import F1, FINAL_METRICS, NULL_METRICS, PARAM_SPEEDUP, TAG_SWEEP_RUN, TAG_TRIAL_RUN, tag_float
from workflows.version_files import FewerPositions, load_version

__all__ = ["SeqLenError", "NOISY_SPREAD", "timing_noise", "time_versions", "latency_settings"]

logger = logging.getLogger(__name__)


class SeqLenError(record.RecordError):
    """A registration's timing length (its space's ``speedup.seq_len``) is longer than a version's model takes: the
    space's field is at fault, not the versions (one line naming it)."""


def timing_noise(times: Mapping[str, Sequence[float]]) -> str | None:
    """What says that interleaved timings (name -> seconds of each pass) are too noisy to rank the models by (see
    :func:`pruning.spread.spread`), or None where every model's passes agree; models of fewer than 4 passes, too few
    for quartiles, are not judged."""
    spreads = {name: spread(seconds) for name, seconds in times.items() if len(seconds) >= JUDGED_PASSES}
    noisy = [value for value in spreads.values() if value > NOISY_SPREAD]
    if not noisy:
        return None
    return (f"the timed passes of {len(noisy)} of the {len(spreads)} models disagree, by up to {max(noisy):.1f}x "
            f"(upper over lower quartile; {NOISY_SPREAD:g}x at most counts as steady)")


def _dense_shape(model):
    """A randomly initialised model of the unpruned shape (speed depends on shapes only), and its shape key."""
    config = copy.deepcopy(model.config)
    key = json.dumps({k: getattr(config, k, None) for k in ("model_type", "vocab_size", "hidden_size",
                                                              "num_hidden_layers", "num_attention_heads",
                                                              "intermediate_size", "max_position_embeddings")},
                     sort_keys=True) + type(model).__name__
    return key, config


@dataclasses.dataclass
class _Timing:
    """What :func:`time_versions` times, and how: the runtime, threads and input shape (``seq_len_from``: what
    gave ``seq_len``, see there); the models to run round-robin (each version's as ``vN``, each dense shape by its
    :func:`_dense_shape` key), the dense shape of each version timed, each version's row, and the versions set aside
    (their trial or sweep run deleted)."""

    runtime: str
    threads: int
    batch_size: int
    seq_len: int
    seq_len_from: str | None
    models: dict[str, Any] = dataclasses.field(default_factory=dict)
    dense_of: dict[str, str] = dataclasses.field(default_factory=dict)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    set_aside: set[str] = dataclasses.field(default_factory=set)
    # Each group timed: its timings (name -> seconds of each pass), for the noise check.
    groups: list[dict[str, list[float]]] = dataclasses.field(default_factory=list)


def _version_to_time(client, name: str, v, dst: Path, timing: _Timing, lifecycle: dict[str, str | None]
                     ) -> dict[str, Any]:
    """The row of version ``v`` of ``name`` (its trial figures, how it runs, or why it is not timed: an ``error``),
    its model loaded from ``dst`` and added to ``timing`` with its dense shape when it runs on the input of
    ``timing`` (see :func:`time_versions`). ``lifecycle`` caches whether each run read was deleted.

    Raises:
        SeqLenError: its model takes fewer positions than ``timing.seq_len`` and ``timing.seq_len_from`` names what
            gave it.
    """
    # transformers and the library are needed only to time models: the registry, which imports this module,
    # stays light without them.
    from transformers import AutoModelForQuestionAnswering

    from pruning.bench import interleaved_latency
    from pruning.structure import max_positions

    row = {"version": str(v.version), "run_id": v.tags.get(TAG_TRIAL_RUN) or v.run_id,
           **{k: tag_float(v.tags, k) for k in FINAL_METRICS},
           **{k: tag_float(v.tags, k) for k in NULL_METRICS if k in v.tags}}
    gone = record.deleted_source(client, v.tags, row["run_id"], lifecycle)
    if gone is not None:  # set aside in the MLflow UI: neither loaded nor chosen
        row["error"] = gone
        timing.set_aside.add(row["version"])
        logger.warning("version %s of %s: %s, so it is not chosen", v.version, name, gone)
        return row
    if row[F1] is None:  # removed or edited by hand: the version cannot be ranked, so it is never chosen
        what = f"its {F1} tag {v.tags[F1]!r} is not a number" if F1 in v.tags else f"it has no {F1} tag"
        logger.warning("version %s of %s: %s, so it cannot be chosen (`%s` writes the tag again from its "
                       "trial while it is on its sweep's frontier)", v.version, name, what,
                       record.register_frontier_command(client, v.tags.get(TAG_SWEEP_RUN)))
    try:  # a model that takes fewer positions than seq_len is found from its config, before its weights
        model, row["served_by"] = load_version(client, name, str(v.version), str(dst), timing.runtime,
                                               timing.threads, seq_len=timing.seq_len)
        row["served_f1"] = checked_f1(v.tags, variant_run(row["served_by"]))
        limit = max_positions(model.config)
    except FewerPositions as short:
        limit = short.limit
    except Exception as err:  # a version that cannot be loaded is reported, not chosen
        raise_interrupt_behind(err)
        row["error"] = error_line(err)
        logger.warning("version %s of %s cannot be loaded: %s", v.version, name, row["error"])
        return row
    seq_len = timing.seq_len
    if seq_len > limit and timing.seq_len_from is not None:
        raise SeqLenError(f"{timing.seq_len_from}: {seq_len} exceeds the {limit} positions the model of version "
                          f"{v.version} of {name} takes; no champion registered")
    if seq_len > limit:  # another version, of a model with more positions, may still be timed
        row["error"] = f"cannot be timed: its model takes at most {limit} positions, fewer than --seq-len {seq_len}"
        logger.warning("version %s of %s %s", v.version, name, row["error"])
        return row
    try:  # one pass first: a version that loads but fails when run must not stop the timing of the others
        interleaved_latency({"probe": model}, batch_size=timing.batch_size, seq_len=seq_len, repeats=1, warmup=0)
    except Exception as err:
        raise_interrupt_behind(err)
        row["error"] = f"cannot be timed: {error_line(err)}"
        logger.warning("version %s of %s %s", v.version, name, row["error"])
        return row
    key, config = _dense_shape(model)
    if key not in timing.models:
        timing.models[key] = AutoModelForQuestionAnswering.from_config(config).eval()
    timing.dense_of[row["version"]] = key
    timing.models[f"v{v.version}"] = model
    return row


def _none_timed(name: str, timing: _Timing) -> str:
    """Why no version of ``name`` could be timed: each version's error, and what went wrong with them all."""
    rows = timing.rows
    reasons = "; ".join(f"version {row['version']}: {row['error']}" for row in rows)
    kinds = {"chosen" if row["version"] in timing.set_aside else
             "timed" if row["error"].startswith("cannot be timed: ") else "loaded" for row in rows}
    what = " or ".join(word for word in ("loaded", "timed", "chosen") if word in kinds)
    return f"no version of {name!r} could be {what} ({reasons})"


def _held_bytes(timing: _Timing, tmp: Path, pending: Sequence[str]) -> int:
    """Roughly what the models loaded for the next group hold: the files each pending version was read from (its
    weights, as ONNX Runtime or PyTorch holds them) and the parameters of every dense shape."""
    dense = set(timing.dense_of.values())
    held = sum(p.numel() * p.element_size() for key in dense for p in timing.models[key].parameters())
    return held + sum(f.stat().st_size for version in pending for f in Path(tmp, version).rglob("*") if f.is_file())


def _time_group(timing: _Timing, tmp: Path, pending: list[str], repeats: int, warmup: int) -> None:
    """Time the loaded versions ``pending`` round-robin with their dense shapes, give each its row's latencies, and
    let their models and files go."""
    import torch

    from pruning.bench import interleaved_latency

    names = {f"v{version}" for version in pending} | {timing.dense_of[version] for version in pending}
    models = {key: model for key, model in timing.models.items() if key in names}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(timing.threads)
    try:
        times = interleaved_latency(models, batch_size=timing.batch_size, seq_len=timing.seq_len, repeats=repeats,
                                    warmup=warmup)
    finally:
        torch.set_num_threads(previous_threads)
    timing.groups.append(times)
    rows = {row["version"]: row for row in timing.rows}
    for version in pending:
        own = statistics.median(times[f"v{version}"]) * 1000.0
        dense = statistics.median(times[timing.dense_of[version]]) * 1000.0
        rows[version].update({"latency_ms": own, "dense_latency_ms": dense,
                              "served_speedup": dense / own if own > 0 else None})
        del timing.models[f"v{version}"]
        shutil.rmtree(Path(tmp, version), ignore_errors=True)
    pending.clear()


def time_versions(client, name: str, versions: Sequence, runtime: str, threads: int, batch_size: int = 1,
                  seq_len: int = 128, repeats: int = 10, warmup: int = 2, seq_len_from: str | None = None,
                  memory_limit: int | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Time ``versions`` (of the registered model ``name``) here, as they serve, against their dense shapes.

    Each version is loaded as it serves (``runtime="served"``: through ONNX Runtime when it carries the exported
    model, which is what its pyfunc and ``mlflow models serve`` run; ``"torch"``: its packed PyTorch model) and timed
    on random input of ``batch_size`` x ``seq_len`` with the benches' helper
    (:func:`pruning.bench.interleaved_latency`): the versions and the dense shape(s) they were pruned from (in
    PyTorch, fp32) run round-robin on ``threads`` threads, ``repeats`` times after ``warmup`` rounds, and each
    latency is a median. Versions are loaded in order until they and the dense shapes hold ``memory_limit`` bytes or
    more (default: half the memory this machine has free; their files' sizes count for them: the last one loaded
    may take a group past the limit by its own size), then that group is timed
    and let go before the next is loaded: a model of many versions is timed in groups, each beside its dense shape,
    rather than all held at once. Timings too noisy to rank the versions by (:func:`timing_noise`) are a warning.

    A version that cannot be loaded or fails when run here, whose model takes fewer positions than ``seq_len``, or
    whose trial run or sweep run was deleted (set aside in the MLflow UI; it is not loaded) is not timed: its row
    gives its ``error``, and the others are timed.

    Args:
        seq_len_from: what gave ``seq_len`` when a registration times the versions (``FILE: speedup.seq_len``): a
            version whose model takes fewer positions is then that field's error, :class:`SeqLenError`.
        memory_limit: the bytes a group of versions may hold, see above.

    Returns:
        One row per version, in order (``version``, ``run_id``, its trial figures from its tags, how it ran,
        ``served_by``, the F1 its int8 check measured for that model, ``served_f1``, and ``latency_ms``,
        ``dense_latency_ms`` and ``served_speedup``, unrounded, or its ``error``), and why no version could be
        timed (one line), or None where one was.
    """
    started = time.perf_counter()
    if memory_limit is None:
        free = available_memory()
        memory_limit = free // 2 if free is not None else None
    timing = _Timing(runtime, threads, batch_size, seq_len, seq_len_from)
    lifecycle: dict[str, str | None] = {}  # run id -> deleted or removed, each run read once
    with atomic.scratch_dir("download") as tmp:
        pending: list[str] = []  # loaded, not yet timed
        for v in versions:
            row = _version_to_time(client, name, v, Path(tmp) / str(v.version), timing, lifecycle)
            timing.rows.append(row)
            if row["version"] not in timing.dense_of:  # not timed: its files are not needed
                shutil.rmtree(Path(tmp, row["version"]), ignore_errors=True)
                continue
            pending.append(row["version"])
            if memory_limit is not None and _held_bytes(timing, Path(tmp), pending) >= memory_limit:
                _time_group(timing, Path(tmp), pending, repeats, warmup)
        if pending:
            _time_group(timing, Path(tmp), pending, repeats, warmup)
    if not timing.dense_of:
        return timing.rows, _none_timed(name, timing)
    groups = (f", in {len(timing.groups)} groups, each timed once its models held {memory_limit / 2**20:.0f} MiB"
              if len(timing.groups) > 1 else "")
    logger.info("loaded and timed %d versions of %s with %d dense shape(s), %d rounds%s, in %.1f s",
                len(timing.dense_of), name, len(set(timing.dense_of.values())), warmup + repeats, groups,
                time.perf_counter() - started)
    # The passes of each group's models, a dense shape timed in several groups once in each.
    passes = {f"{key} ({i})": seconds for i, times in enumerate(timing.groups) for key, seconds in times.items()}
    if (noise := timing_noise(passes)) is not None:
        logger.warning("%s: the choice may differ on a rerun; time with fewer --threads than free cores, on a "
                       "quieter machine, or with more --repeats", noise)
    return timing.rows, None


def latency_settings(speedup: Mapping[str, Any], resources: Mapping[str, Any],
                     source: str | None = None) -> dict[str, Any]:
    """How ``best_f1_under_latency`` times versions in a sweep: the space's ``speedup`` shape and repeats, with the
    threads of one trial (``resources.cpu``). Values may be numbers or params as logged (strings). ``source`` names
    where they come from (the space file, or the sweep run that logged them): a ``speedup.seq_len`` longer than a
    version's model takes is then an error naming it (see :func:`time_versions`' ``seq_len_from``)."""
    def number(values: Mapping[str, Any], key: str, default: float) -> int:
        value = values.get(key)
        return int(float(value)) if value not in (None, "", "None") else int(default)

    settings: dict[str, Any] = {"batch_size": number(speedup, "batch_size", 1),
                                "seq_len": number(speedup, "seq_len", 128),
                                "repeats": max(number(speedup, "repeats", 10), 10),
                                "threads": max(1, number(resources, "cpu", 1))}
    if source is not None:
        settings["seq_len_from"] = f"{source}: {PARAM_SPEEDUP}seq_len"
    return settings
