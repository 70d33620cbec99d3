#!/usr/bin/env bash
# One command: set up, then run the quick SST-2 search with the packaged all-MiniLM-L6-v2.
#   bash scripts/quickstart.sh            # data from ../shared/data/sst2
#   SST2_DIR=/path/to/sst2 bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
autocompress search search_spaces/sst2-quick.yaml --data "${SST2_DIR:-../shared/data/sst2}" "$@"
