#!/usr/bin/env bash
# Does the benchmark reproduce? Rerun the reference benchmark from scratch into a second folder (its own
# studies; the cached fp32 baseline is reused), then compare it with the committed run figure by figure:
#   bash scripts/bench_reproduce.sh       # writes results/sst2-minilm-rerun/ and results/sst2-minilm/reproduction.md
#   SST2_DIR=/path/to/sst2 RERUN=/tmp/rerun bash scripts/bench_reproduce.sh
# About 90 minutes on a 2-core CPU. Run it on an otherwise idle machine: latency is timed on this CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
RERUN="${RERUN:-results/sst2-minilm-rerun}"
bash scripts/bench.sh --out "$RERUN"   # the same command as the committed run, into another folder
.venv/bin/autocompress bench-compare results/sst2-minilm "$RERUN" --out results/sst2-minilm/reproduction.md
