#!/bin/bash
# Prepare, on this machine, what the GPU check carries (both folders are git-ignored):
#   .whl/        wheels of the Python packages the GPU machine lacks (Python 3.12, manylinux x86_64)
#   .gpu_carry/  the tiny retriever and generator built from a config (jsarag/tiny-bert, jsarag/tiny-gpt2: the
#                tiny recipe's models) and SmolLM2's config and tokenizer files (no weights)
# Then, with the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu_carry"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=""
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
mkdir -p .whl
# the versions this repository is tested with; the GPU image has torch, numpy, pyarrow, peft, accelerate,
# sentence-transformers (an older one), torchmetrics, pluggy, filelock, psutil, tqdm, matplotlib, huggingface-hub
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl \
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 faiss-cpu==1.15.1 bm25s==0.3.16 \
  PyStemmer==3.1.0 transformers==5.24.0 sentence-transformers==6.2.0
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8  # no wheel on PyPI: build one
mkdir -p .gpu_carry/models .gpu_carry/smollm2
python3 - <<'PY'
import shutil
from pathlib import Path

from jsarag.models import resolve_model

for name in ("jsarag/tiny-bert", "jsarag/tiny-gpt2"):
    source = resolve_model(name)
    target = Path(".gpu_carry/models") / source.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
smollm2 = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
for file in smollm2.iterdir():
    if file.suffix in (".json", ".jinja", ".txt", ".model") and "safetensors" not in file.name:
        shutil.copy(file, Path(".gpu_carry/smollm2") / file.name)
PY
du -sh .whl .gpu_carry
