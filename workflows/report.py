"""The sweep report: one self-contained HTML page and a Markdown summary of a sweep's trials, frontier and champion.

Two layers:
  * pure renderers (:func:`render_html`, :func:`render_markdown`, :func:`run_url`, :func:`frontier_ids`) that turn
    a :class:`ReportData` (plain rows of metrics and searched values) into strings; they need no MLflow and no
    network, and the plots are drawn with matplotlib into inline SVG;
  * :func:`collect_report_data` and :func:`write_report`, which read a sweep back from MLflow (parent run, trial
    and baseline runs, the registered champion and its packed model's record of kept heads and FFN widths), write
    ``report.html`` and ``report.md`` and log both on the sweep's parent run under ``report/``.

The page works offline: no external script, style sheet, font or image; a Content-Security-Policy forbids any
fetch. Its trial table sorts on a click on a column header (a few lines of inline JavaScript).
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
import re
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "TrialRow",
    "ChampionCard",
    "ReportData",
    "STATUSES",
    "run_url",
    "frontier_ids",
    "render_markdown",
    "render_html",
    "collect_report_data",
    "write_report",
]

logger = logging.getLogger(__name__)

STATUSES = ("finished", "stopped_early", "failed")
_STATUS_LABEL = {"finished": "finished", "stopped_early": "stopped early", "failed": "failed", "running": "running",
                 "baseline": "dense baseline"}
REPORT_ARTIFACT_DIR = "report"
HTML_NAME = "report.html"
MARKDOWN_NAME = "report.md"

# Plot colours: one per trial status, and the frontier / baseline / champion marks.
_COLOURS = {"finished": "#4c72b0", "stopped_early": "#8c8c8c", "failed": "#c44e52", "frontier": "#d62728",
            "baseline": "#222222", "champion": "#e6a100", "kept": "#4c72b0", "removed": "#e8e8ee"}
_DENSITY_OBJECTIVES = (("f1", "max"), ("linear_density", "min"))
_EM_DENSITY_OBJECTIVES = (("exact_match", "max"), ("linear_density", "min"))
_SPEED_OBJECTIVES = (("f1", "max"), ("speedup", "max"))
# (metric, column title, decimals) of the trial table, after the searched values.
_METRIC_COLUMNS = (("exact_match", "EM", 2), ("f1", "F1", 2), ("linear_density", "linear density", 3),
                   ("total_density", "total density", 3), ("heads_removed", "heads removed", 0),
                   ("speedup", "speedup", 2), ("step", "steps", 0))


# --------------------------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRow:
    """One trial (or the dense baseline) as the report shows it.

    Attributes:
        run_id: MLflow run id.
        name: run name (``trial-<id>`` or ``dense-baseline``).
        kind: ``trial`` or ``baseline``.
        status: ``finished``, ``stopped_early`` or ``failed`` (anything else is shown as is).
        searched: the searched values of the trial, as logged (strings), keyed by the space's key.
        metrics: final metrics (``exact_match``, ``f1``, ``linear_density``, ``speedup``, ...).
        url: link to the run in the MLflow UI, when a tracking server is known.
    """

    run_id: str
    name: str
    kind: str = "trial"
    status: str = "finished"
    searched: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    url: str | None = None

    def value(self, metric: str) -> float | None:
        """The metric as a finite float, or None."""
        return _finite(self.metrics.get(metric))


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
        tracking_uri: where the registry lives (for the loading snippet); None to leave it out.
        url: link to the model version in the MLflow UI, when a tracking server is known.
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
    tracking_uri: str | None = None
    url: str | None = None

    @property
    def model_uri(self) -> str:
        """``models:/NAME@champion`` while the alias holds, else the pinned version."""
        from workflows.registry import ALIAS

        if self.alias_current:
            return f"models:/{self.model_name}@{ALIAS}"
        return f"models:/{self.model_name}/{self.version}"


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows about one sweep.

    Attributes:
        experiment: experiment name.
        sweep_run_id: the sweep's parent run.
        rows: trials and the dense baseline (when logged), in the order to list them.
        searched: the searched keys, in the order of the space.
        param_types: searched key -> its type in the space (``uniform``, ``loguniform``, ``choice``, ...).
        champion: the registered champion, or None.
        policy: the registry policy that chose the champion (text), if known.
        tracking_uri: the tracking URI the data came from.
        sweep_url: link to the parent run in the MLflow UI, when a tracking server is known.
        generated: when the report was made (text).
        hypervolume: the frontier's hypervolume after each completed trial, as ``(trials, hypervolume)`` pairs.
        hypervolume_compute: the same values against the trial compute seconds spent, ``(seconds, hypervolume)``.
    """

    experiment: str
    sweep_run_id: str
    rows: Sequence[TrialRow]
    searched: Sequence[str] = ()
    param_types: Mapping[str, str] = field(default_factory=dict)
    champion: ChampionCard | None = None
    policy: str | None = None
    tracking_uri: str | None = None
    sweep_url: str | None = None
    generated: str = ""
    hypervolume: Sequence[tuple[float, float]] = ()
    hypervolume_compute: Sequence[tuple[float, float]] = ()

    @property
    def trials(self) -> list[TrialRow]:
        """The trial rows (no baseline)."""
        return [r for r in self.rows if r.kind == "trial"]

    @property
    def baseline(self) -> TrialRow | None:
        """The dense baseline row, if logged."""
        return next((r for r in self.rows if r.kind == "baseline"), None)

    @property
    def champion_row(self) -> TrialRow | None:
        """The champion's trial row, if it is among the rows."""
        if self.champion is None:
            return None
        return next((r for r in self.rows if r.run_id == self.champion.run_id), None)


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


