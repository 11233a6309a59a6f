#!/usr/bin/env bash
# Installs airan into .venv (idempotent) and runs the whole test suite,
# the slow end-to-end tests (real Ray, vLLM on CPU, gRPC on 127.0.0.1) included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# --durations=15: the slowest tests stay visible in every run
exec .venv/bin/python -m pytest -ra --durations=15 "$@"
