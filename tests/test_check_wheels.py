"""scripts/check_wheels.py, offline: marker evaluation per target, tags, pip's errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_wheels.py"
PLATFORM = (
    "((sys_platform == 'linux' and platform_machine == 'x86_64') or (sys_platform == 'win32' and platform_machine == 'AMD64'))"
)
PLANNED = f"""
[project]
name = "gigassl"
dependencies = ["torch>=2.4", "numpy>=1.24"]

[project.optional-dependencies]
spconv = [
    "spconv-cu120>=2.3; python_version < '3.12' and {PLATFORM}",
    "spconv-cu126>=2.3; python_version >= '3.12' and {PLATFORM}",
]
all = ["gigassl[spconv]", "einops"]
"""


@pytest.fixture(scope="module")
def cw():
    spec = importlib.util.spec_from_file_location("check_wheels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_wheels"] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("check_wheels", None)


@pytest.fixture
def planned(tmp_path: Path) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text(PLANNED)
    return path


def _resolve(cw, pyproject, target_key, python, extras=("spconv",)):
    reqs = cw.read_requirements(pyproject, extras)
    env = cw.marker_environment(cw.TARGETS_BY_KEY[target_key], python)
    return cw.requirements_for(reqs, env)


@pytest.mark.parametrize(
    "target,python,expected",
    [
        ("macos-arm64", "3.11", None),
        ("macos-x86_64", "3.12", None),
        ("linux-aarch64", "3.12", None),
        ("linux-x86_64", "3.10", "spconv-cu120>=2.3"),
        ("linux-x86_64", "3.11", "spconv-cu120>=2.3"),
        ("linux-x86_64", "3.12", "spconv-cu126>=2.3"),
        ("windows-amd64", "3.11", "spconv-cu120>=2.3"),
        ("windows-amd64", "3.12", "spconv-cu126>=2.3"),
    ],
)
def test_spconv_kept_only_where_its_wheels_exist(cw, planned, target, python, expected):
    reqs = _resolve(cw, planned, target, python)
    spconv = [r for r in reqs if r.startswith("spconv")]
    assert spconv == ([expected] if expected else [])
    assert reqs[:2] == ["torch>=2.4", "numpy>=1.24"]
    assert all(";" not in r for r in reqs)  # passed to pip without markers


def test_spconv_cu126_bounded_below_python_3_14(cw):
    # spconv-cu126 2.3.8 and cumm-cu126 0.7.11 ship cp39-cp313 only.
    req = f"spconv-cu126>=2.3; python_version >= '3.12' and python_version < '3.14' and {PLATFORM}"
    linux = cw.TARGETS_BY_KEY["linux-x86_64"]
    assert cw.requirements_for([req], cw.marker_environment(linux, "3.13")) == ["spconv-cu126>=2.3"]
    assert cw.requirements_for([req], cw.marker_environment(linux, "3.14")) == []


def test_markers_use_the_target_not_this_interpreter(cw):
    # This machine is Linux x86-64: a check that fell back to its values would keep it.
    env = cw.marker_environment(cw.TARGETS_BY_KEY["macos-arm64"], "3.12")
    assert cw.requirements_for(["x; sys_platform == 'linux'"], env) == []
    assert cw.requirements_for(
        ["x; sys_platform == 'darwin' and platform_machine == 'arm64' and python_version >= '3.12'"], env
    ) == ["x"]
    win = cw.marker_environment(cw.TARGETS_BY_KEY["windows-amd64"], "3.10")
    assert cw.requirements_for(["x; os_name == 'nt' and platform_system == 'Windows'"], win) == ["x"]


def test_extras_without_the_flag_and_self_references(cw, planned):
    assert cw.read_requirements(planned) == ["torch>=2.4", "numpy>=1.24"]
    everything = cw.read_requirements(planned, ["all"])
    assert [r.split(">")[0].split(";")[0] for r in everything] == ["torch", "numpy", "spconv-cu120", "spconv-cu126", "einops"]
    with pytest.raises(KeyError, match="no extra 'gpu'"):
        cw.read_requirements(planned, ["gpu"])


def test_the_repositorys_pyproject_parses(cw):
    reqs = cw.read_requirements(SCRIPT.parents[1] / "pyproject.toml")
    assert any(r.startswith("torch") for r in reqs)


def test_platform_tags(cw):
    t = cw.TARGETS_BY_KEY
    linux = cw.platform_tags(t["linux-x86_64"])
    assert linux[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in linux
    assert "manylinux_2_5_x86_64" in linux and "manylinux1_x86_64" in linux
    assert "manylinux_2_31_x86_64" not in linux
    assert "manylinux_2_31_x86_64" in cw.platform_tags(t["linux-x86_64"], (2, 31))
    arm = cw.platform_tags(t["linux-aarch64"])
    assert arm[-1] == "manylinux2014_aarch64" and all("aarch64" in tag for tag in arm)
    assert "macosx_11_0_arm64" in cw.platform_tags(t["macos-arm64"])
    assert "macosx_10_9_x86_64" in cw.platform_tags(t["macos-x86_64"])
    assert cw.platform_tags(t["windows-amd64"]) == ["win_amd64"]


def test_pip_command_carries_the_target(cw, tmp_path):
    target = cw.TARGETS_BY_KEY["linux-aarch64"]
    cmd = cw.pip_command("python", target, "3.10", ["torch>=2.4"], tmp_path)
    assert cmd[1] == "-c" and '"platform_machine": "aarch64"' in cmd[3]
    for flag in ("--dry-run", "--only-binary=:all:", "--ignore-installed", "--use-feature=fast-deps"):
        assert flag in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.10"
    assert cmd[-1] == "torch>=2.4"


def test_pip_environment_drops_local_pip_configuration(cw, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    monkeypatch.setenv("PIP_CERT", "/etc/ssl/certs/ca.crt")
    env = cw.pip_environment(use_pip_config=False)
    assert "PIP_FIND_LINKS" not in env and env["PIP_CERT"] == "/etc/ssl/certs/ca.crt"
    assert env["PIP_CONFIG_FILE"] == cw.os.devnull
    assert cw.pip_environment(use_pip_config=True)["PIP_FIND_LINKS"] == "/opt/wheels"


@pytest.mark.parametrize(
    "log,name,why",
    [
        (
            "ERROR: Could not find a version that satisfies the requirement spconv-cu120>=2.3 "
            "(from versions: none)\nERROR: No matching distribution found for spconv-cu120>=2.3",
            "spconv-cu120",
            "no wheel for this platform/Python",
        ),
        (
            "ERROR: Could not find a version that satisfies the requirement torch>=2.4 (from versions: 2.0.0, 2.0.1, 2.2.2)",
            "torch",
            "newest wheel here: 2.2.2",
        ),
        (
            "ERROR: Could not find a version that satisfies the requirement cumm-cu120<0.5,>=0.4.5 "
            "(from spconv-cu120) (from versions: none)",
            "cumm-cu120",
            "required by spconv-cu120",
        ),
    ],
)
def test_explain_missing_wheel(cw, log, name, why):
    got_name, got_why = cw.explain_failure(log)
    assert got_name == name and why in got_why


def test_explain_conflict(cw):
    log = """ERROR: Cannot install torch==2.4.0 and torch==2.5.0 because these package versions have conflicting dependencies.

The conflict is caused by:
    torch 2.5.0 depends on nvidia-cuda-nvrtc-cu12==12.4.127; platform_system == "Linux"
    torch 2.4.0 depends on nvidia-cuda-nvrtc-cu12==12.1.105; platform_system == "Linux"

Additionally, some packages in these conflicts have no matching distributions available for your environment:
    nvidia-cuda-nvrtc-cu12

To fix this you could try to:"""
    name, why = cw.explain_failure(log)
    assert name is None
    assert why.startswith("no wheel for nvidia-cuda-nvrtc-cu12 (e.g. torch 2.5.0 depends")


def test_table(cw):
    t = cw.TARGETS_BY_KEY
    cells = [cw.Cell(t["macos-arm64"], "3.12", ok=True), cw.Cell(t["linux-x86_64"], "3.12", failures=["`a|b`: no wheel"])]
    table = cw.render_table(cells, [t["macos-arm64"], t["linux-x86_64"]], ["3.12"])
    assert table.splitlines() == [
        "| platform | CPython 3.12 |",
        "| --- | --- |",
        "| macOS arm64 | ✓ |",
        "| Linux x86-64 | ✗ `a\\|b`: no wheel |",
    ]