def frontier_ids(rows: Iterable[TrialRow], objectives: Sequence[tuple[str, str]]) -> set[str]:
    """Run ids of the finished rows (baseline included) on the Pareto frontier of ``objectives``.

    The same definition as the sweep's ``pareto`` tags: finished runs only, rows lacking a metric take no part.
    """
    from workflows.frontier import pareto_front

    finished = [r for r in rows if r.status == "finished"]
    points = [dict(r.metrics) for r in finished]
    return {finished[i].run_id for i in pareto_front(points, objectives)}


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


def _status_label(row: TrialRow) -> str:
    if row.kind == "baseline":
        return _STATUS_LABEL["baseline"]
    return _STATUS_LABEL.get(row.status, row.status)


def _counts(data: ReportData) -> dict[str, int]:
    counts = {status: 0 for status in STATUSES}
    for row in data.trials:
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts


def _numeric_param(rows: Sequence[TrialRow], key: str) -> bool:
    values = [r.searched.get(key) for r in rows if r.searched.get(key) not in (None, "")]
    return bool(values) and all(_finite(v) is not None for v in values)


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
    return f'{env}mlflow models serve -m "{card.model_uri}" --env-manager local -h 127.0.0.1 -p 5000'


def _summary_lines(data: ReportData) -> list[tuple[str, str]]:
    """(label, plain text) facts shown at the top of both reports."""
    counts = _counts(data)
    facts = [("Experiment", data.experiment), ("Sweep run", data.sweep_run_id),
             ("Trials", f"{len(data.trials)} ({counts['finished']} finished, {counts['stopped_early']} stopped "
                        f"early, {counts['failed']} failed)")]
    base = data.baseline
    if base is not None:
        facts.append(("Dense baseline", f"F1 {_fmt(base.value('f1'))}, EM {_fmt(base.value('exact_match'))}"))
    card = data.champion
    row = data.champion_row
    if card is not None:
        metrics = "" if row is None else (f": F1 {_fmt(row.value('f1'))}, EM {_fmt(row.value('exact_match'))}, "
                                          f"linear density {_fmt(row.value('linear_density'), 3)}, "
                                          f"speedup {_fmt(row.value('speedup'))}x")
        facts.append(("Champion", f"{card.model_uri} (version {card.version}, "
                                  f"{row.name if row else card.run_id}){metrics}"))
    else:
        facts.append(("Champion", "none registered"))
    if data.policy:
        facts.append(("Policy", data.policy))
    if data.tracking_uri:
        facts.append(("Tracking URI", data.tracking_uri))
    return facts


# --------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def _trial_cells(data: ReportData, row: TrialRow, front: set[str], front_speed: set[str]) -> list[str]:
    cells = [f"[{row.name}]({row.url})" if row.url else row.name, _status_label(row)]
    cells += [_fmt_param(row.searched.get(k)) for k in data.searched]
    cells += [_fmt(row.value(m), d) for m, _, d in _METRIC_COLUMNS]
    cells += ["yes" if row.run_id in front else "", "yes" if row.run_id in front_speed else ""]
    return cells


def _trial_header(data: ReportData) -> list[str]:
    return (["trial", "status", *data.searched, *(title for _, title, _ in _METRIC_COLUMNS),
             "Pareto (density)", "Pareto (speedup)"])


def render_markdown(data: ReportData) -> str:
    """The Markdown summary: key facts, both frontiers, the champion's structure, every trial.

    Args:
        data: the sweep as read by :func:`collect_report_data` (or built by hand).

    Returns:
        Markdown text (GitHub flavour tables).
    """
    front = frontier_ids(data.rows, _DENSITY_OBJECTIVES)
    front_speed = frontier_ids(data.rows, _SPEED_OBJECTIVES)
    by_id = {r.run_id: r for r in data.rows}
    out = [f"# Sweep report: {data.experiment}", ""]
    out += [f"- **{label}**: {text}" for label, text in _summary_lines(data)]
    columns = ("name", "EM", "F1", "linear density", "speedup")

    def frontier_rows(ids: set[str], key) -> list[list[str]]:
        rows = sorted((by_id[i] for i in ids), key=key)
        return [[r.name, _fmt(r.value("exact_match")), _fmt(r.value("f1")), _fmt(r.value("linear_density"), 3),
                 _fmt(r.value("speedup"))] for r in rows]

    out += ["", "## Pareto frontier: F1 against linear density", ""]
    out += _md_table(columns, frontier_rows(front, lambda r: r.value("linear_density") or 0.0)) if front else \
        ["No finished trial."]
    out += ["", "## Pareto frontier: F1 against measured speedup", ""]
    out += _md_table(columns, frontier_rows(front_speed, lambda r: -(r.value("speedup") or 0.0))) if front_speed \
        else ["No finished trial."]

    card = data.champion
    out += ["", "## Champion", ""]
    if card is None:
        out.append("No trial was registered as champion.")
    else:
        out += [f"`{card.model_uri}` (registered model {card.model_name}, version {card.version}, "
                f"trial run `{card.run_id}`).", "",
                f"- Size on disk: {_fmt_bytes(card.size_bytes)} (weights {_fmt_bytes(card.weights_bytes)})"]
        row = data.champion_row
        if row is not None:
            out.append(f"- Speedup: {_fmt(row.value('speedup'))}x; F1 {_fmt(row.value('f1'))}, "
                       f"EM {_fmt(row.value('exact_match'))}, linear density {_fmt(row.value('linear_density'), 3)}")
        if not card.alias_current:
            out.append("- The `champion` alias has since moved to another version; the URI above pins this one.")
        if card.heads_kept or card.ffn_widths:
            out += [""]
            layers = max(len(card.heads_kept), len(card.ffn_widths))
            table = []
            for i in range(layers):
                heads = card.heads_kept[i] if i < len(card.heads_kept) else None
                width = card.ffn_widths[i] if i < len(card.ffn_widths) else None
                kept = "–" if heads is None else f"{len(heads)}/{card.num_heads or '?'}: {list(heads)}"
                ffn = "–" if width is None else f"{width}/{card.ffn_size or '?'}"
                table.append([str(i), kept, ffn])
            out += _md_table(("layer", "heads kept", "FFN width"), table)
        out += ["", "Load it:", "", "```python", _load_snippet(card), "```", "", "Serve it:", "", "```bash",
                _serve_command(card), "```"]

    out += ["", "## Search progress: hypervolume of the frontier", ""]
    if data.hypervolume:
        # Both series come from the same steps; pair them only when none was lost.
        same = len(data.hypervolume_compute) == len(data.hypervolume)
        seconds = dict(enumerate(s for s, _ in data.hypervolume_compute)) if same else {}
        out += _md_table(("trials completed", "trial compute (s)", "hypervolume"),
                         ([f"{trials:.0f}", _fmt(seconds.get(i), 0), f"{value:.6g}"]
                          for i, (trials, value) in enumerate(data.hypervolume)))
    else:
        out.append("No hypervolume was logged for this sweep.")

    out += ["", "## Trials", ""]
    out += _md_table(_trial_header(data), (_trial_cells(data, r, front, front_speed) for r in data.rows))
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# Plots (matplotlib -> inline SVG)
# --------------------------------------------------------------------------------------------------------------


