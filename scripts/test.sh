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
# Best effort: the PostgreSQL server for tests/test_postgres.py (as root, from Debian's registry); it skips,
# saying why, where this cannot be done.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -q postgresql >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1)) \
        || echo "note: could not install postgresql; tests/test_postgres.py will skip"
fi
python -m pytest -m "not slow" "$@"
