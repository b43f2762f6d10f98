#!/usr/bin/env bash
# Gemma 3 270M at 2k on benchmarks/data/test: full KV, StreamingLLM, SnapKV-style and nugget2d (training-free:
# the observation window alone) at 10 % of the global layers' entries. One job at a time, one thread.
set -euo pipefail
export OMP_NUM_THREADS=1
out=benchmarks/models/gemma3-270m/2k
adapter=${ADAPTER:-/tmp/gemma3-training-free}
[ -d "$adapter" ] || python benchmarks/models/training_free_adapter.py --model gemma3-270m --out "$adapter"
common=(--model gemma3-270m --adapter "$adapter" --contexts 2048 --methods full,streaming,snapkv,nugget2d --ratios 0.1)
step=${1:-all}
if [ "$step" = all ] || [ "$step" = ppl ]; then
  nugget2d bench quality "${common[@]}" --metrics ppl,recall_ppl --samples 2 --input benchmarks/data/test/*.txt --out $out/ppl
fi
if [ "$step" = all ] || [ "$step" = qa ]; then
  nugget2d bench quality "${common[@]}" --metrics qa --depths 0.5 --qa-samples 2 --input benchmarks/data/test/*.txt --out $out/qa
fi
if [ "$step" = all ] || [ "$step" = ruler ]; then
  nugget2d bench quality "${common[@]}" --metrics ruler --ruler-tasks niah_single_1 --ruler-samples 2 --out $out/ruler
fi
if [ "$step" = all ] || [ "$step" = speed ]; then
  nugget2d bench speed --model gemma3-270m --adapter "$adapter" --contexts 2048 --methods full,nugget2d --ratios 0.1 --out $out/speed
fi