def _svg(fig, label: str, prefix: str) -> str:
    """The figure as an inline ``<svg>`` element: no XML prolog, ids unique to this figure, scalable."""
    import matplotlib

    buffer = io.StringIO()
    # Text as paths: the page needs no font.
    with matplotlib.rc_context({"svg.fonttype": "path"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    # Several figures share one document: matplotlib's ids (glyphs, clip paths, axes) would repeat between them.
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', text)
    text = re.sub(r'(href="#|url\(#)([^")]+)', lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", text)
    return text.replace("<svg ", f'<svg class="plot" role="img" aria-label="{html.escape(label)}" ', 1)


def _new_figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kwargs):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _style(ax) -> None:
    ax.grid(alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)


def _scatter_trials(ax, data: ReportData, x: str, y: str, objectives: Sequence[tuple[str, str]] | None) -> bool:
    """Trials by status, the frontier through its points, the baseline and the champion; False when empty."""
    drawn = False
    for status, marker, face in (("finished", "o", True), ("stopped_early", "o", False), ("failed", "X", True)):
        pts = [(r.value(x), r.value(y)) for r in data.trials if r.status == status]
        pts = [p for p in pts if None not in p]
        if not pts:
            continue
        drawn = True
        colour = _COLOURS[status]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=28, marker=marker, linewidths=1.2,
                   facecolors=colour if face else "none", edgecolors=colour, alpha=0.85, zorder=3,
                   label=_STATUS_LABEL[status])
    if objectives is not None:
        ids = frontier_ids(data.rows, objectives)
        front = sorted(((r.value(x), r.value(y)) for r in data.rows if r.run_id in ids), key=lambda p: (p[0], p[1]))
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=_COLOURS["frontier"], linewidth=1.6,
                    zorder=2, label="Pareto frontier")
            ax.scatter([p[0] for p in front], [p[1] for p in front], s=46, facecolors="none",
                       edgecolors=_COLOURS["frontier"], linewidths=1.4, zorder=4)
    base = data.baseline
    if base is not None and base.value(y) is not None:
        ax.axhline(base.value(y), color=_COLOURS["baseline"], linestyle=":", linewidth=1.0, zorder=1)
        if base.value(x) is not None:
            drawn = True
            ax.scatter([base.value(x)], [base.value(y)], marker="*", s=150, color=_COLOURS["baseline"], zorder=5,
                       label="dense baseline")
    row = data.champion_row
    if row is not None and row.value(x) is not None and row.value(y) is not None:
        ax.scatter([row.value(x)], [row.value(y)], s=260, facecolors="none", edgecolors=_COLOURS["champion"],
                   linewidths=2.4, zorder=6, label="champion")
        ax.annotate("champion", (row.value(x), row.value(y)), xytext=(8, 8), textcoords="offset points",
                    fontsize=8, color="#8a6000")
    if not drawn:
        ax.text(0.5, 0.5, "no trial with these metrics", ha="center", va="center", transform=ax.transAxes,
                fontsize=9, color="#666666")
    return drawn


