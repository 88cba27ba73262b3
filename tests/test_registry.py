"""The registry: a sweep's whole frontier as model versions, and the choice of a version by latency budget.

A hand-made sweep record in a real SQLite MLflow store: trial runs whose ``packed_model`` artifacts are tiny random
BERTs packed to very different widths (one of them unpruned), so that their speed order is fixed by their shapes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import urllib.parse
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from conftest import CountingClient, sqlite_store
from pruning import precision
from pruning.config import EVALUATION_KEYS
from pruning.squad import fit_windows
from pruning.export import OrtQAModel
from pruning.packing import pack, save_packed
from pruning.precision import Bf16Inference, PrecisionError
from workflows import logged_model, registry, tracking
from workflows.cli import main
from workflows.record import TAG_KIND, TAG_PARENT, TAG_PRECISION, TAG_STATUS, TAG_TRIAL_RUN, fineprune_version
from workflows.version_files import load_version, number_ranges

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-frontier"
WIDE, NARROW, NARROWEST, DOMINATED = "wide", "narrow", "narrowest", "dominated"
# name -> (heads kept per layer, FFN width kept, F1, linear density, on the density frontier)
TRIALS = {
    WIDE: (4, 2048, 90.0, 1.0, True),
    NARROW: (1, 64, 60.0, 0.1, True),
    NARROWEST: (1, 16, 40.0, 0.05, True),
    DOMINATED: (2, 512, 30.0, 0.5, False),
}
# name -> (the trial's precision param, its fineprune.precision tag), and the precision its version records: the
# tag when there is one (what ``auto`` became), else the param, else the run config's default.
PRECISION = {WIDE: ("auto", "fp32"), NARROW: ("bf16", None), NARROWEST: (None, None), DOMINATED: (None, None)}
RECORDED = {WIDE: "fp32", NARROW: "bf16", NARROWEST: "fp32"}


def _packed_dir(path, tokenizer, heads: int, ffn: int):
    """A 2-layer BERT (hidden 256, 4 heads of 64, FFN 2048) with heads and FFN dimensions zeroed, then packed."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2048, max_position_embeddings=128)
    model = BertForQuestionAnswering(config).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.output.dense.weight[:, heads * 64:] = 0  # the output columns of the removed heads
            layer.output.dense.weight[:, ffn:] = 0  # the output columns of the removed FFN dimensions
    save_packed(pack(model), tokenizer, path)
    return path


@pytest.fixture(scope="module")
def record(tmp_path_factory, tokenizer):
    """A sweep's parent run, its dense baseline and four finished trials with packed models."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    uri = sqlite_store(root / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("tiny", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(experiment_id, tags={TAG_KIND: "sweep"}).info.run_id
    client.log_param(parent, "registry.name", NAME)
    client.log_param(parent, "registry.policy", "best_f1_under_density")
    client.log_param(parent, "registry.max_density", "0.5")
    baseline = client.create_run(experiment_id, tags={TAG_KIND: "baseline", TAG_PARENT: parent,
                                                      TAG_STATUS: "finished", "pareto": "true"})
    client.log_metric(baseline.info.run_id, "f1", 95.0)
    client.set_terminated(baseline.info.run_id)
    runs = {}
    for name, (heads, ffn, f1, density, on_front) in TRIALS.items():
        run_id = client.create_run(experiment_id, tags={
            TAG_KIND: "trial", TAG_PARENT: parent, TAG_STATUS: "finished",
            "fineprune.packed_artifact": "packed_model", "pareto": str(on_front).lower(),
            "pareto_speedup": "false", "mlflow.runName": name}).info.run_id
        client.log_artifacts(run_id, str(_packed_dir(root / name, tokenizer, heads, ffn)), "packed_model")
        for key, value in {"f1": f1, "exact_match": f1 - 10, "linear_density": density, "total_density": density,
                           "heads_removed": 2 * (4 - heads), "speedup": 1.0}.items():
            client.log_metric(run_id, key, value)
        client.log_param(run_id, "max_seq_length", "128")
        param, tag = PRECISION[name]
        if param:
            client.log_param(run_id, "precision", param)
        if tag:
            client.set_tag(run_id, TAG_PRECISION, tag)
        client.set_terminated(run_id)
        runs[name] = run_id
    ends = {run_id: client.get_run(run_id).info.end_time for run_id in runs.values()}
    return {"client": client, "uri": uri, "parent": parent, "runs": runs, "ends": ends,
            "experiment_id": experiment_id, "root": root}


@pytest.fixture(scope="module")
def registered(record):
    """The frontier registered twice in a row."""
    first = registry.register_frontier(record["client"], "tiny", record["parent"], NAME)
    second = registry.register_frontier(record["client"], "tiny", record["parent"], NAME)
    return first, second


def _versions(client) -> dict[str, object]:
    return {v.tags[TAG_TRIAL_RUN]: v for v in client.search_model_versions(f"name = '{NAME}'")}


def test_frontier_registration_is_idempotent_and_tagged(record, registered):
    first, second = registered
    client, runs = record["client"], record["runs"]
    assert first == second
    versions = _versions(client)
    # Every trial on the frontier, once; not the dominated trial, not the baseline (it has no packed model).
    assert set(versions) == {runs[WIDE], runs[NARROW], runs[NARROWEST]}
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 3
    assert [row["run_id"] for row in first] == [runs[NARROWEST], runs[NARROW], runs[WIDE]]  # sparsest first
    tags = versions[runs[NARROW]].tags
    assert tags["sweep_run_id"] == record["parent"] and tags["pareto"] == "true"
    for key, value in {"f1": 60.0, "exact_match": 50.0, "linear_density": 0.1, "total_density": 0.1,
                       "heads_removed": 6.0, "speedup": 1.0}.items():
        assert float(tags[key]) == value, key
    assert client.get_registered_model(NAME).aliases == {}  # the frontier gets no alias
    for name, recorded in RECORDED.items():
        version = versions[runs[name]]
        assert version.tags["precision"] == recorded, name
        assert version.tags["onnx"] == "fp32,int8", name  # exported for ONNX Runtime, both variants
        assert version.tags["fineprune.version"] == fineprune_version(), name  # the release whose code it ships
        # Its two ONNX models scored on the questions the trial was scored on: every dev question (no eval_limit),
        # of which the check reads the first 500.
        assert " on the first 500 questions the trial was scored on, " in version.tags["int8_check"], name
    for run_id in versions:  # logging the model on the trial's run kept the run's record
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.end_time == record["ends"][run_id]


def test_a_version_whose_trial_tag_was_removed_by_hand_is_still_its_trials(record, registered, caplog):
    """A version's trial was read from its fineprune.trial_run_id tag alone: with the tag removed (by hand, in the
    UI), registering the frontier again made a second version of the same trial and said the first had "left the
    frontier" (turning its frontier tags false). MLflow's own record of the run it was made on names the trial."""
    client, runs = record["client"], record["runs"]
    version = _versions(client)[runs[NARROW]]
    client.delete_model_version_tag(NAME, version.version, TAG_TRIAL_RUN)
    with caplog.at_level(logging.INFO, logger="workflows.registry"):
        rows = registry.register_frontier(client, "tiny", record["parent"], NAME)
    assert rows == registered[0]
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 3
    again = client.get_model_version(NAME, version.version)
    assert again.tags[TAG_TRIAL_RUN] == runs[NARROW] and again.tags["pareto"] == "true"  # the tag written back
    assert "left the frontier" not in caplog.text


def test_registering_a_registered_frontier_again_searches_once_and_writes_nothing(record, registered, caplog):
    """`fineprune register --frontier` run again on a sweep: one search of the model's versions for the whole
    frontier (not one per frontier point, each reading every version of the model), and no tag written again. Its
    line says which frontiers its versions are the trials of (a sweep's printed frontier is its objectives' only)."""
    client = record["client"]
    registry.register_frontier(client, "tiny", record["parent"], NAME)  # the tags as the record has them now
    counting = CountingClient(client, "search_model_versions", "set_model_version_tag", "create_model_version")
    with caplog.at_level(logging.INFO, logger="workflows.registry"):
        rows = registry.register_frontier(counting, "tiny", record["parent"], NAME)
    assert rows == registered[0]
    assert counting.calls == {"search_model_versions": 1, "set_model_version_tag": 0, "create_model_version": 0}
    assert caplog.messages[-1] == (
        f"registered the 3 trials on the frontiers of sweep run {record['parent']} (of its objectives, and of F1 "
        f"against measured speedup) as versions {', '.join(row['version'] for row in rows)} of {NAME}")


