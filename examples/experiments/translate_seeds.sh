#!/usr/bin/env bash
# The README's translation experiments: two attention specs trained side by side (both at once on
# the two cores), one run per seed, then a summary (mean and spread over seeds) by summarize.py.
# Usage, from the build folder's parent:
#   examples/experiments/translate_seeds.sh build/release/examples/translate runs/seeds 6000 \
#       moa:4K8E48D mha:4H32D 1 2 3
set -euo pipefail
program=$1 output=$2 steps=$3 attention=$4 baseline=$5
shift 5
mkdir -p "$output"
for seed in "$@"; do
  "$program" --attention "$attention" --baseline "$baseline" --steps "$steps" --valid-every 500 --checkpoint-every 200 \
      --average-checkpoints 5 --seed "$seed" --output "$output/seed$seed" > "$output/seed$seed.log" 2>&1 ||
    { echo "seed $seed failed: see $output/seed$seed.log" >&2; exit 1; }
  echo "seed $seed done"
done
python3 "$(dirname "$0")/summarize.py" "$output"/seed*/results.json
