"""The sweep report: one self-contained HTML page and a Markdown summary of a sweep's trials, frontier and champion.

Three parts:
  * the reader, :func:`collect_report_data`: the sweep's record (:mod:`workflows.record`) as a :class:`ReportData`
    whose ``runs`` is the record's runs table (a DataFrame), plus the champion read from the registry and its
    packed model's record of kept heads and FFN widths;
  * the plots, :mod:`workflows.plots` (matplotlib, inline SVG);
  * the renderers, :func:`render_markdown` (a pure function) and :func:`render_html` (the Jinja2 template
    ``templates/report.html.j2``, autoescaped), which need no MLflow and no network.

The frontiers shown are the ones the sweep tagged (``pareto`` over the space's objectives, ``pareto_speedup``); the
report never computes its own. The page works offline: no external script, style sheet, font or image; a
Content-Security-Policy forbids any fetch. Its trial table sorts on a click on a column header (a few lines of
inline JavaScript). :func:`write_report` writes both files and logs them on the sweep's parent run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape
import mlflow
from mlflow.exceptions import MlflowException
from mlflow.entities import FileInfo
from mlflow.tracking import MlflowClient

from pruning import atomic
from pruning.errors import error_line
from pruning.spread import NOISY_SPREAD
from workflows import plots, record
from workflows.frontier import frontier_order
from workflows.record import (ALIAS, ARTIFACT_MODEL_DIR, ARTIFACT_PACKED_MODEL, ARTIFACT_REPORT_DIR,
                              ARTIFACT_REPORT_HTML, ARTIFACT_REPORT_MARKDOWN, DELETED, DENSITY_OBJECTIVES, EXACT_MATCH,
                              F1, FINAL_METRICS, FORMER_POLICY_TAGS, HEADS_REMOVED, HYPERVOLUME, HYPERVOLUME_COMPUTE,
                              KIND_BASELINE, KIND_TRIAL, LINEAR_DENSITY, PARAM_REGISTRY, PARAM_SEARCHED, REMOVED,
                              SPEEDUP, STATUS_FAILED, STATUS_FINISHED, STATUSES, TAG_FINEPRUNE_VERSION, TAG_INT8_CHECK,
                              TAG_PARETO, TAG_PARETO_SPEED, TAG_POLICY, TAG_POLICY_THRESHOLD, TAG_SWEEP_RUN,
                              TAG_TRIAL_RUN, TAG_WARM_START, TAG_WARM_START_STORE, TAG_WARM_START_TRIALS,
                              TIMING_SPREAD, TOTAL_DENSITY, TRIAL_COMPUTE, RegistrySpec, run_deleted)
from workflows.registry import left_to_run, no_trial_finished, policy_choice
from workflows.version_files import served_model_dir, version_files_lost

__all__ = [
    "ChampionCard",
    "ReportData",
    "run_url",
    "render_markdown",
    "render_html",
    "collect_report_data",
    "write_report",
]

logger = logging.getLogger(__name__)

# (metric, column heading, decimals) of the trial table, after the searched values: each metric with the decimals
# the logs show it with.
_METRIC_COLUMNS = tuple((metric, heading, record.DECIMALS[metric]) for metric, heading in (
    (EXACT_MATCH, "EM"), (F1, "F1"), (LINEAR_DENSITY, "linear density"), (TOTAL_DENSITY, "total density"),
    (HEADS_REMOVED, "heads removed"), (SPEEDUP, "speedup"), (record.STEP, "steps")))
# A sweep on questions that hold unanswerable ones (SQuAD v2.0): F1 over each kind, and for a model answering "no
# answer" the F1 the best threshold for these questions would reach, and that threshold. Each shown where a run has it.
_NULL_COLUMNS = tuple((metric, heading, 2) for metric, heading in zip(
    record.NULL_METRICS, ("F1 answerable", "F1 unanswerable", "best F1", "best F1 threshold")))
_FRONTIER_COLUMNS = tuple(column for column in _METRIC_COLUMNS
                          if column[0] in (EXACT_MATCH, F1, LINEAR_DENSITY, SPEEDUP))
# The keys of a packed model's config.json that record its kept heads and FFN widths, as pruning.packed_modeling
# writes them: spelt here so that the report reads them without importing torch, five seconds of the command on 2
# cores (tests/test_report.py checks that the two agree).
_HEADS_KEPT_KEY = "fineprune_heads_kept"
_FFN_WIDTHS_KEY = "fineprune_ffn_widths"
# Nothing may be fetched: the page is a single file that must read the same offline.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
_TEMPLATES = Environment(loader=PackageLoader("workflows", "templates"), autoescape=True, undefined=StrictUndefined,
                         keep_trailing_newline=True)


# --------------------------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChampionCard:
    """The registered champion: which trial, its structure and how to load it.

    Attributes:
        model_name: registered model name.
        version: model version.
        run_id: the trial run the version was made from.
        heads_kept: per layer, the indices (into the original heads) of the kept heads.
        num_heads: heads per layer before pruning.
        ffn_widths: per layer, the kept FFN width.
        ffn_size: FFN width before pruning.
        size_bytes: the packed model directory on disk (weights, config, tokenizer).
        weights_bytes: the weight files alone.
        alias_current: the ``champion`` alias points at this version (False when a later sweep moved it).
        alias_version: where the alias points instead when not at this version; None when it points at no version
            (the version it pointed at was deleted, or the alias removed, by hand).
        tracking_uri: where the registry lives (for the loading snippet); None to leave it out.
        url: link to the model version in the MLflow UI, when a tracking server is known.
        policy: the policy that made this version champion and its threshold, as the version's tags record them
            (``fineprune register --space`` or ``fineprune select`` may have used another than the sweep's).
        note: what became of the version's trial run when it was deleted in the MLflow UI or removed for good
            (``mlflow gc``), and whether the version still serves, or that it cannot be loaded or served when files
            of its served model are gone from the registry's artifact store (plain text, code in backticks); None
            when neither is so.
        serves: the version's served model is whole in the registry (False: files of it are gone, and the card
            gives no way to load or serve it).
        metrics: the trial's final metrics as the version's tags record them (F1, EM, densities, heads removed,
            speedup, and the SQuAD v2.0 figures of a trial that has them), which the card shows when the trial's row
            is not among the runs (its run deleted or removed).
        served: which ONNX Runtime model the version serves and why, as its ``int8_check`` tag records it (its
            int8 and fp32 F1 on the trial's questions); None for a version that serves through PyTorch or was
            registered before the check.
    """

    model_name: str
    version: str
    run_id: str
    heads_kept: Sequence[Sequence[int]] = ()
    num_heads: int | None = None
    ffn_widths: Sequence[int] = ()
    ffn_size: int | None = None
    size_bytes: int | None = None
    weights_bytes: int | None = None
    alias_current: bool = True
    alias_version: str | None = None
    tracking_uri: str | None = None
    url: str | None = None
    policy: str | None = None
    note: str | None = None
    serves: bool = True
    metrics: Mapping[str, float] = field(default_factory=dict)
    served: str | None = None

    @property
    def model_uri(self) -> str:
        """``models:/NAME@champion`` while the alias holds, else the pinned version."""
        if self.alias_current:
            return f"models:/{self.model_name}@{ALIAS}"
        return f"models:/{self.model_name}/{self.version}"


@dataclass(frozen=True, eq=False)
class ReportData:
    """Everything the report shows about one sweep.

    Attributes:
        experiment: experiment name.
        sweep_run_id: the sweep's parent run.
        runs: the runs table of :func:`workflows.record.trials` (baseline first, then trials), with a ``url``
            column linking each run in the MLflow UI (None when no tracking server is known). Columns it lacks
            (a metric no run logged, a frontier tag) read as missing.
        searched: the searched keys, in the order of the space.
        param_types: searched key -> its type in the space (``uniform``, ``loguniform``, ``choice``, ...).
        objectives: the space's objectives: the ``pareto`` tags mark their frontier.
        champion: the registered champion, or None.
        policy: the registry policy that chose the champion (text), if known.
        tracking_uri: the tracking URI the data came from.
        sweep_url: link to the parent run in the MLflow UI, when a tracking server is known.
        generated: when the report was made (text).
        hypervolume: the frontier's hypervolume after each completed trial, as ``(trials, hypervolume)`` pairs.
        hypervolume_compute: the same values against the trial compute seconds spent, ``(seconds, hypervolume)``.
        sweep_status: the MLflow status of the sweep's run (``RUNNING`` while it runs, or after its process was
            killed; ``FINISHED``; ``KILLED`` or ``FAILED`` when it was interrupted), if known.
        no_champion: what the report says in place of the champion's card when there is none (plain text, code in
            backticks): why, as far as the record tells.
        warm_start: ``(sweep run id, trials, tracking URI)``: the earlier sweep whose trials the sampler was told
            before its first suggestion (``fineprune sweep --warm-start``), and the store it is in when that is not
            the sweep's own (else None); or None.
        fineprune_versions: the fineprune releases that made the sweep's runs, the sweep's own first (more than one
            where a resume ran under another); none for a sweep made before runs recorded it.
    """

    experiment: str
    sweep_run_id: str
    runs: pd.DataFrame
    searched: Sequence[str] = ()
    param_types: Mapping[str, str] = field(default_factory=dict)
    objectives: Sequence[tuple[str, str]] = DENSITY_OBJECTIVES
    champion: ChampionCard | None = None
    policy: str | None = None
    tracking_uri: str | None = None
    sweep_url: str | None = None
    generated: str = ""
    hypervolume: Sequence[tuple[float, float]] = ()
    hypervolume_compute: Sequence[tuple[float, float]] = ()
    sweep_status: str | None = None
    no_champion: str = "No trial was registered as champion."
    warm_start: tuple[str, str, str | None] | None = None
    fineprune_versions: Sequence[str] = ()

    @property
    def trials(self) -> pd.DataFrame:
        """The trial rows (no baseline)."""
        return self.runs[self.runs["kind"] == KIND_TRIAL]

    @property
    def baseline(self) -> pd.Series | None:
        """The dense baseline row, if logged."""
        rows = self.runs[self.runs["kind"] == KIND_BASELINE]
        return rows.iloc[0] if len(rows) else None

    @property
    def champion_row(self) -> pd.Series | None:
        """The champion's trial row, if it is among the runs."""
        if self.champion is None:
            return None
        rows = self.runs[self.runs["run_id"] == self.champion.run_id]
        return rows.iloc[0] if len(rows) else None

    @property
    def metric_columns(self) -> tuple[tuple[str, str, int], ...]:
        """The trial table's metric columns, ``(metric, heading, decimals)``: those of every sweep, then the SQuAD
        v2.0 ones any run logged."""
        return _METRIC_COLUMNS + tuple(column for column in _NULL_COLUMNS
                                       if column[0] in self.runs.columns and self.runs[column[0]].notna().any())

    @property
    def champion_figures(self) -> pd.Series | None:
        """The champion's metrics: its trial row's, else those its version's tags record (the trial's run deleted
        or removed for good), else None."""
        row = self.champion_row
        if row is not None or self.champion is None or not self.champion.metrics:
            return row
        return pd.Series(dict(self.champion.metrics), dtype=float)

    def frontier(self, tag: str = TAG_PARETO) -> pd.DataFrame:
        """The runs the sweep tagged as on a frontier (``pareto`` or ``pareto_speedup``)."""
        if tag not in self.runs.columns:
            return self.runs.iloc[0:0]
        return self.runs[self.runs[tag].fillna(False).astype(bool)]


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _value(row: pd.Series | None, metric: str) -> float | None:
    """A row's metric as a finite float, or None."""
    return None if row is None else _finite(row.get(metric))