def _select(capsys, record, budget: float, alias: str = "champion", *extra: str,
            name: str = NAME) -> tuple[int, str, str]:
    code = main(["select", "--registered-model", name, "--max-latency-ms", str(budget), "--batch-size", "1",
                 "--seq-len", "128", "--threads", "1", "--repeats", "9", "--alias", alias,
                 "--tracking-uri", record["uri"], *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_select_picks_the_most_accurate_version_within_the_budget(record, registered, capsys):
    client, runs = record["client"], record["runs"]
    by_run = {run_id: str(v.version) for run_id, v in _versions(client).items()}

    code, out, _ = _select(capsys, record, 1e6)  # no limit: the most accurate
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["version"] == by_run[runs[WIDE]] and result["f1"] == 90.0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == by_run[runs[WIDE]]
    # Every version carries its ONNX export, so each is timed as its pyfunc serves it: ONNX Runtime, int8.
    assert result["runtime"] == "served" and result["served_by"] == "onnxruntime-int8"
    assert {row["served_by"] for row in result["versions"]} == {"onnxruntime-int8"}
    latency = {row["run_id"]: row["latency_ms"] for row in result["versions"]}
    assert set(latency) == {runs[WIDE], runs[NARROW], runs[NARROWEST]}
    assert all(math.isfinite(v) and v > 0 for v in latency.values())
    # The unpruned model does about 16 times the matrix work of the narrow ones: its order is robust to load.
    assert latency[runs[WIDE]] > max(latency[runs[NARROW]], latency[runs[NARROWEST]])

    # A budget between the narrow and the wide models: both narrow ones fit, the more accurate is chosen. The
    # second measurement may see other load than the first, so the budget sits well inside the gap.
    narrow = max(latency[runs[NARROW]], latency[runs[NARROWEST]])
    budget = narrow + 0.25 * (latency[runs[WIDE]] - narrow)
    code, out, _ = _select(capsys, record, budget, alias="edge")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["version"] == by_run[runs[NARROW]] and result["alias"] == "edge"
    assert str(client.get_model_version_by_alias(NAME, "edge").version) == by_run[runs[NARROW]]
    assert {row["version"]: row["within_budget"] for row in result["versions"]}[by_run[runs[WIDE]]] is False


# ONNX Runtime's compiled module, interrupted as it initialises, raises ImportError from the KeyboardInterrupt (as
# pybind11 does); here the module's creation raises just that, the first time a command imports it.
_INTERRUPTED_ORT_IMPORT = """
import importlib.abc, importlib.machinery, sys

class InterruptedInit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "onnxruntime.capi.onnxruntime_pybind11_state":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)

        def create_module(spec):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as stop:
                raise ImportError("initialization failed") from stop

        spec.loader.create_module = create_module
        return spec

sys.meta_path.insert(0, InterruptedInit())
from workflows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_ctrl_c_as_onnx_runtime_first_loads_stops_select_and_leaves_the_alias(record, registered):
    """A Ctrl-C landing as ONNX Runtime's module initialised came out as "version N cannot be loaded: initialization
    failed": select went on without the versions it could not load and moved the alias to another, then said it was
    interrupted (or another command ended in a traceback). It is the interrupt: one line, 130, the alias where it
    was."""
    import subprocess
    import sys

    client, runs = record["client"], record["runs"]
    narrow = str(_versions(client)[runs[NARROW]].version)
    client.set_registered_model_alias(NAME, "kept", narrow)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_ORT_IMPORT, "select", "--registered-model", NAME,
                           "--max-latency-ms", "1e6", "--seq-len", "128", "--threads", "1", "--repeats", "3",
                           "--alias", "kept", "--tracking-uri", record["uri"]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 130, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "fineprune select: interrupted by SIGINT"
    assert "cannot be loaded" not in done.stderr and done.stdout == ""
    assert str(client.get_model_version_by_alias(NAME, "kept").version) == narrow


def test_an_interrupt_is_found_behind_the_errors_raised_from_it():
    from pruning.errors import interrupt_behind

    stop = KeyboardInterrupt()
    try:
        try:
            raise ImportError("initialization failed") from stop
        except ImportError as err:
            raise RuntimeError("version 2 cannot be loaded") from err
    except RuntimeError as err:
        assert interrupt_behind(err) is stop
    looped = ValueError("a")
    looped.__context__ = ValueError("b")
    looped.__context__.__context__ = looped
    assert interrupt_behind(looped) is None and interrupt_behind(ValueError("plain")) is None


def test_select_can_time_the_packed_pytorch_models(record, registered, capsys):
    code, out, _ = _select(capsys, record, 1e6, "torch-timed", "--runtime", "torch")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["runtime"] == "torch" and {row["served_by"] for row in result["versions"]} == {"torch"}
    # `runtime` is the option given; how each version ran is its `served_by`, as for the chosen one.
    assert not any("runtime" in row for row in result["versions"])
    latency = {row["run_id"]: row["latency_ms"] for row in result["versions"]}
    runs = record["runs"]
    assert latency[runs[WIDE]] > max(latency[runs[NARROW]], latency[runs[NARROWEST]])


def test_versions_beyond_the_memory_limit_are_timed_in_groups_each_beside_its_dense_shape(record, registered,
                                                                                         caplog):
    from workflows.version_timing import time_versions

    client, runs = record["client"], record["runs"]
    versions = sorted(client.search_model_versions(f"name = '{NAME}'"), key=lambda v: int(v.version))
    assert len(versions) == 3

    def timed(memory_limit: int | None) -> tuple[dict[str, dict], str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="workflows.version_timing"):
            rows, none_timed = time_versions(client, NAME, versions, "torch", 1, seq_len=128, repeats=9, warmup=1,
                                             memory_limit=memory_limit)
        assert none_timed is None
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded and timed"))
        return {row["run_id"]: row for row in rows}, line

    # Any one version reaches a limit of a byte: each is loaded, timed beside its dense shape and let go alone.
    rows, line = timed(1)
    assert "3 versions" in line and "in 3 groups, each timed once its models held 0 MiB" in line
    assert set(rows) == {runs[WIDE], runs[NARROW], runs[NARROWEST]}
    for row in rows.values():
        assert row["latency_ms"] > 0 and row["dense_latency_ms"] > 0
        assert row["served_speedup"] == pytest.approx(row["dense_latency_ms"] / row["latency_ms"])
    # Timed apart, the unpruned model is still the slowest by far: its dense shape's speed, and 16 times the narrow
    # ones' matrix work.
    assert rows[runs[WIDE]]["latency_ms"] > max(rows[runs[NARROW]]["latency_ms"], rows[runs[NARROWEST]]["latency_ms"])
    # Within the limit (or without one), all are held and timed at once.
    for limit in (2**40, None):
        rows, line = timed(limit)
        assert "3 versions" in line and "groups" not in line
        assert all(row["latency_ms"] > 0 for row in rows.values())


def test_select_looks_for_the_versions_in_the_tracking_store_whatever_the_registry_variable(record, registered,
                                                                                          capsys, monkeypatch,
                                                                                          tmp_path):
    # The registry is the tracking store for every command (a sweep registers there, as register does): a registry
    # named elsewhere in the environment must not send select to another store.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    code, out, err = _select(capsys, record, 1e6, "anywhere")
    assert code == 0, err[-2000:]
    chosen = json.loads(out.strip().splitlines()[-1])
    assert chosen["run_id"] == record["runs"][WIDE]
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    assert str(record["client"].get_model_version_by_alias(NAME, "anywhere").version) == chosen["version"]


@pytest.mark.parametrize("runtime", ["served", "torch"])
def test_timing_a_version_downloads_only_the_model_it_times(record, registered, tmp_path, runtime):
    """`fineprune select` times every version of a frontier: each one's download is the model it times (the int8
    ONNX file served, or the packed PyTorch model), not the whole version with the other variant and the code."""
    client = record["client"]
    version = _versions(client)[record["runs"][WIDE]]
    model_id = version.source.removeprefix("models:/")
    stored = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    model, label = load_version(client, NAME, str(version.version), str(tmp_path), runtime, threads=1)
    assert label == ("onnxruntime-int8" if runtime == "served" else "torch")
    fetched = {str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file()}
    if runtime == "served":
        assert fetched == {"MLmodel", "artifacts/onnx_model/fineprune_export.json",
                           "artifacts/onnx_model/config.json", "artifacts/onnx_model/model_int8.onnx"}
    else:
        packed = {str(path.relative_to(stored)) for path in (stored / "artifacts" / "packed_model").rglob("*")
                  if path.is_file()}
        assert fetched == {"MLmodel", *packed}
    whole = sum(path.stat().st_size for path in stored.rglob("*") if path.is_file())
    assert sum((tmp_path / path).stat().st_size for path in fetched) < whole / 2


def test_a_budget_nothing_meets_leaves_the_alias_as_it_was(record, registered, capsys):
    client = record["client"]
    wide = str(_versions(client)[record["runs"][WIDE]].version)
    client.set_registered_model_alias(NAME, "champion", wide)
    code, out, err = _select(capsys, record, 1e-6)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("fineprune select: error:")]
    assert len(lines) == 1 and NAME in lines[0] and "1e-06 ms" in lines[0]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == wide


@pytest.mark.parametrize("alias", ["latest", "V2", "two words", ""])
def test_an_alias_the_registry_refuses_is_a_one_line_error_before_any_timing(record, registered, capsys, caplog,
                                                                            alias):
    caplog.set_level(logging.INFO, logger="workflows.registry")
    client = record["client"]
    wide = str(_versions(client)[record["runs"][WIDE]].version)
    client.set_registered_model_alias(NAME, "champion", wide)
    code, out, err = _select(capsys, record, 1e6, alias)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("fineprune select: error:")]
    assert len(lines) == 1 and "--alias" in lines[0], err
    assert not any("loaded" in r.getMessage() for r in caplog.records)  # refused before loading and timing
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == wide


def test_the_budget_is_checked_once_on_the_unrounded_latency(record, registered, monkeypatch):
    """A version 0.4 ns over the budget shows 5.0 ms once rounded: it is not within a 5 ms budget, and is not
    chosen; a budget it meets chooses it and says so."""
    import pruning.bench

    def timed(models, **_):  # every version 5.0000004 ms, the dense shapes 20 ms
        return {key: [0.0050000004] * 3 if key.startswith("v") else [0.02] * 3 for key in models}

    monkeypatch.setattr(pruning.bench, "interleaved_latency", timed)
    client = record["client"]
    with pytest.raises(registry.SelectionError, match="fastest: version .* at 5 ms"):
        registry.select_by_latency(client, NAME, 5.0, seq_len=32, repeats=1, warmup=0, alias="edge")
    result = registry.select_by_latency(client, NAME, 5.000001, seq_len=32, repeats=1, warmup=0, alias="edge")
    rows = {row["version"]: row for row in result["versions"]}
    assert rows[result["version"]]["within_budget"] is True and result["latency_ms"] == 5.0
    assert all(row["within_budget"] for row in rows.values())


def test_select_of_the_champion_records_the_policy_that_chose_it(record, registered):
    """`fineprune select` moving the champion tags the version with its policy and budget, as a registration
    does, so that the sweep's report names what chose it; another alias leaves the policy tags alone."""
    client = record["client"]
    chosen = registry.select_by_latency(client, NAME, 1e4, seq_len=32, repeats=1, warmup=0, runtime="torch")
    tags = client.get_model_version(NAME, chosen["version"]).tags
    assert (tags["policy"], tags["policy_threshold"]) == ("best_f1_under_latency", "max_latency_ms 10000")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == chosen["version"]
    other = registry.select_by_latency(client, NAME, 1e6, seq_len=32, repeats=1, warmup=0, runtime="torch",
                                       alias="edge")
    assert other["version"] == chosen["version"]  # the most accurate, within both budgets
    assert client.get_model_version(NAME, other["version"]).tags["policy_threshold"] == "max_latency_ms 10000"
    client.delete_registered_model_alias(NAME, "edge")


def test_select_names_the_speedup_it_timed_apart_from_the_trials(record, registered):
    """The chosen version and every listed one give the speedup timed here as `served_speedup` (dense latency over
    the version's, as it serves) beside the trial's own `speedup` (1.0 in this record), never under one name."""
    client = record["client"]
    result = registry.select_by_latency(client, NAME, 1e6, seq_len=32, repeats=1, warmup=0, runtime="torch",
                                        alias="speeds")
    client.delete_registered_model_alias(NAME, "speeds")
    for row in (result, *result["versions"]):
        assert "measured_speedup" not in row and row["speedup"] == 1.0  # the trial's, as its version's tag has it
        assert row["served_speedup"] == pytest.approx(row["dense_latency_ms"] / row["latency_ms"], rel=1e-3)
    assert result["served_by"] == "torch"


def test_a_version_whose_trial_left_the_frontier_is_untagged_and_no_longer_a_candidate(record, registered):
    """A resumed sweep's later trials can dominate a point registered before: registering the frontier again turns
    its version's frontier tags false, and the sweep's latency policy no longer chooses among it."""
    client, runs = record["client"], record["runs"]
    client.set_tag(runs[NARROWEST], "pareto", "false")
    try:
        again = registry.register_frontier(client, "tiny", record["parent"], NAME)
        assert {row["run_id"] for row in again} == {runs[WIDE], runs[NARROW]}
        versions = _versions(client)
        assert len(versions) == 3  # the version and its model stay
        assert {run: v.tags["pareto"] for run, v in versions.items()} == {
            runs[WIDE]: "true", runs[NARROW]: "true", runs[NARROWEST]: "false"}
        chosen = registry.select_by_latency(client, NAME, 1e6, seq_len=32, repeats=1, warmup=0, alias="left",
                                            sweep_run_id=record["parent"], runtime="torch")
        assert {row["run_id"] for row in chosen["versions"]} == {runs[WIDE], runs[NARROW]}
        assert chosen["run_id"] == runs[WIDE]
    finally:  # back on the frontier, as the other tests expect
        client.set_tag(runs[NARROWEST], "pareto", "true")
        registry.register_frontier(client, "tiny", record["parent"], NAME)
        client.delete_registered_model_alias(NAME, "left")
    assert _versions(client)[runs[NARROWEST]].tags["pareto"] == "true"


def test_select_on_a_missing_model_is_a_one_line_error(record, capsys):
    code = main(["select", "--registered-model", "no-such-model", "--max-latency-ms", "10",
                 "--tracking-uri", record["uri"]])
    _, err = capsys.readouterr()
    assert code == 2 and "no-such-model" in err.splitlines()[-1]


def test_the_latency_policy_chooses_among_measured_points():
    points = [{"run_id": "a", "f1": 80.0, "latency_ms": 12.0}, {"run_id": "b", "f1": 70.0, "latency_ms": 4.0},
              {"run_id": "c", "f1": 70.0, "latency_ms": 3.0}, {"run_id": "d", "f1": 99.0}]
    pick = registry.select_champion
    assert pick(points, "best_f1_under_latency", max_latency_ms=20.0)["run_id"] == "a"
    assert pick(points, "best_f1_under_latency", max_latency_ms=5.0)["run_id"] == "c"  # a tie goes to the faster
    assert pick(points, "best_f1_under_latency", max_latency_ms=2.0) is None
    with pytest.raises(ValueError, match="max_latency_ms"):
        pick(points, "best_f1_under_latency")


def test_a_sweep_registers_its_whole_frontier_once(smoke_sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    from workflows.registry import register_from_experiment

    client = MlflowClient(tracking_uri=smoke_sweep["tracking_uri"])
    runs = tracking.trial_runs(client, smoke_sweep["experiment"], smoke_sweep["parent_run_id"])
    front = {r.info.run_id for r in runs if r.data.tags.get("fineprune.status") == "finished"
             and (r.data.tags.get("pareto") == "true" or r.data.tags.get("pareto_speedup") == "true")}
    name = "fineprune-smoke"
    versions = {v.tags[TAG_TRIAL_RUN]: str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
    assert front and set(versions) == front
    assert {row["run_id"]: row["version"] for row in smoke_sweep["frontier_versions"]} == versions
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["policy"] == "best_f1_under_density"  # the champion keeps its policy
    # The trials recorded the precision they were measured in (the smoke space's fp32), and so do their versions.
    assert {r.data.tags.get(TAG_PRECISION) for r in runs if r.info.run_id in front} == {"fp32"}
    for version in client.search_model_versions(f"name = '{name}'"):
        assert version.tags["precision"] == "fp32" and version.tags["onnx"] == "fp32,int8"
    from workflows.record import RecordError

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(elsewhere := sqlite_store(tmp_path / "notebook.db"))  # a notebook's own store
    try:
        for _ in range(2):  # `fineprune register --frontier`, twice: no new version, the champion unchanged
            again = register_from_experiment(smoke_sweep["experiment"], tracking_uri=smoke_sweep["tracking_uri"],
                                             frontier=True)
            assert {row["run_id"]: row["version"] for row in again["frontier_versions"]} == versions
            assert again["version"] == str(champion.version)
        assert len(client.search_model_versions(f"name = '{name}'")) == len(versions)
        # The caller's MLflow was left pointing at the sweep's store, also after a call that failed: a notebook's next
        # runs were logged there.
        assert mlflow.get_tracking_uri() == elsewhere
        with pytest.raises(RecordError):
            register_from_experiment("no-such-experiment", tracking_uri=smoke_sweep["tracking_uri"])
        assert mlflow.get_tracking_uri() == elsewhere
    finally:
        mlflow.set_tracking_uri(before)


def _logged_models(record, run_id: str) -> list:
    return list(record["client"].search_logged_models([record["experiment_id"]],
                                                      filter_string=f"source_run_id = '{run_id}'"))


def test_a_registered_trial_is_neither_logged_nor_exported_again(record, registered, caplog):
    # The fixture registered the frontier twice: each trial's run holds the one model logged the first time.
    frontier = [record["runs"][name] for name in (WIDE, NARROW, NARROWEST)]
    assert [len(_logged_models(record, run_id)) for run_id in frontier] == [1, 1, 1]
    with caplog.at_level(logging.INFO):
        rows = registry.register_frontier(record["client"], "tiny", record["parent"], NAME)
    assert [row["run_id"] for row in rows] == list(reversed(frontier))
    exports = [r for r in caplog.records if r.name == "pruning.export"]
    assert exports == [], [r.getMessage() for r in exports]
    assert sum("is already version" in r.getMessage() for r in caplog.records) == 3
    assert [len(_logged_models(record, run_id)) for run_id in frontier] == [1, 1, 1]


def test_a_trial_registered_again_reuses_the_model_logged_on_its_run(record, tokenizer):
    client, root = record["client"], record["root"]
    run_id = client.create_run(record["experiment_id"], tags={TAG_STATUS: "finished"}).info.run_id
    client.log_artifacts(run_id, str(_packed_dir(root / "reused", tokenizer, 1, 32)), "packed_model")
    client.set_terminated(run_id)
    artifacts = root / "artifacts"

    def register(name: str, onnx: bool) -> tuple[object, int, int]:
        result = registry.register_run(client, run_id, name, record["parent"], "best_f1_under_density", onnx)
        files = sum(1 for p in artifacts.rglob("*") if p.is_file())
        return client.get_model_version(name, result["version"]), len(_logged_models(record, run_id)), files

    first, logged, files = register("tiny-reused", onnx=False)
    assert logged == 1 and first.tags["onnx"] == "skipped"
    # The model and its version name the release whose code the model ships: the one that logged it.
    model = _logged_models(record, run_id)[0]
    assert model.tags["fineprune.version"] == first.tags["fineprune.version"] == fineprune_version()
    client.set_logged_model_tags(model.model_id, {"fineprune.version": "0.0.9"})  # as an earlier release logs it
    # Under another name: a version of the same logged model, nothing logged or stored again.
    other, *counts = register("tiny-reused-too", onnx=False)
    assert counts == [1, files] and other.source == first.source
    assert other.tags["fineprune.version"] == "0.0.9"  # the code it serves is the earlier release's
    # A version deleted (as a registration stopped before it made one leaves the model): made again from it.
    client.delete_model_version("tiny-reused", first.version)
    again, *counts = register("tiny-reused", onnx=False)
    assert counts == [1, files] and again.source == first.source and again.version != first.version
    assert client.get_model_version_by_alias("tiny-reused", "champion").version == again.version
    # Served through ONNX Runtime: the model without the export does not do; one with it is logged, once.
    exported, logged, files = register("tiny-reused-onnx", onnx=True)
    assert logged == 2 and exported.source != first.source and exported.tags["onnx"] == "fp32,int8"
    exported_too, *counts = register("tiny-reused-onnx-too", onnx=True)
    assert counts == [2, files] and exported_too.source == exported.source
    assert exported_too.tags["onnx"] == "fp32,int8"


def test_a_model_logged_with_other_settings_than_registering_now_gives_is_not_reused(record, tokenizer, caplog):
    """A model logged on a trial's run with the windows of its params (as registrations did before the served
    settings came from the packed model's record), or in another precision, is not what registering the trial now
    serves: a new model is logged, and reused by the next registration."""
    from pruning.checkpoint import EVALUATION_KEY

    client, root = record["client"], record["root"]
    model_dir = _packed_dir(root / "restated", tokenizer, 1, 32)
    config = json.loads((model_dir / "config.json").read_text())
    evaluation = {"max_seq_length": 64, "doc_stride": 32, "max_query_length": 16, "max_answer_length": 30,
                  "n_best": 20}
    (model_dir / "config.json").write_text(json.dumps({**config, EVALUATION_KEY: evaluation}))
    run_id = client.create_run(record["experiment_id"], tags={TAG_STATUS: "finished"}).info.run_id
    client.log_artifacts(run_id, str(model_dir), "packed_model")
    params = {"max_seq_length": "96", "doc_stride": "48"}  # the run config as given, longer than the teacher's
    for key, value in params.items():
        client.log_param(run_id, key, value)
    client.set_terminated(run_id)
    mlflow.set_tracking_uri(record["uri"])
    with mlflow.start_run(run_id=run_id):
        old = logged_model.log_qa_model(model_dir, {**logged_model.serve_settings(params), "precision": "fp32"},
                                    tags={"onnx": "skipped"})
    client.set_terminated(run_id)

    def register(name: str) -> dict:
        with caplog.at_level(logging.INFO, logger="workflows.logged_model"):
            result = registry.register_run(client, run_id, name, record["parent"], "best_f1_under_density",
                                           onnx=False)
        version = client.get_model_version(name, result["version"])
        return mlflow.pyfunc.load_model(version.source).model_config, version

    served, first = register("tiny-restated")
    assert {key: served[key] for key in evaluation} == evaluation
    assert first.source != old.model_uri and len(_logged_models(record, run_id)) == 2
    assert f"the model logged on it before serves other settings than registering it now would ({old.model_id}: " \
        in caplog.text
    assert "max_seq_length 96 -> 64" in caplog.text
    # The same again under another name: the new model is reused, nothing logged.
    caplog.clear()
    _, again = register("tiny-restated-too")
    assert again.source == first.source and len(_logged_models(record, run_id)) == 2
    assert "serves other settings" not in caplog.text
    # The trial now records that its metrics were measured in bf16: neither model serves that.
    client.set_tag(run_id, TAG_PRECISION, "bf16")
    served, bf16 = register("tiny-restated-bf16")
    assert served["precision"] == "bf16" and len(_logged_models(record, run_id)) == 3
    assert bf16.source not in (old.model_uri, first.source)


# Logged as before, without an input example, which MLflow warns about (in colour, hence the leading ".*").
@pytest.mark.filterwarnings("ignore:.*An input example was not provided:UserWarning")
def test_a_model_logged_with_its_served_class_pickled_is_not_reused(record, tokenizer, caplog):
    """A trial's served model logged as registrations logged it before, its class pickled with it (which loading
    it unpickles), serves as one logged now would, but is not made a version again: a new model is logged, as code,
    and reused by the next registration."""
    from mlflow.models import Model

    from pruning.checkpoint import read_evaluation
    from workflows.served_model import MAX_RECORDS, SIGNATURE, PackedQAModel

    client, root = record["client"], record["root"]
    model_dir = _packed_dir(root / "pickled", tokenizer, 1, 32)
    run_id = client.create_run(record["experiment_id"], tags={TAG_STATUS: "finished"}).info.run_id
    client.log_artifacts(run_id, str(model_dir), "packed_model")
    client.set_terminated(run_id)
    settings = {**logged_model.serve_settings({}, read_evaluation(model_dir)), "precision": "fp32"}
    mlflow.set_tracking_uri(record["uri"])
    with mlflow.start_run(run_id=run_id):
        old = mlflow.pyfunc.log_model(name="qa_model", python_model=PackedQAModel(),
                                      artifacts={"model_dir": str(model_dir)}, code_paths=[str(ROOT / "pruning")],
                                      pip_requirements=logged_model.PIP_REQUIREMENTS,
                                      signature=SIGNATURE, tags={"onnx": "skipped"},
                                      model_config={"max_records": MAX_RECORDS, **settings, "onnx_variant": "none"})
    client.set_terminated(run_id)
    assert "python_model" in Model.load(old.model_uri).flavors["python_function"]  # the pickle, as before

    def register(name: str):
        with caplog.at_level(logging.INFO, logger="workflows.logged_model"):
            result = registry.register_run(client, run_id, name, record["parent"], "best_f1_under_density",
                                           onnx=False)
        return client.get_model_version(name, result["version"])

    first = register("tiny-unpickled")
    assert first.source != old.model_uri and len(_logged_models(record, run_id)) == 2
    assert "model_code_path" in Model.load(first.source).flavors["python_function"]
    assert (f"trial run {run_id}: the model logged on it before ({old.model_id}) holds its served class pickled, "
            "which loading it unpickles: logging a new one, as code") in caplog.text
    caplog.clear()
    again = register("tiny-unpickled-too")
    assert again.source == first.source and len(_logged_models(record, run_id)) == 2
    assert "holds its served class pickled" not in caplog.text

def test_select_over_versions_whose_files_are_spoilt_names_each_and_leaves_the_alias(record, tokenizer, capsys):
    client, root, name = record["client"], record["root"], "tiny-spoilt"
    run_id = client.create_run(record["experiment_id"], tags={TAG_STATUS: "finished"}).info.run_id
    client.log_artifacts(run_id, str(_packed_dir(root / "spoilt", tokenizer, 1, 32)), "packed_model")
    client.set_terminated(run_id)
    version = registry.register_run(client, run_id, name, record["parent"], "best_f1_under_density", onnx=False)
    model_id = client.get_model_version(name, version["version"]).source.removeprefix("models:/")
    stored = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    weights = next(stored.rglob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a copy that did not finish

    code, out, err = _select(capsys, record, 1e6, "fast", name=name)
    assert code == 2 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"fineprune select: error: no version of '{name}' could be loaded (version 1: "
                           f"models:/{name}/1/artifacts/packed_model/model.safetensors: cannot be read"), line
    assert line.endswith("alias 'fast' left as it was")
    assert "fast" not in client.get_registered_model(name).aliases
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def test_a_version_that_loads_but_cannot_be_timed_is_named_and_not_chosen(record, registered, tokenizer, capsys):
    """A version whose exported model loads but fails when run (here its config claims a vocabulary its ONNX graph
    does not hold, so the timed token ids fall outside it) is reported with why, not chosen, and does not stop the
    timing of the others; when it is the only one, select is the one-line error and the alias stays where it was."""
    client, root, name = record["client"], record["root"], "tiny-untimable"
    run_id = client.create_run(record["experiment_id"], tags={TAG_STATUS: "finished"}).info.run_id
    client.log_artifacts(run_id, str(_packed_dir(root / "untimable", tokenizer, 1, 32)), "packed_model")
    client.log_metric(run_id, "f1", 99.0)  # the most accurate: chosen if it could be timed
    client.set_terminated(run_id)
    registry.register_run(client, run_id, name, record["parent"], "best_f1_under_density")
    model_id = client.get_model_version(name, "1").source.removeprefix("models:/")
    stored = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    config_file = next(stored.rglob("onnx_model/config.json"))
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps({**config, "vocab_size": 50 * config["vocab_size"]}), encoding="utf-8")

    code, out, err = _select(capsys, record, 1e6, "fast", name=name)
    assert code == 2 and out == "", err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"fineprune select: error: no version of '{name}' could be timed (version 1: "), line
    assert line.endswith("alias 'fast' left as it was") and "Traceback" not in err
    assert "fast" not in client.get_registered_model(name).aliases

    registry.register_run(client, record["runs"][NARROW], name, record["parent"], "best_f1_under_density")
    code, out, err = _select(capsys, record, 1e6, "fast", name=name)
    assert code == 0, err[-3000:]
    chosen = json.loads(out)
    assert chosen["version"] == "2" and chosen["run_id"] == record["runs"][NARROW]
    rows = {row["version"]: row for row in chosen["versions"]}
    assert "latency_ms" not in rows["1"] and rows["1"]["error"].startswith("cannot be timed: ")
    assert rows["2"]["within_budget"] is True
    assert str(client.get_model_version_by_alias(name, "fast").version) == "2"


def test_a_trial_whose_packed_model_is_missing_or_spoilt_is_not_registered(record, tokenizer):
    from workflows.record import RecordError
    from workflows.user_errors import user_errors

    client, root, name = record["client"], record["root"], "tiny-unreadable"
    missing = client.create_run(record["experiment_id"], tags={TAG_STATUS: "finished"}).info.run_id
    client.set_terminated(missing)
    with pytest.raises(RecordError, match=f"^trial run {missing}: its 'packed_model' artifact cannot be read .*; "
                                          "not registered$") as refused:
        registry.register_run(client, missing, name, record["parent"], "best_f1_under_density", onnx=False)
    assert isinstance(refused.value, user_errors())  # one line and exit status 2 on the command line

    model_dir = _packed_dir(root / "unreadable", tokenizer, 1, 32)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # cut short, as by an upload that did not finish
    spoilt = client.create_run(record["experiment_id"], tags={TAG_STATUS: "finished"}).info.run_id
    client.log_artifacts(spoilt, str(model_dir), "packed_model")
    client.set_terminated(spoilt)
    for onnx in (False, True):  # whether or not an export would have tried (and failed) to read it
        with pytest.raises(RecordError, match=f"^trial run {spoilt}: runs:/{spoilt}/packed_model/"
                                              "model.safetensors: .*; not registered$"):
            registry.register_run(client, spoilt, name, record["parent"], "best_f1_under_density", onnx=onnx)
    assert client.search_model_versions(f"name = '{name}'") == []
    assert _logged_models(record, spoilt) == []


def test_a_spoilt_frontier_trial_is_left_out_and_the_rest_of_the_frontier_registered(record, tokenizer, caplog):
    client, root, name = record["client"], record["root"], "tiny-partly-spoilt"
    # A sweep of its own experiment: the module's other tests read the latest sweep of theirs.
    experiment_id = client.create_experiment("tiny-partly-spoilt", artifact_location=(root / "spoilt").as_uri())
    parent = client.create_run(experiment_id, tags={TAG_KIND: "sweep"}).info.run_id
    trials = {}
    for label, density in (("good", 0.3), ("spoilt", 0.2)):
        run_id = client.create_run(experiment_id, tags={
            TAG_KIND: "trial", TAG_PARENT: parent, TAG_STATUS: "finished", "fineprune.packed_artifact": "packed_model",
            "pareto": "true", "pareto_speedup": "false"}).info.run_id
        model_dir = _packed_dir(root / f"frontier-{label}", tokenizer, 1, 32)
        if label == "spoilt":
            weights = model_dir / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-1000])
        client.log_artifacts(run_id, str(model_dir), "packed_model")
        for key, value in {"f1": 50.0 + 10 * density, "linear_density": density}.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id)
        trials[label] = run_id
    with caplog.at_level("WARNING", logger="workflows.registry"):
        rows = registry.register_frontier(client, "tiny-partly-spoilt", parent, name, onnx=False)
    assert [row["run_id"] for row in rows] == [trials["good"]]
    assert {v.tags[TAG_TRIAL_RUN] for v in client.search_model_versions(f"name = '{name}'")} == {trials["good"]}
    assert f"trial run {trials['spoilt']}: runs:/{trials['spoilt']}/packed_model/model.safetensors" in caplog.text