def _frontier_figure(data: ReportData) -> str:
    """Three panels: F1 and EM against linear density, F1 against speedup; one legend below them."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = _new_figure(11.0, 3.8, ncols=3)
    panels = ((axes[0][0], "linear_density", "f1", _DENSITY_OBJECTIVES, "F1 against linear density"),
              (axes[0][1], "linear_density", "exact_match", _EM_DENSITY_OBJECTIVES,
               "exact match against linear density"),
              (axes[0][2], "speedup", "f1", _SPEED_OBJECTIVES, "F1 against measured speedup"))
    for ax, x, y, objectives, title in panels:
        _scatter_trials(ax, data, x, y, objectives)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("F1" if y == "f1" else "exact match", fontsize=9)
        _style(ax)
    for ax in (axes[0][0], axes[0][1]):
        ax.set_xlabel("linear density (fraction of encoder linear weights kept)", fontsize=8)
    speed_ax = axes[0][2]
    speeds = [r.value("speedup") for r in data.rows if r.value("speedup")]
    if speeds and max(speeds) / max(min(speeds), 1e-9) > 8:  # a wide range reads better on a log axis
        speed_ax.set_xscale("log")
        speed_ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        speed_ax.xaxis.set_minor_formatter(NullFormatter())
    speed_ax.axvline(1.0, color="#999999", linewidth=0.8, linestyle="--", zorder=1)
    speed_ax.set_xlabel("measured speedup over the dense shape (x)", fontsize=8)
    _figure_legend(fig, axes)
    return _svg(fig, "F1 and exact match against linear density and F1 against speedup, with the Pareto frontier, "
                     "the dense baseline and the champion", "front")


def _figure_legend(fig, axes) -> None:
    """One legend under the figure with every label drawn in any panel, once."""
    seen: dict[str, Any] = {}
    for row in axes:
        for ax in row:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=len(seen), fontsize=8,
                   frameon=False)


def _structure_figure(card: ChampionCard) -> str:
    import numpy as np
    from matplotlib.colors import ListedColormap

    layers = max(len(card.heads_kept), len(card.ffn_widths), 1)
    heads = card.num_heads or max((max(h) + 1 for h in card.heads_kept if len(h)), default=1)
    fig, axes = _new_figure(8.0, 0.9 + 0.32 * layers, ncols=2, width_ratios=[max(heads, 4), 6])
    grid_ax, bar_ax = axes[0]
    grid = np.zeros((layers, heads))
    for i, kept in enumerate(card.heads_kept):
        for h in kept:
            if 0 <= h < heads:
                grid[i, h] = 1.0
    grid_ax.pcolormesh(grid, cmap=ListedColormap([_COLOURS["removed"], _COLOURS["kept"]]), vmin=0, vmax=1,
                       edgecolors="white", linewidth=1.5)
    grid_ax.set_ylim(layers, 0)  # layer 0 on top, as in the paper's figure
    grid_ax.set_xticks(np.arange(heads) + 0.5, [str(h) for h in range(heads)], fontsize=7)
    grid_ax.set_yticks(np.arange(layers) + 0.5, [str(i) for i in range(layers)], fontsize=7)
    grid_ax.set_xlabel("head", fontsize=8)
    grid_ax.set_ylabel("layer", fontsize=8)
    grid_ax.set_title("attention heads kept (filled)", fontsize=9)
    grid_ax.tick_params(length=0)
    for side in grid_ax.spines.values():
        side.set_visible(False)

    widths = list(card.ffn_widths) + [0] * (layers - len(card.ffn_widths))
    full = card.ffn_size or max(widths + [1])
    ys = np.arange(layers) + 0.5
    bar_ax.barh(ys, [full] * layers, height=0.7, color=_COLOURS["removed"])
    bar_ax.barh(ys, widths, height=0.7, color=_COLOURS["kept"])
    for y, width in zip(ys, widths):
        bar_ax.text(full * 1.02, y, f"{width}/{full}", va="center", fontsize=7)
    bar_ax.set_ylim(layers, 0)
    bar_ax.set_xlim(0, full * 1.25)
    bar_ax.set_yticks(ys, [str(i) for i in range(layers)], fontsize=7)
    bar_ax.set_xlabel("FFN width", fontsize=8)
    bar_ax.set_title("FFN width kept per layer", fontsize=9)
    bar_ax.tick_params(labelsize=7)
    for side in ("top", "right"):
        bar_ax.spines[side].set_visible(False)
    return _svg(fig, "heads kept per layer (grid of layers by heads) and FFN width per layer (bars)", "struct")


def _hypervolume_figure(data: ReportData) -> str | None:
    """The frontier's hypervolume against completed trials and against trial compute seconds (step lines)."""
    if not data.hypervolume:
        return None
    panels = [(data.hypervolume, "trials completed"), (data.hypervolume_compute, "trial compute (seconds)")]
    panels = [(series, label) for series, label in panels if series]
    fig, axes = _new_figure(11.0, 3.2, ncols=len(panels), sharey="row")
    for ax, (series, label) in zip(axes[0], panels):
        xs = [x for x, _ in series]
        ys = [y for _, y in series]
        ax.step(xs, ys, where="post", color=_COLOURS["frontier"], linewidth=1.6)
        ax.scatter(xs, ys, s=14, color=_COLOURS["frontier"], zorder=3)
        ax.set_xlabel(label, fontsize=8)
        _style(ax)
    axes[0][0].set_ylabel("hypervolume", fontsize=9)
    return _svg(fig, "hypervolume of the Pareto frontier against completed trials and trial compute seconds", "hv")