def _param(row: pd.Series, key: str) -> str | None:
    """A row's searched value as logged, or None."""
    value = row.get(f"{PARAM_SEARCHED}{key}")
    return value if isinstance(value, str) else None


def run_url(tracking_uri: str | None, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run, or None when the tracking URI is not a server (sqlite, file, databricks...).

    Args:
        tracking_uri: the tracking URI the runs were logged to.
        experiment_id: the run's experiment id.
        run_id: the run id.

    Returns:
        ``{uri}/#/experiments/{experiment_id}/runs/{run_id}`` for an http(s) URI, else None.
    """
    base = _server(tracking_uri)
    return None if base is None else f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _server(tracking_uri: str | None) -> str | None:
    if not tracking_uri or not re.match(r"^https?://", tracking_uri, flags=re.IGNORECASE):
        return None
    return tracking_uri.rstrip("/")


def _fmt(value: Any, decimals: int = 2) -> str:
    number = _finite(value)
    if number is None:
        return "–"
    if decimals == 0:
        return f"{number:.0f}"
    return f"{number:.{decimals}f}"


def _fmt_param(value: str | None) -> str:
    if value is None or value == "":
        return "–"
    number = _finite(value)
    if number is None or re.fullmatch(r"[-+]?\d+", value.strip()):
        return value
    return f"{number:.4g}"


def _fmt_bytes(size: int | None) -> str:
    if size is None:
        return "–"
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _status_key(row: pd.Series) -> str:
    return KIND_BASELINE if row["kind"] == KIND_BASELINE else str(row["status"])


def _status_label(row: pd.Series) -> str:
    key = _status_key(row)
    return plots.STATUS_LABELS.get(key, key)


def _url(row: pd.Series) -> str | None:
    url = row.get("url")
    return url if isinstance(url, str) and url else None


def _rows(frame: pd.DataFrame) -> list[pd.Series]:
    return [row for _, row in frame.iterrows()]


def _counts(data: ReportData) -> dict[str, int]:
    counts = {status: 0 for status in STATUSES}
    for status in data.trials["status"]:
        counts[status] = counts.get(status, 0) + 1
    return counts


def _alias_note(card: ChampionCard) -> str:
    """Where the ``champion`` alias points when not at the sweep's champion (plain text, code in backticks)."""
    if card.alias_version is not None:
        return (f"The {_code(ALIAS)} alias has since moved to version {_plain(card.alias_version)}; the URI above "
                "pins this one.")
    return (f"The {_code(ALIAS)} alias points at no version now (the version it pointed at was deleted, or the alias "
            "removed); the URI above pins this one.")


# A backtick of user-given text (a name, a command naming it) put into a note: it stands for itself, never for the
# start or end of code. A character of Unicode's private use area, which no name or command holds.
_TICK = "\ue000"
_NOTE_CODE = re.compile(r"`([^`]*)`")


def _plain(text: Any) -> str:
    """User-given text (a trial's, an experiment's or a registered model's name) put into a note as written."""
    return str(text).replace("`", _TICK)


def _code(text: Any) -> str:
    """``text`` (a command, a run id) put into a note as code, shown verbatim."""
    return f"`{_plain(text)}`"


def _note_parts(text: str) -> list[tuple[str, bool]]:
    """A note's (text, is code) parts: code is in backticks, the rest plain text."""
    return [(part.replace(_TICK, "`"), bool(i % 2)) for i, part in enumerate(_NOTE_CODE.split(text)) if part]


def _note_html(text: str) -> Markup:
    """A note of plain text with code in backticks, as HTML."""
    return Markup("".join(f"<code>{escape(part)}</code>" if code else str(escape(part))
                          for part, code in _note_parts(text)))


def _load_snippet(card: ChampionCard) -> str:
    lines = ["import mlflow", "import pandas as pd", ""]
    if card.tracking_uri:
        lines.append(f"mlflow.set_tracking_uri({json.dumps(card.tracking_uri)})")
    lines += [f"model = mlflow.pyfunc.load_model({json.dumps(card.model_uri)})",
              'answers = model.predict(pd.DataFrame({"question": ["Who wrote it?"],',
              '                                      "context": ["It was written by Ann."]}))',
              "print(answers)  # columns: answer, score"]
    return "\n".join(lines)


def _serve_command(card: ChampionCard) -> str:
    env = f"MLFLOW_TRACKING_URI={shlex.quote(card.tracking_uri)} " if card.tracking_uri else ""
    return f"{env}mlflow models serve -m {shlex.quote(card.model_uri)} --env-manager local -h 127.0.0.1 -p 5000"


def _served_line(card: ChampionCard) -> str | None:
    """What the card says of the ONNX model the champion serves (its ``int8_check`` tag, as a sentence)."""
    return card.served[:1].upper() + card.served[1:] if card.served else None


def _null_line(data: ReportData) -> str | None:
    """What the card says of a champion answering "no answer", scored on questions that hold unanswerable ones: its
    F1 over each kind, and the threshold that would score best on these questions, with how to check and serve it
    (from its trial's row, else its version's tags); None for any other champion."""
    row, card = data.champion_figures, data.champion
    best, threshold = (None, None) if row is None else (_value(row, "best_f1"), _value(row, "best_f1_threshold"))
    if best is None or threshold is None or card is None:
        return None
    threshold = round(threshold, 4)  # a margin's midpoint: more digits say nothing more
    where = ["--tracking-uri", card.tracking_uri] if card.tracking_uri else []
    check = shlex.join(["fineprune", "eval", card.model_uri, *where, "--eval-data", "OTHER_QUESTIONS.json",
                        "--null-threshold", f"{threshold:g}"])
    config = shlex.quote(json.dumps({"null_threshold": threshold}))
    return (f"SQuAD v2.0: F1 {_fmt(_value(row, 'has_answer_f1'))} on the answerable questions and "
            f"{_fmt(_value(row, 'no_answer_f1'))} on the unanswerable ones, answering \"no answer\" wherever it scores "
            f"higher than the best span (null_threshold 0, as it serves). A threshold of {threshold:g} logits would "
            f"score F1 {_fmt(best)} on these questions; it is fitted on them, so check it on others "
            f"({_code(check)}) before serving it ({_code(f'MLFLOW_PYFUNC_INFERENCE_CONFIG={config}')}, or a "
            f"request's {_code('params')}).")


def _eval_command(card: ChampionCard) -> str:
    """The `fineprune eval` line that scores the champion, as it serves, on a SQuAD file of one's own."""
    where = ("--tracking-uri", card.tracking_uri) if card.tracking_uri else ()
    return shlex.join(["fineprune", "eval", card.model_uri, *where, "--eval-data", "YOUR_SQUAD.json"])


def _summary_lines(data: ReportData) -> list[tuple[str, str]]:
    """(label, plain text) facts shown at the top of both reports."""
    counts = _counts(data)
    # A trial of a sweep that has not ended (running, interrupted, orphaned) is counted too, so the parts add up.
    unended = "".join(f", {n} {plots.STATUS_LABELS.get(status, status)}" for status, n in counts.items()
                      if status not in STATUSES and n)
    facts = [("Experiment", data.experiment), ("Sweep run", data.sweep_run_id),
             ("Trials", f"{len(data.trials)} ({counts['finished']} finished, {counts['stopped_early']} stopped "
                        f"early, {counts['failed']} failed{unended})")]
    if data.warm_start is not None:
        run_id, trials, store = data.warm_start
        where = f" (tracking URI {store})" if store else ""
        facts.append(("Warm start", f"the sampler was told {trials} trials of sweep run {run_id}{where} before its "
                                    "first suggestion"))
    base = data.baseline
    if base is not None:
        facts.append(("Dense baseline", f"F1 {_fmt(_value(base, F1))}, EM {_fmt(_value(base, EXACT_MATCH))}"))
    card = data.champion
    row, figures = data.champion_row, data.champion_figures
    if card is not None:
        metrics = "" if figures is None else (f": F1 {_fmt(_value(figures, F1))}, "
                                              f"EM {_fmt(_value(figures, EXACT_MATCH))}, "
                                              f"linear density {_fmt(_value(figures, LINEAR_DENSITY), 3)}, "
                                              f"speedup {_fmt(_value(figures, SPEEDUP))}x")
        facts.append(("Champion", f"{card.model_uri} (version {card.version}, "
                                  f"{row['name'] if row is not None else card.run_id}){metrics}"))
    else:
        facts.append(("Champion", "none registered"))
    if data.policy:
        facts.append(("Policy", data.policy))
    if data.tracking_uri:
        facts.append(("Tracking URI", data.tracking_uri))
    if data.fineprune_versions:
        facts.append(("fineprune", ", ".join(data.fineprune_versions)))
    return facts


def _frontier_rows(data: ReportData, tag: str) -> list[pd.Series]:
    """The tagged frontier's runs, in the order ``frontier.json`` and the sweep's summary list them
    (:func:`workflows.frontier.frontier_order`), or fastest first for the speedup frontier."""
    front = _rows(data.frontier(tag))
    if tag == TAG_PARETO_SPEED:
        return sorted(front, key=lambda r: -(_value(r, SPEEDUP) or 0.0))
    points = [{name: _value(r, name) for name, _ in data.objectives} for r in front]
    return [front[i] for i in frontier_order(points, data.objectives)]


def _frontier_note(data: ReportData, tag: str) -> str | None:
    """What a reader must know about a frontier before its table or plot: that no trial finished (so the frontier
    holds no pruned model, at most the dense baseline), or that the sweep has not tagged it yet; None otherwise."""
    trials = data.trials
    if int((trials["status"] == STATUS_FINISHED).sum()):
        return _untagged_note(data, tag)
    if not len(trials):
        return "The sweep has no trial yet, so no pruned model is on this frontier."
    counts = ", ".join(f"{n} {plots.STATUS_LABELS.get(status, status)}" for status, n in _counts(data).items() if n)
    only_baseline = bool(len(data.frontier(tag)))
    return (f"No trial finished ({counts}), so no pruned model is on this frontier"
            + ("; it holds only the dense baseline." if only_baseline else ".")
            + (" Why each trial failed is listed under Failed trials." if _counts(data)[STATUS_FAILED] else ""))


def _speed_note(data: ReportData) -> str | None:
    """Which finished trials' speedups were timed among passes that disagree (their ``timing_spread`` above
    :data:`pruning.spread.NOISY_SPREAD`, as when trials share a machine): their order on the speedup frontier is noise.
    None when every speedup was timed steadily (or no trial recorded how steadily)."""
    trials = data.trials
    if TIMING_SPREAD not in trials:
        return None
    finished = trials[trials["status"] == STATUS_FINISHED]
    noisy = finished[pd.to_numeric(finished[TIMING_SPREAD], errors="coerce") > NOISY_SPREAD]
    if not len(noisy):
        return None
    return (f"The speedups of {len(noisy)} of the {len(finished)} finished trials ({', '.join(noisy['name'])}) were "
            f"timed while their passes disagreed by up to {float(noisy[TIMING_SPREAD].max()):.1f}x (upper over lower "
            f"quartile; {NOISY_SPREAD:g}x at most counts as steady), as when trials share a machine: their place "
            f"against speedup is noise. `fineprune select` times registered versions side by side.")


def _one_line(text: str, limit: int = 400) -> str:
    """An error message as one line of at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _failures(data: ReportData) -> list[dict[str, Any]]:
    """The failed trials, each with why it failed and where its traceback is (as the sweep recorded them)."""
    out = []
    for row in _rows(data.trials):
        if row["status"] != STATUS_FAILED:
            continue
        error, where = row.get("error"), row.get("error_file")
        out.append({"name": str(row["name"]), "url": _url(row),
                    "error": _one_line(error) if isinstance(error, str) and error.strip() else None,
                    "error_file": where if isinstance(where, str) and where else None})
    return out


def _untagged_note(data: ReportData, tag: str) -> str | None:
    """Why a frontier with finished trials shows no run: the sweep tags its frontiers when it ends (an
    interrupted or still running sweep has not); None when the frontier has runs or there is no finished trial."""
    finished = int((data.trials["status"] == STATUS_FINISHED).sum())
    if not finished or len(data.frontier(tag)):
        return None
    note = f"No run is tagged on this frontier although {finished} trial(s) finished: the sweep tags its frontiers"
    resume = record.resume_command(data.tracking_uri or record.tracking_uri(None), data.sweep_run_id)
    space = record.SPACE_PLACEHOLDER
    if data.sweep_status == "RUNNING":
        return (f"{note} when it ends, and it is still running (its MLflow run is RUNNING; if its process was killed, "
                f"{_code(resume)} finishes it, {space}).")
    if data.sweep_status in ("KILLED", "FAILED"):
        return (f"{note} when it ends, and it was interrupted (its MLflow run is {data.sweep_status}): "
                f"{_code(resume)} finishes it ({space}).")
    return f"{note} when it ends ({_code(resume)} finishes an interrupted one; {space})."


# --------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "*": "&#42;", "[": "&#91;", "]": "&#93;", "`": "&#96;",
                "_": "&#95;", "\\": "&#92;", "#": "&#35;"}


def _md_text(text: str) -> str:
    """User-given ``text`` (an experiment's, a trial's or a searched value's name) shown as written: HTML and the
    Markdown that would change how it reads (emphasis, links, code, a backslash escaping what follows, a heading's
    closing ``#``) become character references. An underscore inside a word (``trial_00001``), which never starts or
    ends emphasis, is left as it is."""
    return re.sub(r"[&<>*\[\]`\\#]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", lambda m: _MD_ENTITIES[m.group()],
                  str(text))


def _md_note(text: str) -> str:
    """A note (plain text, code in backticks) as Markdown: its text shown as written, its code as code spans."""
    return "".join(_md_code(part) if code else _md_text(part) for part, code in _note_parts(text))


def _md_code(text: str) -> str:
    """``text`` as an inline code span, shown verbatim (no markup or HTML inside it is interpreted)."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def _trial_cells(data: ReportData, row: pd.Series, metric_columns: Sequence[tuple[str, str, int]]) -> list[str]:
    url = _url(row)
    name = _md_text(row["name"])
    cells = [f"[{name}]({url})" if url else name, _status_label(row)]
    cells += [_md_text(_fmt_param(_param(row, k))) for k in data.searched]
    cells += [_fmt(_value(row, m), d) for m, _, d in metric_columns]
    cells += ["yes" if bool(row.get(tag)) is True else "" for tag in (TAG_PARETO, TAG_PARETO_SPEED)]
    return cells


def _pareto_titles(data: ReportData) -> tuple[str, str]:
    """What the trial table's two frontier columns are on: the space's objectives (named by the metric across the
    frontier plot, which density or other), and F1 against speedup."""
    x, _ = plots.frontier_axes(data.objectives)
    return plots.metric_label(x), plots.metric_label(SPEEDUP)


def _trial_header(data: ReportData) -> list[str]:
    return (["trial", "status", *data.searched, *(title for _, title, _ in data.metric_columns),
             *(f"Pareto ({title})" for title in _pareto_titles(data))])


def render_markdown(data: ReportData) -> str:
    """The Markdown summary: key facts, both frontiers, the champion's structure, every trial.

    Args:
        data: the sweep as read by :func:`collect_report_data` (or built by hand).

    Returns:
        Markdown text (GitHub flavour tables).
    """
    out = [f"# Sweep report: {_md_text(data.experiment)}", ""]
    out += [f"- **{label}**: {_md_text(text)}" for label, text in _summary_lines(data)]
    x, y = plots.frontier_axes(data.objectives)
    shown = [metric for metric, _, _ in _FRONTIER_COLUMNS]
    extra = [name for name, _ in data.objectives if name not in shown]
    header = ("name", *(title for _, title, _ in _FRONTIER_COLUMNS), *(plots.metric_label(m) for m in extra))

    def table(rows: list[pd.Series], tag: str) -> list[str]:
        note = _frontier_note(data, tag)
        note = _md_note(note) if note else None
        if not rows:
            return [note or "No finished trial."]
        cells = ([_md_text(r["name"]), *(_fmt(_value(r, m), d) for m, _, d in _FRONTIER_COLUMNS),
                  *(_fmt(_value(r, m), 3) for m in extra)] for r in rows)
        return ([note, ""] if note else []) + _md_table(header, cells)

    out += ["", f"## Pareto frontier: {plots.metric_label(y)} against {plots.metric_label(x)}", ""]
    out += table(_frontier_rows(data, TAG_PARETO), TAG_PARETO)
    out += ["", "## Pareto frontier: F1 against measured speedup", ""]
    out += table(_frontier_rows(data, TAG_PARETO_SPEED), TAG_PARETO_SPEED)
    if (speed := _speed_note(data)) is not None:
        out += ["", _md_note(speed)]

    card = data.champion
    out += ["", "## Champion", ""]
    if card is None:
        out.append(_md_note(data.no_champion))
    else:
        out += [f"{_md_code(card.model_uri)} (registered model {_md_text(card.model_name)}, version "
                f"{_md_text(card.version)}, trial run {_md_code(card.run_id)}).", ""]
        if card.note:
            out += [_md_note(card.note), ""]
        out += [f"- Size on disk: {_fmt_bytes(card.size_bytes)} (weights {_fmt_bytes(card.weights_bytes)})"]
        figures = data.champion_figures
        if figures is not None:
            out.append(f"- Speedup: {_fmt(_value(figures, SPEEDUP))}x; F1 {_fmt(_value(figures, F1))}, "
                       f"EM {_fmt(_value(figures, EXACT_MATCH))}, "
                       f"linear density {_fmt(_value(figures, LINEAR_DENSITY), 3)}")
        if card.served:
            out.append(f"- {_md_text(_served_line(card))}")
        null_line = _null_line(data)
        if null_line:
            out.append(f"- {_md_note(null_line)}")
        if not card.alias_current:
            out.append(f"- {_md_note(_alias_note(card))}")
        if card.heads_kept or card.ffn_widths:
            out += [""]
            layers = max(len(card.heads_kept), len(card.ffn_widths))
            rows = []
            for i in range(layers):
                heads = card.heads_kept[i] if i < len(card.heads_kept) else None
                width = card.ffn_widths[i] if i < len(card.ffn_widths) else None
                kept = "–" if heads is None else f"{len(heads)}/{card.num_heads or '?'}: {list(heads)}"
                ffn = "–" if width is None else f"{width}/{card.ffn_size or '?'}"
                rows.append([str(i), kept, ffn])
            out += _md_table(("layer", "heads kept", "FFN width"), rows)
        if card.serves:
            out += ["", "Load it:", "", "```python", _load_snippet(card), "```", "", "Serve it:", "", "```bash",
                    _serve_command(card), "```", "", "Score it, as it serves, on SQuAD-format questions of your own:",
                    "", "```bash", _eval_command(card), "```"]

    out += ["", "## Search progress: hypervolume of the frontier", ""]
    if data.hypervolume:
        # Both series come from the same steps; pair them only when none was lost.
        same = len(data.hypervolume_compute) == len(data.hypervolume)
        seconds = dict(enumerate(s for s, _ in data.hypervolume_compute)) if same else {}
        # One row per step that moved the frontier (and the first and last): a sweep of hundreds of trials would
        # otherwise repeat the same value row after row.
        last = len(data.hypervolume) - 1
        kept = [i for i, (_, value) in enumerate(data.hypervolume)
                if i in (0, last) or value != data.hypervolume[i - 1][1]]
        if len(kept) < len(data.hypervolume):
            out += ["Only the trials that grew the hypervolume are listed, and the last one.", ""]
        out += _md_table(("trials completed", "trial compute (s)", "hypervolume"),
                         ([f"{data.hypervolume[i][0]:.0f}", _fmt(seconds.get(i), 0),
                           f"{data.hypervolume[i][1]:.6g}"] for i in kept))
    else:
        out.append("No hypervolume was logged for this sweep.")

    out += ["", "## Trials", ""]
    metric_columns = data.metric_columns
    out += _md_table(_trial_header(data), (_trial_cells(data, r, metric_columns) for r in _rows(data.runs)))
    failures = _failures(data)
    if failures:
        out += ["", "## Failed trials", ""]
        for failure in failures:
            name = _md_text(failure["name"])
            name = f"[{name}]({failure['url']})" if failure["url"] else name
            reason = _md_code(failure["error"]) if failure["error"] else "no reason was recorded"
            where = f" (traceback: {_md_code(failure['error_file'])})" if failure["error_file"] else ""
            out.append(f"- {name}: {reason}{where}")
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------


def _sort_key(value: Any) -> str:
    number = _finite(value)
    if number is not None:
        return str(number)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _table(data: ReportData) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The trial table's columns and rows for the template (plain values; the template escapes them)."""
    numeric = {k: plots.numeric_values(data.trials.get(f"{PARAM_SEARCHED}{k}", pd.Series(dtype=object)))
               for k in data.searched}
    columns = [{"title": "trial", "text": True, "searched": False},
               {"title": "status", "text": True, "searched": False}]
    columns += [{"title": key, "text": not numeric[key], "searched": True} for key in data.searched]
    metric_columns = data.metric_columns
    columns += [{"title": title, "text": False, "searched": False} for _, title, _ in metric_columns]
    columns += [{"title": f"Pareto: {title}", "text": True, "searched": False} for title in _pareto_titles(data)]
    champion_id = data.champion.run_id if data.champion else None
    rows = []
    for row in _rows(data.runs):
        cells = []
        for key in data.searched:
            raw = _param(row, key)
            cells.append({"display": _fmt_param(raw), "sort": _sort_key(_finite(raw) if numeric[key] else raw),
                          "text": not numeric[key]})
        for metric, _, decimals in metric_columns:
            value = _value(row, metric)
            text = _fmt(value, decimals) + ("x" if metric == SPEEDUP and value is not None else "")
            cells.append({"display": text, "sort": _sort_key(value), "text": False})
        for tag in (TAG_PARETO, TAG_PARETO_SPEED):
            on = bool(row.get(tag)) is True
            cells.append({"display": "yes" if on else "", "sort": "yes" if on else "", "text": True})
        is_champion = row["run_id"] == champion_id
        rows.append({"run_id": row["run_id"], "name": str(row["name"]), "url": _url(row), "champion": is_champion,
                     "classes": " ".join([str(row["kind"]), *(["champion"] if is_champion else [])]),
                     "status_key": _status_key(row), "status_label": _status_label(row), "cells": cells})
    return columns, rows


def _champion_view(data: ReportData) -> dict[str, Any] | None:
    card = data.champion
    if card is None:
        return None
    row, figures, null_line = data.champion_row, data.champion_figures, _null_line(data)
    stats = []
    if figures is not None:
        stats += [(_fmt(_value(figures, F1)), "F1"), (_fmt(_value(figures, EXACT_MATCH)), "exact match"),
                  (_fmt(_value(figures, LINEAR_DENSITY), 3), "linear density"),
                  (_fmt(_value(figures, SPEEDUP)) + "x", "speedup"), (_fmt(_value(figures, HEADS_REMOVED), 0),
                                                                     "heads removed")]
    stats += [(_fmt_bytes(card.size_bytes), "size on disk"), (_fmt_bytes(card.weights_bytes), "weights")]
    structure = None
    if card.heads_kept or card.ffn_widths:
        structure = Markup(plots.structure_figure(card.heads_kept, card.num_heads, card.ffn_widths, card.ffn_size))
    return {"model_uri": card.model_uri, "url": card.url, "model_name": card.model_name, "version": card.version,
            "trial": str(row["name"]) if row is not None else card.run_id,
            "trial_url": _url(row) if row is not None else None, "stats": stats,
            "alias_current": card.alias_current, "structure_svg": structure,
            "alias_note": _note_html(_alias_note(card)),
            "note": _note_html(card.note) if card.note else None, "serves": card.serves,
            "served": _served_line(card), "null_note": _note_html(null_line) if null_line else None,
            "load_snippet": _load_snippet(card), "serve_command": _serve_command(card),
            "eval_command": _eval_command(card)}


def render_html(data: ReportData) -> str:
    """The self-contained report page: plots as inline SVG, a sortable trial table, the champion's card.

    Args:
        data: the sweep as read by :func:`collect_report_data` (or built by hand).

    Returns:
        A complete HTML document with no external reference (scripts, styles, fonts and images are inline).
    """
    champion_id = data.champion.run_id if data.champion else None
    x, y = plots.frontier_axes(data.objectives)
    second = EXACT_MATCH if y != EXACT_MATCH else F1
    hypervolume = plots.hypervolume_figure(data.hypervolume, data.hypervolume_compute)
    learned = plots.learned_figure(data.runs, data.searched, dict(data.param_types), champion_id, data.objectives)
    columns, rows = _table(data)
    # The SVGs are matplotlib's output with labels escaped where they are written (workflows.plots): markup.
    return _TEMPLATES.get_template("report.html.j2").render(
        csp=_CSP, experiment=data.experiment, sweep_run_id=data.sweep_run_id, sweep_url=data.sweep_url,
        generated=data.generated, facts=_summary_lines(data),
        frontier_svg=Markup(plots.frontier_figure(data.runs, data.objectives, champion_id)),
        frontier_note=_note_html(note) if (note := _frontier_note(data, TAG_PARETO)) else None,
        speed_note=_note_html(speed) if (speed := _speed_note(data)) else None,
        failures=_failures(data),
        x_label=plots.metric_label(x), y_label=plots.metric_label(y), second_label=plots.metric_label(second),
        hypervolume_svg=Markup(hypervolume) if hypervolume else None,
        any_url=any(row["url"] for row in rows), columns=columns, rows=rows,
        champion=_champion_view(data), policy=data.policy, no_champion=_note_html(data.no_champion),
        learned_svg=Markup(learned) if learned else None)


# --------------------------------------------------------------------------------------------------------------
# Reading a sweep back from MLflow
# --------------------------------------------------------------------------------------------------------------


def _champion(client: MlflowClient, parent, tracking_uri: str, trial_ids: set[str]) -> ChampionCard | None:
    """The version the sweep made champion: the one the ``champion`` alias points at when it is one of the sweep's,
    else the newest this sweep's policy chose (tag ``policy``; ``former_champion_policy`` once the alias has left
    it) whose trial run is still among ``trial_ids`` (a version of a trial deleted by hand, or one a later choice of
    the same sweep replaced and its trial deleted, is not named champion); None when there is none."""
    name = record.params_under(parent.data.params, PARAM_REGISTRY).get("name")  # whatever else the record holds
    if not name:
        return None
    parent_id = parent.info.run_id
    try:
        versions = [v for v in client.search_model_versions(f"name = '{name}'")
                    if v.tags.get(TAG_SWEEP_RUN) == parent_id]
    except MlflowException:
        return None
    if not versions:
        return None
    try:
        aliased = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        aliased = None
    if aliased is not None and aliased.tags.get(TAG_SWEEP_RUN) == parent_id:
        version, current = aliased, True
    else:
        # The alias has moved on: the version this sweep made champion carries the policy that chose it (its other
        # versions are frontier points); none when no trial met the policy.
        version = record.last_champion([v for v in versions if (v.tags.get(TAG_TRIAL_RUN) or v.run_id) in trial_ids])
        if version is None:
            return None
        current = False
    run_id = version.tags.get(TAG_TRIAL_RUN) or version.run_id
    structure = _packed_structure(client, run_id, name, str(version.version))
    note, serves = _serving_note(client, name, str(version.version), run_id, run_id in trial_ids, tracking_uri)
    held = version.tags if current or version.tags.get(TAG_POLICY) else {  # kept as it was when the alias left it
        key: version.tags[former] for key, former in FORMER_POLICY_TAGS.items() if former in version.tags}
    policy = held.get(TAG_POLICY) or None
    if policy is not None:
        threshold = held.get(TAG_POLICY_THRESHOLD)
        sweep = _sweep_policy(parent.data.params)
        if threshold is None and sweep is not None and sweep.policy == policy:
            threshold = sweep.threshold()  # a version tagged before versions recorded the threshold
        policy = record.policy_text(policy, threshold)
    server = _server(tracking_uri)
    return ChampionCard(
        model_name=name, version=str(version.version), run_id=run_id, alias_current=current,
        alias_version=None if current or aliased is None else str(aliased.version),
        tracking_uri=None if tracking_uri == "databricks" else tracking_uri,
        url=None if server is None else f"{server}/#/models/{name}/versions/{version.version}", policy=policy,
        note=note, serves=serves, metrics={key: value for key in (*FINAL_METRICS, *record.NULL_METRICS)
                                           if (value := _finite(version.tags.get(key))) is not None},
        served=version.tags.get(TAG_INT8_CHECK) or None, **structure)


def _serving_note(client: MlflowClient, name: str, version: str, run_id: str, listed: bool,
                  tracking_uri: str) -> tuple[str | None, bool]:
    """The champion card's note on version ``version`` of ``name`` and whether it serves: what became of its trial
    run ``run_id`` when it is not ``listed`` among the sweep's trials (deleted, or removed for good), and whether its
    served model is whole. That model is a copy of the version's own in the registry's artifact location, which
    deleting or removing the trial run leaves; files of it deleted from the store by hand make it serve no more."""
    state = None if listed else run_deleted(client, run_id)
    try:
        lost = version_files_lost(client, name, version)
    except MlflowException as err:
        lost = error_line(err)
    if state not in (DELETED, REMOVED):
        if lost is None:
            return None, True
        return (f"This version cannot be loaded or served: {_plain(lost)}. `fineprune register` and `fineprune "
                "select` no longer choose it; delete the version, and registering the sweep again makes it anew "
                "from the trial's packed model."), False
    if state == REMOVED:
        said = (f"Its trial run {_code(run_id)} was removed for good (`mlflow gc`): the sweep's record no longer holds "
                "it, so the tables leave it out, the card's figures are those its version's tags record and its size "
                "and structure those of the packed model the version holds; `fineprune register` and `fineprune "
                "select` no longer choose this version.")
    else:
        restore = record.restore_command(tracking_uri, run_id)
        said = (f"Its trial run {_code(run_id)} was deleted in the MLflow UI ({_code(restore)} brings it back): the "
                "tables leave it out and the card's figures are those its version's tags record; `fineprune "
                "register` and `fineprune select` do not choose this version while it is deleted.")
    if lost is None:
        return (f"{said} The registered version keeps its own copy of the served model in the registry, which "
                "deleting or removing its trial run leaves in place: it still loads and serves as below."), True
    return f"{said} The registered version cannot be loaded or served either: {_plain(lost)}.", False


def _sweep_policy(params: Mapping[str, str]) -> RegistrySpec | None:
    """The registry policy the sweep's run records, or None."""
    try:
        spec = RegistrySpec.from_params(params)
    except record.RecordError:
        return None
    return spec if params.get(f"{PARAM_REGISTRY}policy") else None


def _packed_structure(client: MlflowClient, run_id: str, name: str, version: str) -> dict[str, Any]:
    """Kept heads, FFN widths and sizes of the champion's packed model: from its trial run's ``packed_model``
    artifact, else (the run removed for good with `mlflow gc`, or its artifact gone) from the copy the registered
    version ``version`` of ``name`` holds; empty when neither can be read. Only the files are listed and
    ``config.json`` read, not the weights downloaded."""
    try:
        files = _artifact_files(client.list_artifacts, run_id, ARTIFACT_PACKED_MODEL)
        trial_problem = None if files else f"run {run_id} holds no {ARTIFACT_PACKED_MODEL} artifact"
    except (MlflowException, OSError) as err:
        files = []
        if isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST":
            trial_problem = f"its trial run {run_id} was removed for good (`mlflow gc`)"
        else:
            trial_problem = f"cannot list the packed model of run {run_id}: {err}"
    if files:
        return _structure_of(files, f"{ARTIFACT_PACKED_MODEL}/config.json",
                             lambda path, dst: client.download_artifacts(run_id, path, dst), f"run {run_id}")
    try:  # the version's own copy, which deleting or removing the trial run leaves
        root = client.get_model_version_download_uri(name, version).rstrip("/")
        with atomic.scratch_dir("download") as tmp:
            model_dir = served_model_dir(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root}/MLmodel", dst_path=tmp, tracking_uri=client.tracking_uri))
        if not model_dir:
            raise ValueError(f"its MLmodel names no {ARTIFACT_MODEL_DIR}")
        base = f"{root}/{model_dir.strip('/')}"

        def listing(_: Any, path: str) -> list:  # paths as under the model directory, as a run's are under the run
            infos = mlflow.artifacts.list_artifacts(artifact_uri=f"{base}/{path}".rstrip("/"),
                                                    tracking_uri=client.tracking_uri)
            return [FileInfo(f"{path}/{info.path.rsplit('/', 1)[-1]}".lstrip("/"), info.is_dir, info.file_size)
                    for info in infos]

        files = _artifact_files(listing, None, "")
    except (MlflowException, OSError, ValueError) as err:
        logger.warning("%s, and the packed model of version %s of %s cannot be read (%s): the report has no size "
                       "or structure of it", trial_problem, version, name, err)
        return {}
    if not files:
        logger.warning("%s, and version %s of %s holds no packed model: the report has no size or structure of it",
                       trial_problem, version, name)
        return {}

    def fetch(path: str, dst: str) -> str:
        return mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{path}", dst_path=dst,
                                                   tracking_uri=client.tracking_uri)
    return _structure_of(files, "config.json", fetch, f"version {version} of {name}")


def _structure_of(files: list[tuple[str, int]], config_path: str, fetch, where: str) -> dict[str, Any]:
    """Sizes of a packed model directory's ``files`` ((path, bytes) pairs) and the kept heads and FFN widths its
    ``config_path`` records, read through ``fetch(path, dst) -> local path``; ``where`` names it in a warning."""
    out: dict[str, Any] = {"size_bytes": sum(size for _, size in files),
                           "weights_bytes": sum(size for path, size in files
                                                if path.endswith((".safetensors", ".bin")))}
    if not any(path == config_path for path, _ in files):
        return out
    with atomic.scratch_dir("download") as tmp:
        try:
            config = json.loads(Path(fetch(config_path, tmp)).read_text(encoding="utf-8"))
        except (MlflowException, OSError, ValueError) as err:
            logger.warning("cannot read the packed config of %s: %s", where, err)
            return out
    heads = config.get(_HEADS_KEPT_KEY)
    widths = config.get(_FFN_WIDTHS_KEY)
    if isinstance(heads, list):
        out["heads_kept"] = [list(map(int, layer)) for layer in heads]
    if isinstance(widths, list):
        out["ffn_widths"] = [int(w) for w in widths]
    if isinstance(config.get("num_attention_heads"), int):
        out["num_heads"] = config["num_attention_heads"]
    if isinstance(config.get("intermediate_size"), int):
        out["ffn_size"] = config["intermediate_size"]
    return out


def _artifact_files(listing, run_id: str | None, path: str) -> list[tuple[str, int]]:
    """The files under ``path`` as (path, bytes) pairs, listed through ``listing(run_id, path)``."""
    files: list[tuple[str, int]] = []
    for info in listing(run_id, path):
        if info.is_dir:
            files += _artifact_files(listing, run_id, info.path)
        else:
            files.append((info.path, int(info.file_size or 0)))
    return files


def collect_report_data(experiment: str, tracking_uri: str | None = None,
                        sweep_run_id: str | None = None, concluding: bool = False) -> ReportData:
    """Read a sweep back from MLflow: its runs table, searched keys, objectives and registered champion.

    Args:
        experiment: the experiment name.
        tracking_uri: MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).
        sweep_run_id: the sweep's parent run; default: the experiment's latest sweep.
        concluding: the report is the sweep's own, made at its end once it has registered its champion (its run
            is ended after the report): a sweep without a champion is not said to register one still.

    Returns:
        The report's data.

    Raises:
        RecordError: the experiment, or a sweep run in it, does not exist.
    """
    given = record.tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=given, registry_uri=given)
    parent = record.latest_sweep(client, experiment, sweep_run_id)  # an error names the store as it was given
    # The report is read elsewhere: its snippets and commands name the store from any directory.
    uri = record.portable_uri(given)
    parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
    runs = record.trials(client, parent)
    runs["url"] = [run_url(uri, experiment_id, run_id) for run_id in runs["run_id"]]
    params = parent.data.params
    types = record.search_types(params)
    logged = [c[len(PARAM_SEARCHED):] for c in runs.columns if c.startswith(PARAM_SEARCHED)]
    keys = [*types, *(k for k in logged if k not in types)]  # keys the parent does not describe (older sweeps)
    champion = _champion(client, parent, uri, set(runs.loc[runs["kind"] == KIND_TRIAL, "run_id"]))
    if champion is not None:  # what made it champion, which may be another policy than the sweep's
        policy = champion.policy
    else:  # the sweep's policy, which chose none
        policy = params.get(f"{PARAM_REGISTRY}policy")
        for key in ("max_density", "max_f1_drop", "max_latency_ms"):
            value = params.get(f"{PARAM_REGISTRY}{key}")
            if policy and value not in (None, "", "None"):
                policy += f" ({key} {value})"
    hypervolume = record.metric_history(client, parent_id, HYPERVOLUME)
    status = None if concluding else parent.info.status
    no_champion = _no_champion(client, runs, params, parent_id, policy, experiment, uri, status) if champion is None \
        else ""
    return ReportData(
        experiment=experiment, sweep_run_id=parent_id, runs=runs, searched=keys, param_types=types,
        objectives=record.sweep_objectives(params), champion=champion, policy=policy,
        tracking_uri=uri, sweep_url=run_url(uri, experiment_id, parent_id),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        hypervolume=hypervolume, hypervolume_compute=_hypervolume_by_compute(client, parent_id, hypervolume),
        sweep_status=parent.info.status, **({"no_champion": no_champion} if no_champion else {}),
        warm_start=(parent.data.tags[TAG_WARM_START], parent.data.tags.get(TAG_WARM_START_TRIALS, "?"),
                    parent.data.tags.get(TAG_WARM_START_STORE))
        if TAG_WARM_START in parent.data.tags else None,
        fineprune_versions=[v for v in dict.fromkeys([parent.data.tags.get(TAG_FINEPRUNE_VERSION),
                                                      *runs["fineprune_version"]]) if isinstance(v, str) and v])


def _no_champion(client: MlflowClient, runs: pd.DataFrame, params: Mapping[str, str], parent_id: str,
                 policy: str | None, experiment: str, tracking_uri: str, status: str | None = None) -> str:
    """Why no version of the sweep ``parent_id`` is shown as its champion, as far as the record and the registry
    tell: the version that was its champion is set aside (its trial run deleted, or removed for good), the sweep is
    still running (``status`` RUNNING: it registers its champion when it ends), no trial meets its registry policy,
    or the one that does (:func:`workflows.registry.policy_choice`, as a registration chooses
    it) is not champion, its version deleted from the registry or never registered."""
    spec = _sweep_policy(params)
    if spec is None:
        return "No trial was registered as champion."
    try:
        versions = [v for v in client.search_model_versions(f"name = '{spec.name}'")
                    if v.tags.get(TAG_SWEEP_RUN) == parent_id]
    except MlflowException:
        versions = []
    listed = set(runs.loc[runs["kind"] == KIND_TRIAL, "run_id"])
    version = record.last_champion([v for v in versions if (v.tags.get(TAG_TRIAL_RUN) or v.run_id) not in listed])
    if version is not None:  # the champion it had, whose trial was deleted since
        run_id = version.tags.get(TAG_TRIAL_RUN) or version.run_id
        if run_deleted(client, run_id) == REMOVED:
            gone = "was removed for good (`mlflow gc`), which nothing brings back"
        else:
            gone = f"was deleted ({_code(record.restore_command(tracking_uri, run_id))} brings it back)"
        return (f"Version {version.version} of {_plain(spec.name)}, this sweep's champion, is set aside: its trial "
                f"run {_code(run_id)} {gone}.")
    if status == "RUNNING":  # its champion is chosen and registered at its end, from all its trials
        resume = record.resume_command(tracking_uri, parent_id)
        return (f"The sweep has not finished (its MLflow run is RUNNING): it registers its champion, as the registry "
                f"policy {_plain(policy)} chooses it from all its trials, when it ends. If its process was killed, "
                f"{_code(resume)} finishes it ({record.SPACE_PLACEHOLDER}).")
    unfinished = no_trial_finished(runs)
    if unfinished is not None:  # no policy had one to choose
        resume = record.resume_command(tracking_uri, parent_id)
        left = (f" {_code(resume)} runs what is left ({record.SPACE_PLACEHOLDER})."
                if left_to_run(runs) else "")
        return f"No trial to register as champion: {_plain(unfinished)}.{left}"
    if spec.policy == "best_f1_under_latency":  # chosen by timing the versions where they were registered
        return f"No version of this sweep is, or was, its champion (registry policy {_plain(policy)})."
    try:
        chosen = policy_choice(runs, spec, parent_id)
    except record.RecordError:
        return (f"No trial was registered as champion: the registry policy {_plain(policy)} needs the dense "
                "baseline's F1, which the sweep does not record.")
    if chosen is None:
        return f"No trial meets the registry policy {_plain(policy)}: none was registered as champion."
    command = record.fineprune_command("register", tracking_uri, "--experiment", experiment, "--sweep-run",
                                       parent_id)
    try:
        held = client.get_model_version_by_alias(spec.name, ALIAS).version
    except MlflowException:  # the alias is on no version
        held = None
    moves = "" if held is None else f" and moves the {_code(ALIAS)} alias to it from version {held}, the champion now"
    return (f"The registry policy {_plain(policy)} chooses trial {_plain(chosen.get('name') or chosen['run_id'])}, "
            "but no version "
            "of this sweep is, or was, its champion: its version was deleted from the registry, or it was not "
            "registered (the sweep has not registered it yet, its registration stopped, `fineprune register "
            f"--space` gave another policy, or the alias was left on a later sweep's version); {_code(command)} "
            f"registers it{moves}.")


def _hypervolume_by_compute(client: MlflowClient, parent_id: str,
                            by_trials: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The hypervolume against the trial compute seconds spent, one point per step of ``by_trials``: each step's
    seconds as the sweep logged them (``trial_compute_s``). A sweep logged before them gives its
    ``hypervolume_by_compute_s`` history, stepped by whole seconds (trials that ended within one share a step)."""
    seconds = dict(record.metric_history(client, parent_id, TRIAL_COMPUTE))
    if by_trials and all(trials in seconds for trials, _ in by_trials):
        return [(seconds[trials], value) for trials, value in by_trials]
    return record.metric_history(client, parent_id, HYPERVOLUME_COMPUTE)


def write_report(experiment: str, out_dir: str | Path, tracking_uri: str | None = None,
                 sweep_run_id: str | None = None, concluding: bool = False) -> dict[str, Path]:
    """Write ``report.html`` and ``report.md`` for a sweep and log both on its parent run under ``report/``.

    Args:
        experiment: the experiment name.
        out_dir: directory to write into (created if missing).
        tracking_uri: MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).
        sweep_run_id: the sweep's parent run; default: the experiment's latest sweep.
        concluding: the sweep's own report, at its end (see :func:`collect_report_data`).

    Returns:
        ``{"html": path, "markdown": path}``.

    Raises:
        RecordError: the experiment, or a sweep run in it, does not exist.
    """
    data = collect_report_data(experiment, tracking_uri=tracking_uri, sweep_run_id=sweep_run_id,
                               concluding=concluding)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / ARTIFACT_REPORT_HTML, "markdown": out / ARTIFACT_REPORT_MARKDOWN}
    html, markdown = render_html(data), render_markdown(data)
    atomic.write_text(paths["html"], html)  # a stop part-way leaves the earlier report, not half of this one
    atomic.write_text(paths["markdown"], markdown)
    client = MlflowClient(tracking_uri=data.tracking_uri, registry_uri=data.tracking_uri)
    for path in paths.values():
        client.log_artifact(data.sweep_run_id, str(path), artifact_path=ARTIFACT_REPORT_DIR)
    logger.info("sweep report: %s (Markdown: %s), logged on run %s under %s/", paths["html"], paths["markdown"],
                data.sweep_run_id, ARTIFACT_REPORT_DIR)
    return paths