# Loads a registered model by alias as a process without this project would: Ray cannot be imported, nor any module
# of the installed project (the `workflows` modules and the `pruning` package the model carries as code are used).
_FRESH_PROCESS = """
import json, sys
from importlib.abc import MetaPathFinder


class WithoutTheProject(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "ray" or name.startswith("workflows.") and name not in (
                "workflows.record", "workflows.served_model"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path = [WithoutTheProject()] + [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import mlflow
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.DataFrame(json.loads(sys.argv[2]))
answers = model.predict(frame)
import pruning, workflows.served_model
print(json.dumps({"answers": answers["answer"].tolist(), "pruning": pruning.__file__,
                  "served_model": workflows.served_model.__file__, "runtime": model.unwrap_python_model().runtime}))
"""


def test_a_registered_model_loads_by_alias_in_a_process_without_the_project(record, registered, dev_subset, tmp_path):
    import os
    import subprocess
    import sys

    client = record["client"]
    client.set_registered_model_alias(NAME, "fresh", _versions(client)[record["runs"][NARROW]].version)
    frame = _records(dev_subset, 2)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=record["uri"], HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-I", "-c", _FRESH_PROCESS, f"models:/{NAME}@fresh",
                           frame.to_json(orient="records")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["runtime"] == "onnxruntime"
    assert not Path(loaded["pruning"]).is_relative_to(ROOT)  # the package the model carries
    assert not Path(loaded["served_model"]).is_relative_to(ROOT)  # and its copy of the served model's module
    assert all(answer in context for answer, context in zip(loaded["answers"], frame["context"]))


