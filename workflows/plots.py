"""The sweep report's plots: matplotlib figures of a sweep's runs table, as inline SVG.

Every function takes the runs table of :func:`workflows.record.trials` (one row per trial or baseline run, metric
columns, ``searched.<key>`` columns, the ``pareto`` and ``pareto_speedup`` frontier tags as booleans) or plain
values, and returns one ``<svg>`` element that can sit in an HTML page next to the others: no XML prolog, ids
unique to the figure, text drawn as paths (the page needs no font), scalable to its container.

The frontiers drawn are the ones the sweep tagged; nothing here computes a frontier.
"""

from __future__ import annotations

import html
import io
import math
import re
from typing import Any, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from workflows.frontier import frontier_axis
from workflows.record import (EXACT_MATCH, F1, HEADS_REMOVED, KIND_BASELINE, KIND_TRIAL, LINEAR_DENSITY,
                              PARAM_SEARCHED, SPEEDUP, STATUS_FAILED, STATUS_FINISHED, STATUS_INTERRUPTED,
                              STATUS_ORPHANED, STATUS_STOPPED_EARLY, TAG_PARETO, TAG_PARETO_SPEED, TOTAL_DENSITY)

__all__ = ["COLOURS", "STATUS_LABELS", "METRIC_LABELS", "metric_label", "frontier_axes", "numeric_values",
           "frontier_figure", "structure_figure", "hypervolume_figure", "learned_figure"]

# One colour per trial status, and the frontier / baseline / champion marks.
COLOURS = {STATUS_FINISHED: "#4c72b0", STATUS_STOPPED_EARLY: "#8c8c8c", STATUS_FAILED: "#c44e52",
           "frontier": "#d62728", "baseline": "#222222", "champion": "#e6a100", "kept": "#4c72b0",
           "removed": "#e8e8ee"}
STATUS_LABELS = {STATUS_FINISHED: "finished", STATUS_STOPPED_EARLY: "stopped early", STATUS_FAILED: "failed",
                 "running": "running", STATUS_INTERRUPTED: "interrupted", STATUS_ORPHANED: "orphaned",
                 KIND_BASELINE: "dense baseline"}
METRIC_LABELS = {F1: "F1", EXACT_MATCH: "exact match", LINEAR_DENSITY: "linear density", TOTAL_DENSITY: "total density",
                 HEADS_REMOVED: "heads removed", SPEEDUP: "speedup"}
_MARKS = ((STATUS_FINISHED, "o", True), (STATUS_STOPPED_EARLY, "o", False), (STATUS_FAILED, "X", True))


def metric_label(metric: str) -> str:
    """How a metric is named on axes and in headings."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def frontier_axes(objectives: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """The ``(x, y)`` metrics that show the frontier of ``objectives``: :func:`workflows.frontier.frontier_axis`
    across (a density objective, else the last objective), the first other objective up (F1 when there is only
    one objective)."""
    names = [name for name, _ in objectives]
    x = frontier_axis(objectives)
    y = next((name for name in names if name != x), F1 if x != F1 else LINEAR_DENSITY)
    return x, y


# --------------------------------------------------------------------------------------------------------------
# Figures -> SVG
# --------------------------------------------------------------------------------------------------------------


def _svg(fig: Figure, label: str, prefix: str) -> str:
    """The figure as an inline ``<svg>`` element: no XML prolog, ids unique to this figure, scalable."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path"}):  # text as paths: the page needs no font
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    # Several figures share one document: matplotlib's ids (glyphs, clip paths, axes) would repeat between them.
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', text)
    text = re.sub(r'(href="#|url\(#)([^")]+)', lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", text)
    return text.replace("<svg ", f'<svg class="plot" role="img" aria-label="{html.escape(label)}" ', 1)


# Every figure's text is drawn as written: searched values and names are the user's (a path, a label), where a pair of
# `$` would be read as math notation (drawn in italics, or a parse error that stopped the report).
_plain_text = matplotlib.rc_context({"text.parse_math": False})


def _new_figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kwargs) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _style(ax) -> None:
    ax.grid(alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)


