"""Shared fixtures: a tiny random BERT configuration, a masked checkpoint of one, the shipped tokenizer, a slice
of the shipped dev set, and the bench scripts as modules."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

from pruning import masks, squad
from pruning.checkpoint import save_model
from pruning.config import RunConfig
from pruning.resources import shipped_model_dir, squad_file
from pruning.trainer import build_model

DEV_SUBSET_SIZE = 40
BENCH = Path(__file__).resolve().parents[1] / "bench"


@functools.cache
def _migrated_store() -> Path:
    """An empty MLflow database that MLflow made and migrated, once per test process (removed at its exit)."""
    import atexit
    import tempfile

    from mlflow.tracking import MlflowClient

    template = Path(tempfile.mkdtemp(prefix="fineprune-store-")) / "mlflow.db"
    atexit.register(shutil.rmtree, template.parent, True)
    MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    return template


class StandInGpu(TorchFunctionMode):
    """The CPU standing in for a GPU while the mode is on: the library's device check, which asks whether there is
    one, is told there is. Subclasses record what reaches the stand-in."""

    def __enter__(self):
        self._is_available = torch.cuda.is_available
        torch.cuda.is_available = lambda: True
        return super().__enter__()

    def __exit__(self, *exc):
        torch.cuda.is_available = self._is_available
        return super().__exit__(*exc)


def sqlite_store(path: Path) -> str:
    """The ``sqlite:///`` URI of a new, empty MLflow database at ``path``: a copy of :func:`_migrated_store` (about
    a second and a half saved per store; a test of what a store that is not there yet gets, or of a database given
    by hand, names its own path instead)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path}: a test store is made only where there is none")
    shutil.copyfile(_migrated_store(), path)
    return f"sqlite:///{path}"


@contextlib.contextmanager
def handed_to_handlers(logger_name: str):
    """The messages of the records the logger ``logger_name`` hands its handlers while the block runs (after its
    level and filters: a record a filter drops is not among them). Where a library logs to a handler of its own,
    which ``caplog`` does not see."""
    import logging

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    target, keep = logging.getLogger(logger_name), Keep()
    target.addHandler(keep)
    try:
        yield messages
    finally:
        target.removeHandler(keep)


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A directory nothing can be written into (:func:`frozen`)."""
    path = tmp_path / "read-only"
    path.mkdir()
    with frozen(path):
        yield path


@contextlib.contextmanager
def frozen(path: Path):
    """``path`` (a file or a directory, that exists) made one nothing may write while the block runs: without write
    permission, or (for root, whom permissions do not stop) immutable; skips the test where neither can be done."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield path
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("no way to make a path root cannot write here (chattr +i)")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture(scope="session")
def bench_script():
    """Import a script of bench/ as a module: ``bench_script("accuracy_budget")``."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # as for an import: dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


def processes_mentioning(root: Path) -> list[int]:
    """Ids of the processes (this one aside) whose command line names ``root``: what is left of a private Ray or a
    test cluster whose temp dir or storage is under it, and a driver given a path under it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if str(root) in cmdline:
            found.append(int(entry.name))
    return found