def _learned_figure(data: ReportData) -> str | None:
    keys = list(data.searched)
    if not keys:
        return None
    metrics = (("f1", "F1"), ("linear_density", "linear density"))
    fig, axes = _new_figure(max(2.6 * len(keys), 11.0), 4.8, ncols=len(keys), nrows=len(metrics), sharey="row")
    champion = data.champion_row
    for col, key in enumerate(keys):
        # Choices are categories even when their values are numbers: evenly spaced, in numeric order.
        numeric = _numeric_param(data.trials, key) and data.param_types.get(key) not in ("choice", "grid")
        categories = sorted({r.searched.get(key, "") for r in data.trials if r.searched.get(key) not in (None, "")},
                            key=lambda v: (_finite(v) is None, _finite(v) or 0.0, v))

        def position(value: str | None, numeric: bool = numeric, categories: list[str] = categories) -> float | None:
            if value in (None, ""):
                return None
            return _finite(value) if numeric else float(categories.index(value))

        for row_index, (metric, label) in enumerate(metrics):
            ax = axes[row_index][col]
            for status, face in (("finished", True), ("stopped_early", False), ("failed", True)):
                pts = [(position(r.searched.get(key)), r.value(metric)) for r in data.trials if r.status == status]
                pts = [p for p in pts if None not in p]
                if pts:
                    colour = _COLOURS[status]
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, facecolors=colour if face else "none",
                               edgecolors=colour, linewidths=1.1, alpha=0.85, zorder=3, label=_STATUS_LABEL[status])
            if champion is not None:
                x, y = position(champion.searched.get(key)), champion.value(metric)
                if x is not None and y is not None:
                    ax.scatter([x], [y], s=150, facecolors="none", edgecolors=_COLOURS["champion"], linewidths=2.0,
                               zorder=4, label="champion")
            base = data.baseline
            if base is not None and base.value(metric) is not None:
                ax.axhline(base.value(metric), color=_COLOURS["baseline"], linestyle=":", linewidth=1.0,
                           label="dense baseline")
            if numeric and data.param_types.get(key) == "loguniform":
                ax.set_xscale("log")
            if not numeric:
                ax.set_xticks(range(len(categories)), categories)
                ax.set_xlim(-0.5, len(categories) - 0.5)
            if col == 0:
                ax.set_ylabel(label, fontsize=9)
            if row_index == len(metrics) - 1:
                ax.set_xlabel(key, fontsize=9)
            if row_index == 0:
                ax.set_title(key, fontsize=9)
            _style(ax)
    _figure_legend(fig, axes)
    return _svg(fig, "each searched parameter against F1 and linear density", "learned")


# --------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------

_CSS = """
:root { --ink: #1d1f24; --muted: #5d6470; --line: #dde1e7; --accent: #4c72b0; --gold: #e6a100; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #f6f7f9; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 16px; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; background: #fff;
         border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; overflow-wrap: anywhere; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
figcaption { color: var(--muted); font-size: 12px; padding: 4px 6px 0; }
svg.plot { display: block; width: 100%; height: auto; }
.table-wrap { overflow-x: auto; background: #fff; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 7px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { white-space: normal; vertical-align: bottom; }
th:first-child, td:first-child, th.text, td.text { text-align: left; }
thead th { position: sticky; top: 0; background: #eef1f5; }
th button { all: unset; cursor: pointer; font-weight: 600; }
th button:focus-visible { outline: 2px solid var(--accent); }
th[aria-sort="ascending"] button::after { content: " \\25B2"; font-size: 10px; }
th[aria-sort="descending"] button::after { content: " \\25BC"; font-size: 10px; }
tbody tr:hover { background: #f3f6fb; }
tr.baseline { background: #fafafa; font-style: italic; }
tr.champion { background: #fff6dc; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-style: normal; }
.st-finished { background: #e3ecf8; color: #27497d; }
.st-stopped_early { background: #ececec; color: #4d4d4d; }
.st-failed { background: #f8e1e2; color: #8d2a2e; }
.st-baseline { background: #e6e6e6; color: #222; }
.card { background: #fff; border: 1px solid var(--gold); border-left-width: 6px; border-radius: 8px;
        padding: 14px 18px; }
.card h3 { margin: 0 0 8px; font-size: 16px; }
.card .stats { display: flex; flex-wrap: wrap; gap: 10px 28px; margin: 8px 0 12px; }
.card .stat b { display: block; font-size: 20px; }
.card .stat span { color: var(--muted); font-size: 12px; }
pre { background: #1f2430; color: #e6e9ef; padding: 10px 12px; border-radius: 6px; white-space: pre-wrap;
      overflow-wrap: anywhere;
      font-size: 12.5px; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
.note { color: var(--muted); font-size: 12px; }
a { color: var(--accent); }
"""

# Sorting: numbers by value, text by locale order; empty cells always last; clicking again reverses.
_SCRIPT = """
(function () {
  "use strict";
  function sortKey(cell, numeric) {
    var raw = cell.getAttribute("data-v");
    if (raw === null || raw === "") { return null; }
    if (numeric) { var n = parseFloat(raw); return isNaN(n) ? null : n; }
    return raw.toLowerCase();
  }
  function compare(a, b, numeric) {
    if (numeric) { return a - b; }
    return a.localeCompare(b);
  }
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, column) {
      var button = th.querySelector("button");
      if (!button) { return; }
      button.addEventListener("click", function () {
        var numeric = th.getAttribute("data-type") === "num";
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(heads, function (other) {
          if (other.hasAttribute("aria-sort")) { other.setAttribute("aria-sort", "none"); }
        });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r1, r2) {
          var a = sortKey(r1.cells[column], numeric), b = sortKey(r2.cells[column], numeric);
          if (a === null || b === null) { return (a === null) - (b === null); }
          var order = compare(a, b, numeric);
          return ascending ? order : -order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
})();
"""

