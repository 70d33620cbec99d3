#!/usr/bin/env bash
# One command: set up, then run the test suite (fast tests; add -m slow for the long ones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The scale-out tests run a real Ray cluster and a real PostgreSQL server (tests/test_ray_backend.py,
# tests/test_postgres.py): their optional extras. The server itself is Debian's postgresql package; without
# it that test skips and says so.
pip install -q -e ".[ray,postgres]"
python -m pytest -m "not slow" "$@"
