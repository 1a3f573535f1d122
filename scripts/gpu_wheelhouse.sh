#!/usr/bin/env bash
# Prepare .whl/: the wheels the lent GPU machine lacks, to install there with no network.
#
# That machine: x86-64 Linux, CPython 3.12.3, a CUDA torch 2.11.0 preinstalled, and in its
# image h5py, numpy, scikit-learn, scipy, threadpoolctl, matplotlib, pillow, tifffile, tqdm,
# einops, pytest, packaging, pyyaml (and their own dependencies) — the IMAGE list below.
# What we need beyond it is computed, not hand-listed: pyproject.toml's `dependencies`
# (markers evaluated for that machine), minus IMAGE, plus TEST_NEEDS (packages a test module
# imports at collection time: tests/test_loss.py imports pytorch_metric_learning). spconv is
# not fetched: it is an optional extra and its py3.12 wheels (spconv-cu126 + cumm-cu126,
# ~98 MB) do not fit; the GPU check runs the pure-PyTorch backend.
#
# Steps: 1. add /.whl/ to the repository's info/exclude (.git/info/exclude in a clone), so
# the wheels are never committed; 2. `pip download --no-deps --only-binary=:all:` each
# requirement as a manylinux x86-64 CPython 3.12 wheel into .whl/ (emptied first);
# 3. read each wheel's METADATA: a Requires-Dist (markers evaluated for that machine, extras
# ignored) that is neither in IMAGE nor in .whl/ is reported and downloaded too, until none is
# missing (e.g. kornia -> kornia-rs); fail if a torch requirement excludes TORCH_VERSION or a
# Requires-Python excludes 3.12.3; 4. print the files and the total size, failing above
# WHEELHOUSE_LIMIT_MIB (60 MiB: what can be carried to that machine). Versions are the newest
# that pyproject's specifiers allow; the image's own versions are not checked (names only).
#
#   bash scripts/gpu_wheelhouse.sh            # needs the package index (PyPI)
# then, on the GPU machine (the folder is ignored, so name it in the device tool's `carry`):
#   python3 -m pip install --no-index --find-links .whl --no-deps .whl/*.whl
#   python3 -m pip install --no-deps --no-build-isolation -e .
#
# Settings (environment): PYTHON (an interpreter with pip and packaging; default python3),
# PYPROJECT (default pyproject.toml), WHEELHOUSE (default .whl), WHEELHOUSE_LIMIT_MIB (60),
# TORCH_VERSION (2.11.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST="${WHEELHOUSE:-.whl}"
LIMIT_MIB="${WHEELHOUSE_LIMIT_MIB:-60}"
export TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
# What the image has, and the dependencies those packages install with them (names only).
export IMAGE="torch h5py numpy scikit-learn scipy threadpoolctl matplotlib pillow tifffile tqdm
  einops pytest packaging pyyaml
  filelock typing-extensions sympy mpmath networkx jinja2 markupsafe fsspec setuptools triton
  joblib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six
  iniconfig pluggy pygments"
export TEST_NEEDS="pytorch-metric-learning>=2.0"
PYPROJECT="${PYPROJECT:-pyproject.toml}"  # relative to the repository root
case "$DEST" in /*|*..*|"") echo "gpu_wheelhouse: WHEELHOUSE must be a folder inside the repository" >&2; exit 2;; esac

# 1. never commit the wheels
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >> "$exclude"

# The machine's PEP 508 environment, for the markers of pyproject and of Requires-Dist.
export TARGET_ENV='{"implementation_name": "cpython", "implementation_version": "3.12.3",
  "os_name": "posix", "platform_machine": "x86_64", "platform_python_implementation": "CPython",
  "platform_release": "", "platform_system": "Linux", "platform_version": "",
  "python_full_version": "3.12.3", "python_version": "3.12", "sys_platform": "linux"}'

# 2. what we need beyond the image: pyproject's dependencies for that machine, minus IMAGE
needs_text="$("$PY" - "$PYPROJECT" <<'EOF'
import json, os, sys
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
env = json.loads(os.environ["TARGET_ENV"])
image = {canonicalize_name(n) for n in os.environ["IMAGE"].split()}
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for text in deps + os.environ["TEST_NEEDS"].split():
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate(env):
        continue
    if canonicalize_name(req.name) in image:
        continue
    req.marker = None
    print(req)
EOF
)"
mapfile -t NEEDS < <(awk 'NF && !seen[$0]++' <<< "$needs_text")
[ "${#NEEDS[@]}" -gt 0 ] || { echo "gpu_wheelhouse: nothing to fetch?" >&2; exit 1; }
echo "needed beyond the image (from $PYPROJECT): ${NEEDS[*]}"

rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for n in 28 27 26 25 24 23 22 21 20 19 18 17 12 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
download() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$DEST" "$@"
}

# 3. every Requires-Dist of every wheel (markers for that machine, no extras) must be in the
# image or in $DEST: what is missing is printed, downloaded, and checked in turn (5 rounds at most)
check() {
    "$PY" - "$DEST" <<'EOF'
import json, os, sys, zipfile
from email.parser import Parser
from pathlib import Path
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

dest = Path(sys.argv[1])
env = json.loads(os.environ["TARGET_ENV"]) | {"extra": ""}
image = {canonicalize_name(n) for n in os.environ["IMAGE"].split()}
torch_version = os.environ["TORCH_VERSION"]
wheels = sorted(dest.glob("*.whl"))
have = {parse_wheel_filename(w.name)[0] for w in wheels}
missing, problems = {}, []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    rp = meta.get("Requires-Python")
    if rp and "3.12.3" not in SpecifierSet(rp):
        problems.append(f"{wheel.name}: Requires-Python {rp} excludes 3.12.3")
    for text in meta.get_all("Requires-Dist") or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name == "torch" and req.specifier and torch_version not in req.specifier:
            problems.append(f"{wheel.name}: needs {req}, the machine has torch {torch_version}")
        if name not in image and name not in have:
            req.marker = None
            missing.setdefault(name, (str(req), wheel.name))
for p in problems:
    print(f"gpu_wheelhouse: {p}", file=sys.stderr)
for req, by in missing.values():
    print(f"gpu_wheelhouse: {by} needs {req}: not in the image, fetching it", file=sys.stderr)
    print(req)
sys.exit(1 if problems else 0)
EOF
}
download "${NEEDS[@]}"
missing_file="$(mktemp)"
trap 'rm -f "$missing_file"' EXIT
for round in 1 2 3 4 5; do
    check > "$missing_file" || exit 1
    mapfile -t MORE < "$missing_file"
    [ "${#MORE[@]}" -eq 0 ] && break
    [ "$round" -eq 5 ] && { echo "gpu_wheelhouse: still missing after 5 rounds: ${MORE[*]}" >&2; exit 1; }
    download "${MORE[@]}"
done

# 4. the list and the size
"$PY" - "$DEST" "$LIMIT_MIB" <<'EOF'
import sys
from pathlib import Path
dest, limit_mib = Path(sys.argv[1]), float(sys.argv[2])
wheels = sorted(dest.glob("*.whl"))
total = sum(w.stat().st_size for w in wheels)
for w in wheels:
    print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
print(f"{total / 2**20:8.2f} MiB  total in {dest}/ ({len(wheels)} wheels; limit {limit_mib:g} MiB)")
if total > limit_mib * 2**20:
    sys.exit(f"gpu_wheelhouse: {total / 2**20:.1f} MiB is over the {limit_mib:g} MiB limit")
EOF
