#!/usr/bin/env python3
"""Check that gigassl's dependencies install from wheels on every platform we claim.

For each target platform (macOS arm64, macOS x86-64, Linux aarch64, Linux x86-64,
Windows x86-64) and each CPython (3.10, 3.11, 3.12) this runs one resolver pass of
pip that installs nothing and, where the index serves it, downloads no wheel::

    pip install --dry-run --ignore-installed --only-binary=:all: \\
        --platform TAG [--platform TAG ...] --python-version X.Y --implementation cp \\
        --target TMP --report REPORT.json --use-feature=fast-deps -v REQUIREMENTS

and prints a markdown table: one row per platform, one column per Python, each cell
``✓`` or ``✗`` with the package that has no usable wheel and why. It exits 1 if any
cell fails, 2 on a usage error.

    python scripts/check_wheels.py                       # today's pyproject.toml
    python scripts/check_wheels.py --extras spconv       # plus an optional extra
    python scripts/check_wheels.py --pyproject /tmp/planned.toml --details
    python scripts/check_wheels.py --targets linux-x86_64 --pythons 3.12

What is checked
    ``project.dependencies`` of ``--pyproject`` (read at run time, so the check
    follows whatever the file says), plus ``project.optional-dependencies[E]`` for
    each ``--extras E``, and every transitive dependency pip resolves for them.
    ``--only-binary=:all:`` means an sdist never counts: a package counts as
    installable only through a platform wheel or a pure-Python (``py3-none-any``)
    wheel. The resolved set (from ``--report``) is checked to be wheels only.

Environment markers (the trap this script exists to avoid)
    ``--platform``/``--python-version`` change only which wheel *tags* pip accepts
    (and the Requires-Python check). pip evaluates environment markers (``;
    sys_platform == 'linux'``, ``platform_machine == 'x86_64'`` ...) against the
    interpreter that runs it, both in our requirements and in every dependency's
    Requires-Dist. Run from Linux x86-64, pip would therefore drop spconv's
    ``platform_machine`` guard wrongly and ask macOS for torch's Linux-only
    ``nvidia-*``/``cuda-bindings`` wheels (a false failure). Two measures:

    1. our own requirements are filtered here with
       ``packaging.markers.Marker.evaluate(env)`` against the *target's* PEP 508
       environment (``marker_environment``) and passed to pip without markers;
    2. pip itself runs through a small wrapper that replaces
       ``pip._vendor.packaging.markers.default_environment`` with the same target
       environment, so transitive markers are evaluated for the target too (pip's
       report echoes the environment it used under ``"environment"``; this script
       checks that it is the target's). If a future pip moves that function, the
       wrapper fails loudly rather than checking the wrong platform.

    What cannot be handled: ``platform_release``/``platform_version`` are
    placeholder values (no package we use keys on them), ``python_full_version``
    is ``X.Y.0``.

Platform tags
    Linux: ``manylinux_2_N`` for N from 2.5 (x86-64) / 2.17 (aarch64) up to
    ``--glibc`` (default 2.28: RHEL/Rocky 8, Debian 10, Ubuntu 20.04 and newer)
    plus the legacy ``manylinux1/2010/2014`` aliases — pip does not expand
    ``manylinux_2_N`` tags itself. macOS: up to ``macosx_14_0_arm64`` and
    ``macosx_13_0_x86_64`` (pip also expands each to the older versions and
    ``universal2``). Windows: ``win_amd64``. musllinux (Alpine) is not a target.

Network and time
    Needs the package index (PyPI by default; pip's own configuration files and
    ``PIP_*`` variables are ignored so a local wheel folder or constraint file of
    this machine cannot change the answer; ``--use-pip-config`` keeps them). Only
    metadata is fetched: from PEP 658 ``.metadata`` files where the index serves them,
    otherwise (``--use-feature=fast-deps``) by HTTP range requests of the few KiB at
    the end of each wheel — pip's ``-v`` log says "Obtaining dependency information"
    for each; a full download would log "Downloading NAME.whl" and is counted in the
    ``--details`` output (expected 0). 15 cells run 2 at a time in a few minutes.
    Linux x86-64 resolves torch to its CUDA build with the ``nvidia-*`` wheels: that
    is expected, and only their metadata is read.

Requires Python >= 3.10 with pip >= 23 and ``packaging``; Python 3.11+ (``tomllib``)
or ``tomli`` to read the pyproject.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.10", "3.11", "3.12")
MAX_RETRIES = 4  # extra pip runs per cell to find further failing top-level packages


@dataclass(frozen=True)
class Target:
    """A platform: a name for the table, pip's ``--platform`` tags, PEP 508 values."""

    key: str
    label: str
    os_name: str
    sys_platform: str
    platform_system: str
    platform_machine: str
    platform_release: str
    platform_version: str


