#!/usr/bin/env bash
# Each technique alone at three settings on the reference workload (SST-2, all-MiniLM-L6-v2, the
# 2-epoch baseline of search_spaces/sst2-minilm.yaml), then results/techniques.md from that run only.
#   bash scripts/bench_techniques.sh            # data from ../shared/data/sst2
#   SST2_DIR=/path/to/sst2 bash scripts/bench_techniques.sh
# Interrupt and rerun at will: finished trials are kept, the study resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
autocompress search search_spaces/sst2-techniques.yaml --data "${SST2_DIR:-../shared/data/sst2}" "$@"
autocompress table sst2-techniques --out results/techniques.md \
  --title "Each technique alone on SST-2 (all-MiniLM-L6-v2)"
