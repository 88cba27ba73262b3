"""The sweep report: pure renderers on hand-made sweeps, then the real smoke sweep's report in headless Chromium."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from workflows.record import TAG_PARETO, TAG_PARETO_SPEED
from workflows.report import (ChampionCard, ReportData, collect_report_data, render_html, render_markdown, run_url,
                              write_report)

from conftest import sqlite_store

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
F1_DENSITY = [("f1", "max"), ("linear_density", "min")]


def _metrics(f1, em, density, speedup, heads_removed=0.0, step=6.0):
    return {"f1": f1, "exact_match": em, "linear_density": density, "total_density": 0.9, "speedup": speedup,
            "heads_removed": heads_removed, "step": step}


def _row(run_id, name, kind, status, searched, metrics, url, pareto=False, pareto_speedup=False):
    """One run as :func:`workflows.record.trials` gives it back (with the report's ``url`` column)."""
    return {"run_id": run_id, "name": name, "kind": kind, "status": status, TAG_PARETO: pareto,
            TAG_PARETO_SPEED: pareto_speedup, "url": url, **metrics,
            **{f"searched.{k}": v for k, v in searched.items()}}


def _sweep(urls: bool = False, champion: bool = True, searched: bool = True, name: str = "trial-b") -> ReportData:
    """A hand-made sweep: a baseline, three finished trials, one stopped early, one failed without metrics; the
    frontier tags are those the sweep's F1/linear-density and F1/speedup frontiers give."""
    server = "http://mlflow.example:5000" if urls else None

    def url(run_id):
        return run_url(server, "7", run_id)

    def params(density, temperature):
        return {"target_density": str(density), "temperature": str(temperature)} if searched else {}

    rows = [
        _row("base", "dense-baseline", "baseline", "finished", {}, _metrics(80.0, 70.0, 1.0, 1.0), url("base"),
             True, True),
        _row("a", "trial-a", "trial", "finished", params(0.2, 1), _metrics(60.0, 50.0, 0.2, 2.5, 10), url("a"),
             True, True),
        _row("b", name, "trial", "finished", params(0.5, 2), _metrics(75.0, 66.0, 0.5, 1.8, 4), url("b"), True, True),
        _row("c", "trial-c", "trial", "finished", params(0.6, 4), _metrics(70.0, 61.0, 0.6, 1.2, 2), url("c")),
        # Better than every finished trial, but stopped early: never on the frontier.
        _row("d", "trial-d", "trial", "stopped_early", params(0.1, 1), _metrics(90.0, 85.0, 0.1, 3.0, 11, 3),
             url("d")),
        _row("e", "trial-e", "trial", "failed", params(0.3, 2), {}, url("e")),
    ]
    card = ChampionCard(model_name="qa-small", version="3", run_id="b", heads_kept=[[0, 1, 3], [2], []],
                        num_heads=4, ffn_widths=[100, 40, 0], ffn_size=128, size_bytes=5 * 1024 * 1024,
                        weights_bytes=4 * 1024 * 1024, tracking_uri=server or "sqlite:///mlflow.db")
    return ReportData(experiment="exp", sweep_run_id="parent", runs=pd.DataFrame(rows),
                      searched=["target_density", "temperature"] if searched else [],
                      param_types={"target_density": "uniform", "temperature": "choice"} if searched else {},
                      champion=card if champion else None, policy="best_f1_under_density (max_density 0.5)",
                      tracking_uri=server or "sqlite:///mlflow.db", sweep_url=url("parent"))


class _Page(HTMLParser):
    """Collects the tags (with attributes) and the text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def _markdown_table(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


# --------------------------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------------------------


def test_run_url_links_only_to_tracking_servers():
    assert run_url("http://host:5000", "3", "abc") == "http://host:5000/#/experiments/3/runs/abc"
    assert run_url("https://mlflow.example/", "3", "abc") == "https://mlflow.example/#/experiments/3/runs/abc"
    for uri in ("sqlite:///mlflow.db", "file:///tmp/mlruns", "databricks", "", None):
        assert run_url(uri, "3", "abc") is None


def test_the_report_shows_the_frontier_the_sweep_tagged_for_any_objectives():
    """The frontier tables are the tagged runs, under the space's objectives; the report computes none itself."""
    from dataclasses import replace

    data = _sweep()
    runs = data.runs.copy()
    # A sweep over exact match and total density tagged only c (whatever F1 and linear density would say).
    runs[TAG_PARETO] = runs["run_id"] == "c"
    tagged = replace(data, runs=runs, objectives=[("exact_match", "max"), ("total_density", "min")])
    text = render_markdown(tagged)
    front = _markdown_table(text, "## Pareto frontier: exact match against total density")
    assert [row[0] for row in front] == ["trial-c"]
    assert front[0][-1] == "0.900"  # the objective's own column
    trials = {row[0]: row for row in _markdown_table(text, "## Trials")}
    assert [name for name, row in trials.items() if row[-2] == "yes"] == ["trial-c"]
    parsed = _parse(render_html(tagged))
    assert "exact match and F1 against its total density" in " ".join(" ".join(parsed.text).split())
    labels = [a["aria-label"] for t, a in parsed.tags if t == "svg" and "aria-label" in a]
    assert labels[0].startswith("exact match and F1 against total density")


def test_the_trial_table_names_the_objective_its_pareto_column_is_on():
    """The trial table shows linear and total density side by side: its frontier column says which one (or which
    other metric) the space's frontier is on, in the Markdown and the HTML alike."""
    from dataclasses import replace

    for objectives, title in ((F1_DENSITY, "linear density"),
                              ([("exact_match", "max"), ("total_density", "min")], "total density"),
                              ([("f1", "max"), ("heads_removed", "max")], "heads removed")):
        data = replace(_sweep(), objectives=objectives)
        header = render_markdown(data).split("## Trials", 1)[1].strip().splitlines()[0]
        assert header.endswith(f"| Pareto ({title}) | Pareto (speedup) |"), header
        parsed = _parse(render_html(data))
        text = [t.strip() for t in parsed.text if t.strip()]
        assert f"Pareto: {title}" in text and "Pareto: speedup" in text
        assert "Pareto: density" not in text


def test_what_the_search_learned_is_plotted_against_the_objectives_searched_for():
    """A sweep over exact match and total density shows each searched value against those two metrics."""
    from dataclasses import replace

    default = _parse(render_html(_sweep()))
    labels = [a["aria-label"] for t, a in default.tags if t == "svg" and "aria-label" in a]
    assert "each searched parameter against F1 and linear density" in labels
    assert "against F1 (top) and linear density (bottom)" in " ".join(" ".join(default.text).split())
    parsed = _parse(render_html(replace(_sweep(), objectives=[("exact_match", "max"), ("total_density", "min")])))
    labels = [a["aria-label"] for t, a in parsed.tags if t == "svg" and "aria-label" in a]
    assert "each searched parameter against exact match and total density" in labels
    assert "against exact match (top) and total density (bottom)" in " ".join(" ".join(parsed.text).split())


def test_searched_values_with_dollar_signs_are_drawn_as_written_not_as_math():
    """A searched choice holding two `$` (a path, a label) was read as math notation by matplotlib: a parse error
    stopped the report (`runs/$x^$`), or it drew the text between them in italics without the signs (`a$b$c`)."""
    data = _sweep()
    runs = data.runs.copy()
    runs.loc[runs["run_id"] == "a", "searched.temperature"] = "runs/$x^$"
    runs.loc[runs["run_id"] == "b", "searched.temperature"] = "a$b$c"
    page = render_html(dataclasses.replace(data, runs=runs))
    svg = page.split('aria-label="each searched parameter', 1)[1].split("</svg>", 1)[0]
    # Text is drawn as glyph paths, each defined once under its index in the font: the dollar sign's is among them.
    from matplotlib.font_manager import findfont, get_font

    dollar = get_font(findfont("DejaVu Sans")).get_char_index(ord("$"))
    assert f'id="learned-DejaVuSans-{dollar:x}"' in svg, "no '$' drawn in the plot"


def test_markdown_lists_every_trial_with_its_status_and_the_frontiers():
    data = _sweep()
    text = render_markdown(data)
    trials = _markdown_table(text, "## Trials")
    assert [row[0] for row in trials] == list(data.runs["name"])
    status = {row[0]: row[1] for row in trials}
    assert status == {"dense-baseline": "dense baseline", "trial-a": "finished", "trial-b": "finished",
                      "trial-c": "finished", "trial-d": "stopped early", "trial-e": "failed"}
    failed = next(row for row in trials if row[0] == "trial-e")
    assert failed[4:11] == ["–"] * 7  # no metrics, no invented numbers
    front = _markdown_table(text, "## Pareto frontier: F1 against linear density")
    assert [row[0] for row in front] == ["trial-a", "trial-b", "dense-baseline"]  # by density
    speed = _markdown_table(text, "## Pareto frontier: F1 against measured speedup")
    assert [row[0] for row in speed] == ["trial-a", "trial-b", "dense-baseline"]  # fastest first
    assert "`models:/qa-small@champion`" in text
    assert 'mlflow.pyfunc.load_model("models:/qa-small@champion")' in text
    layers = _markdown_table(text, "## Champion")
    assert layers == [["0", "3/4: [0, 1, 3]", "100/128"], ["1", "1/4: [2]", "40/128"], ["2", "0/4: []", "0/128"]]


def test_the_trial_count_of_an_unended_sweep_adds_up():
    data = _sweep()
    runs = data.runs.copy()
    runs.loc[runs["run_id"] == "c", "status"] = "interrupted"
    runs.loc[runs["run_id"] == "e", "status"] = "orphaned"
    data = ReportData(experiment="exp", sweep_run_id="parent", runs=runs)
    expected = "5 (2 finished, 1 stopped early, 0 failed, 1 interrupted, 1 orphaned)"
    assert f"- **Trials**: {expected}" in render_markdown(data)
    page = render_html(data)
    assert f"<dt>Trials</dt><dd>{expected}</dd>" in page
    assert '<span class="badge st-interrupted">interrupted</span>' in page


@pytest.mark.parametrize("objectives", [[("f1", "max"), ("speedup", "max")], [("speedup", "max"), ("f1", "max")],
                                        [("f1", "max"), ("heads_removed", "max")], F1_DENSITY])
def test_the_report_lists_the_frontier_in_the_order_of_frontier_json(objectives):
    """The sweep's frontier.json and summary (frontier_table) and the report list the same points in one order."""
    from workflows.frontier import frontier_table

    points = [{"name": "a", "f1": 80.0, "speedup": 1.0, "heads_removed": 1.0, "linear_density": 0.9},
              {"name": "b", "f1": 60.0, "speedup": 3.0, "heads_removed": 6.0, "linear_density": 0.2},
              {"name": "c", "f1": 70.0, "speedup": 2.0, "heads_removed": 3.0, "linear_density": 0.5}]
    rows = [_row(p["name"], p["name"], "trial", "finished", {},
                 _metrics(p["f1"], 1.0, p["linear_density"], p["speedup"], p["heads_removed"]), None, True)
            for p in points]
    data = ReportData(experiment="exp", sweep_run_id="parent", runs=pd.DataFrame(rows), objectives=objectives)
    heading = next(line for line in render_markdown(data).splitlines() if line.startswith("## Pareto frontier: "))
    listed = [row[0] for row in _markdown_table(render_markdown(data), heading)]
    assert listed == [row["name"] for row in frontier_table(points, objectives, ["name"])]


def test_a_sweep_that_has_not_tagged_its_frontier_says_so():
    data = _sweep()
    runs = data.runs.copy()
    runs["pareto"] = False
    runs["pareto_speedup"] = False
    untagged = ReportData(experiment="exp", sweep_run_id="parent", runs=runs)
    text = render_markdown(untagged)
    note = "No run is tagged on this frontier although 3 trial(s) finished"
    assert text.count(note) == 2 and "No finished trial." not in text
    assert note in render_html(untagged)
    assert note not in render_markdown(data) and note not in render_html(data)
    runs["status"] = runs["status"].where(runs["kind"] == "baseline", "failed")
    none_finished = render_markdown(ReportData(experiment="exp", sweep_run_id="parent", runs=runs))
    assert none_finished.count("No trial finished (5 failed), so no pruned model is on this frontier.") == 2


def test_a_sweep_where_no_trial_finished_says_so_and_why_each_failed():
    """Every trial failed: the frontier holds only the dense baseline, and both pages say so and list each failure
    with its recorded reason, escaped (an exception's text holds <, & and backticks)."""
    error = "RuntimeError: expected <class 'int'> & got `x` in\n  line 2 <b>bold</b>"
    base = _row("base", "dense-baseline", "baseline", "finished", {}, _metrics(80.0, 70.0, 1.0, 1.0), None, True,
                True)
    failed = [{**_row("a", "trial-a", "trial", "failed", {}, {}, None), "error": error,
               "error_file": "sweep/trial_a/error.txt"},
              {**_row("b", "trial-<b>", "trial", "failed", {}, {}, None), "error": None, "error_file": None}]
    data = ReportData(experiment="exp", sweep_run_id="parent", runs=pd.DataFrame([base, *failed]))
    note = "No trial finished (2 failed), so no pruned model is on this frontier; it holds only the dense baseline."
    one_line = "RuntimeError: expected <class 'int'> & got `x` in line 2 <b>bold</b>"

    page = render_html(data)
    parsed = _parse(page)
    text = " ".join(" ".join(parsed.text).split())
    assert note in text and "Failed trials" in text
    assert one_line in text and "sweep/trial_a/error.txt" in text
    assert "trial-<b>: no reason was recorded" in text
    assert "b" not in [t for t, _ in parsed.tags] and "class" not in [t for t, _ in parsed.tags]

    markdown = render_markdown(data)
    assert markdown.count(note) == 2
    failures = markdown.split("## Failed trials", 1)[1].strip().splitlines()
    assert failures == [f"- trial-a: ``{one_line}`` (traceback: `sweep/trial_a/error.txt`)",
                        "- trial-&lt;b&gt;: no reason was recorded"]  # the name reads as written once rendered


def test_markdown_escapes_table_separators():
    text = render_markdown(_sweep(name="odd|name"))
    assert "odd\\|name" in text
    assert all(len(row) == 13 for row in _markdown_table(text, "## Trials"))


@pytest.fixture(scope="module")
def page() -> str:
    """The hand-made sweep as a page (rendered once: drawing the plots is the slow part)."""
    return render_html(_sweep())


def test_html_is_one_self_contained_file(page):
    parsed = _parse(page)
    tags = [t for t, _ in parsed.tags]
    assert "link" not in tags and "img" not in tags and "iframe" not in tags
    for tag, attrs in parsed.tags:
        assert not attrs.get("src"), f"<{tag}> loads {attrs.get('src')}"
    assert not re.search(r"@import|@font-face|url\((?!#)", page)
    csp = next(a["content"] for t, a in parsed.tags if t == "meta" and a.get("http-equiv") ==
               "Content-Security-Policy")
    assert "default-src 'none'" in csp
    assert tags.count("svg") == 3  # frontier panels, champion structure, search small multiples
    assert tags.count("script") == 1


def test_html_ids_are_unique_and_every_reference_resolves(page):
    ids = [a["id"] for _, a in _parse(page).tags if "id" in a]
    assert len(ids) == len(set(ids))
    references = set(re.findall(r'href="#([^"]+)"', page)) | set(re.findall(r"url\(#([^)]+)\)", page))
    assert references and references <= set(ids)


def test_html_table_has_one_sortable_row_per_run(page):
    data = _sweep()
    parsed = _parse(page)
    rows = [a["data-run-id"] for t, a in parsed.tags if t == "tr" and "data-run-id" in a]
    assert rows == list(data.runs["run_id"])
    buttons = [a for t, a in parsed.tags if t == "th" and "data-type" in a]
    assert len(buttons) == 2 + len(data.searched) + 7 + 2
    # Sort keys are the raw numbers; a metric the run lacks has an empty key (sorted last).
    assert 'data-v="0.5"' in page and 'data-v="75.0"' in page
    failed_row = page.split('data-run-id="e"', 1)[1].split("</tr>", 1)[0]
    assert failed_row.count('data-v=""') == 7 + 2


def test_html_links_runs_only_when_a_server_is_known_and_escapes_names(page):
    linked_page = render_html(_sweep(urls=True, name="<script>alert(1)</script>"))
    linked = [a["href"] for t, a in _parse(linked_page).tags if t == "a"]
    for run_id in ("base", "a", "b", "c", "d", "e", "parent"):
        assert f"http://mlflow.example:5000/#/experiments/7/runs/{run_id}" in linked
    assert not [t for t, a in _parse(page).tags if t == "a"]  # sqlite: nothing to link to
    assert "<script>alert(1)" not in linked_page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in linked_page


def test_html_without_champion_or_searched_values():
    page = render_html(_sweep(champion=False, searched=False))
    text = " ".join(_parse(page).text)
    assert "No trial was registered as champion" in text
    assert "This sweep searched no parameter" in text
    assert [t for t, _ in _parse(page).tags].count("svg") == 1


def test_a_sweep_without_trials_yet_is_reported_without_warnings():
    """A sweep stopped before its first trial: its searched keys have no value yet. The page says so and draws
    empty panels, with no plotting library warning on the command's stderr."""
    import warnings

    base = _row("base", "dense-baseline", "baseline", "finished", {}, _metrics(80.0, 70.0, 1.0, 1.0), None, True,
                True)
    data = ReportData(experiment="exp", sweep_run_id="parent", runs=pd.DataFrame([base]),
                      searched=["target_density", "temperature"],
                      param_types={"target_density": "uniform", "temperature": "choice"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = render_html(data)
        render_markdown(data)
    assert "The sweep has no trial yet" in " ".join(_parse(page).text)


def test_the_champion_card_shows_how_to_load_it(page):
    text = " ".join(_parse(page).text)
    assert 'mlflow.pyfunc.load_model("models:/qa-small@champion")' in text
    assert "mlflow models serve -m models:/qa-small@champion --env-manager local" in text
    assert "5.0 MiB" in text and "4.0 MiB" in text


def test_a_sweep_on_unanswerable_questions_shows_f1_by_kind_and_the_champions_best_threshold():
    """SQuAD v2.0: the trial table adds the metrics a run logged of them; the champion's card the threshold that
    would score best on its questions, with the lines that check it on others and serve it."""
    data = _sweep()
    v2 = {"has_answer_f1": [None, 50.0, 60.0, 55.0, None, None], "no_answer_f1": [None, 80.0, 90.0, 70.0, None, None],
          "best_f1": [None, 66.0, 77.5, None, None, None], "best_f1_threshold": [None, 1.5, -0.25, None, None, None]}
    runs = data.runs.assign(**v2)
    markdown = render_markdown(ReportData(**{**data.__dict__, "runs": runs}))
    header = next(line for line in markdown.split("## Trials", 1)[1].splitlines() if line.startswith("| trial"))
    assert header.split(" | ")[-6:-2] == ["F1 answerable", "F1 unanswerable", "best F1", "best F1 threshold"]
    rows = _markdown_table(markdown, "## Trials")
    assert [row[-6:-2] for row in rows[1:4]] == [["50.00", "80.00", "66.00", "1.50"], ["60.00", "90.00", "77.50",
                                                                                       "-0.25"],
                                                 ["55.00", "70.00", "–", "–"]]
    card = next(line for line in markdown.splitlines() if line.startswith("- SQuAD v2.0:"))
    assert card == ('- SQuAD v2.0: F1 60.00 on the answerable questions and 90.00 on the unanswerable ones, answering '
                    '"no answer" wherever it scores higher than the best span (null_threshold 0, as it serves). A '
                    'threshold of -0.25 logits would score F1 77.50 on these questions; it is fitted on them, so check '
                    'it on others (`fineprune eval models:/qa-small@champion --tracking-uri sqlite:///mlflow.db '
                    '--eval-data OTHER_QUESTIONS.json --null-threshold -0.25`) before serving it '
                    '(`MLFLOW_PYFUNC_INFERENCE_CONFIG=\'{"null_threshold": -0.25}\'`, or a request\'s `params`).')
    page = render_html(ReportData(**{**data.__dict__, "runs": runs}))
    buttons = [a for t, a in _parse(page).tags if t == "th" and "data-type" in a]
    assert len(buttons) == 2 + len(data.searched) + 7 + 4 + 2
    assert "<code>MLFLOW_PYFUNC_INFERENCE_CONFIG=&#39;{&#34;null_threshold&#34;: -0.25}&#39;</code>" in page
    # The champion's trial run gone (deleted, or removed for good): the figures its version's tags record.
    tagged = dataclasses.replace(data.champion, metrics={"f1": 75.0, **{key: values[2] for key, values in v2.items()}})
    gone = ReportData(**{**data.__dict__, "runs": runs[runs["run_id"] != "b"], "champion": tagged})
    assert "A threshold of -0.25 logits would score F1 77.50 on these questions" in render_markdown(gone)
    # A sweep on answerable questions alone, or a champion not answering "no answer": neither.
    for runs in (data.runs, data.runs.assign(has_answer_f1=v2["has_answer_f1"])):
        markdown = render_markdown(ReportData(**{**data.__dict__, "runs": runs}))
        assert "SQuAD v2.0" not in markdown and "best F1" not in markdown
        assert ("F1 answerable" in markdown) == ("has_answer_f1" in runs.columns)
    assert 'id="champion-null"' not in render_html(data)


def test_the_hypervolume_is_plotted_and_tabled_when_logged():
    from dataclasses import replace

    data = replace(_sweep(), hypervolume=[(0.0, 0.0), (1.0, 20.0), (2.0, 20.0), (3.0, 31.5)],
                   hypervolume_compute=[(0.0, 0.0), (40.0, 20.0), (75.0, 20.0), (130.0, 31.5)])
    page = render_html(data)
    parsed = _parse(page)
    labels = [a.get("aria-label", "") for t, a in parsed.tags if t == "svg"]
    assert len(labels) == 4 and any(label.startswith("hypervolume") for label in labels)
    ids = [a["id"] for _, a in parsed.tags if "id" in a]
    assert len(ids) == len(set(ids))
    assert _markdown_table(render_markdown(data), "## Search progress") == [  # step 2 did not grow it
        ["0", "0", "0"], ["1", "40", "20"], ["3", "130", "31.5"]]
    assert "No hypervolume was logged" in render_markdown(_sweep())
    assert "No hypervolume was logged" in " ".join(_parse(render_html(_sweep())).text)


def test_the_hypervolume_table_of_a_long_sweep_lists_the_trials_that_grew_it():
    """500 trials of which 7 grew the frontier: the Markdown table has the first step, those 7 and the last, not
    one row per trial."""
    from dataclasses import replace

    grew = {3: 10.0, 9: 12.5, 40: 20.0, 41: 21.0, 120: 30.0, 300: 31.0, 301: 31.25}
    values, value = [], 0.0
    for step in range(501):
        value = grew.get(step, value)
        values.append(value)
    data = replace(_sweep(), hypervolume=[(float(i), v) for i, v in enumerate(values)],
                   hypervolume_compute=[(60.0 * i, v) for i, v in enumerate(values)])
    text = render_markdown(data)
    rows = _markdown_table(text, "## Search progress")
    assert [row[0] for row in rows] == ["0", "3", "9", "40", "41", "120", "300", "301", "500"]
    assert rows[-1] == ["500", "30000", "31.25"] and rows[3] == ["40", "2400", "20"]
    assert "Only the trials that grew the hypervolume are listed" in text


def _recorded_sweep(root: Path, experiment: str = "recorded", compute_ms=(300, 300, 300)):
    """A sweep's record in a real SQLite MLflow store, as the sweep writes it: its parent run, the dense baseline and
    one finished trial per ``compute_ms`` (each run that long, one after another); returns the client, the store's
    URI and the parent run's id."""
    from mlflow.tracking import MlflowClient

    from workflows import record, tracking

    uri = sqlite_store(root / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
    parent = tracking.start_parent_run(client, experiment, str(root / "sweep"), {
        "registry": {"name": "qa-small", "policy": "best_f1_under_density", "max_density": 0.5}}, resume=False)
    start = 1_700_000_000_000
    runs = [("dense-baseline", record.KIND_BASELINE, 80.0, 1.0, 0)]
    runs += [(f"trial-{i}", record.KIND_TRIAL, 70.0 - 10 * i, 0.6 - 0.2 * i, ms) for i, ms in enumerate(compute_ms)]
    for name, kind, f1, density, ms in runs:
        run = client.create_run(experiment_id, start_time=start, tags={
            record.TAG_KIND: kind, record.TAG_PARENT: parent, record.TAG_STATUS: record.STATUS_FINISHED,
            record.TAG_RUN_NAME: name, **({record.TAG_PACKED_ARTIFACT: record.ARTIFACT_PACKED_MODEL}
                                          if kind == record.KIND_TRIAL else {})})
        client.log_batch(run.info.run_id, metrics=[mlflow_metric(record.F1, f1), mlflow_metric(
            record.LINEAR_DENSITY, density)])
        start += ms
        client.set_terminated(run.info.run_id, end_time=start)
    return client, uri, parent


def mlflow_metric(name: str, value: float):
    from mlflow.entities import Metric

    return Metric(name, value, 1_700_000_000_000, 0)


def test_trials_ending_within_one_second_of_compute_keep_their_own_seconds_in_the_report(tmp_path):
    """Three trials of 0.3 s each: the compute steps round to whole seconds and share one, yet the report still
    pairs every step of the hypervolume with its trial compute seconds (not a '–' in every cell, nor one point)."""
    from workflows import record, tracking
    from workflows.frontier import reference_point

    client, uri, parent = _recorded_sweep(tmp_path)
    runs = tracking.trial_runs(client, "recorded", parent, include_baseline=True)
    series = tracking.hypervolume_series(runs, F1_DENSITY, reference_point(F1_DENSITY))
    tracking.log_hypervolume(client, parent, series)
    tracking.log_hypervolume(client, parent, series)  # a resumed sweep logs the same steps again: nothing new
    assert [s for s, _ in record.metric_history(client, parent, record.HYPERVOLUME_COMPUTE)] == [0.0, 1.0]

    data = collect_report_data("recorded", tracking_uri=uri)
    assert [step for step, _ in data.hypervolume] == [0.0, 1.0, 2.0, 3.0]
    assert [seconds for seconds, _ in data.hypervolume_compute] == pytest.approx([0.0, 0.3, 0.6, 0.9])
    assert [value for _, value in data.hypervolume_compute] == [value for _, value in data.hypervolume]
    assert _markdown_table(render_markdown(data), "## Search progress") == [
        ["0", "0", "0"], ["1", "0", "28"], ["2", "1", "40"], ["3", "1", "50"]]


def test_a_report_of_a_running_sweep_says_it_runs_and_of_an_interrupted_one_that_it_was(tmp_path):
    """Finished trials, no frontier tagged yet: while the sweep's run is RUNNING the report says the sweep still
    runs, not that it was interrupted; once it was (its run KILLED), that `--resume` finishes it. The command it
    gave, `fineprune sweep --resume`, stopped on its required --space and named neither the sweep nor its store;
    it now names both, and parses to them."""
    from workflows import record, tracking

    client, uri, parent = _recorded_sweep(tmp_path)
    running = render_markdown(collect_report_data("recorded", tracking_uri=uri))
    assert running.count("it is still running (its MLflow run is RUNNING") == 2
    assert "interrupted" not in running
    tracking.finish_parent_run(client, parent, status="KILLED", state=record.SWEEP_INTERRUPTED)
    stopped = render_markdown(collect_report_data("recorded", tracking_uri=uri))
    command = f"fineprune sweep --space SPACE --resume {parent} --tracking-uri {uri}"
    assert stopped.count(f"it was interrupted (its MLflow run is KILLED): `{command}` finishes it (SPACE: the search "
                         "space file the sweep ran)") == 2
    assert "still running" not in stopped
    import shlex

    from workflows.cli import build_parser

    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.resume, args.tracking_uri) == (parent, uri)


@pytest.mark.parametrize("statuses,ended,left", [
    (("interrupted", "interrupted", "failed"), "2 interrupted, 1 failed", True),
    (("failed", "failed", "failed"), "3 failed", False),
])
def test_no_champion_for_want_of_a_finished_trial_is_said_so_with_how_the_trials_ended(tmp_path, statuses, ended,
                                                                                       left):
    """A sweep stopped before any trial finished: `register`, the sweep's summary and the report said no trial met the
    registry policy, which had nothing to choose from; they now say none finished, how the trials ended, and, where
    trials are left to run, the command that runs them."""
    from workflows import record, tracking
    from workflows.registry import register_champion

    client, uri, parent = _recorded_sweep(tmp_path)
    trials = client.search_runs([client.get_experiment_by_name("recorded").experiment_id],
                                filter_string=f"tags.`{record.TAG_KIND}` = 'trial'", order_by=["attributes.start_time"])
    for run, status in zip(trials, statuses):
        client.set_tag(run.info.run_id, record.TAG_STATUS, status)
    tracking.finish_parent_run(client, parent, status="KILLED", state=record.SWEEP_INTERRUPTED)
    command = f"fineprune sweep --space SPACE --resume {parent} --tracking-uri {uri}"
    resume = f"{command} runs what is left (SPACE: the search space file the sweep ran)"
    spec = record.RegistrySpec.from_params(client.get_run(parent).data.params)
    result = register_champion(client, "recorded", parent, spec)
    unfinished = f"none of its 3 trials finished with a packed model ({ended})"
    assert result == {"registered": False, "policy": "best_f1_under_density", "name": "qa-small",
                      "reason": f"no trial to choose: {unfinished}" + (f"; {resume}" if left else "")}
    note = collect_report_data("recorded", tracking_uri=uri).no_champion
    assert note == f"No trial to register as champion: {unfinished}." + (f" `{command}` runs what is left (SPACE: "
                                                                         "the search space file the sweep ran)."
                                                                         if left else "")


def test_the_report_names_the_policy_that_made_the_champion_not_the_sweeps(tmp_path):
    """`fineprune register --space other.yaml` moved the champion under another policy: the report names that
    one, as the version's tags record it, not the sweep's."""
    from workflows import record
    from workflows.registry import register_champion

    client, uri, parent = _recorded_sweep(tmp_path)
    client.create_registered_model("qa-small")
    for run in client.search_runs([client.get_experiment_by_name("recorded").experiment_id],
                                  filter_string=f"tags.`{record.TAG_KIND}` = 'trial'"):
        client.log_text(run.info.run_id, "flavors:\n  python_function: {}\n", "model/MLmodel")  # a model to serve
        client.create_model_version("qa-small", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                    tags={record.TAG_TRIAL_RUN: run.info.run_id})  # the frontier's versions

    spec = record.RegistrySpec.from_params(client.get_run(parent).data.params)
    assert register_champion(client, "recorded", parent, spec)["registered"]  # the sweep's own choice
    assert collect_report_data("recorded", tracking_uri=uri).policy == "best_f1_under_density (max_density 0.5)"

    other = record.RegistrySpec("qa-small", policy="min_density_within_f1_drop", max_f1_drop=35.0)
    moved = register_champion(client, "recorded", parent, other)
    data = collect_report_data("recorded", tracking_uri=uri)
    assert data.champion.version == moved["version"] and data.champion_row["name"] == "trial-2"
    assert data.policy == "min_density_within_f1_drop (max_f1_drop 35)"
    assert "- **Policy**: min_density_within_f1_drop (max_f1_drop 35)" in render_markdown(data)


def test_the_template_ships_in_the_wheel(tmp_path):
    """The page's template, style sheet and script are package data: a wheel built from pyproject.toml has them."""
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for package in ("pruning", "workflows"):
        shutil.copytree(root / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--wheel-dir", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("fineprune-*.whl"))
    templates = {f"workflows/templates/{path.name}" for path in (root / "workflows" / "templates").iterdir()}
    assert "workflows/templates/report.html.j2" in templates
    assert templates <= set(zipfile.ZipFile(wheel).namelist())


def test_the_serve_command_passes_the_model_uri_as_written_to_the_shell():
    """A registered model name may hold characters a shell expands inside double quotes ($, `): the command the
    report shows, pasted into bash, still names the model."""
    from workflows.report import _serve_command

    for name in ("qa-small", "qa$HOME", "qa`id`", "two words"):
        card = ChampionCard(model_name=name, version="2", run_id="b", tracking_uri="sqlite:///my db.db")
        command = _serve_command(card)
        assert command.startswith("MLFLOW_TRACKING_URI=") and " mlflow models serve -m " in command
        echoed = subprocess.run(["bash", "-c", command.replace(" mlflow models serve ", " printf '%s\\n' ", 1)],
                                capture_output=True, text=True, check=True).stdout.splitlines()
        assert echoed[:2] == ["-m", f"models:/{name}@champion"], command


def test_an_alias_moved_elsewhere_pins_the_version():
    card = ChampionCard(model_name="qa", version="2", run_id="b", alias_current=False)
    assert card.model_uri == "models:/qa/2"


# --------------------------------------------------------------------------------------------------------------
# The real smoke sweep
# --------------------------------------------------------------------------------------------------------------


def _mlflow(smoke_sweep):
    from mlflow.tracking import MlflowClient

    from workflows import tracking

    client = MlflowClient(tracking_uri=smoke_sweep["tracking_uri"])
    runs = tracking.trial_runs(client, smoke_sweep["experiment"], smoke_sweep["parent_run_id"],
                               include_baseline=True)
    return client, runs


def test_the_sweep_writes_and_logs_its_report(smoke_sweep, tmp_path):
    client, runs = _mlflow(smoke_sweep)
    for key in ("html", "markdown"):
        assert Path(smoke_sweep["report"][key]).stat().st_size > 0
    logged = {a.path for a in client.list_artifacts(smoke_sweep["parent_run_id"], "report")}
    assert logged == {"report/report.html", "report/report.md"}

    paths = write_report(smoke_sweep["experiment"], out_dir=tmp_path / "again",
                         tracking_uri=smoke_sweep["tracking_uri"])
    assert set(paths) == {"html", "markdown"} and all(p.parent == tmp_path / "again" for p in paths.values())
    text = paths["markdown"].read_text(encoding="utf-8")
    names = [row[0] for row in _markdown_table(text, "## Trials")]
    assert sorted(names) == sorted(r.data.tags["mlflow.runName"] for r in runs)
    assert f"`{smoke_sweep['champion']['model_uri']}`" in text


def test_the_champion_card_matches_the_champion_run(smoke_sweep):
    client, runs = _mlflow(smoke_sweep)
    data = collect_report_data(smoke_sweep["experiment"], tracking_uri=smoke_sweep["tracking_uri"])
    champion = smoke_sweep["champion"]
    card = data.champion
    assert card is not None and card.run_id == champion["run_id"] and card.version == champion["version"]
    assert card.model_uri == champion["model_uri"]
    run = next(r for r in runs if r.info.run_id == champion["run_id"])
    metrics = run.data.metrics
    layers = len(card.heads_kept)
    # The packed model's record and the trial's metrics are two views of the same structure.
    assert layers == len(card.ffn_widths) == 2
    assert layers * card.num_heads - sum(map(len, card.heads_kept)) == metrics["heads_removed"]
    for i in range(layers):
        assert card.num_heads - len(card.heads_kept[i]) == metrics[f"heads_removed_layer_{i}"]
        assert card.ffn_widths[i] == metrics[f"ffn_kept_layer_{i}"]
    sizes = {a.path: a.file_size for a in client.list_artifacts(champion["run_id"], "packed_model")}
    assert card.size_bytes == sum(sizes.values())
    # Which ONNX model it serves, checked on the 12 questions its trial was scored on, as its version records it.
    version = client.get_model_version(card.model_name, card.version)
    assert card.served == version.tags["int8_check"]
    assert card.served.startswith(f"serves ONNX Runtime {version.tags['onnx_variant']}: int8 F1 ")
    assert " on the first 12 questions the trial was scored on, " in card.served
    assert f"- S{card.served[1:]}" in render_markdown(data)
    assert f"S{card.served[1:]}" in " ".join(_parse(render_html(data)).text)
    assert card.weights_bytes == sizes["packed_model/model.safetensors"]
    assert set(data.trials["run_id"]) == {r.info.run_id for r in runs if r.data.tags["fineprune.kind"] == "trial"}
    assert data.searched == ["target_density", "alpha_distil", "temperature"]
    # The report's frontier is the sweep's own (its MLflow tags).
    tagged = {r.info.run_id for r in runs if r.data.tags.get("pareto") == "true"}
    assert set(data.frontier()["run_id"]) == tagged


def test_the_report_command_reads_the_champions_structure_without_torch(smoke_sweep, tmp_path):
    """`fineprune report` imported torch and transformers (five seconds of the command on 2 cores) for the names of
    the two config.json keys that record a packed model's kept heads and FFN widths; it now reads them as
    pruning.packed_modeling writes them, and the layer table is as before."""
    from pruning import packed_modeling
    from workflows import report

    assert (report._HEADS_KEPT_KEY, report._FFN_WIDTHS_KEY) == (packed_modeling.HEADS_KEPT_KEY,
                                                                packed_modeling.FFN_WIDTHS_KEY)
    code = ("import sys\nfrom workflows import cli\n"
            "status = cli.main(['report', '--experiment', sys.argv[1], '--tracking-uri', sys.argv[2], '--out', "
            "sys.argv[3]])\nprint(status, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-c", code, smoke_sweep["experiment"], smoke_sweep["tracking_uri"],
                           str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout
    card = collect_report_data(smoke_sweep["experiment"], tracking_uri=smoke_sweep["tracking_uri"]).champion
    layers = _markdown_table((out / "report.md").read_text(encoding="utf-8"), "## Champion")
    assert len(layers) == len(card.heads_kept) == 2
    for i, row in enumerate(layers):
        assert row[1].startswith(f"{len(card.heads_kept[i])}/{card.num_heads}: ")
        assert row[2] == f"{card.ffn_widths[i]}/{card.ffn_size}"


def test_the_sweep_logs_the_hypervolume_of_its_frontier_by_trial_and_by_compute(smoke_sweep):
    from workflows.frontier import hypervolume

    _, runs = _mlflow(smoke_sweep)
    data = collect_report_data(smoke_sweep["experiment"], tracking_uri=smoke_sweep["tracking_uri"])
    trials = [r for r in runs if r.data.tags["fineprune.kind"] == "trial"]
    steps = [step for step, _ in data.hypervolume]
    values = [value for _, value in data.hypervolume]
    assert steps == list(range(len(trials) + 1))  # the baseline, then one step per completed trial
    assert values == sorted(values) and values[0] == 0.0  # the dense baseline alone sits on the reference density
    finished = [dict(r.data.metrics) for r in runs if r.data.tags.get("fineprune.status") == "finished"]
    assert values[-1] == pytest.approx(hypervolume(finished, F1_DENSITY)) == smoke_sweep["hypervolume"]
    assert values[-1] > 0
    seconds = [step for step, _ in data.hypervolume_compute]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    assert [value for _, value in data.hypervolume_compute] == values


@pytest.fixture
def chromium(tmp_path):
    """A headless Debian Chromium driven through the Debian chromedriver (nothing is downloaded)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path / "chromium-profile"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _column(driver, title: str) -> list[str]:
    """The sort keys of one column of the trial table, top to bottom."""
    return driver.execute_script(
        "var t = document.getElementById('trials');"
        "var heads = Array.prototype.map.call(t.tHead.rows[0].cells, function (c) { return c.textContent; });"
        "var i = heads.indexOf(arguments[0]);"
        "return Array.prototype.map.call(t.tBodies[0].rows, function (r) { return r.cells[i].dataset.v; });", title)


def _click(driver, title: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//table[@id='trials']//th/button[normalize-space()='{title}']").click()


def test_the_report_renders_and_sorts_in_chromium(smoke_sweep, chromium, tmp_path):
    from selenium.webdriver.common.by import By

    _, runs = _mlflow(smoke_sweep)
    page = Path(smoke_sweep["report"]["html"])
    chromium.get(page.resolve().as_uri())

    # Loads with no console error and fetches nothing (a fetch would also break the page's CSP, an error).
    severe = [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    assert chromium.execute_script("return performance.getEntriesByType('resource').length") == 0

    plots = chromium.find_elements(By.CSS_SELECTOR, "svg.plot")
    labels = [p.get_attribute("aria-label") for p in plots]
    assert [label.split()[0] for label in labels] == ["F1", "hypervolume", "heads", "each"], labels
    for plot in plots:
        assert plot.size["width"] > 400 and plot.size["height"] > 80
    rows = chromium.find_elements(By.CSS_SELECTOR, "#trials tbody tr")
    assert len(rows) == len(runs)
    assert all(row.is_displayed() for row in rows)

    densities = {r.info.run_id: r.data.metrics["linear_density"] for r in runs}
    expected = sorted(densities, key=densities.get)
    _click(chromium, "linear density")
    order = [r.get_attribute("data-run-id") for r in chromium.find_elements(By.CSS_SELECTOR, "#trials tbody tr")]
    assert [densities[i] for i in order] == [densities[i] for i in expected]
    assert order[0] != order[-1]
    _click(chromium, "linear density")
    values = [float(v) for v in _column(chromium, "linear density")]
    assert values == sorted(values, reverse=True)
    _click(chromium, "trial")
    names = _column(chromium, "trial")
    assert names == sorted(names, key=str.lower)

    # The whole page in one picture: the window grows by the page height plus the browser's own frame.
    full_height = chromium.execute_script("window.scrollTo(0, 0); return document.documentElement.scrollHeight + "
                                          "window.outerHeight - window.innerHeight")
    chromium.set_window_size(1280, full_height)
    shot = tmp_path / "report.png"
    assert chromium.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The console check above can fail: an error logged now is seen.
    chromium.execute_script("console.error('probe')")
    assert any("probe" in e["message"] for e in chromium.get_log("browser") if e["level"] == "SEVERE")


def test_user_given_names_read_as_written_in_the_markdown_report():
    """An experiment or trial name with HTML or Markdown in it is shown as written, not as markup, once rendered."""
    from dataclasses import replace

    from markdown_it import MarkdownIt

    data = _sweep(name="b<i>|[1]*x*")
    data = replace(data, experiment="exp<b>&amp;`code`")
    page = _Page()
    page.feed(MarkdownIt("commonmark").enable("table").render(render_markdown(data)))
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"b", "i", "em"}  # no markup from the names
    text = [t.strip() for t in page.text]
    assert "Sweep report: exp<b>&amp;`code`" in text
    assert "b<i>|[1]*x*" in text  # a cell of the trial table, pipe and brackets included
    # A backslash escaped the character reference (or bracket) after it, and a trailing " #" closed the heading.
    for name in (r"a\*b", "exp #", "run\\"):
        page = _Page()
        page.feed(MarkdownIt("commonmark").enable("table").render(render_markdown(replace(data, experiment=name))))
        assert f"Sweep report: {name}" in [t.strip() for t in page.text], page.text


def test_the_report_command_reports_the_sweep_run_it_is_given(smoke_sweep, tmp_path, capsys):
    from workflows.cli import main

    common = ["report", "--experiment", smoke_sweep["experiment"], "--tracking-uri", smoke_sweep["tracking_uri"]]
    assert main([*common, "--out", str(tmp_path / "given"), "--sweep-run", smoke_sweep["parent_run_id"]]) == 0
    text = (tmp_path / "given" / "report.md").read_text(encoding="utf-8")
    assert f"- **Sweep run**: {smoke_sweep['parent_run_id']}" in text
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "other"), "--sweep-run", "0" * 32]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"run {'0' * 32} is not in {smoke_sweep['tracking_uri']} (removed for good, by `mlflow "
                            "gc`, or never made): pass a sweep run of experiment 'smoke'")
    assert not (tmp_path / "other").exists()


def test_speedups_timed_among_disagreeing_passes_are_named_under_the_speedup_frontier():
    """A trial timed while another trained on the machine reported 4.2x for a structure the next sweep timed at
    1.3x: the report names the finished trials whose timed passes disagreed by more than 1.5x, in both forms, and
    says nothing where every timing was steady or none recorded its spread."""
    data = _sweep()
    assert "timed while their passes disagreed" not in render_markdown(data)
    runs = data.runs.copy()
    runs["timing_spread"] = [1.1, 3.14, 1.2, 1.9, 5.0, None]  # baseline, a, b, c, d (stopped early), e (failed)
    noisy = dataclasses.replace(data, runs=runs)
    expected = ("The speedups of 2 of the 3 finished trials (trial-a, trial-c) were timed while their passes "
                "disagreed by up to 3.1x (upper over lower quartile; 1.5x at most counts as steady), as when trials "
                "share a machine: their place against speedup is noise.")
    markdown = render_markdown(noisy)
    section = markdown.split("## Pareto frontier: F1 against measured speedup", 1)[1].split("\n## ", 1)[0]
    assert expected in section, section
    assert expected in " ".join("".join(_parse(render_html(noisy)).text).split())
    runs["timing_spread"] = [1.1, 1.2, 1.3, 1.4, 9.0, None]  # only the trial stopped early (never packed) is noisy
    assert "timed while their passes disagreed" not in render_markdown(dataclasses.replace(data, runs=runs))
