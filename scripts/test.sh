#!/usr/bin/env bash
# Install (into .venv) and run the whole test suite, notebooks included — twice where spconv
# installs: once with it (its reference tests run; a missing spconv is an error there), and once
# with spconv hidden (tests/no_spconv), so that the pure-PyTorch backend carries the whole suite,
# demo and notebooks. Tests marked `cuda` are deselected without a GPU, `shared_data` without
# ../shared/data (an error under GIGASSL_REQUIRE_SHARED_DATA=1, as .ci/run sets); counts are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
GIGASSL_EXTRAS="${GIGASSL_EXTRAS:-test,spconv}" bash scripts/setup_env.sh
VENV="${GIGASSL_VENV:-.venv}"
PY="$VENV/bin/python"
echo "== lint: ruff check (settings in pyproject.toml)"
"$PY" -m ruff check src tests benchmarks
echo "== format: ruff format --check (run \`ruff format src tests benchmarks\` to apply)"
"$PY" -m ruff format --check src tests benchmarks
echo "== types: mypy over src/ (settings in pyproject.toml)"
"$PY" -m mypy
if "$PY" -c "import spconv.pytorch" 2>/dev/null; then
    echo "== pass 1 of 2: spconv installed (reference tests included)"
    GIGASSL_REQUIRE_SPCONV=1 "$PY" -m pytest -q "$@"
    echo "== pass 2 of 2: spconv hidden (pure-PyTorch sparse backend only)"
    export PYTHONPATH="$PWD/tests/no_spconv${PYTHONPATH:+:$PYTHONPATH}"
    if "$PY" -c "import spconv" 2>/dev/null; then echo "tests/no_spconv failed to hide spconv" >&2; exit 1; fi
    exec "$PY" -m pytest -q "$@"
fi
echo "== spconv does not install on this platform: one pass, pure-PyTorch sparse backend"
exec "$PY" -m pytest -q "$@"
