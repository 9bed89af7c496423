#!/bin/bash
# The GPU check, as the device tool runs it (see benchmarks/gpu_prepare.sh): install the carried wheels and jsarag
# into /tmp/site, put the carried tiny models into a fresh jsarag cache, run benchmarks/gpu_check.py (about 10
# minutes on one H200), leaving $OUT/gpu_check.json (one entry per job, written as each job ends) and the log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export JSARAG_CACHE=/tmp/jsarag-cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$JSARAG_CACHE/models" && cp -r .gpu_carry/models/* "$JSARAG_CACHE/models/"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" --tokenizer .gpu_carry/smollm2 "$@" 2>&1 \
  | tee "$OUT/gpu_check.log"
