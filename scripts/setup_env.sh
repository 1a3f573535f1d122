#!/usr/bin/env bash
# Create (once) the project's virtual environment and install the package into it.
# torch is pinned first: 2.13.0 is a CPU build on this project's machines; asking pip for an
# unpinned torch would pull a multi-GB CUDA build. On a GPU node install your CUDA torch first.
# GIGASSL_EXTRAS: the optional extras to install (test.sh: test,spconv; spconv installs only on
# x86-64 Linux/Windows, its markers skip it elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GIGASSL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "torch==${GIGASSL_TORCH_VERSION:-2.13.0}"
fi
EXTRAS="${GIGASSL_EXTRAS:-}"
"$VENV/bin/python" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
