#!/usr/bin/env bash
# Creates .venv and installs airan with vLLM's CPU build and the test tools.
# Idempotent: re-running only reinstalls when pyproject.toml/setup.py/protos change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${AIRAN_VENV:-.venv}
EXTRAS=${AIRAN_EXTRAS:-cpu,dev}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.airan-installed"
want=$(cat pyproject.toml setup.py protos/airan/v1/*.proto | sha256sum | cut -d' ' -f1)-$EXTRAS
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -f airan/v1/netops_pb2.py ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  # PyPI's torchvision/torchaudio/torchcodec break beside torch+cpu
  # ("operator torchvision::nms does not exist"); vLLM does not need them for text models.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import airan.v1.netops_pb2, vllm, ray" 2>/dev/null \
  || { echo "setup: install is incomplete (airan stubs, vllm or ray missing)" >&2; exit 1; }
