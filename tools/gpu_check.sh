#!/usr/bin/env bash
# GPU verification in one go: writes random-weight models of real shapes, runs the GPU tests,
# the logprob test in bf16 on them, and the throughput and step benchmarks.
#   tools/gpu_check.sh OUT_DIR [tests|bench|all]
set -uo pipefail
out=${1:?OUT_DIR}; what=${2:-all}
mkdir -p "$out" /tmp/toka-models
m=/tmp/toka-models
status=0
run() { echo "=== $*"; "$@" 2>&1 | tee -a "$out/log.txt"; local rc=${PIPESTATUS[0]}; echo "=== rc=$rc"; [ $rc = 0 ] || status=1; }
[ -d $m/llama-3.2-1b ] || python tools/make_model.py llama-3.2-1b $m/llama-3.2-1b --dtype bfloat16 &
[ -d $m/qwen3-0.6b ] || python tools/make_model.py qwen3-0.6b $m/qwen3-0.6b --dtype bfloat16 &
wait
if [ "$what" = tests ] || [ "$what" = all ]; then
  run python -m pytest -q -x tests/gpu
  for model in qwen3-0.6b llama-3.2-1b; do
    MODEL=$m/$model run python -m pytest tests/test_logprobs.py -k test_logprobs -s -q
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  run python tools/bench_step.py $m/llama-3.2-1b --batches 1,64,256,1024 --context 512 --out "$out/step.json"
  run python tools/bench.py --launch "--model $m/llama-3.2-1b --load-format random" --vocab 128000 \
      --workload random --requests 1024 --input-len 256 --output-len 256 --out "$out/bench.json"
fi
grep -E "token match|tokens, token|TFLOP|^ +[0-9]+ +[0-9]+ |output_tok_s|total_tok_s|mean_running|passed|failed" "$out/log.txt"
exit $status
