"""Commands stopped by real signals: Ctrl-C (SIGINT) and SIGTERM give one line and the shell's status for the
signal, and what a command had already written stays whole and usable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "configs" / "tiny_smoke.yaml").read_text())


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    # SIGINT as a terminal's Ctrl-C delivers it: a shell without job control starts its background jobs with SIGINT
    # ignored, so the handler is set back to the default, as a foreground job has it.
    return subprocess.Popen([sys.executable, "-m", "workflows.cli", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the command ended (status {process.returncode}) before {path} appeared:\n"
                                 f"{process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout:.0f} s"
        time.sleep(0.05)


def _dense_config(tmp_path: Path) -> Path:
    config = {k: v for k, v in TINY.items() if k not in ("method", "attention_block", "mask_lr", "lambda_attention",
                                                         "lambda_ffn", "fill_steps")}
    config.update(method="dense", max_steps=100000, eval_every=None, save_every=2, log_every=1000)
    path = tmp_path / "dense.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_training_run_says_so_in_one_line_and_resumes_from_its_checkpoint(tmp_path, sig):
    config, out = _dense_config(tmp_path), tmp_path / "out"
    process = _start(["train", "--config", str(config), "--output-dir", str(out), "--no-progress"], tmp_path)
    _wait_for(out / "checkpoint" / "trainer_state.json", process)
    time.sleep(1.0)  # a few more steps and checkpoints: the signal may come while one is written
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, stderr[-3000:]
    assert stdout == "" and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1] == f"fineprune train: interrupted by {signal.Signals(sig).name}"
    # Nothing half-written is left: the checkpoint is whole, no staging directory beside it, no final model.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]
    step = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert step >= 2 and step % 2 == 0

    done = subprocess.run([sys.executable, "-m", "workflows.cli", "train", "--config", str(config), "--output-dir",
                           str(out), "--resume", str(out / "checkpoint"), "--max-steps", str(step + 2),
                           "--no-progress"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["step"] == step + 2 and (Path(result["model_dir"]) / "model.safetensors").is_file()
