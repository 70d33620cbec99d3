#!/usr/bin/env bash
# Does the benchmark reproduce? Rerun the reference benchmark from scratch into a second folder (its own
# studies; the cached fp32 baseline is reused), then compare it with the committed run figure by figure:
#   bash scripts/bench_reproduce.sh       # writes results/sst2-minilm-rerun/ and results/sst2-minilm/reproduction.md
#   SST2_DIR=/path/to/sst2 RERUN=/tmp/rerun bash scripts/bench_reproduce.sh
# About 90 minutes on a 2-core CPU. Run it on an otherwise idle machine: latency is timed on this CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
RERUN="${RERUN:-results/sst2-minilm-rerun}"
autocompress bench search_spaces/sst2-minilm.yaml --data "${SST2_DIR:-../shared/data/sst2}" --trials-per-technique 5 --out "$RERUN"
autocompress bench-compare results/sst2-minilm "$RERUN" --out results/sst2-minilm/reproduction.md
