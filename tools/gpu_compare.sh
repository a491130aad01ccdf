#!/usr/bin/env bash
# Launch configurations side by side, one a GPU of one host: each runs the workload's quick run
# (llama-3.2-1b shape) with its steps 1200..1239 traced (TOKA_TRACE), then a table of the figures and
# where each traced step's device time went.
#   tools/gpu_compare.sh OUT_DIR WORKLOAD "LAUNCH FLAGS" "LAUNCH FLAGS" ...   ("" = the defaults)
#   e.g. tools/gpu_compare.sh /tmp/c sharegpt-like "" "--decode-attention tensor-cores"
set -uo pipefail
out=${1:?OUT_DIR}; workload=${2:?WORKLOAD}; shift 2
mkdir -p "$out"
m=/tmp/toka-models/llama-3.2-1b
[ -d $m ] || python tools/make_model.py llama-3.2-1b $m --dtype bfloat16 --no-weights > /dev/null
i=0
for flags in "$@"; do
  CUDA_VISIBLE_DEVICES=$i TOKA_TRACE=$out/trace$i:1200:40 timeout ${LANE_TIMEOUT:-540} python tools/bench.py \
    --launch "--model $m --load-format random $flags" --vocab 128000 --workload $workload --quick \
    --out $out/run$i.json > $out/run$i.log 2>&1 &
  i=$((i + 1))
done
wait
i=0
for flags in "$@"; do
  echo "##### GPU $i: ${flags:-defaults}"
  grep -hE "a step|output_tok_s|total_tok_s|mean_running|pct_of_speed_of_light\"|Error" $out/run$i.log | sort -u
  head -8 $out/trace$i/*-steps.txt 2>/dev/null; tail -1 $out/trace$i/*-steps.txt 2>/dev/null
  rm -f $out/trace$i/*-trace.json  # tens of MB each; the summary above is what is kept
  i=$((i + 1))
done