def free_port() -> int:
    """A port nothing on 127.0.0.1 listens on now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store and served artifacts under ``root``, its log in
    ``root/mlflow-server.log``; stopped and started again on the same port and store.

    Its port is one found free, which another process can take before the server binds it (a Ray node starting
    beside it takes ports of the same range): the server then logs "address already in use" and exits with status 0.
    Its first start then tries another port; a start again keeps the port, which is its point.
    """

    def __init__(self, root: Path, env: dict[str, str], tries: int = 3) -> None:
        self.root, self.env, self.port, self.tries = root, env, free_port(), tries
        self.process: subprocess.Popen | None = None
        self._started = False

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        """Start the process, without waiting for it to answer (see :meth:`wait`)."""
        with open(self.root / "mlflow-server.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                 "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts", "-h", "127.0.0.1",
                 "-p", str(self.port)],
                env=self.env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    def wait(self, timeout: float = 180) -> None:
        """Until the server answers; on its first start, on another port where its own was taken meanwhile."""
        deadline, tries = time.monotonic() + timeout, 1
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                taken = "address already in use" in self.log_tail(600)
                if self._started or not taken or tries >= self.tries:
                    raise AssertionError(f"the MLflow server exited (status {self.process.returncode}):\n"
                                         f"{self.log_tail()}")
                self.port, tries = free_port(), tries + 1
                self.launch()
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as response:
                    if response.status == 200:
                        self._started = True
                        return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"the MLflow server did not answer at {self.uri} within {timeout:.0f} s")

    def start(self) -> None:
        self.launch()
        self.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass

    def log_tail(self, chars: int = 3000) -> str:
        log = self.root / "mlflow-server.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else ""


@pytest.fixture
def tiny_bert_config() -> BertConfig:
    """A 2-layer BERT small enough for CPU tests, with the shipped tokenizer's vocabulary and no dropout."""
    return BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=512, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def random_masked_model(positions: int = 128):
    """A 2-layer topk model with random scores cut at 0.4 (some blocks, heads and FFN columns masked), and the
    shipped tokenizer."""
    torch.manual_seed(0)
    cfg = RunConfig(model_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=positions),
                    method="topk", attention_block=(16, 16))
    model, tokenizer = build_model(cfg)
    with torch.no_grad():
        for score in masks.mask_score_parameters(model):
            score.copy_(torch.randn_like(score))
    masks.set_threshold(model, 0.4)
    return model, tokenizer


@pytest.fixture(scope="session")
def masked_checkpoint(tmp_path_factory) -> Path:
    """:func:`random_masked_model` saved. Read-only: tests that change a checkpoint copy it first."""
    return save_model(*random_masked_model(), tmp_path_factory.mktemp("ckpt") / "masked")


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped model's fast (uncased WordPiece) tokenizer."""
    return AutoTokenizer.from_pretrained(shipped_model_dir())


@pytest.fixture(scope="session")
def dev_subset() -> list[squad.Example]:
    """The first questions of the shipped SQuAD v1.1 dev set."""
    return squad.load_squad(squad_file("dev"), limit=DEV_SUBSET_SIZE)


