#!/usr/bin/env bash
# Install (into .venv) and run the whole test suite, notebooks included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${GIGASSL_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -q "$@"
