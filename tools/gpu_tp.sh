#!/usr/bin/env bash
# Tensor-parallel check on a multi-GPU host: greedy agreement of --tp N with --tp 1 on an 8B-shaped
# random model, then throughput of 1,024 requests of 256 in / 256 out at each tp.
#   tools/gpu_tp.sh OUT_DIR "1 2 4"
set -uo pipefail
out=${1:?OUT_DIR}; tps=${2:-"1 2"}
m=/tmp/toka-models/llama-3.1-8b
mkdir -p "$out"
[ -d $m ] || python tools/make_model.py llama-3.1-8b $m --dtype bfloat16 > /dev/null
others=()
for tp in $tps; do [ "$tp" = 1 ] || others+=(--b "--tp $tp"); done
python -m tools.compare_runs --model $m --a "--tp 1" "${others[@]}" --vocab 128000 --requests 64 \
    --max-tokens 128 --out "$out/agree.json" 2>&1 | grep -E "token_match|\"b\"|divergence|logprob_diff"
for tp in $tps; do
  python -m tools.bench --launch "--model $m --tp $tp --load-format random" --vocab 128000 --workload random \
      --requests 1024 --input-len 256 --output-len 256 --out "$out/bench-tp$tp.json" 2>&1 | grep -E "tok_s|running|seconds|pct_of"
done