TARGETS = (
    Target("macos-arm64", "macOS arm64", "posix", "darwin", "Darwin", "arm64",
           "23.6.0", "Darwin Kernel Version 23.6.0"),
    Target("macos-x86_64", "macOS x86-64", "posix", "darwin", "Darwin", "x86_64",
           "22.6.0", "Darwin Kernel Version 22.6.0"),
    Target("linux-aarch64", "Linux aarch64", "posix", "linux", "Linux", "aarch64",
           "5.14.0", "#1 SMP"),
    Target("linux-x86_64", "Linux x86-64", "posix", "linux", "Linux", "x86_64",
           "5.14.0", "#1 SMP"),
    Target("windows-amd64", "Windows x86-64", "nt", "win32", "Windows", "AMD64",
           "10", "10.0.19045"),
)
TARGETS_BY_KEY = {t.key: t for t in TARGETS}


def platform_tags(target: Target, glibc: tuple[int, int] = (2, 28)) -> list[str]:
    """The ``--platform`` values for ``target``, most specific first."""
    if target.sys_platform == "linux":
        arch = target.platform_machine
        lowest = 5 if arch == "x86_64" else 17  # aarch64 starts at manylinux2014
        tags = [f"manylinux_{glibc[0]}_{n}_{arch}" for n in range(glibc[1], lowest - 1, -1)]
        legacy = {"x86_64": ["manylinux2014", "manylinux2010", "manylinux1"],
                  "aarch64": ["manylinux2014"]}[arch]
        return tags + [f"{name}_{arch}" for name in legacy]
    if target.sys_platform == "darwin":
        if target.platform_machine == "arm64":
            versions = ["14_0", "13_0", "12_0", "11_0"]
        else:
            versions = ["13_0", "12_0", "11_0", "10_15", "10_13", "10_9"]
        return [f"macosx_{v}_{target.platform_machine}" for v in versions]
    if target.sys_platform == "win32":
        return ["win_amd64"]
    raise ValueError(f"no tags for {target}")


def marker_environment(target: Target, python: str) -> dict[str, str]:
    """The PEP 508 marker environment of CPython ``python`` ("3.12") on ``target``."""
    full = f"{python}.0"
    return {
        "implementation_name": "cpython",
        "implementation_version": full,
        "os_name": target.os_name,
        "platform_machine": target.platform_machine,
        "platform_python_implementation": "CPython",
        "platform_release": target.platform_release,
        "platform_system": target.platform_system,
        "platform_version": target.platform_version,
        "python_full_version": full,
        "python_version": python,
        "sys_platform": target.sys_platform,
    }


