"""Shared fixtures: a tiny random BERT configuration, the shipped tokenizer, and a slice of the shipped dev set."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, BertConfig

from pruning import squad
from pruning.resources import shipped_model_dir, squad_file

DEV_SUBSET_SIZE = 40


@pytest.fixture
def tiny_bert_config() -> BertConfig:
    """A 2-layer BERT small enough for CPU tests, with the shipped tokenizer's vocabulary and no dropout."""
    return BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=512, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped model's fast (uncased WordPiece) tokenizer."""
    return AutoTokenizer.from_pretrained(shipped_model_dir())


@pytest.fixture(scope="session")
def dev_subset() -> list[squad.Example]:
    """The first questions of the shipped SQuAD v1.1 dev set."""
    return squad.load_squad(squad_file("dev"), limit=DEV_SUBSET_SIZE)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_test_process():
    """Tiny models gain nothing from threads, and thread contention on a busy machine slows them by 50x."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
