#!/usr/bin/env bash
# GPU verification in one go: writes random-weight models of real shapes, runs the GPU tests, the
# logprob test in bf16 on them, the decode step sweep (with a host/kernel profile) and the
# throughput benchmarks (TOKA_PROFILE: one cProfile per process).
#   tools/gpu_check.sh OUT_DIR [tests|step|mixed|bench|workloads|ahead|sharing|unshared|full|fullprefix|fullhydragen|profile|all]...
set -uo pipefail
out=${1:?OUT_DIR}; shift; what=" ${*:-all} "
mkdir -p "$out" /tmp/toka-models
m=/tmp/toka-models
status=0
run() { echo "=== $*"; "$@" 2>&1 | tee -a "$out/log.txt"; local rc=${PIPESTATUS[0]}; echo "=== rc=$rc"; [ $rc = 0 ] || status=1; }
want() { [[ "$what" == *" $1 "* || "$what" == *" all "* ]]; }
need() {  # need MODEL yes|no: write MODEL unless its folder is there (with weights, for yes)
  [ -d $m/$1 ] && { [ $2 = no ] || compgen -G "$m/$1/*.safetensors" > /dev/null; } && return
  python tools/make_model.py $1 $m/$1 --dtype bfloat16 > /dev/null &
}
want tests && need llama-3.2-1b yes || need llama-3.2-1b no  # the logprob test needs written weights
want tests && need qwen3-0.6b yes
wait
if want tests; then
  run python -m pytest -q tests/gpu
  for model in qwen3-0.6b llama-3.2-1b; do
    MODEL=$m/$model run python -m pytest tests/test_logprobs.py -k test_logprobs -s -q
  done
fi
if want mixed; then  # steps as in sharegpt-like: ~2,000 decode rows and ~2,000 prompt tokens
  run python tools/bench_step.py $m/llama-3.2-1b --batches 1024,2048 --context 384 --prefill-tokens 2048 --profile \
      --out "$out/mixed.json"
fi
if want step; then
  run python tools/bench_step.py $m/llama-3.2-1b --batches 1,64,256,1024,2048 --context 512 --profile \
      --out "$out/step.json"
fi
bench() {  # bench WORKLOAD NAME "LAUNCH FLAGS" [bench flags]: one run through the API, llama-3.2-1b shape
  local workload=$1 name=$2 flags=$3; shift 3
  run python tools/bench.py --launch "--model $m/llama-3.2-1b --load-format random $flags" --vocab 128000 \
      --workload "$workload" --out "$out/$name.json" "$@"
}
want bench && bench random random-1024 "" --requests 1024 --input-len 256 --output-len 256
want workloads && bench sharegpt-like sharegpt-quick "" --quick
want ahead && bench sharegpt-like sharegpt-quick-ahead2 "--steps-ahead 2" --quick
if want sharing; then
  bench shared-prefix shared-prefix-quick-cached "" --quick
  bench shared-prefix shared-prefix-quick-hydragen "--hydragen" --quick
fi
want unshared && bench shared-prefix shared-prefix-quick-unshared "--no-prefix-caching" --quick
want full && bench sharegpt-like sharegpt-full ""
want fullprefix && bench shared-prefix shared-prefix-full ""
want fullhydragen && bench shared-prefix shared-prefix-full-hydragen "--hydragen"
if want profile; then  # cProfile slows Python several times: for where time goes, not for figures
  TOKA_PROFILE=$out/prof bench sharegpt-like sharegpt-4096-profiled "" --requests 4096
  for f in "$out"/prof/*.prof; do
    python -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(18)" "$f" \
      >> "$out/profiles.txt"
  done
fi
grep -E "^=== python tools/bench.py|token_match|TFLOP|^ +[0-9]+ +[0-9]+ |output_tok_s|total_tok_s|mean_running|pct_of_speed|passed|failed|a step" "$out/log.txt"
exit $status