def _figure_legend(fig: Figure, axes) -> None:
    """One legend under the figure with every label drawn in any panel, once."""
    seen: dict[str, Any] = {}
    for row in axes:
        for ax in row:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=len(seen), fontsize=8,
                   frameon=False)


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column of the runs table (all NaN when no run logged it)."""
    if name not in runs.columns:
        return pd.Series(np.nan, index=runs.index, dtype=float)
    return pd.to_numeric(runs[name], errors="coerce").where(lambda v: np.isfinite(v))


def _xy(runs: pd.DataFrame, x: str, y: str) -> tuple[list[float], list[float]]:
    points = pd.DataFrame({"x": _column(runs, x), "y": _column(runs, y)}).dropna()
    return points["x"].tolist(), points["y"].tolist()


def _one(runs: pd.DataFrame, run_id: str | None) -> pd.DataFrame:
    return runs[runs["run_id"] == run_id] if run_id is not None else runs.iloc[0:0]


def _scatter_runs(ax, runs: pd.DataFrame, x: str, y: str, frontier_tag: str | None, join: bool,
                  champion_id: str | None) -> bool:
    """Trials by status, the tagged frontier (joined when the axes are its objectives), the baseline and the
    champion; False when nothing could be drawn."""
    trials = runs[runs["kind"] == KIND_TRIAL]
    drawn = False
    for status, marker, face in _MARKS:
        xs, ys = _xy(trials[trials["status"] == status], x, y)
        if not xs:
            continue
        drawn = True
        colour = COLOURS[status]
        ax.scatter(xs, ys, s=28, marker=marker, linewidths=1.2, facecolors=colour if face else "none",
                   edgecolors=colour, alpha=0.85, zorder=3, label=STATUS_LABELS[status])
    if frontier_tag is not None and frontier_tag in runs.columns:
        xs, ys = _xy(runs[runs[frontier_tag].astype(bool)], x, y)
        if xs:
            order = sorted(zip(xs, ys))
            if join:
                ax.plot([p[0] for p in order], [p[1] for p in order], "-", color=COLOURS["frontier"],
                        linewidth=1.6, zorder=2, label="Pareto frontier")
            ax.scatter([p[0] for p in order], [p[1] for p in order], s=46, facecolors="none",
                       edgecolors=COLOURS["frontier"], linewidths=1.4, zorder=4,
                       label=None if join else "Pareto frontier")
    base = runs[runs["kind"] == KIND_BASELINE]
    base_y = _column(base, y).dropna()
    if len(base_y):
        ax.axhline(float(base_y.iloc[0]), color=COLOURS["baseline"], linestyle=":", linewidth=1.0, zorder=1)
        xs, ys = _xy(base, x, y)
        if xs:
            drawn = True
            ax.scatter(xs[:1], ys[:1], marker="*", s=150, color=COLOURS["baseline"], zorder=5, label="dense baseline")
    xs, ys = _xy(_one(runs, champion_id), x, y)
    if xs:
        ax.scatter(xs[:1], ys[:1], s=260, facecolors="none", edgecolors=COLOURS["champion"], linewidths=2.4,
                   zorder=6, label="champion")
        ax.annotate("champion", (xs[0], ys[0]), xytext=(8, 8), textcoords="offset points", fontsize=8,
                    color="#8a6000")
    if not drawn:
        ax.text(0.5, 0.5, "no trial with these metrics", ha="center", va="center", transform=ax.transAxes,
                fontsize=9, color="#666666")
    return drawn


@_plain_text
def frontier_figure(runs: pd.DataFrame, objectives: Sequence[tuple[str, str]], champion_id: str | None) -> str:
    """Three panels: the space's objectives (the ``pareto`` frontier, joined), exact match (or F1) on the same
    axis (the same frontier's trials ringed), F1 against measured speedup (the ``pareto_speedup`` frontier); one
    legend below them.

    Args:
        runs: the sweep's runs table.
        objectives: the space's objectives, which the ``pareto`` tags follow.
        champion_id: the champion's trial run, ringed in gold.
    """
    x, y = frontier_axes(objectives)
    second = EXACT_MATCH if y != EXACT_MATCH else F1
    objective_names = {name for name, _ in objectives}
    panels = ((x, y, TAG_PARETO, {x, y} == objective_names or objective_names == {y}),
              (x, second, TAG_PARETO, False),
              (SPEEDUP, F1, TAG_PARETO_SPEED, True))
    fig, axes = _new_figure(11.0, 3.8, ncols=3)
    for ax, (px, py, tag, join) in zip(axes[0], panels):
        _scatter_runs(ax, runs, px, py, tag, join, champion_id)
        ax.set_title(f"{metric_label(py)} against {'measured ' if px == SPEEDUP else ''}{metric_label(px)}",
                     fontsize=10)
        ax.set_ylabel(metric_label(py), fontsize=9)
        _style(ax)
    for ax in (axes[0][0], axes[0][1]):
        ax.set_xlabel("linear density (fraction of encoder linear weights kept)" if x == LINEAR_DENSITY
                      else metric_label(x), fontsize=8)
    speed_ax = axes[0][2]
    speeds = _column(runs, SPEEDUP).dropna()
    speeds = speeds[speeds > 0]
    if len(speeds) and speeds.max() / max(speeds.min(), 1e-9) > 8:  # a wide range reads better on a log axis
        speed_ax.set_xscale("log")
        speed_ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        speed_ax.xaxis.set_minor_formatter(NullFormatter())
    speed_ax.axvline(1.0, color="#999999", linewidth=0.8, linestyle="--", zorder=1)
    speed_ax.set_xlabel("measured speedup over the dense shape (x)", fontsize=8)
    _figure_legend(fig, axes)
    return _svg(fig, f"{metric_label(y)} and {metric_label(second)} against {metric_label(x)} and F1 against "
                     "speedup, with the Pareto frontier, the dense baseline and the champion", "front")


@_plain_text
def structure_figure(heads_kept: Sequence[Sequence[int]], num_heads: int | None, ffn_widths: Sequence[int],
                     ffn_size: int | None) -> str:
    """The champion's structure: a layers x heads grid of kept heads, and bars of the kept FFN width per layer."""
    layers = max(len(heads_kept), len(ffn_widths), 1)
    heads = num_heads or max((max(h) + 1 for h in heads_kept if len(h)), default=1)
    fig, axes = _new_figure(8.0, 0.9 + 0.32 * layers, ncols=2, width_ratios=[max(heads, 4), 6])
    grid_ax, bar_ax = axes[0]
    grid = np.zeros((layers, heads))
    for i, kept in enumerate(heads_kept):
        for h in kept:
            if 0 <= h < heads:
                grid[i, h] = 1.0
    grid_ax.pcolormesh(grid, cmap=ListedColormap([COLOURS["removed"], COLOURS["kept"]]), vmin=0, vmax=1,
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

    widths = list(ffn_widths) + [0] * (layers - len(ffn_widths))
    full = ffn_size or max(widths + [1])
    ys = np.arange(layers) + 0.5
    bar_ax.barh(ys, [full] * layers, height=0.7, color=COLOURS["removed"])
    bar_ax.barh(ys, widths, height=0.7, color=COLOURS["kept"])
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


@_plain_text
def hypervolume_figure(by_trials: Sequence[tuple[float, float]],
                       by_compute: Sequence[tuple[float, float]]) -> str | None:
    """The frontier's hypervolume against completed trials and against trial compute seconds (step lines); None
    when no hypervolume was logged."""
    if not by_trials:
        return None
    panels = [(series, label) for series, label in ((by_trials, "trials completed"),
                                                    (by_compute, "trial compute (seconds)")) if series]
    fig, axes = _new_figure(11.0, 3.2, ncols=len(panels), sharey="row")
    for ax, (series, label) in zip(axes[0], panels):
        xs = [x for x, _ in series]
        ys = [y for _, y in series]
        ax.step(xs, ys, where="post", color=COLOURS["frontier"], linewidth=1.6)
        ax.scatter(xs, ys, s=14, color=COLOURS["frontier"], zorder=3)
        ax.set_xlabel(label, fontsize=8)
        _style(ax)
    axes[0][0].set_ylabel("hypervolume", fontsize=9)
    return _svg(fig, "hypervolume of the Pareto frontier against completed trials and trial compute seconds", "hv")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def numeric_values(values: pd.Series) -> bool:
    """Whether every logged value of a searched key is a number."""
    present = [v for v in values if isinstance(v, str) and v != ""]
    return bool(present) and all(_number(v) is not None for v in present)


@_plain_text
def learned_figure(runs: pd.DataFrame, searched: Sequence[str], param_types: dict[str, str],
                   champion_id: str | None,
                   objectives: Sequence[tuple[str, str]] = ((F1, "max"), (LINEAR_DENSITY, "min"))) -> str | None:
    """Each searched value against the objectives the frontier plot shows (:func:`frontier_axes`: by default F1 in
    the top row, linear density in the bottom one); None when nothing was searched."""
    keys = list(searched)
    if not keys:
        return None
    x, y = frontier_axes(objectives)
    metrics = ((y, metric_label(y)), (x, metric_label(x)))
    fig, axes = _new_figure(max(2.6 * len(keys), 11.0), 4.8, ncols=len(keys), nrows=len(metrics), sharey="row")
    trials = runs[runs["kind"] == KIND_TRIAL]
    base = runs[runs["kind"] == KIND_BASELINE]
    champion = _one(runs, champion_id)
    for col, key in enumerate(keys):
        name = f"{PARAM_SEARCHED}{key}"
        raw = trials[name] if name in trials.columns else pd.Series(None, index=trials.index, dtype=object)
        # Choices are categories even when their values are numbers: evenly spaced, in numeric order.
        numeric = numeric_values(raw) and param_types.get(key) not in ("choice", "grid")
        categories = sorted({v for v in raw if isinstance(v, str) and v != ""},
                            key=lambda v: (_number(v) is None, _number(v) or 0.0, v))

        def position(value: Any, numeric: bool = numeric, categories: list[str] = categories) -> float | None:
            if not isinstance(value, str) or value == "":
                return None
            return _number(value) if numeric else float(categories.index(value))

        for row_index, (metric, label) in enumerate(metrics):
            ax = axes[row_index][col]
            for status, _, face in _MARKS:
                group = trials[trials["status"] == status]
                pts = [(position(v), m) for v, m in zip(group[name] if name in group.columns else [None] * len(group),
                                                          _column(group, metric))]
                pts = [p for p in pts if p[0] is not None and not math.isnan(p[1])]
                if pts:
                    colour = COLOURS[status]
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, facecolors=colour if face else "none",
                               edgecolors=colour, linewidths=1.1, alpha=0.85, zorder=3, label=STATUS_LABELS[status])
            if len(champion) and name in champion.columns:
                x, y = position(champion[name].iloc[0]), _column(champion, metric).iloc[0]
                if x is not None and not math.isnan(y):
                    ax.scatter([x], [y], s=150, facecolors="none", edgecolors=COLOURS["champion"], linewidths=2.0,
                               zorder=4, label="champion")
            base_value = _column(base, metric).dropna()
            if len(base_value):
                ax.axhline(float(base_value.iloc[0]), color=COLOURS["baseline"], linestyle=":", linewidth=1.0,
                           label="dense baseline")
            if numeric and param_types.get(key) == "loguniform":
                ax.set_xscale("log")
            if not numeric and categories:  # none before any trial logged the key: no axis to lay out
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
    return _svg(fig, f"each searched parameter against {metrics[0][1]} and {metrics[1][1]}", "learned")
