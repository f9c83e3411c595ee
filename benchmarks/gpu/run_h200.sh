#!/usr/bin/env bash
# The 8B table in one call on one GPU, in about 8.5 minutes (and up to 200 s more for batches of prompts): benchmarks/run.py on a random-weight Llama
# of Llama-3.1-8B's shape (bf16, built in place), with the default model's tokenizer from
# benchmarks/gpu/tokenizer (its GGUF cannot travel). Targets 1-4 in one process (the model is built
# once), each method time-boxed, every record written to $OUT/bench.json as it is measured; a hard
# `timeout` ends the run in time and keeps what it measured. Uses the machine's torch and transformers.
#
#   WHEELS=gpuwheels benchmarks/gpu/run_h200.sh   # on the GPU machine: $OUT/{bench,batch}.{json,log}, table.md, env.txt
#   benchmarks/gpu/run_h200.sh --shape tiny --device cpu --dtype fp32 --prompt-tokens 64 --reference-tokens 8 \
#     --long-tokens 256 --methods origin,topk,h2o      # test aid: the same steps on a CPU in a few minutes
# Arguments go to benchmarks/run.py after the defaults below (the last of a repeated option wins).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/gpu/out}"
mkdir -p "$OUT"
py="${PYTHON:-python3}"
export FIDBENCH_CACHE="${FIDBENCH_CACHE:-/tmp/fidbench-gpu-cache}" PYTHONUNBUFFERED=1
start=$(date +%s)

# A GPU machine without network that lacks a fidbench dependency (e.g. rapidfuzz, imported by fidbench.metrics):
# bring its wheel in the checkout and name the folder in WHEELS, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 rapidfuzz -d gpuwheels
if [ -n "${WHEELS:-}" ]; then "$py" -m pip install -q --no-deps "$WHEELS"/*.whl >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }; fi
# Where fidbench is not installed yet: no dependencies and no build isolation, so pip takes the machine's
# torch, transformers and setuptools as they are (run.py itself runs from the checkout either way).
"$py" -c "import importlib.metadata as m; m.distribution('fidbench')" 2>/dev/null \
  || "$py" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
"$py" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import fidbench, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(f"fidbench {fidbench.__file__}, torch {torch.__version__}, transformers {transformers.__version__}, gpu {gpu}")
PY

# First origin's target-1 case under torch.profiler (CUDA activities: where the engine's time goes), then
# target 1 for the engine and the methods of the 8B table's rows, 2-3 for every method but the calibrating weight
# methods (gptq, awq, wanda: calibrating an 8B model takes minutes; their prefill and long-prompt rows are
# origin's forward on other weights), 3 at 32,000 tokens, 4 with one prompt per dataset. Measured on the H200
# (benchmarks/LOG.md): targets 1-2 with awq and wanda took 233 s, target 3 about 9 s a method (sage-attention
# 38 s, sparge-attention over 40 s: time-boxed), target 4 79 s.
timeout "${BUDGET:-500}" "$py" benchmarks/run.py --shape 8b --tokenizer benchmarks/gpu/tokenizer --device cuda \
  --dtype bf16 --out "$OUT/bench.json" --targets 1,2,3,4 --repeats 3 --engine-methods origin,topk,snapkv,h2o,tova \
  --skip gptq,awq,wanda,checkpoint,legacy --long-tokens 32000 --suite-limit 1 --time-box 30 --profile origin "$@" 2>&1 \
  | tee "$OUT/bench.log"
echo "run.py exit status: ${PIPESTATUS[0]} (124: stopped by the time limit)" | tee -a "$OUT/bench.log"

# Prompts per forward (--fidbench-batch-size): origin, then an eviction and a low-bit attention method (their hooks
# see each row alone), teacher-forced and free-running over the default suite's first two prompts per dataset at
# batch 1, 8 and 16, side by side, every record written to $OUT/batch.json as it is measured. BATCH_ARGS replaces
# the shape and device (test aid: BATCH_ARGS="--shape tiny --device cpu").
# shellcheck disable=SC2086
timeout "${BATCH_BUDGET:-200}" "$py" benchmarks/batch.py ${BATCH_ARGS:---shape 8b --device cuda --dtype bf16} \
  --tokenizer benchmarks/gpu/tokenizer --variants origin,snapkv-25,fp8-attention --sizes 1 8 16 --limit 2 --repeats 2 \
  --out "$OUT/batch.json" 2>&1 | tee "$OUT/batch.log"
echo "batch.py exit status: ${PIPESTATUS[0]} (124: stopped by the time limit)" | tee -a "$OUT/batch.log"

[ -f "$OUT/bench.json" ] && "$py" benchmarks/run.py --show --out "$OUT/bench.json" | tee "$OUT/table.md"
echo "run_h200.sh took $(( $(date +%s) - start )) s"