def _records(dev_subset, count: int = 6) -> pd.DataFrame:
    """Dev questions with 200 characters of context around the gold answer: one window of the tiny models."""
    rows = []
    for example in dev_subset[:count]:
        start = max(0, example.answer_starts[0] - 100)
        rows.append({"question": example.question, "context": example.context[start:start + 200]})
    return pd.DataFrame(rows)


def _load(record, run_name: str, monkeypatch, bf16: bool, **config):
    """The version of a trial loaded as the served model would be, on a CPU with or without bf16 matrix units."""
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: bf16)  # the capability check, simulated
    version = _versions(record["client"])[record["runs"][run_name]].version
    mlflow.set_tracking_uri(record["uri"])
    return mlflow.pyfunc.load_model(f"models:/{NAME}/{version}", model_config=config or None)


def test_the_served_model_runs_bf16_only_where_the_cpu_supports_it(record, registered, dev_subset, monkeypatch):
    frame = _records(dev_subset)
    # Measured in bf16 (NARROW). Through PyTorch on a CPU without bf16: fp32, not an error.
    without = _load(record, NARROW, monkeypatch, bf16=False, onnx_variant="none")
    served = without.unwrap_python_model()
    assert without.model_config["precision"] == "bf16"
    assert (served.runtime, served.precision) == ("torch", "fp32")
    fp32 = without.predict(frame)
    # With bf16: autocast, whose rounding moves the scores a little.
    with_bf16 = _load(record, NARROW, monkeypatch, bf16=True, onnx_variant="none")
    assert with_bf16.unwrap_python_model().precision == "bf16"
    # Autocast over linear weights stored in bf16 once, not cast again on every call.
    assert isinstance(with_bf16.unwrap_python_model().model, Bf16Inference)
    bf16 = with_bf16.predict(frame)
    assert all(answer in context for answer, context in zip(bf16["answer"], frame["context"]))
    assert bf16["score"].tolist() != fp32["score"].tolist()
    assert bf16["score"].tolist() == pytest.approx(fp32["score"].tolist(), abs=0.25)
    # Through ONNX Runtime (the default), int8 whatever the recorded precision.
    through_ort = _load(record, NARROW, monkeypatch, bf16=True).unwrap_python_model()
    assert (through_ort.runtime, through_ort.precision) == ("onnxruntime", "int8")
    assert isinstance(through_ort.model, OrtQAModel)

    # Measured in fp32 (NARROWEST): fp32 even where bf16 is supported, unless the inference config says auto.
    assert _load(record, NARROWEST, monkeypatch, bf16=True, onnx_variant="none").unwrap_python_model().precision \
        == "fp32"
    auto = _load(record, NARROWEST, monkeypatch, bf16=True, onnx_variant="none", precision="auto")
    assert auto.unwrap_python_model().precision == "bf16"
    assert _load(record, NARROWEST, monkeypatch, bf16=False, onnx_variant="none",
                 precision="auto").unwrap_python_model().precision == "fp32"
    with pytest.raises(PrecisionError, match="model_config precision: unknown value 'fp16'"):
        _load(record, NARROWEST, monkeypatch, bf16=True, onnx_variant="none", precision="fp16")


