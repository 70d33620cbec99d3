#!/usr/bin/env bash
# Create .venv (if missing) and install autocompress with its test extras.
# PyTorch: keeps an existing install; otherwise takes a local CPU wheel where one is offered
# (probed with pip download --no-index, i.e. find-links only) and falls back to PyTorch's CPU index. Unpinned "torch" from
# PyPI would pull several GB of CUDA packages, so it is never installed that way here.
# GPU users: install the torch build you want into .venv first; this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing CPU PyTorch"
  version="${AUTOCOMPRESS_TORCH_VERSION:-2.13.0}"
  probe="$(mktemp -d)"
  if pip download -q --no-index --no-deps -d "$probe" "torch==$version" >/dev/null 2>&1; then
    pip install -q "torch==$version"   # the local CPU wheel (find-links); its dependencies from the index
  else
    pip install -q torch --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
  rm -rf "$probe"
fi
echo "setup: installing autocompress and its dependencies"
pip install -q -e ".[dev,onnx]"
