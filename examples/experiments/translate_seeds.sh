#!/usr/bin/env bash
# The README's translation experiment: MoA against MHA at equal multiply-adds per token, the demo's
# model trained longer, one run per seed (both models at once on the two cores), then a summary
# (mean and spread over seeds) by summarize.py. Usage, from the build folder's parent:
#   examples/experiments/translate_seeds.sh build/release/examples/translate runs/seeds 6000 1 2 3
set -euo pipefail
program=$1 output=$2 steps=$3
shift 3
mkdir -p "$output"
for seed in "$@"; do
  "$program" --attention moa:4K8E48D --baseline mha:4H32D --steps "$steps" --valid-every 500 --checkpoint-every 200 \
      --average-checkpoints 5 --seed "$seed" --output "$output/seed$seed" > "$output/seed$seed.log" 2>&1 ||
    { echo "seed $seed failed: see $output/seed$seed.log" >&2; exit 1; }
  echo "seed $seed done"
done
python3 "$(dirname "$0")/summarize.py" "$output"/seed*/results.json