def save_read_as_model(model: torch.nn.Module, path: Path, tokenizer_class: str,
                       dtype: torch.dtype = torch.float32) -> Path:
    """A random model of a family read as another (DistilBERT as BERT, ALBERT as ELECTRA) saved by transformers in
    ``path``, its weights moved off their initial values (biases and norms too) by draws that continue the random
    stream the caller seeded before building it, with the shipped WordPiece vocabulary as its tokenizer, declared as
    ``tokenizer_class``."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval().to(dtype).save_pretrained(str(path))
    for name in ("vocab.txt", "tokenizer.json", "special_tokens_map.json"):
        shutil.copy(shipped_model_dir() / name, path)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": tokenizer_class}))
    return path


def dev_windows(model_dir: Path, examples: list[squad.Example]) -> squad.EvalFeatures:
    """Real dev windows of a model directory's tokenizer, 96 tokens overlapping by 32: several per long context of
    the first 8 ``examples``, some padded."""
    from pruning.tokenizer import load_tokenizer

    return squad.prepare_eval_features(examples[:8], load_tokenizer(model_dir), max_seq_length=96, doc_stride=32)


def no_qa_head_line(directory: Path) -> str:
    """The one line :func:`pruning.checkpoint.load_model` refuses an encoder without a QA head with, as a model to
    evaluate."""
    return (f"{directory}: not a question-answering model (model.safetensors has no qa_outputs.weight: a pre-trained "
            "encoder, whose answers would come from a random head); fine-tune it with `fineprune train` first")


def loading_refused(directory: Path, state: dict[str, torch.Tensor], config: dict | None = None) -> str:
    """The one-line CheckpointError of loading ``directory`` with ``state`` as its weights (and ``config`` as its
    config.json, when given)."""
    from safetensors.torch import save_file

    from pruning.checkpoint import CheckpointError, load_model

    save_file(state, str(directory / "model.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    assert "\n" not in str(err.value)
    return str(err.value)


def pack_export_and_score(run, pruned: dict, out: Path, window: list[str]) -> None:
    """``fineprune pack`` a pruned run's model, ``eval`` the packed model (it answers as the masked one did),
    ``export`` it and ``eval`` the export (it answers as the packed one), through ``run`` (argv -> the command's
    JSON line)."""
    packed = run(["pack", pruned["model_dir"], str(out / "packed"), "--questions", "4", "--repeats", "1"])
    assert packed["max_logit_diff"] <= 1e-3
    again = run(["eval", str(out / "packed"), "--eval-limit", "8", *window, "--device", "cpu", "--no-progress"])
    assert again["f1"] == pytest.approx(pruned["f1"], abs=1e-6)
    run(["export", str(out / "packed"), str(out / "onnx"), "--questions", "4"])
    exported = run(["eval", str(out / "onnx"), "--eval-limit", "8", *window, "--no-progress"])
    assert exported["f1"] == pytest.approx(again["f1"], abs=1e-6)


def qa_logits(model, inputs) -> torch.Tensor:
    """A QA model's start and end logits on ``inputs``, stacked."""
    with torch.inference_mode():
        out = model(**inputs)
    return torch.stack([out.start_logits, out.end_logits])


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_test_process():
    """Tiny models gain nothing from threads, and thread contention on a busy machine slows them by 50x."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _rays_files_in_a_directory_of_the_tests():
    """Every Ray the tests start (in this process or in a command it runs) keeps its session files (logs, sockets)
    in one new directory, removed at the end, not in the machine's /tmp/ray, where Ray leaves each session's. A
    ``RAY_TMPDIR`` the caller set is kept. Short, for Ray's socket paths."""
    if os.environ.get("RAY_TMPDIR"):
        yield
        return
    import tempfile

    root = tempfile.mkdtemp(prefix="fpr-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.environ["RAY_TMPDIR"] = root
    try:
        yield
    finally:
        del os.environ["RAY_TMPDIR"]
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory) -> dict:
    """One real sweep of ``tune_spaces/smoke.yaml`` per test session, shared by every test that reads a sweep back.

    Local Ray on 2 CPUs and an SQLite MLflow store in a temporary directory. Returns ``run_sweep``'s summary:
    ``experiment``, ``tracking_uri``, ``parent_run_id``, ``champion`` (with ``model_uri``), ``frontier``,
    ``report`` (paths of the report it wrote), ``sweep_dir``, ...
    """
    import logging
    from pathlib import Path

    import ray
    from mlflow.tracking import MlflowClient

    from workflows.sweep import run_sweep

    root = tmp_path_factory.mktemp("smoke_sweep")
    space = Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml"
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    # Created up front so that artifacts (packed and registered models) stay in the temporary directory too; an
    # experiment created by the sweep would put them under ./mlruns of the working directory.
    MlflowClient(tracking_uri=tracking_uri).create_experiment("smoke", artifact_location=(root / "artifacts").as_uri())
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Started here (run_sweep reuses a running Ray and shuts it down at its end) to pin the CPU count. A private
    # instance: never a cluster Ray recorded as current (which may be dead, or someone else's) or RAY_ADDRESS.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": env})
    try:
        return run_sweep(space, experiment="smoke", tracking_uri=tracking_uri, storage_path=str(root / "ray"),
                         report_dir=root / "report", address="local")
    finally:
        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def known_answers(tokenizer) -> list[squad.Example]:
    """Six shipped dev questions, from six articles, whose gold answer an answer-key model can mark.

    Each gold answer starts and ends on token boundaries of its context, within 20 tokens; its first and last
    tokens occur once in their context, and no context holds a token that marks another question's answer.
    """
    chosen: list[squad.Example] = []
    marked: set[int] = set()
    contexts: list[set[int]] = []
    special = set(tokenizer.all_special_ids)
    for example in squad.load_squad(squad_file("dev")):
        if any(example.title == other.title for other in chosen):
            continue
        encoded = tokenizer(example.context, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        begin = example.answer_starts[0]
        end = begin + len(example.answers[0])
        first = [i for i, (a, _) in enumerate(offsets) if a == begin]
        last = [i for i, (_, b) in enumerate(offsets) if b == end]
        if len(first) != 1 or len(last) != 1 or not 0 <= last[0] - first[0] < 20:
            continue
        marks = {ids[first[0]], ids[last[0]]}
        if (marks & special or any(ids.count(t) != 1 for t in marks) or marked & set(ids)
                or any(marks & seen for seen in contexts)):
            continue
        chosen.append(example)
        marked |= marks
        contexts.append(set(ids))
        if len(chosen) == 6:
            return chosen
    raise AssertionError("the dev set has fewer than six questions an answer-key model can mark")


@pytest.fixture(scope="session")
def answer_key_model(tokenizer, known_answers):
    """A tiny BERT whose best span in the context of each of :func:`known_answers` is its gold answer, exactly.

    Both sublayers of its one encoder layer add nothing (zero output projections), so every token's last hidden state
    is the LayerNorm of its word embedding (positions and segments embed to zero). Word embeddings are basis vectors:
    dimension 0 for the first token of a gold answer, dimension 1 for its last token (both for a one-token answer),
    dimension 2 for every other token; the QA head reads dimension 0 as the start logit and dimension 1 as the end
    logit, ten times over. A marked token scores about 80, any other about -1, so the answer is fixed by the model,
    whatever the question, the windows or the batch it comes in.
    """
    hidden = 64
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=512,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForQuestionAnswering(config).eval()
    with torch.no_grad():
        embeddings = model.bert.embeddings
        words = embeddings.word_embeddings.weight
        words.zero_()
        words[:, 2] = 1.0
        for example in known_answers:
            begin = example.answer_starts[0]
            end = begin + len(example.answers[0])
            encoded = tokenizer(example.context, add_special_tokens=False, return_offsets_mapping=True)
            for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]):
                if a == begin:
                    words[token, 2], words[token, 0] = 0.0, 1.0
                if b == end:
                    words[token, 2], words[token, 1] = 0.0, 1.0
        embeddings.position_embeddings.weight.zero_()
        embeddings.token_type_embeddings.weight.zero_()
        for layer in model.bert.encoder.layer:
            for projection in (layer.attention.output.dense, layer.output.dense):
                projection.weight.zero_()
                projection.bias.zero_()
        model.qa_outputs.weight.zero_()
        model.qa_outputs.bias.zero_()
        model.qa_outputs.weight[0, 0] = 10.0
        model.qa_outputs.weight[1, 1] = 10.0
    return model