def test_a_model_that_cannot_be_exported_is_registered_to_serve_through_pytorch(record, tokenizer, dev_subset,
                                                                               caplog, capsys):
    client, root = record["client"], record["root"]
    model_dir = _packed_dir(root / "unexportable", tokenizer, 2, 256)
    config_file = model_dir / "config.json"
    # Relative position embeddings cannot be exported; the PyTorch model of this version ignores the key.
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "position_embedding_type": "relative_key"}))
    run_id = client.create_run(record["experiment_id"], tags={
        TAG_KIND: "trial", TAG_PARENT: record["parent"], TAG_STATUS: "finished",
        "fineprune.packed_artifact": "packed_model"}).info.run_id
    client.log_artifacts(run_id, str(model_dir), "packed_model")
    client.log_param(run_id, "max_seq_length", "128")
    client.set_terminated(run_id)

    name = "tiny-unexportable"
    with caplog.at_level(logging.WARNING, logger="workflows.logged_model"):
        result = registry.register_run(client, run_id, name, record["parent"], "best_f1_under_density")
    warnings = [r.getMessage() for r in caplog.records if r.name in ("workflows.registry", "workflows.logged_model")]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"the packed model of trial run {run_id}: cannot be exported for ONNX Runtime")
    assert "position_embedding_type" in warnings[0]
    version = client.get_model_version(name, result["version"])
    tag = version.tags["onnx"]
    assert tag.startswith("failed: ExportError: ") and "position_embedding_type" in tag

    mlflow.set_tracking_uri(record["uri"])
    loaded = mlflow.pyfunc.load_model(result["model_uri"])
    flavor = loaded.metadata.flavors["python_function"]
    assert "onnx_dir" not in flavor["artifacts"] and flavor["config"]["onnx_variant"] == "none"
    served = loaded.unwrap_python_model()
    assert served.runtime == "torch" and not isinstance(served.model, OrtQAModel)
    frame = _records(dev_subset, 3)
    answers = loaded.predict(frame)
    assert all(answer in context for answer, context in zip(answers["answer"], frame["context"]))
    with pytest.raises(ValueError, match="onnx_variant: 'int8', but this version carries no ONNX models"):
        mlflow.pyfunc.load_model(result["model_uri"], model_config={"onnx_variant": "int8"})
    # `fineprune ask` runs its packed PyTorch model, as it serves; an ONNX variant it lacks is one line.
    question = ["--question", frame["question"][0], "--context", frame["context"][0]]
    assert main(["ask", result["model_uri"], "--tracking-uri", record["uri"], *question]) == 0
    asked = json.loads(capsys.readouterr().out)
    assert asked["answer"] == answers["answer"][0] and asked["score"] == pytest.approx(answers["score"][0], rel=1e-5)
    assert main(["ask", result["model_uri"], "--tracking-uri", record["uri"], "--variant", "int8", *question]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fineprune ask: error: {result['model_uri']} (version {result['version']}): --variant int8: the version "
        "carries no ONNX export (registered without one); it runs as its packed PyTorch model")
    # A version whose weights were damaged in the artifact store: the error names the version, not the directory
    # they were downloaded into, which is gone by the time one reads it.
    stored = Path(urllib.parse.urlparse(client.get_model_version_download_uri(name, result["version"])).path)
    weights = next(stored.glob("artifacts/packed_model/*.safetensors"))
    weights.write_bytes(b"not safetensors")
    assert main(["ask", result["model_uri"], "--tracking-uri", record["uri"], *question]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    label = f"{result['model_uri']} (version {result['version']})"
    assert line.startswith(f"fineprune ask: error: {label}/{weights.name}: ") and tempfile.gettempdir() not in line


def test_a_version_serves_with_the_windows_its_trial_was_scored_with(record, dev_subset, capsys, tmp_path):
    """A teacher of 64 positions cuts the student's 96-token windows (its run config, the trial's params) to 64 in
    training and evaluation: the version windows at 64 too, and answers as `fineprune ask` on the packed model."""
    from pruning.config import RunConfig
    from pruning.trainer import train

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    common = dict(train_data="dev", eval_data="dev", train_limit=4, eval_limit=2, batch_size=4, max_steps=1,
                  max_seq_length=96, doc_stride=48, log_every=100)
    teacher = train(RunConfig(model_config={**tiny, "max_position_embeddings": 64},
                              output_dir=str(tmp_path / "teacher"), **common), progress=False)["model_dir"]
    student = train(RunConfig(model_config={**tiny, "max_position_embeddings": 128}, teacher=teacher,
                              method="topk", attention_block=(16, 16), target_density=0.5, initial_warmup=0,
                              final_warmup=0, output_dir=str(tmp_path / "student"), **common), progress=False)
    packed = tmp_path / "packed"
    assert main(["pack", student["model_dir"], str(packed), "--questions", "2", "--repeats", "1"]) == 0
    capsys.readouterr()

    client = record["client"]
    run_id = client.create_run(record["experiment_id"], tags={
        TAG_KIND: "trial", TAG_PARENT: record["parent"], TAG_STATUS: "finished",
        "fineprune.packed_artifact": "packed_model"}).info.run_id
    client.log_artifacts(run_id, str(packed), "packed_model")
    for key in ("max_seq_length", "doc_stride"):  # the run config as given, as a sweep logs it
        client.log_param(run_id, key, str(common[key]))
    client.set_terminated(run_id)
    result = registry.register_run(client, run_id, "tiny-cut-windows", record["parent"], "best_f1_under_density",
                                   onnx=False)
    mlflow.set_tracking_uri(record["uri"])
    loaded = mlflow.pyfunc.load_model(result["model_uri"])
    assert {k: loaded.model_config[k] for k in ("max_seq_length", "doc_stride")} == {"max_seq_length": 64,
                                                                                    "doc_stride": 32}
    served = loaded.unwrap_python_model()
    assert (served.max_seq_length, served.doc_stride) == (64, 32)

    # Contexts of several 64-token windows, so that the windows decide the answers.
    frame = pd.DataFrame([{"question": e.question, "context": e.context[:900]} for e in dev_subset[:4]])
    answers = loaded.predict(frame)
    for row, (answer, score) in zip(frame.itertuples(), zip(answers["answer"], answers["score"])):
        assert main(["ask", str(packed), "--question", row.question, "--context", row.context]) == 0
        asked = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (answer, score) == (asked["answer"], pytest.approx(asked["score"], abs=1e-5))


# Last in this module: it logs a second model on the frontier trials' runs, which the tests above count.
def test_a_frontier_registered_without_onnx_serves_and_is_timed_through_pytorch(record, registered, monkeypatch,
                                                                               capsys, caplog):
    client, runs, name = record["client"], record["runs"], "tiny-frontier-torch"
    with caplog.at_level(logging.INFO):
        rows = registry.register_frontier(client, "tiny", record["parent"], name, onnx=False)
    assert [row["run_id"] for row in rows] == [runs[NARROWEST], runs[NARROW], runs[WIDE]]
    exports = [r.getMessage() for r in caplog.records if r.name == "pruning.export"]
    assert exports == []
    versions = {v.tags[TAG_TRIAL_RUN]: v for v in client.search_model_versions(f"name = '{name}'")}
    assert {run_id: v.tags["onnx"] for run_id, v in versions.items()} == {runs[n]: "skipped" for n in TRIALS
                                                                          if n != DOMINATED}
    mlflow.set_tracking_uri(record["uri"])
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{versions[runs[NARROW]].version}")
    flavor = loaded.metadata.flavors["python_function"]
    assert "onnx_dir" not in flavor["artifacts"] and flavor["config"]["onnx_variant"] == "none"

    # select times each version as its pyfunc serves it: PyTorch, in bf16 for the trial measured in bf16 where the
    # CPU supports it (simulated here), in fp32 for the others.
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    code, out, _ = _select(capsys, record, 1e6, "champion", name=name)
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    served = {row["run_id"]: row["served_by"] for row in result["versions"]}
    assert served == {runs[WIDE]: "torch", runs[NARROW]: "torch-bf16", runs[NARROWEST]: "torch"}
    assert result["version"] == str(versions[runs[WIDE]].version) and result["served_by"] == "torch"
    # Without bf16 matrix units, every version is timed in fp32.
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    code, out, _ = _select(capsys, record, 1e6, "champion", name=name)
    assert code == 0
    assert {row["served_by"] for row in json.loads(out.strip().splitlines()[-1])["versions"]} == {"torch"}


def test_register_no_onnx_registers_the_champion_without_its_export(record, registered, capsys):
    # The smoke space's policy (best F1 under density 0.8) under its own registered model name: a new version.
    space = ROOT / "tune_spaces" / "smoke.yaml"
    code = main(["register", "--experiment", "tiny", "--tracking-uri", record["uri"], "--space", str(space),
                 "--no-onnx"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["registered"] and result["run_id"] == record["runs"][NARROW]
    version = record["client"].get_model_version("fineprune-smoke", result["version"])
    assert version.tags["onnx"] == "skipped"


def test_a_version_is_tagged_with_its_trial_s_figures_unrounded_and_select_reports_them(record, tokenizer, capsys,
                                                                                       caplog):
    """EM 200/3 and F1 250/3 points on a dev subset: the version's tags, `fineprune register` and `fineprune
    select` all give the trial's own figures, not ones cut to six digits; select's line says F1 as every other
    line does, to two decimals."""
    client, root, name = record["client"], record["root"], "tiny-figures"
    experiment_id = client.create_experiment("figures", artifact_location=(root / "figures").as_uri())
    parent = client.create_run(experiment_id, tags={TAG_KIND: "sweep"}).info.run_id
    run_id = client.create_run(experiment_id, tags={TAG_KIND: "trial", TAG_PARENT: parent, TAG_STATUS: "finished",
                                                    "fineprune.packed_artifact": "packed_model"}).info.run_id
    client.log_artifacts(run_id, str(_packed_dir(root / "figures-packed", tokenizer, 1, 32)), "packed_model")
    figures = {"exact_match": 200 / 3, "f1": 250 / 3, "linear_density": 0.123456789, "total_density": 0.987654321,
               "heads_removed": 6.0, "speedup": 1.23456789}
    for key, value in figures.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)

    registered = registry.register_run(client, run_id, name, parent, "best_f1_under_density", onnx=False)
    assert {key: registered[key] for key in ("exact_match", "f1", "linear_density", "speedup")} == \
        {key: figures[key] for key in ("exact_match", "f1", "linear_density", "speedup")}
    tags = client.get_model_version(name, registered["version"]).tags
    assert {key: float(tags[key]) for key in figures} == figures
    assert tags["heads_removed"] == "6"  # a count reads as one

    with caplog.at_level(logging.INFO, logger="workflows.registry"):
        code, out, _ = _select(capsys, record, 1e6, "fastest", name=name)
    assert code == 0
    lines = [r.getMessage() for r in caplog.records if "@fastest -> version" in r.getMessage()]
    assert len(lines) == 1 and re.fullmatch(rf"{name}@fastest -> version 1 \(F1 83\.33, \d+\.\d\d ms <= 1e\+06 ms\)",
                                            lines[0]), lines
    result = json.loads(out.strip().splitlines()[-1])
    assert {key: result[key] for key in figures} == figures
    assert {key: result["versions"][0][key] for key in figures} == figures


def test_timings_too_noisy_to_rank_versions_by_are_named_and_steady_ones_are_not():
    """`select` on a busy machine measured a version at 1.5 ms in one run and 70 ms in the next; the spread of its
    passes (upper over lower quartile) says so, where a steady machine's passes agree."""
    from pruning.bench import spread
    from workflows.version_timing import timing_noise

    assert spread([2.0] * 5) == 1.0
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == 2.0  # quartiles 2 and 4
    assert spread([1.0, 1.0, 1.0, 1.0, 9.0]) == 1.0  # one slowed pass moves neither quartile, nor the median
    with pytest.raises(ValueError, match="two or more timed passes"):
        spread([1.0])
    steady = {"v1": [1.0, 1.1, 1.0, 1.05, 1.0], "dense": [3.0, 3.1, 3.0, 3.2, 3.0]}
    assert timing_noise(steady) is None
    assert timing_noise({"v1": [1.0, 5.0, 1.0]}) is None  # too few passes for quartiles
    noisy = {**steady, "v2": [1.0, 2.0, 3.0, 4.0, 5.0]}
    assert timing_noise(noisy) == ("the timed passes of 1 of the 3 models disagree, by up to 2.0x (upper over lower "
                                   "quartile; 1.5x at most counts as steady)")


def test_eval_and_ask_run_a_registered_version_as_it_serves(record, registered, dev_subset, capsys, tmp_path):
    """`fineprune ask models:/NAME@ALIAS` and `eval models:/NAME/VERSION`: the version's own files, run as its
    served model runs them (ONNX Runtime int8 here; `--variant fp32` the other), answering as the served model does
    and scoring as the same files do from a directory; what they downloaded is gone after."""
    client, uri = record["client"], record["uri"]
    version = str(_versions(client)[record["runs"][WIDE]].version)  # a string, as in `select`'s result
    client.set_registered_model_alias(NAME, "mine", version)
    try:
        frame = _records(dev_subset, 1)
        question, context = frame["question"][0], frame["context"][0]
        assert main(["ask", f"models:/{NAME}@mine", "--tracking-uri", uri, "--question", question,
                     "--context", context]) == 0
        asked = json.loads(capsys.readouterr().out)
        mlflow.set_tracking_uri(uri)
        loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@mine")
        served = loaded.predict(frame)
        assert asked["answer"] == served["answer"][0] and asked["score"] == pytest.approx(served["score"][0], rel=1e-4)
        assert (asked["model_uri"], asked["version"]) == (f"models:/{NAME}@mine", version)

        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}", dst_path=str(tmp_path),
                                                         tracking_uri=uri))
        # The windows and span search of the version's model config, as the served model windows (a stride as long
        # as the window halved, as fit_windows cuts it for the served model too).
        windows = {key: loaded.model_config[key] for key in EVALUATION_KEYS if key != "doc_stride"}
        figures = ("exact_match", "f1", "precision", "questions", *EVALUATION_KEYS)
        for variant in (None, "fp32"):
            flags = ["--eval-limit", "3", "--no-progress", *(["--variant", variant] if variant else [])]
            assert main(["eval", f"models:/{NAME}/{version}", "--tracking-uri", uri, *flags]) == 0
            remote = json.loads(capsys.readouterr().out)
            assert {key: remote[key] for key in windows} == windows
            assert remote["doc_stride"] == fit_windows(windows["max_seq_length"], loaded.model_config["doc_stride"],
                                                       128)[1]
            given = [f for key in EVALUATION_KEYS for f in (f"--{key.replace('_', '-')}", str(remote[key]))]
            assert main(["eval", str(local / "artifacts" / "onnx_model"), "--variant", variant or "int8", *flags,
                         *given]) == 0
            here = json.loads(capsys.readouterr().out)
            assert {k: remote[k] for k in figures} == {k: here[k] for k in figures}
            assert remote["precision"] == (variant or "int8") and remote["version"] == version
        assert not list(Path(tempfile.gettempdir()).glob(f"fineprune-download.{os.getpid()}@*"))
    finally:
        client.delete_registered_model_alias(NAME, "mine")


