"""The robot install (docs/robot.md): Python 3.10 sources, tools/robot_setup.sh, declared versions.

The script cannot run end to end here (no /opt/ros, no GPU): it is checked through --dry-run,
which prints every command it would run, and through its functions (sourced with
--functions-only) for the distro table and the driver check.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "robot_setup.sh"
# Everything that runs on a robot or a training machine (tests/ run only here, on 3.11).
SOURCES = ["toist_core", "toist_ros", "training", "launch", "tools", "bench", "scripts/perception_node"]

DISTROS = {  # distro: (Python, numpy requirement in the venv)
    "humble": ("3.10", "numpy>=1.21.5,<2"),
    "jazzy": ("3.12", "numpy>=1.26,<2"),
    "kilted": ("3.12", "numpy>=1.26,<2"),
}


def test_sources_need_no_python_newer_than_310():
    """Humble's Python is 3.10: no 3.11+ syntax, modules or members (vermin, annotations included)."""
    try:
        import vermin  # noqa: F401  (pinned in requirements/base.txt)
    except ImportError:
        pytest.fail("vermin is missing: pip install -r requirements/base.txt -c requirements/lock.txt")
    # str.decode: vermin takes bytes.decode for Python 2's str.decode (a false "!3" rule).
    result = subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "--target=3.10-", "--violations",
         "--no-tips", "--eval-annotations", "--exclude", "str.decode", *SOURCES],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"sources that need Python > 3.10:\n{result.stdout}{result.stderr}"


# --- tools/robot_setup.sh ---------------------------------------------------------------------

def _bash(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run bash code after sourcing the script's functions."""
    return subprocess.run(["bash", "-c", f'source "{SCRIPT}" --functions-only\n{code}'],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})


def _script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("ROS_DISTRO", "VIRTUAL_ENV")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**environ, **(env or {})})


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """A colcon workspace with this repository in src/ (as a symlink)."""
    (tmp_path / "ws" / "src").mkdir(parents=True)
    (tmp_path / "ws" / "src" / "toist").symlink_to(ROOT)
    return tmp_path / "ws"


def test_script_is_valid_bash_and_executable():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert os.access(SCRIPT, os.X_OK)
    assert "set -euo pipefail" in SCRIPT.read_text()


def test_help_names_the_options():
    result = _script("--help")
    assert result.returncode == 0
    for option in ("--workspace", "--distro", "--torch-index", "--skip-rosdep", "--dry-run", "--skip-driver-check"):
        assert option in result.stdout


@pytest.mark.parametrize("distro", sorted(DISTROS))
def test_dry_run_prints_the_install(distro: str, workspace: Path):
    python, numpy_spec = DISTROS[distro]
    venv = workspace / "venv"
    result = _script("--dry-run", "--workspace", str(workspace), "--distro", distro, "--driver-version", "590.48.01")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"ROS 2 {distro} (Ubuntu {'22.04' if distro == 'humble' else '24.04'}, Python {python})" in out
    assert f"numpy requirement: {numpy_spec}" in out
    assert f"+ rosdep install --from-paths src --ignore-src -y --rosdistro {distro}" in out
    assert f"-m venv --system-site-packages {venv}\n" in out
    assert f"+ touch {venv}/COLCON_IGNORE" in out
    assert f"echo '{numpy_spec}' > {venv}/toist-constraints.txt" in out
    assert f"install 'torch>=2.5' 'torchvision>=0.20' -c {venv}/toist-constraints.txt" in out
    assert "--index-url" not in out  # default: PyPI
    assert f"'transformers>=4.45' 'safetensors>=0.4.3' 'pycocotools>=2.0.7' '{numpy_spec}'" in out
    assert (f"+ {venv}/bin/python -m colcon build --packages-select toist_ros --cmake-args "
            f"-DPython3_EXECUTABLE={venv}/bin/python -DPYTHON_EXECUTABLE={venv}/bin/python") in out
    assert f"source /opt/ros/{distro}/setup.bash" in out
    # The two lines to source afterwards, in this order.
    tail = out[out.index("Done."):]
    assert tail.index(f"source {workspace}/install/setup.bash") < tail.index(f"source {venv}/bin/activate")
    # Order of the steps: rosdep (apt) before the venv, pip before colcon.
    assert out.index("rosdep install") < out.index("-m venv") < out.index("pip") < out.index("colcon build")


def test_dry_run_with_another_torch_index(workspace: Path):
    result = _script("--dry-run", "--workspace", str(workspace), "--distro", "jazzy", "--skip-rosdep",
                     "--driver-version", "550.54.15", "--torch-index", "https://download.pytorch.org/whl/cu126")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--index-url https://download.pytorch.org/whl/cu126" in result.stdout
    assert "rosdep install" not in result.stdout
    assert "CUDA 12.6" in result.stdout and "minor version" in result.stdout  # 550 < 560.28.03, >= 525


def test_dry_run_stops_on_a_driver_too_old_for_pypi_torch(workspace: Path):
    result = _script("--dry-run", "--workspace", str(workspace), "--distro", "humble", "--driver-version", "535.183.01")
    assert result.returncode == 3
    out = result.stdout
    assert "535.183.01" in out and "CUDA 13.0" in out and ">= 580" in out
    assert "--torch-index https://download.pytorch.org/whl/cu126" in out
    assert "--skip-driver-check" in out
    assert "-m venv" not in out and "pip" not in out  # nothing installed


