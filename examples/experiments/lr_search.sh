#!/usr/bin/env bash
# The learning-rate search behind the README's translation experiment, the same for both kinds:
# MoA and MHA trained at once for STEPS steps at each peak learning rate, then each run's valid
# loss (the last checkpoints averaged, as in the experiment). Usage, from the build folder's parent:
#   examples/experiments/lr_search.sh build/release/examples/translate runs/lr 1200 1e-3 2e-3 3e-3 5e-3
set -euo pipefail
program=$1 output=$2 steps=$3
shift 3
mkdir -p "$output"
for lr in "$@"; do
  "$program" --attention moa:4K8E48D --baseline mha:4H32D --steps "$steps" --lr "$lr" --valid-every 200 \
      --checkpoint-every 100 --average-checkpoints 5 --eval-sentences 200 --output "$output/lr$lr" > "$output/lr$lr.log" 2>&1 ||
    { echo "lr $lr failed: see $output/lr$lr.log" >&2; exit 1; }
  python3 - "$lr" "$output/lr$lr/results.json" <<'PY'
import json, sys
runs = json.load(open(sys.argv[2]))["runs"]
print(f"lr {sys.argv[1]}: " + ", ".join(f"{r['model']} valid loss {r['valid_loss']:.3f}" for r in runs))
PY
done
