#!/usr/bin/env bash
# The GPU checks of issue 26 in one run, each step capped so that the whole stays inside BUDGET seconds:
# per-head kernel parity with eager on CUDA (pytest -m gpu), `nugget2d bench speed` (full / ideal /
# nugget2d, r = 0.1, bf16) with the sdpa and flex backends, and the ragged-head read benchmark.
# The model is SmolLM2-135M's shape with random weights and a random per-head adapter
# (benchmarks/gpu/make_model.py says why). flash-attn is not installed on the device: not measured.
#
# Here first: bash benchmarks/gpu/prepare.sh; then on the device (repository root, carry .gpu_carry and .whl):
#   bash benchmarks/gpu/run_gpu.sh "$OUT" [BUDGET_S=400]
# Contexts: CTX="8192 32768 16384 65536" (sdpa, in that order), FLEX_CTX="" (none), HEADS_CTX="8192,32768";
# READING=whole (compressing methods read the context whole, then compress once; "stream" streams it);
# PARITY=0 skips the sdpa/eager parity tests.
set -u
OUT=${1:?usage: run_gpu.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-400}
CTX=${CTX:-8192 32768 16384 65536}
FLEX_CTX=${FLEX_CTX:-}
READING=${READING:-whole}
HEADS_CTX=${HEADS_CTX:-8192,32768}
DECODE=${DECODE:-32}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false USE_HUB_KERNELS=0  # no hub kernels: nothing to fetch
start=$SECONDS
PY=${PY:-python3}

step() {  # step NAME CAP CMD...: run CMD for at most CAP s (less when the budget runs short), logged
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - 25 - (SECONDS - start)))  # 25 s kept for the merges at the end
  ((left < cap)) && cap=$left
  if ((cap < 20)); then
    echo "== $name: skipped, budget spent" | tee -a "$LOG"
    return
  fi
  echo "== $name (cap ${cap}s) at $((SECONDS - start))s: $*" >>"$LOG"
  timeout -k 5 "$cap" "$@" >>"$LOG" 2>&1
  local status=$?
  echo >>"$LOG"  # progress bars end without a newline
  echo "== $name: exit $status at $((SECONDS - start))s" | tee -a "$LOG"
}

# nugget2d without pip: its package directories linked under one name; platformdirs from the carried wheel
pkg=$(mktemp -d)
mkdir -p "$pkg/nugget2d"
for part in compress runtime serve ds_configs; do ln -s "$PWD/$part" "$pkg/nugget2d/$part"; done
site=$(mktemp -d)
[ -d .whl ] && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
export PYTHONPATH="$pkg:$site:${PYTHONPATH:-}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
  $PY -c "import flash_attn" 2>&1 | tail -1
} >>"$LOG" 2>&1

work=$(mktemp -d)
model="$work/model"
adapter="$work/adapter"
step model 90 $PY benchmarks/gpu/make_model.py .gpu_carry/smollm2-shape "$model" "$adapter"
bench() {  # bench BACKEND CONTEXT REPEATS CAP: full / ideal / nugget2d at one context, its own process (a step)
  step "speed $1 $2" "$4" $PY benchmarks/gpu/speed.py "$model" "$adapter" "$1" "$2" "$3" "$DECODE" \
    "$work/speed-$1/c$2" "$READING"
}
[ "${PARITY:-1}" = 1 ] && step parity 90 $PY -m pytest -q -m gpu -p no:cacheprovider -k "not flex" \
  tests/test_per_head.py tests/test_attention.py
set -- $CTX
bench sdpa "$1" 2 60
step heads 70 $PY benchmarks/heads/batched_read.py --out "$OUT/heads.json" --contexts "$HEADS_CTX" --backends sdpa \
  --candidates loop,buckets:1024,padded,whole --steps 16 --rounds 3 --model "$model" --adapter "$adapter" \
  --reading "$READING"
shift
for context in "$@"; do bench sdpa "$context" 1 140; done
for context in $FLEX_CTX; do bench flex "$context" 1 100; done
step "parity flex" 40 $PY -m pytest -q -m gpu -p no:cacheprovider -k flex tests/test_per_head.py tests/test_attention.py

for backend in sdpa flex; do  # each backend's contexts in one JSON and PNG
  runs=$(ls -d "$work/speed-$backend"/c*/ 2>/dev/null)
  [ -n "$runs" ] && timeout 20 $PY -m nugget2d.runtime.cli bench merge $runs --out "$OUT/speed-$backend" >>"$LOG" 2>&1
done
echo "== done at $((SECONDS - start))s" | tee -a "$LOG"