def test_dry_run_installs_anyway_with_skip_driver_check(workspace: Path):
    result = _script("--dry-run", "--workspace", str(workspace), "--distro", "humble",
                     "--driver-version", "535.183.01", "--skip-driver-check")
    assert result.returncode == 0 and "'torch>=2.5'" in result.stdout


def test_jetson_keeps_nvidia_torch(workspace: Path, tmp_path: Path):
    tegra = tmp_path / "nv_tegra_release"
    tegra.write_text("# R36 (release), REVISION: 4.0\n")
    result = _script("--dry-run", "--workspace", str(workspace), "--distro", "humble", "--skip-rosdep",
                     env={"TOIST_ARCH": "aarch64", "TOIST_TEGRA_RELEASE": str(tegra)})
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Jetson detected" in out and "JetPack" in out
    assert "'torch>=" not in out  # no torch from PyPI
    assert "'transformers>=4.45'" in out and "colcon build" in out


def test_unsupported_distro_is_refused(workspace: Path):
    result = _script("--dry-run", "--workspace", str(workspace), "--distro", "iron")
    assert result.returncode != 0 and "humble jazzy kilted" in result.stderr


@pytest.mark.parametrize("distro", sorted(DISTROS))
def test_distro_table(distro: str):
    python, numpy_spec = DISTROS[distro]
    result = _bash(f"distro_python {distro}; distro_numpy_spec {distro}")
    assert result.stdout.split() == [python, numpy_spec]


def test_distro_table_rejects_unknown():
    assert _bash("distro_python rolling").returncode != 0


@pytest.mark.parametrize("url, cuda", [
    ("", "13.0"), ("https://pypi.org/simple", "13.0"), ("https://download.pytorch.org/whl/cu126", "12.6"),
    ("https://download.pytorch.org/whl/cu128/", "12.8"), ("https://download.pytorch.org/whl/cu130", "13.0"),
    ("https://download.pytorch.org/whl/cpu", "cpu"), ("https://mirror.example/simple", ""),
])
def test_cuda_of_torch_index(url: str, cuda: str):
    assert _bash(f'index_cuda "{url}"').stdout.strip() == cuda


@pytest.mark.parametrize("driver, cuda, ok, words", [
    ("580.65.06", "13.0", True, ["ok"]),
    ("590.48.01", "13.0", True, ["ok"]),
    ("575.64", "13.0", False, [">= 580", "--torch-index https://download.pytorch.org/whl/cu126"]),
    ("560.35.03", "12.6", True, ["ok"]),
    ("535.183.01", "12.8", True, ["minor version", "570.26"]),
    ("470.256.02", "12.6", False, [">= 525", "--skip-driver-check"]),
    ("470.256.02", "cpu", True, ["CPU-only"]),
])
def test_driver_check(driver: str, cuda: str, ok: bool, words: list[str]):
    result = _bash(f"check_driver {driver} {cuda}")
    assert (result.returncode == 0) == ok, result.stdout
    for word in words:
        assert word in result.stdout
    if not ok:
        assert driver in result.stdout and "upgrade the driver" in result.stdout
        if cuda.startswith("12"):  # no older CUDA build to offer for a 12.x build
            assert "whl/cu126" not in result.stdout


def test_makefile_target_runs_the_script():
    result = subprocess.run(["make", "-n", "robot-setup", "ARGS=--dry-run --distro humble"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "tools/robot_setup.sh --dry-run --distro humble" in result.stdout


# --- the versions promised, said the same way everywhere -----------------------------------

def _script_minimums() -> dict[str, str]:
    text = SCRIPT.read_text()
    return {name.lower(): re.search(rf"^{name}_MIN=(\S+)", text, re.M).group(1)
            for name in ("TORCH", "TORCHVISION", "TRANSFORMERS", "SAFETENSORS", "PYCOCOTOOLS", "NUMPY")}


def test_setup_py_and_docs_promise_the_script_minimums():
    setup_py = (ROOT / "setup.py").read_text()
    docs = (ROOT / "docs" / "robot.md").read_text()
    for package, version in _script_minimums().items():
        assert f'"{package}>={version}"' in setup_py, f"setup.py: {package}>={version}"
        assert re.search(rf"^\| {package} \| {re.escape(version)}\b", docs, re.M | re.I), f"docs/robot.md: {package}"
    assert 'python_requires=">=3.10"' in setup_py


def test_package_xml_declares_apt_keys_and_no_pip_packages():
    root = ET.parse(ROOT / "package.xml").getroot()
    declared = {e.text for e in root if e.tag.endswith("depend")}
    assert {"python3-numpy", "python3-opencv", "python3-scipy", "python3-yaml", "rclpy", "launch_ros"} <= declared
    # pip-only (CUDA builds, PEP 668): never rosdep keys.
    assert not {key for key in declared if re.search(r"torch|transformers|safetensors|pycocotools|-pip$", key)}
