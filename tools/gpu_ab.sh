#!/usr/bin/env bash
# The same quick workload served by an earlier commit's code (A) and by this tree (B), alternating
# A B A B on one GPU (ORDER="B A" to start with B), so that the difference can be read against the
# run-to-run spread. The same client (this tree's tools/bench.py) measures both.
#   git archive REV toka workers | tar -x -C build/base   (then copy build/base to the GPU host with the tree)
#   tools/gpu_ab.sh OUT_DIR WORKLOAD "LAUNCH FLAGS" [ROUNDS] [bench flags...]
set -uo pipefail
out=${1:?OUT_DIR}; workload=${2:?WORKLOAD}; flags=${3-}; rounds=${4:-2}; shift 4 2>/dev/null || shift $#
mkdir -p "$out"
m=/tmp/toka-models/llama-3.2-1b
[ -d $m ] || python tools/make_model.py llama-3.2-1b $m --dtype bfloat16 --no-weights > /dev/null
base=${BASE:-$PWD/build/base}; tree=${TREE:-$PWD}  # A's code and B's
[ -d "$base/toka" ] || { echo "no $base: git archive REV toka workers | tar -x -C build/base"; exit 2; }
for round in $(seq "$rounds"); do
  for side in ${ORDER:-A B}; do
    path=$tree; [ $side = A ] && path=$base
    PYTHONPATH=$path:$PYTHONPATH timeout ${RUN_TIMEOUT:-300} python tools/bench.py \
      --launch "--model $m --load-format random $flags" --vocab 128000 --workload "$workload" --quick \
      --out "$out/$side$round.json" "$@" > "$out/$side$round.log" 2>&1
    pgrep -fa "toka.launch|multiprocessing" > "$out/$side$round.left" || true  # nothing should outlive a run
  done
done
python - "$out" <<'PY'
import glob, json, os, sys
rows = sorted(glob.glob(os.path.join(sys.argv[1], "[AB]*.json")))
print(f"{'run':6} {'total tok/s':>12} {'output tok/s':>13} {'seconds':>8}")
for f in rows:
    r = json.load(open(f))
    print(f"{os.path.basename(f)[:-5]:6} {r['total_tok_s']:12.0f} {r['output_tok_s']:13.0f} {r['seconds']:8.1f}")
PY
