#!/usr/bin/env bash
# On a host of 4 GPUs, side by side: the full sharegpt-like run (GPU 0), the full shared-prefix run
# with Hydragen (GPU 1) and the tensor-parallel check at tp 1 and 2 (GPUs 2 and 3); a summary at the end.
#   tools/gpu_host4.sh OUT_DIR
set -uo pipefail
out=${1:?OUT_DIR}; mkdir -p "$out"
python tools/make_model.py llama-3.2-1b /tmp/toka-models/llama-3.2-1b --dtype bfloat16 --no-weights > /dev/null
python tools/make_model.py llama-3.1-8b /tmp/toka-models/llama-3.1-8b --dtype bfloat16 --no-weights > /dev/null
w=/tmp/toka-models/llama-3.1-8b-weights  # written while the first runs go
python tools/make_model.py llama-3.1-8b $w --dtype bfloat16 > "$out/weights.log" 2>&1 &
weights=$!
CUDA_VISIBLE_DEVICES=0 bash tools/gpu_check.sh /tmp/g0 full > "$out/full.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 bash tools/gpu_check.sh /tmp/g1 fullhydragen > "$out/prefix.log" 2>&1 &
( CUDA_VISIBLE_DEVICES=2,3 bash tools/gpu_tp.sh /tmp/tp "1 2" step bench
  while kill -0 $weights 2>/dev/null; do sleep 1; done  # a sibling's child: wait cannot take it
  CUDA_VISIBLE_DEVICES=2,3 WEIGHTS=$w bash tools/gpu_tp.sh /tmp/tp "1 2" agree ) > "$out/tp.log" 2>&1 &
wait
for f in full prefix tp; do
  echo "##### $f"
  grep -E "^=== python tools/bench|total_tok_s|output_tok_s|mean_running|pct_of_speed|\"seconds\"|a step|^tp |batch|^ +[0-9]+ +[0-9]+ |token_match|logprob_diff|\"b\"|Error|error" "$out/$f.log" | grep -v "^=== rc"
done