def test_version_numbers_are_told_as_ranges():
    """A model of a thousand versions was refused with all of them listed: one line of 5,000 characters."""
    assert number_ranges([3]) == "3"
    assert number_ranges([2, 1]) == "1, 2"
    assert number_ranges([1, 2, 3, 5, 7, 8, 9, 10]) == "1-3, 5, 7-10"
    assert number_ranges(range(1, 1048)) == "1-1047"
    assert number_ranges(range(1, 60, 2), most=4) == "1, 3, ... (30 in all), 57, 59"
    assert number_ranges(range(1, 20, 2), most=1) == "1, ... (10 in all), 19"


@pytest.mark.parametrize("target,says", [
    (f"models:/{NAME}/999", "registered model 'tiny-frontier' has no version 999 (its versions: {versions})"),
    (f"models:/{NAME}@nobody", "registered model 'tiny-frontier' has no alias 'nobody' (its aliases: {aliases})"),
    (f"models:/{NAME}@mien", "registered model 'tiny-frontier' has no alias 'mien' (its aliases: {aliases}); did "
                             "you mean 'mine'?"),
    ("models:/no-such-model/1", "no registered model 'no-such-model'"),
    ("models:/tiny-fronteir@champion", "no registered model 'tiny-fronteir'; did you mean 'tiny-frontier'?"),
    (f"models:/{NAME}", "not a registered version (models:/NAME/VERSION or models:/NAME@ALIAS)"),
])
def test_a_registered_version_that_is_not_there_is_one_line(record, registered, capsys, target, says):
    """What is not there, with what is: the versions or aliases of the model, or the name of one close to it."""
    client, uri = record["client"], record["uri"]
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))
    client.set_registered_model_alias(NAME, "mine", str(numbers[0]))
    aliases = ", ".join(sorted(client.get_registered_model(NAME).aliases))  # with those other tests left
    try:
        code = main(["ask", target, "--tracking-uri", uri, "--question", "Who?", "--context", "Ann."])
    finally:
        client.delete_registered_model_alias(NAME, "mine")
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("fineprune ")]
    assert code == 2 and captured.out == "" and len(lines) == 1, captured.err
    where = "" if target == f"models:/{NAME}" else f" (in {uri})"
    said = says.format(versions=number_ranges(numbers), aliases=aliases)
    assert lines[0] == f"fineprune ask: error: {target}: {said}{where}"
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("command", ["eval", "ask"])
def test_a_tracking_uri_for_a_model_directory_is_refused(record, tmp_path, capsys, command):
    """--tracking-uri names the registry of a models:/ version: given with a directory, it is read for nothing."""
    (tmp_path / "config.json").write_text("{}")
    extra = ["--question", "Who?", "--context", "Ann."] if command == "ask" else ["--eval-limit", "2"]
    code = main([command, str(tmp_path), "--tracking-uri", record["uri"], *extra])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("fineprune ")]
    assert code == 2 and captured.out == "" and lines == [
        f"fineprune {command}: error: --tracking-uri {record['uri']}: names the registry of a models:/ version, and "
        f"{tmp_path} is a model directory; drop --tracking-uri, or give models:/NAME@ALIAS or models:/NAME/VERSION"]
