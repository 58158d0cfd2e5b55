#!/usr/bin/env bash
# Create the virtual environment VENV (default .venv) with furlong and its test tools.
# A machine whose python3 already has torch >= 2.11 keeps that torch (the venv sees the
# system packages); otherwise torch is pinned to 2.13.0. Set TORCH_INDEX (for example
# https://download.pytorch.org/whl/cpu) to take torch from another index.
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
has_torch='import sys, torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)'
if "$PY" -c "$has_torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages "$VENV"
else
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==2.13.0"
fi
"$VENV/bin/pip" install --quiet -e ".[test]"