def read_requirements(pyproject: Path, extras: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``project.dependencies`` plus the named optional extras, as written (markers kept).

    A self-reference such as ``gigassl[spconv]`` inside an extra is expanded.
    Raises ``KeyError`` for an extra that the file does not define.
    """
    project = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))["project"]
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(reqs: list[str]) -> None:
        for text in reqs:
            req = Requirement(text)
            if canonicalize_name(req.name) == name:
                add_extras(sorted(req.extras))
            elif text not in out:
                out.append(text)

    def add_extras(names: list[str]) -> None:
        for extra in names:
            if extra in seen_extras:
                continue
            if extra not in optional:
                raise KeyError(f"{pyproject} defines no extra {extra!r} "
                               f"(it has: {', '.join(sorted(optional)) or 'none'})")
            seen_extras.add(extra)
            add(optional[extra])

    add(project.get("dependencies", []))
    add_extras(list(extras))
    return out


def requirements_for(requirements: list[str], env: dict[str, str]) -> list[str]:
    """The requirements whose markers hold in ``env``, with the markers removed."""
    kept = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not Marker(str(req.marker)).evaluate(env):
            continue
        req.marker = None
        kept.append(str(req))
    return kept


# Run pip with the target's marker environment (see the module docstring).
PIP_WRAPPER = r"""
import json, sys
import pip._vendor.packaging.markers as markers
if not callable(getattr(markers, "default_environment", None)):
    sys.exit("check_wheels: this pip has no packaging.markers.default_environment to patch")
_env = markers.default_environment()
_env.update(json.loads(sys.argv[1]))
markers.default_environment = lambda: dict(_env)
from pip._internal.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def pip_command(python_exe: str, target: Target, python: str, requirements: list[str],
                workdir: Path, glibc: tuple[int, int] = (2, 28),
                index_url: str | None = None) -> list[str]:
    """The argv of one dry-run resolve (through ``PIP_WRAPPER``)."""
    cmd = [python_exe, "-c", PIP_WRAPPER, json.dumps(marker_environment(target, python)),
           "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp",
           "--target", str(workdir / "target"), "--report", str(workdir / "report.json"),
           "--use-feature=fast-deps", "--no-input", "--progress-bar", "off", "-v"]
    for tag in platform_tags(target, glibc):
        cmd += ["--platform", tag]
    if index_url:
        cmd += ["--index-url", index_url]
    return cmd + requirements


def pip_environment(use_pip_config: bool) -> dict[str, str]:
    """os.environ, without pip's configuration unless ``use_pip_config``."""
    env = dict(os.environ)
    if not use_pip_config:
        keep = {"PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_CLIENT_CERT"}
        env = {k: v for k, v in env.items() if not k.startswith("PIP_") or k in keep}
        env["PIP_CONFIG_FILE"] = os.devnull  # pip then loads no configuration file
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


_NO_VERSION = re.compile(
    r"Could not find a version that satisfies the requirement (?P<req>\S+)"
    r"(?: \(from (?P<parent>[^)]*)\))? \(from versions: (?P<versions>[^)]*)\)")
_NETWORK = re.compile(r"Could not fetch URL|NewConnectionError|ConnectTimeout|"
                      r"Max retries exceeded|Temporary failure in name resolution")


def explain_failure(log: str) -> tuple[str | None, str]:
    """(failing requirement's name or None, short reason) from pip's output."""
    if _NETWORK.search(log):
        line = next(ln for ln in log.splitlines() if _NETWORK.search(ln))
        return None, f"network error: {line.strip()[:160]}"
    match = _NO_VERSION.search(log)
    if match:
        req = match["req"]
        name = Requirement(req).name if _valid(req) else req
        versions = [v.strip() for v in match["versions"].split(",") if v.strip()]
        if not versions or versions == ["none"]:
            why = "no wheel for this platform/Python"
        else:
            why = f"no wheel of a matching version (newest wheel here: {versions[-1]})"
        if match["parent"]:
            why += f", required by {match['parent']}"
        return name, f"`{req}`: {why}"
    if "conflicting dependencies" in log:
        lines = log.splitlines()
        caused, missing = [], []
        for i, line in enumerate(lines):
            if line.startswith("The conflict is caused by:"):
                caused = [ln.strip() for ln in _block(lines, i + 1)]
            if line.startswith("Additionally, some packages in these conflicts have no matching"):
                missing = [ln.strip() for ln in _block(lines, i + 1)]
        first = caused[0] if caused else "conflicting dependencies"
        if missing:
            return None, f"no wheel for {', '.join(missing)} (e.g. {first})"
        return None, f"conflict: {first}"
    errors = [ln.strip() for ln in log.splitlines() if ln.startswith("ERROR:")]
    return None, errors[-1][:200] if errors else "pip failed (see its log)"


def _valid(text: str) -> bool:
    try:
        Requirement(text)
        return True
    except Exception:
        return False


def _block(lines: list[str], start: int) -> list[str]:
    out = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        out.append(line)
    return out


@dataclass
class Cell:
    target: Target
    python: str
    ok: bool = False
    failures: list[str] = field(default_factory=list)
    wheels: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    metadata_fetches: int = 0
    full_downloads: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        if self.ok:
            return "✓"
        return "✗ " + "; ".join(f.replace("|", "\\|") for f in self.failures)


def check_cell(target: Target, python: str, requirements: list[str], python_exe: str,
               glibc: tuple[int, int], index_url: str | None, use_pip_config: bool,
               log_dir: Path | None = None) -> Cell:
    """Resolve ``requirements`` for one (platform, Python); see the module docstring."""
    cell = Cell(target, python)
    env = marker_environment(target, python)
    reqs = requirements_for(requirements, env)
    start = time.monotonic()
    for attempt in range(MAX_RETRIES + 1):
        with tempfile.TemporaryDirectory(prefix="check_wheels_") as tmp:
            workdir = Path(tmp)
            proc = subprocess.run(
                pip_command(python_exe, target, python, reqs, workdir, glibc, index_url),
                env=pip_environment(use_pip_config), capture_output=True, text=True,
                stdin=subprocess.DEVNULL)
            log = proc.stdout + proc.stderr
            if log_dir is not None:
                name = f"{target.key}-py{python}-{attempt}.log"
                (log_dir / name).write_text(log, encoding="utf-8")
            cell.metadata_fetches += log.count("Obtaining dependency information")
            cell.full_downloads += re.findall(r"^\s*Downloading (\S+\.whl)\b", log, re.M)
            if proc.returncode == 0:
                _read_report(cell, workdir / "report.json", env)
                break
            name, why = explain_failure(log)
            cell.failures.append(why)
            top = [r for r in reqs if name and canonicalize_name(Requirement(r).name)
                   == canonicalize_name(name)]
            if not top or len(reqs) == len(top):
                break  # a transitive package or a conflict: no further top-level search
            reqs = [r for r in reqs if r not in top]  # find the next failing package
    cell.ok = not cell.failures
    cell.seconds = time.monotonic() - start
    return cell


def _read_report(cell: Cell, path: Path, env: dict[str, str]) -> None:
    report = json.loads(path.read_text(encoding="utf-8"))
    used = report.get("environment", {})
    wrong = {k: used.get(k) for k in ("sys_platform", "platform_machine", "python_version")
             if used.get(k) != env[k]}
    if wrong:
        cell.failures.append(f"pip evaluated markers for {wrong}, not for the target")
    for item in report.get("install", []):
        url = item["download_info"]["url"]
        meta = item["metadata"]
        cell.versions[canonicalize_name(meta["name"])] = meta["version"]
        if not url.split("#")[0].endswith(".whl"):
            cell.failures.append(f"`{meta['name']}` would be built from {url.rsplit('/', 1)[-1]}")
    cell.wheels = len(report.get("install", []))


def render_table(cells: list[Cell], targets: list[Target], pythons: list[str]) -> str:
    by_key = {(c.target.key, c.python): c for c in cells}
    lines = ["| platform | " + " | ".join(f"CPython {p}" for p in pythons) + " |",
             "| --- | " + " | ".join("---" for _ in pythons) + " |"]
    for t in targets:
        lines.append(f"| {t.label} | "
                     + " | ".join(by_key[(t.key, p)].text() for p in pythons) + " |")
    return "\n".join(lines)


def render_details(cells: list[Cell], watch: list[str]) -> str:
    lines = ["| platform | Python | wheels | " + " | ".join(watch)
             + " | metadata fetches | full downloads | s |",
             "| --- | --- | --- | " + " | ".join("---" for _ in watch) + " | --- | --- | --- |"]
    for c in cells:
        vals = [c.versions.get(canonicalize_name(w), "–") for w in watch]
        lines.append(f"| {c.target.label} | {c.python} | {c.wheels} | " + " | ".join(vals)
                     + f" | {c.metadata_fetches} | {len(c.full_downloads)} | {c.seconds:.0f} |")
    if any(not c.ok for c in cells):
        lines.append("")
        lines.append("(for a ✗ cell: versions from the last resolve, without the failing packages)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pyproject", type=Path, default=REPO_ROOT / "pyproject.toml",
                    help="pyproject.toml whose dependencies are checked (default: the repo's)")
    ap.add_argument("--extras", action="append", default=[], metavar="NAME",
                    help="also check optional-dependencies[NAME]; repeat or comma-separate")
    ap.add_argument("--targets", default=",".join(t.key for t in TARGETS),
                    help=f"comma-separated subset of: {', '.join(TARGETS_BY_KEY)}")
    ap.add_argument("--pythons", default=",".join(PYTHONS), help="e.g. 3.10,3.11,3.12")
    ap.add_argument("--glibc", default="2.28", help="newest manylinux glibc accepted")
    ap.add_argument("--jobs", type=int, default=2, help="pip runs at once (default 2)")
    ap.add_argument("--pip-python", default=sys.executable,
                    help="interpreter whose pip is run (default: this one)")
    ap.add_argument("--index-url", default=None, help="package index (default: pip's, PyPI)")
    ap.add_argument("--use-pip-config", action="store_true",
                    help="keep pip's configuration files and PIP_* variables")
    ap.add_argument("--details", action="store_true",
                    help="also print per cell: wheel count, key versions, fetches, time")
    ap.add_argument("--log-dir", type=Path, default=None, help="keep pip's logs here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        extras = [e.strip() for arg in args.extras for e in arg.split(",") if e.strip()]
        requirements = read_requirements(args.pyproject, extras)
        keys = [k.strip() for k in args.targets.split(",") if k.strip()]
        unknown = [k for k in keys if k not in TARGETS_BY_KEY]
        if unknown:
            raise ValueError(f"unknown target(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(TARGETS_BY_KEY)}")
        targets = [TARGETS_BY_KEY[k] for k in keys]
        pythons = [p.strip() for p in args.pythons.split(",") if p.strip()]
        glibc = tuple(int(x) for x in args.glibc.split("."))
        assert len(glibc) == 2
    except (KeyError, ValueError, AssertionError, OSError) as exc:
        print(f"check_wheels: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    print(f"checking {len(requirements)} requirements from {args.pyproject}"
          f"{' + extras ' + ','.join(extras) if extras else ''} on "
          f"{len(targets)} platforms x {len(pythons)} Pythons", file=sys.stderr)
    start = time.monotonic()
    jobs = [(t, p) for t in targets for p in pythons]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        cells = list(pool.map(lambda tp: check_cell(
            tp[0], tp[1], requirements, args.pip_python, glibc, args.index_url,
            args.use_pip_config, args.log_dir), jobs))
    elapsed = time.monotonic() - start
    print(render_table(cells, targets, pythons))
    if args.details:
        watch = [n for n in ("torch", "spconv-cu120", "spconv-cu126", "kornia", "numpy")
                 if any(canonicalize_name(n) in c.versions for c in cells)]
        print()
        print(render_details(cells, watch))
    full = sum(len(c.full_downloads) for c in cells)
    print(f"\n{sum(c.ok for c in cells)}/{len(cells)} cells pass; {len(cells)} resolves "
          f"in {elapsed:.0f} s; full wheel downloads: {full}", file=sys.stderr)
    return 0 if all(c.ok for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
