#!/usr/bin/env bash
# GPU reference run: dense MiniLM teacher on full SQuAD v1.1 train, six fine-pruned students (15-60% density),
# full-dev evaluation, packing and GPU latency (batch 32, seq 384, fp32 and bf16). About 9 minutes on one H200.
#
# Needs torch + transformers (no Ray, no MLflow) and the carried files in .carry/ (made by `--prepare`):
#   .carry/minilm/            the shipped MiniLM with float16 weights (45 MB instead of 90 MB)
#   .carry/{train,dev}-v1.1.json.xz   the shipped SQuAD v1.1 files, xz-compressed
#
#   bash bench/gpu_reference.sh --prepare      # on the development machine: build .carry/
#   OUT=results bash bench/gpu_reference.sh    # on the GPU machine
#   bash bench/gpu_reference.sh --rehearsal    # every phase on a CPU with tiny settings
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--prepare" ]]; then
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p .carry/minilm
  "$PY" - <<'PYEOF'
import shutil
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from pruning.resources import shipped_model_dir
src, dst = shipped_model_dir(), Path(".carry/minilm")
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(src / name, dst / name)
weights = load_file(str(src / "model.safetensors"))
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
          str(dst / "model.safetensors"), metadata={"format": "pt"})
PYEOF
  data=$("$PY" -c "from pruning.resources import squad_file; print(squad_file('dev').parent)")
  for split in train dev; do xz -9 -T2 -c "$data/$split-v1.1.json" > ".carry/$split-v1.1.json.xz"; done
  du -sh .carry
  exit 0
fi
OUT=${OUT:-gpu-reference-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
"$PY" bench/gpu_reference.py --out "$OUT" --work "${WORK:-/tmp/fineprune-gpu}" "$@" 2>&1 | tee "$OUT/run.log"