# Nothing may be fetched: the page is a single file that must read the same offline.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _cell(display: str, sort_value: Any, css: str = "") -> str:
    value = "" if sort_value is None else str(sort_value)
    klass = f' class="{css}"' if css else ""
    return f'<td{klass} data-v="{_e(value)}">{display}</td>'


def _table_html(data: ReportData) -> str:
    front = frontier_ids(data.rows, _DENSITY_OBJECTIVES)
    front_speed = frontier_ids(data.rows, _SPEED_OBJECTIVES)
    numeric = {k: _numeric_param(data.trials, k) for k in data.searched}
    head = ['<th class="text" data-type="text" aria-sort="none"><button type="button">trial</button></th>',
            '<th class="text" data-type="text" aria-sort="none"><button type="button">status</button></th>']
    for key in data.searched:
        kind, css = ("num", "") if numeric[key] else ("text", ' class="text"')
        head.append(f'<th{css} data-type="{kind}" aria-sort="none" title="searched">'
                    f'<button type="button">{_e(key)}</button></th>')
    for _, title, _ in _METRIC_COLUMNS:
        head.append(f'<th data-type="num" aria-sort="none"><button type="button">{_e(title)}</button></th>')
    for title in ("Pareto: density", "Pareto: speedup"):
        head.append(f'<th class="text" data-type="text" aria-sort="none"><button type="button">{title}</button></th>')
    body = []
    champion_id = data.champion.run_id if data.champion else None
    for row in data.rows:
        classes = [row.kind]
        if row.run_id == champion_id:
            classes.append("champion")
        name = _e(row.name)
        if row.url:
            name = f'<a href="{_e(row.url)}" target="_blank" rel="noopener">{name}</a>'
        if row.run_id == champion_id:
            name += ' <span class="badge" style="background:#ffe7a3">champion</span>'
        status_key = "baseline" if row.kind == "baseline" else row.status
        cells = [_cell(name, row.name, "text"),
                 _cell(f'<span class="badge st-{_e(status_key)}">{_e(_status_label(row))}</span>',
                       _status_label(row), "text")]
        for key in data.searched:
            raw = row.searched.get(key)
            sort_value = _finite(raw) if numeric[key] else raw
            cells.append(_cell(_e(_fmt_param(raw)), sort_value, "" if numeric[key] else "text"))
        for metric, _, decimals in _METRIC_COLUMNS:
            value = row.value(metric)
            text = _fmt(value, decimals) + ("x" if metric == "speedup" and value is not None else "")
            cells.append(_cell(text, value))
        for ids in (front, front_speed):
            on = row.run_id in ids
            cells.append(_cell("yes" if on else "", "yes" if on else None, "text"))
        body.append(f'<tr class="{" ".join(classes)}" data-run-id="{_e(row.run_id)}">{"".join(cells)}</tr>')
    return ('<div class="table-wrap"><table class="sortable" id="trials">'
            f'<thead><tr>{"".join(head)}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _champion_html(data: ReportData) -> str:
    card = data.champion
    if card is None:
        return '<p class="note">No trial was registered as champion (no trial met the registry policy).</p>'
    row = data.champion_row
    title = _e(card.model_uri)
    if card.url:
        title = f'<a href="{_e(card.url)}" target="_blank" rel="noopener">{title}</a>'
    stats = []
    if row is not None:
        stats += [(_fmt(row.value("f1")), "F1"), (_fmt(row.value("exact_match")), "exact match"),
                  (_fmt(row.value("linear_density"), 3), "linear density"),
                  (_fmt(row.value("speedup")) + "x", "speedup"), (_fmt(row.value("heads_removed"), 0),
                                                                  "heads removed")]
    stats += [(_fmt_bytes(card.size_bytes), "size on disk"), (_fmt_bytes(card.weights_bytes), "weights")]
    stat_html = "".join(f'<div class="stat"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for v, k in stats)
    trial = _e(row.name if row else card.run_id)
    if row is not None and row.url:
        trial = f'<a href="{_e(row.url)}" target="_blank" rel="noopener">{trial}</a>'
    parts = [f'<div class="card" id="champion"><h3>{title}</h3>',
             f'<div class="note">registered model {_e(card.model_name)}, version {_e(card.version)}; trial {trial}'
             + (f"; chosen by {_e(data.policy)}" if data.policy else "") + "</div>",
             f'<div class="stats">{stat_html}</div>']
    if not card.alias_current:
        parts.append('<p class="note">The <code>champion</code> alias has since moved to another version; the URI '
                     "above pins this one.</p>")
    if card.heads_kept or card.ffn_widths:
        parts.append(f'<figure class="wide">{_structure_figure(card)}<figcaption>Kept attention heads per layer '
                     "(filled cells) and kept FFN width per layer.</figcaption></figure>")
    else:
        parts.append('<p class="note">The packed model records no per-layer structure.</p>')
    parts += ["<p>Load it in Python:</p>", f"<pre><code>{_e(_load_snippet(card))}</code></pre>",
              "<p>Serve it over HTTP (POST <code>{\"dataframe_records\": [{\"question\": ..., \"context\": ...}]}"
              "</code> to <code>/invocations</code>):</p>", f"<pre><code>{_e(_serve_command(card))}</code></pre>",
              "</div>"]
    return "".join(parts)


def render_html(data: ReportData) -> str:
    """The self-contained report page: plots as inline SVG, a sortable trial table, the champion's card.

    Args:
        data: the sweep as read by :func:`collect_report_data` (or built by hand).

    Returns:
        A complete HTML document with no external reference (scripts, styles, fonts and images are inline).
    """
    facts = "".join(f"<dt>{_e(label)}</dt><dd>{_e(text)}</dd>" for label, text in _summary_lines(data))
    sweep = _e(data.sweep_run_id)
    if data.sweep_url:
        sweep = f'<a href="{_e(data.sweep_url)}" target="_blank" rel="noopener">{sweep}</a>'
    learned = _learned_figure(data)
    learned_html = (f'<figure class="wide">{learned}<figcaption>Each searched value against F1 (top) and linear '
                    "density (bottom); hollow points stopped early, the ring marks the champion, the dotted line "
                    "the dense baseline.</figcaption></figure>") if learned else \
        '<p class="note">This sweep searched no parameter.</p>'
    hypervolume = _hypervolume_figure(data)
    hypervolume_html = (f'<figure class="wide">{hypervolume}<figcaption>The hypervolume of the Pareto frontier (the '
                        "objective space its points dominate, up to the reference point) after each completed "
                        "trial and against the trial compute time spent: a flat end means the last trials no "
                        "longer moved the frontier.</figcaption></figure>") if hypervolume else \
        '<p class="note">No hypervolume was logged for this sweep.</p>'
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sweep report: {_e(data.experiment)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>Sweep report: {_e(data.experiment)}</h1>
<p class="sub">Sweep run {sweep}{' &middot; generated ' + _e(data.generated) if data.generated else ''}</p>
<dl class="facts">{facts}</dl>

<h2 id="frontier">Pareto frontier</h2>
<figure class="wide">{_frontier_figure(data)}<figcaption>Every trial's F1 and exact match against the fraction
of encoder linear weights it keeps, and its F1 against the measured speedup of its packed model. The red line joins
the Pareto frontier; the star is the dense baseline (dotted line: its score); the gold ring is the champion. Hollow
points were stopped early.</figcaption></figure>

<h2 id="progress">Search progress</h2>
{hypervolume_html}

<h2 id="trials-section">Trials</h2>
<p class="note">Click a column header to sort; click again to reverse.{' Trial names link to their MLflow runs.'
    if any(r.url for r in data.rows) else ''}</p>
{_table_html(data)}

<h2 id="champion-section">Champion</h2>
{_champion_html(data)}

<h2 id="learned">What the search learned</h2>
{learned_html}
</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    return page


# --------------------------------------------------------------------------------------------------------------
# Reading a sweep back from MLflow
# --------------------------------------------------------------------------------------------------------------


def _parent_run(client, experiment: str, sweep_run_id: str | None):
    from workflows import tracking

    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"experiment {experiment!r} not found in {client.tracking_uri}")
    if sweep_run_id is not None:
        run = client.get_run(sweep_run_id)
        if run.info.experiment_id != found.experiment_id or run.data.tags.get(tracking.TAG_KIND) != "sweep":
            raise ValueError(f"run {sweep_run_id} is not a sweep run of experiment {experiment!r}")
        return found, run
    parents = client.search_runs([found.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise ValueError(f"experiment {experiment!r} has no sweep run")
    return found, parents[0]


def _searched_keys(parent_params: Mapping[str, str], runs: Sequence) -> tuple[list[str], dict[str, str]]:
    """Searched keys in the space's order (from the parent's ``search.<key>.type`` params), and their types."""
    types: dict[str, str] = {}
    for name, value in parent_params.items():
        match = re.fullmatch(r"search\.(.+)\.type", name)
        if match:
            types[match.group(1)] = value
    keys = list(types)
    for run in runs:  # keys a trial logged that the parent does not describe (older sweeps)
        for name in run.data.params:
            if name.startswith("searched.") and name[len("searched."):] not in keys:
                keys.append(name[len("searched."):])
    return keys, types


def _champion(client, parent, tracking_uri: str) -> ChampionCard | None:
    from mlflow.exceptions import MlflowException

    from workflows.registry import ALIAS, TAG_TRIAL_RUN

    name = parent.data.params.get("registry.name")
    if not name:
        return None
    parent_id = parent.info.run_id
    try:
        versions = [v for v in client.search_model_versions(f"name = '{name}'")
                    if v.tags.get("sweep_run_id") == parent_id]
    except MlflowException:
        return None
    if not versions:
        return None
    try:
        aliased = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        aliased = None
    if aliased is not None and aliased.tags.get("sweep_run_id") == parent_id:
        version, current = aliased, True
    else:
        version, current = max(versions, key=lambda v: int(v.version)), False
    run_id = version.tags.get(TAG_TRIAL_RUN) or version.run_id
    structure = _packed_structure(client, run_id)
    server = _server(tracking_uri)
    return ChampionCard(
        model_name=name, version=str(version.version), run_id=run_id, alias_current=current,
        tracking_uri=None if tracking_uri == "databricks" else tracking_uri,
        url=None if server is None else f"{server}/#/models/{name}/versions/{version.version}", **structure)


def _packed_structure(client, run_id: str) -> dict[str, Any]:
    """Kept heads, FFN widths and sizes from the trial's ``packed_model`` artifact (empty when it is missing)."""
    from mlflow.exceptions import MlflowException

    from pruning.packing import FFN_WIDTHS_KEY, HEADS_KEPT_KEY

    out: dict[str, Any] = {}
    try:
        files = _artifact_files(client, run_id, "packed_model")
    except (MlflowException, OSError) as err:
        logger.warning("cannot list the packed model of run %s: %s", run_id, err)
        return out
    if files:
        out["size_bytes"] = sum(size for _, size in files)
        out["weights_bytes"] = sum(size for path, size in files if path.endswith((".safetensors", ".bin")))
    if not any(path == "packed_model/config.json" for path, _ in files):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, "packed_model/config.json", tmp)
            config = json.loads(Path(local).read_text(encoding="utf-8"))
        except (MlflowException, OSError, ValueError) as err:
            logger.warning("cannot read the packed config of run %s: %s", run_id, err)
            return out
    heads = config.get(HEADS_KEPT_KEY)
    widths = config.get(FFN_WIDTHS_KEY)
    if isinstance(heads, list):
        out["heads_kept"] = [list(map(int, layer)) for layer in heads]
    if isinstance(widths, list):
        out["ffn_widths"] = [int(w) for w in widths]
    if isinstance(config.get("num_attention_heads"), int):
        out["num_heads"] = config["num_attention_heads"]
    if isinstance(config.get("intermediate_size"), int):
        out["ffn_size"] = config["intermediate_size"]
    return out


def _artifact_files(client, run_id: str, path: str) -> list[tuple[str, int]]:
    files: list[tuple[str, int]] = []
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            files += _artifact_files(client, run_id, info.path)
        else:
            files.append((info.path, int(info.file_size or 0)))
    return files


def collect_report_data(experiment: str, tracking_uri: str | None = None,
                        sweep_run_id: str | None = None) -> ReportData:
    """Read a sweep back from MLflow: its trials, baseline, searched keys and registered champion.

    Args:
        experiment: the experiment name.
        tracking_uri: MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).
        sweep_run_id: the sweep's parent run; default: the experiment's latest sweep.

    Returns:
        The report's data.

    Raises:
        ValueError: the experiment, or a sweep run in it, does not exist.
    """
    from mlflow.tracking import MlflowClient

    from workflows import tracking

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.DEFAULT_TRACKING_URI
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found, parent = _parent_run(client, experiment, sweep_run_id)
    parent_id = parent.info.run_id
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{tracking.PARENT}` = '{parent_id}'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    runs = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) in ("trial", "baseline")]
    keys, types = _searched_keys(parent.data.params, [r for r in runs if r.data.tags.get(tracking.TAG_KIND) ==
                                                      "trial"])
    rows = []
    for run in sorted(runs, key=lambda r: (r.data.tags.get(tracking.TAG_KIND) != "baseline", r.info.start_time)):
        tags = run.data.tags
        status = tags.get(tracking.TAG_STATUS)
        if status is None:  # a run the sweep did not close (interrupted): say what MLflow says
            status = {"FAILED": "failed", "KILLED": "stopped_early"}.get(run.info.status, run.info.status.lower())
        rows.append(TrialRow(
            run_id=run.info.run_id, name=tags.get("mlflow.runName", run.info.run_id),
            kind=tags.get(tracking.TAG_KIND, "trial"), status=status,
            searched={k: run.data.params[f"searched.{k}"] for k in keys if f"searched.{k}" in run.data.params},
            metrics=dict(run.data.metrics), url=run_url(uri, found.experiment_id, run.info.run_id)))
    policy = parent.data.params.get("registry.policy")
    for key in ("max_density", "max_f1_drop", "max_latency_ms"):
        value = parent.data.params.get(f"registry.{key}")
        if policy and value not in (None, "", "None"):
            policy += f" ({key} {value})"
    return ReportData(
        experiment=experiment, sweep_run_id=parent_id, rows=rows, searched=keys, param_types=types,
        champion=_champion(client, parent, uri), policy=policy, tracking_uri=uri,
        sweep_url=run_url(uri, found.experiment_id, parent_id), generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        hypervolume=_history(client, parent_id, tracking.METRIC_HYPERVOLUME),
        hypervolume_compute=_history(client, parent_id, tracking.METRIC_HYPERVOLUME_COMPUTE))


def _history(client, run_id: str, metric: str) -> list[tuple[float, float]]:
    """A metric's (step, value) history, one value per step (the latest logged), by step."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, metric):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(float(step), value) for step, (_, value) in sorted(latest.items())]


def write_report(experiment: str, out_dir: str | Path, tracking_uri: str | None = None,
                 sweep_run_id: str | None = None) -> dict[str, Path]:
    """Write ``report.html`` and ``report.md`` for a sweep and log both on its parent run under ``report/``.

    Args:
        experiment: the experiment name.
        out_dir: directory to write into (created if missing).
        tracking_uri: MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).
        sweep_run_id: the sweep's parent run; default: the experiment's latest sweep.

    Returns:
        ``{"html": path, "markdown": path}``.

    Raises:
        ValueError: the experiment, or a sweep run in it, does not exist.
    """
    from mlflow.tracking import MlflowClient

    data = collect_report_data(experiment, tracking_uri=tracking_uri, sweep_run_id=sweep_run_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / HTML_NAME, "markdown": out / MARKDOWN_NAME}
    paths["html"].write_text(render_html(data), encoding="utf-8")
    paths["markdown"].write_text(render_markdown(data), encoding="utf-8")
    client = MlflowClient(tracking_uri=data.tracking_uri, registry_uri=data.tracking_uri)
    for path in paths.values():
        client.log_artifact(data.sweep_run_id, str(path), artifact_path=REPORT_ARTIFACT_DIR)
    logger.info("sweep report: %s (Markdown: %s), logged on run %s under %s/", paths["html"], paths["markdown"],
                data.sweep_run_id, REPORT_ARTIFACT_DIR)
    return paths
