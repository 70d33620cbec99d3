#!/usr/bin/env bash
# One command: set up, then run the reference benchmark of issue 4 into results/sst2-minilm/ (the fp32
# baseline fine-tune is cached and reused; every study resumes where it stopped if interrupted).
#   bash scripts/bench.sh                 # data from ../shared/data/sst2
#   SST2_DIR=/path/to/sst2 bash scripts/bench.sh
# Run it on an otherwise idle machine: latency is timed on this CPU, and concurrent work inflates it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
autocompress bench search_spaces/sst2-minilm.yaml --data "${SST2_DIR:-../shared/data/sst2}" --trials-per-technique 5 "$@"
