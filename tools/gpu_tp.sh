#!/usr/bin/env bash
# Tensor-parallel check on a multi-GPU host, Llama-3.1-8B shape: the decode step at each tp against
# its floor (with the all-reduces' own time), throughput of 1,024 requests of 256 in / 256 out at each
# tp, then greedy agreement of --tp N with --tp 1 (free-running and teacher-forced) on written weights.
#   tools/gpu_tp.sh OUT_DIR "1 2 4" [step] [bench] [agree]
set -uo pipefail
out=${1:?OUT_DIR}; tps=${2:-"1 2"}; shift $(( $# < 2 ? $# : 2 )); what=" ${*:-step bench agree} "
want() { [[ "$what" == *" $1 "* ]]; }
m=/tmp/toka-models/llama-3.1-8b
mkdir -p "$out"
[ -f $m/config.json ] || python tools/make_model.py llama-3.1-8b $m --dtype bfloat16 --no-weights > /dev/null
if want step; then
  for tp in $tps; do
    python tools/bench_step.py $m --tp $tp --batches 64,256,768 --context 512 --out "$out/step-tp$tp.json" 2>&1 \
      | grep -E "^tp |^ +batch|^ +[0-9]+ +[0-9]+ |Error"
  done
fi
if want bench; then
  for tp in $tps; do
    python -m tools.bench --launch "--model $m --tp $tp --load-format random" --vocab 128000 --workload random \
        --requests 1024 --input-len 256 --output-len 256 --out "$out/bench-tp$tp.json" 2>&1 \
        | grep -E "tok_s|running|seconds|pct_of|a step|Error"
  done
fi
if want agree; then  # the same weights at every tp: written ones (WEIGHTS=DIR if already made)
  w=${WEIGHTS:-$m-weights}
  [ -n "${WEIGHTS:-}" ] || python tools/make_model.py llama-3.1-8b $w --dtype bfloat16 > /dev/null
  others=()
  for tp in $tps; do [ "$tp" = 1 ] || others+=(--b "--tp $tp"); done
  python -m tools.compare_runs --model $w --a "--tp 1" "${others[@]}" --vocab 128000 --requests 64 \
      --max-tokens 128 --out "$out/agree.json" 2>&1 | grep -E "token_match|\"b\"|divergence|logprob_diff|Error"
fi
