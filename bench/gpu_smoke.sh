#!/usr/bin/env bash
# Every pruning mode end to end on a GPU (or with --device cpu), with nothing but torch and transformers installed:
# dense -> topk (per matrix, global, distilled from the teacher cache), sigmoid_threshold and fisher (recovered
# packed, or in two stages), each with a filled phase -> checkpoint -> resume -> pack -> eval of masked and packed
# (equal EM/F1) -> ask, in fp32 and bf16. Last line:
# `gpu_smoke stages passed = N/N`. Arguments go to bench/gpu_smoke.py (--device, --precisions, --out, --verbose).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# $PYTHON if set, else the project's venv where there is one (a bare GPU machine has only a system python).
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON="$(command -v python3 || command -v python)"; fi
fi
exec "$PYTHON" bench/gpu_smoke.py "$@"
