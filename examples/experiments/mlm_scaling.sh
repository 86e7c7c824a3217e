#!/usr/bin/env bash
# The README's masked-LM scaling experiment: at fixed top-k and head width (fixed multiply-adds per
# token), MoA with E = 4, 8, 16, 32 experts, and MHA, one run per seed, then a summary by
# summarize_mlm.py (perplexity and tokens/s against E). Usage, from the build folder's parent:
#   examples/experiments/mlm_scaling.sh build/release/examples/mlm runs/mlm_scaling 1000 1 2 3
# SPECS replaces the list of specs, e.g. SPECS="moa-ec:4K8E48D moa-ec:4K8E48D:largest".
set -euo pipefail
program=$1 output=$2 steps=$3
shift 3
mkdir -p "$output"
for seed in "$@"; do
  for spec in ${SPECS:-moa:4K4E48D moa:4K8E48D moa:4K16E48D moa:4K32E48D mha:4H32D}; do
    folder="$output/${spec//:/_}_seed$seed"
    "$program" --attention "$spec" --steps "$steps" --valid-every 250 --seed "$seed" --threads 2 \
        --output "$folder" > "$folder.log" 2>&1 || { echo "$spec seed $seed failed: see $folder.log" >&2; exit 1; }
    echo "$spec seed $seed done"
  done
done
python3 "$(dirname "$0")/summarize_mlm.py" "$output" "$output"/*_seed*/results.json
