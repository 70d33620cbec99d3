#!/usr/bin/env bash
# One command: set up, then run the test suite (fast tests; add -m slow for the long ones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -m "not slow" "$@"