class CountingClient:
    """An MLflow client that counts the calls made through it of the ``counted`` methods (and makes them)."""

    def __init__(self, client, *counted: str) -> None:
        self._client = client
        self.calls = dict.fromkeys(counted, 0)

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if name not in self.calls:
            return method

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return method(*args, **kwargs)
        return counted


def assert_each_trial_registered_once(client, name: str) -> None:
    """No trial's model is more than one version of the registered model ``name``."""
    registered = [v.tags.get("fineprune.trial_run_id") for v in client.search_model_versions(f"name = '{name}'")]
    assert len(registered) == len(set(registered)), "a trial's model registered twice"


def renumber_tokens(model_dir: Path) -> None:
    """Gives 1000 ordinary word pieces of ``model_dir``'s tokenizer each other's ids (the special tokens keep theirs):
    a tokenizer of the same size that reads other words from the same ids."""
    import json

    tokenizer_file = model_dir / "tokenizer.json"
    spec = json.loads(tokenizer_file.read_text())
    vocab = spec["model"]["vocab"]
    moved = sorted(vocab, key=vocab.get)[1000:2000]
    for token, index in zip(moved, reversed([vocab[t] for t in moved])):
        vocab[token] = index
    tokenizer_file.write_text(json.dumps(spec))
    (model_dir / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")


def packed_tiny_bert(path: Path, tokenizer, heads: int, ffn: int, positions: int = 128) -> Path:
    """A 2-layer BERT (hidden 64, 2 heads of 32, FFN 128, ``positions`` position embeddings) with heads and FFN
    dimensions zeroed, then packed into ``path`` (once: a path that exists is taken as made)."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    from pruning.packing import pack, save_packed

    if not path.exists():
        torch.manual_seed(0)
        model = BertForQuestionAnswering(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64,
                                                    num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=128,
                                                    max_position_embeddings=positions)).eval()
        with torch.no_grad():
            for layer in model.bert.encoder.layer:
                layer.attention.output.dense.weight[:, heads * 32:] = 0
                layer.output.dense.weight[:, ffn:] = 0
        save_packed(pack(model), tokenizer, path)
    return path


def sweep_record(client, root: Path, tokenizer, name: str, key: str, trials: dict[str, tuple],
                 experiment: str = "exp") -> dict:
    """A finished sweep of ``experiment`` (registered model ``name``, policy best_f1_under_density 0.6, no ONNX
    export), shaped as a sweep's record: its parent run (storage ``root / key``), its dense baseline and ``trials``
    (trial name -> (heads kept per layer, FFN width kept, F1, linear density, on the density frontier, and optionally
    the model's positions, 128 unless given)), finished with packed models (:func:`packed_tiny_bert`, kept under
    ``root / "models"``). Returns the parent run id and the trials' run ids."""
    from workflows import record, tracking

    spec = {"registry": {"name": name, "policy": "best_f1_under_density", "max_density": 0.6, "onnx": False}}
    parent = tracking.start_parent_run(client, experiment, str(root / key), spec, resume=False)
    experiment_id = client.get_run(parent).info.experiment_id
    baseline = client.create_run(experiment_id, tags={record.TAG_KIND: record.KIND_BASELINE,
                                                      record.TAG_PARENT: parent, record.TAG_STATUS: "finished"})
    client.log_metric(baseline.info.run_id, "f1", 95.0)
    client.set_terminated(baseline.info.run_id)
    runs = {}
    for trial, (heads, ffn, f1, density, on_front, *positions) in trials.items():
        run_id = client.create_run(experiment_id, tags={
            record.TAG_KIND: record.KIND_TRIAL, record.TAG_PARENT: parent, record.TAG_STATUS: "finished",
            record.TAG_PACKED_ARTIFACT: "packed_model", "pareto": str(on_front).lower(), "pareto_speedup": "false",
            record.TAG_RUN_NAME: trial}).info.run_id
        positions = positions[0] if positions else 128
        model_dir = packed_tiny_bert(root / "models" / f"{heads}-{ffn}-{positions}", tokenizer, heads, ffn, positions)
        client.log_artifacts(run_id, str(model_dir), "packed_model")
        for metric, value in {"f1": f1, "exact_match": f1 - 10, "linear_density": density,
                              "total_density": density, "heads_removed": 2 - heads, "speedup": 2 - density}.items():
            client.log_metric(run_id, metric, value)
        client.log_param(run_id, "max_seq_length", "64")
        client.set_terminated(run_id)
        runs[trial] = run_id
    tracking.finish_parent_run(client, parent)
    return {"parent": parent, "runs": runs}
