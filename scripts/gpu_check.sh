#!/usr/bin/env bash
# The GPU check, for a CUDA machine with Python ≥ 3.10 and a CUDA torch preinstalled and no network
# (the lent H200: Python 3.12, torch 2.11+cu130). Prepare the wheels here first, on a machine with
# network: `bash scripts/gpu_wheelhouse.sh` (→ .whl/, ~10 MiB); carry .whl with the working tree.
#   bash scripts/gpu_check.sh [WHEELHOUSE]
# Installs the missing wheels into a private folder (no dependency resolution, nothing touched in
# the system site-packages), runs the tests marked `cuda`, then prints the GPU figures. ~5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-.whl}"
SITE="${GIGASSL_GPU_SITE:-/tmp/gigassl-gpu-site}"
PY="${PYTHON:-python3}"
"$PY" -c "import torch, sys; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.__version__, torch.cuda.get_device_name(), sys.version.split()[0])"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
echo "== tests marked cuda"
"$PY" -m pytest -q -o addopts="" -p no:cacheprovider -m cuda tests/test_cuda.py
echo "== GPU figures"
"$PY" benchmarks/bench_gpu.py --slides "${GIGASSL_SLIDES:-../shared/data/slides}"
"$PY" benchmarks/bench_train.py --device cuda --threads 8 --workers 4 --epochs 4
