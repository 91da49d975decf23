"""The robot install (docs/robot.md): Python 3.10 sources, tools/robot_setup.sh, declared versions.

The script cannot run end to end here (no /opt/ros, no GPU): it is checked through --dry-run,
which prints every command it would run, and through its functions (sourced with
--functions-only) for the distro table and the driver check.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "robot_setup.sh"
# Everything that runs on a robot or a training machine (tests/ run only here, on 3.11).
SOURCES = ["toist_core", "toist_ros", "training", "launch", "tools", "bench", "scripts/perception_node",
           "scripts/perception_lifecycle_node"]

DISTROS = {  # distro: (Python, numpy requirement in the venv)
    "humble": ("3.10", "numpy>=1.21.5,<2"),
    "jazzy": ("3.12", "numpy>=1.26,<2"),
    "kilted": ("3.12", "numpy>=1.26,<2"),
}
# numba that takes the distro's numpy (Humble: 0.57 is the last for numpy 1.21) and Python (3.12: 0.59+).
NUMBA_SPECS = {"humble": "numba>=0.55.1,<0.58", "jazzy": "numba>=0.59", "kilted": "numba>=0.59"}


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


def _dry_run_finished(result: subprocess.CompletedProcess) -> None:
    """A dry run that printed the whole install: status 0 when no check failed on this machine,
    else 5, with every warned problem listed at the end (this VM has no /opt/ros, a robot has)."""
    warned = re.findall(r"^WARNING \(dry run, continuing\): (.*)$", result.stdout, re.M)
    if not warned:
        assert result.returncode == 0, result.stdout + result.stderr
        return
    assert result.returncode == 5, result.stdout + result.stderr
    assert f"DRY RUN FAILED: the install would stop at the first of these {len(warned)} problem(s):" in result.stderr
    for problem in warned:
        assert f"  - {problem}\n" in result.stderr


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
    _dry_run_finished(result)
    assert f"ROS 2 {distro} (Ubuntu {'22.04' if distro == 'humble' else '24.04'}, Python {python})" in out
    assert f"numpy requirement: {numpy_spec}" in out
    assert f"+ rosdep install --from-paths src --ignore-src -y --rosdistro {distro}" in out
    assert f"-m venv --system-site-packages {venv}\n" in out
    assert f"+ touch {venv}/COLCON_IGNORE" in out
    assert f"echo '{numpy_spec}' > {venv}/toist-constraints.txt" in out
    assert f"install 'torch>=2.5' 'torchvision>=0.20' -c {venv}/toist-constraints.txt" in out
    assert "--index-url" not in out  # default: PyPI
    assert f"'transformers>=4.45' 'safetensors>=0.4.3' 'pycocotools>=2.0.7' '{NUMBA_SPECS[distro]}' '{numpy_spec}'" in out
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
    _dry_run_finished(result)
    assert "--index-url https://download.pytorch.org/whl/cu126" in result.stdout
    assert "rosdep install" not in result.stdout
    assert "CUDA 12.6" in result.stdout and "minor version" in result.stdout  # 550 < 560.28.03, >= 525


def test_dry_run_lists_a_driver_too_old_for_pypi_torch_with_the_other_problems(workspace: Path):
    """The dry run stopped at the driver (exit 3) instead of listing it with the rest and exiting
    5 (docs/robot.md, --help); a real run still stops there with exit 3."""
    result = _script("--dry-run", "--workspace", str(workspace), "--distro", "humble", "--driver-version", "535.183.01")
    assert result.returncode == 5, result.stdout[-3000:]
    out = result.stdout
    assert "535.183.01" in out and "CUDA 13.0" in out and ">= 580" in out
    assert "--torch-index https://download.pytorch.org/whl/cu126" in out
    assert "--skip-driver-check" in out
    assert "DRY RUN FAILED" in result.stderr
    assert "NVIDIA driver 535.183.01 is too old for torch's CUDA 13.0 build" in result.stderr
    assert "-m venv" in out   # the later steps were still shown


def test_dry_run_installs_anyway_with_skip_driver_check(workspace: Path):
    result = _script("--dry-run", "--workspace", str(workspace), "--distro", "humble",
                     "--driver-version", "535.183.01", "--skip-driver-check")
    _dry_run_finished(result)
    assert "'torch>=2.5'" in result.stdout


def test_jetson_keeps_nvidia_torch(workspace: Path, tmp_path: Path):
    tegra = tmp_path / "nv_tegra_release"
    tegra.write_text("# R36 (release), REVISION: 4.0\n")
    result = _script("--dry-run", "--workspace", str(workspace), "--distro", "humble", "--skip-rosdep",
                     env={"TOIST_ARCH": "aarch64", "TOIST_TEGRA_RELEASE": str(tegra)})
    out = result.stdout
    _dry_run_finished(result)
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
            for name in ("TORCH", "TORCHVISION", "TRANSFORMERS", "SAFETENSORS", "PYCOCOTOOLS", "NUMBA", "NUMPY")}


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
    assert {"python3-numpy", "python3-opencv", "python3-scipy", "python3-yaml", "rclpy", "launch_ros",
            "lifecycle_msgs"} <= declared
    # pip-only (CUDA builds, PEP 668): never rosdep keys. Nor python3-numba: rosdistro's key names
    # Ubuntu 18.04 and 20.04 only, and rosdep install stopped on 22.04 / 24.04 ("No definition of
    # [python3-numba] for OS version [jammy]"): the script installs numba with pip.
    assert not {key for key in declared if re.search(r"torch|transformers|safetensors|pycocotools|numba|-pip$", key)}


# --- the script's real (non-dry) paths, against stubs -------------------------------------------
# A copy of the script whose /opt/ros is a folder in tmp_path, a stub system Python that "creates"
# a venv holding a stub venv Python, and a stub nvidia-smi: every call is logged, nothing is installed.

_SYSTEM_PY = r"""#!/bin/bash
echo "SYS_PY $*" >> "$FAKE_LOG"
case "$*" in
  *sys.version_info*) echo 3.10 ;;
  *"import ensurepip, venv"*) exit 0 ;;
  "-m venv --system-site-packages "*)
    d="${@: -1}"; mkdir -p "$d/bin"; cp "$FAKE_VENV_PY" "$d/bin/python"; chmod +x "$d/bin/python"
    printf 'home = /usr/bin\ninclude-system-site-packages = true\nversion = 3.10.12\n' > "$d/pyvenv.cfg"
    echo 'export VIRTUAL_ENV_FAKE=1' > "$d/bin/activate" ;;
esac
exit 0
"""
_VENV_PY = r"""#!/bin/bash
echo "VENV_PY[cwd=$PWD] $*" >> "$FAKE_LOG"
case "$*" in
  *sys.version_info*) echo 3.10 ;;
  *"torch.version.cuda"*) [ -n "${FAKE_TORCH_CUDA:-}" ] && echo "$FAKE_TORCH_CUDA" || exit 1 ;;
esac
exit 0
"""
_NVIDIA_SMI = r"""#!/bin/bash
echo "$FAKE_SMI_OUT"
exit "${FAKE_SMI_RC:-0}"
"""


class Fake:
    """The stubbed robot: run() runs the copied script (not in dry-run), log() reads the calls."""

    def __init__(self, root: Path):
        self.root = root
        (root / "opt" / "ros" / "humble").mkdir(parents=True)
        (root / "opt" / "ros" / "humble" / "setup.bash").write_text("")
        (root / "tools").mkdir()
        self.script = root / "tools" / "robot_setup.sh"
        self.script.write_text(SCRIPT.read_text().replace("/opt/ros", str(root / "opt" / "ros")))
        (root / "bin").mkdir()
        self.python = root / "bin" / "python3"
        for path, text in ((self.python, _SYSTEM_PY), (root / "venvpy", _VENV_PY),
                           (root / "bin" / "nvidia-smi", _NVIDIA_SMI)):
            path.write_text(text)
            path.chmod(0o755)
        self.workspace = root / "ws"
        (self.workspace / "src").mkdir(parents=True)
        (self.workspace / "src" / "toist").symlink_to(ROOT)
        self.venv = self.workspace / "venv"

    def run(self, *args: str, cwd: Path | None = None, python: str | None = None,
            workspace: str | None = None, **env: str) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if k not in ("ROS_DISTRO", "VIRTUAL_ENV")}
        environ.update(FAKE_LOG=str(self.root / "log.txt"), FAKE_VENV_PY=str(self.root / "venvpy"),
                       PATH=f"{self.root / 'bin'}:{environ['PATH']}",
                       FAKE_SMI_OUT=env.pop("FAKE_SMI_OUT", "590.48.01"), **env)
        return subprocess.run(
            ["bash", str(self.script), "--distro", "humble", "--skip-rosdep",
             "--python", python or str(self.python), "--workspace", workspace or str(self.workspace), *args],
            capture_output=True, text=True, timeout=60, env=environ, cwd=cwd or self.root)

    def log(self) -> str:
        path = self.root / "log.txt"
        return path.read_text() if path.exists() else ""


@pytest.fixture()
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path / "fake")


def test_fake_install_runs_end_to_end(fake: Fake):
    result = fake.run()
    assert result.returncode == 0, result.stdout + result.stderr
    log = fake.log()
    assert f"-m venv --system-site-packages {fake.venv}" in log
    assert f"-m pip --disable-pip-version-check install torch>=2.5 torchvision>=0.20 -c {fake.venv}/toist-constraints.txt" in log
    assert f"VENV_PY[cwd={fake.workspace}] -m colcon build" in log
    assert "driver check: driver 590.48.01" in result.stdout


def test_dry_run_fails_after_listing_every_problem(fake: Fake):
    """A dry run goes on past a failed check to show the whole install, then exits 5 naming them."""
    (fake.root / "opt" / "ros" / "humble" / "setup.bash").unlink()
    (fake.workspace / "src" / "toist").unlink()
    result = fake.run("--dry-run")
    assert result.returncode == 5, result.stdout + result.stderr
    assert "colcon build" in result.stdout  # it went on to the end
    assert "the first of these 2 problem(s)" in result.stderr
    assert f"  - {fake.root}/opt/ros/humble/setup.bash not found" in result.stderr
    assert f"  - no toist_ros package under {fake.workspace}/src" in result.stderr
    assert fake.log().count("-m venv") == 0  # nothing ran


def test_dry_run_without_problems_exits_0(fake: Fake):
    result = fake.run("--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout and "DRY RUN FAILED" not in result.stderr
    assert f"+ {fake.venv}/bin/python -m colcon build" in result.stdout


def test_switching_the_torch_build_uninstalls_instead_of_force_reinstall(fake: Fake):
    """--force-reinstall would reinstall numpy too; an uninstall of torch + torchvision does not."""
    assert fake.run("--skip-build").returncode == 0
    (fake.root / "log.txt").unlink()
    result = fake.run("--skip-build", "--torch-index", "https://download.pytorch.org/whl/cu126",
                      FAKE_TORCH_CUDA="13.0")
    assert result.returncode == 0, result.stdout + result.stderr
    log = fake.log()
    assert "--force-reinstall" not in log + result.stdout
    uninstall = log.index("-m pip --disable-pip-version-check uninstall -y torch torchvision")
    install = log.index("install torch>=2.5 torchvision>=0.20 -c")
    assert uninstall < install
    assert "--index-url https://download.pytorch.org/whl/cu126" in log[install:]


def test_same_torch_build_is_not_uninstalled(fake: Fake):
    result = fake.run("--skip-build", FAKE_TORCH_CUDA="13.0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "uninstall" not in fake.log()


def test_rerun_keeps_the_torch_index_and_cuda_of_the_first_run(fake: Fake):
    """A plain re-run must neither stop on the driver check nor swap the torch build."""
    first = fake.run("--skip-build", "--torch-index", "https://mirror.example/simple", "--cuda", "12.6",
                     FAKE_SMI_OUT="550.54.15")
    assert first.returncode == 0, first.stdout + first.stderr
    (fake.root / "log.txt").unlink()
    again = fake.run("--skip-build", FAKE_SMI_OUT="550.54.15", FAKE_TORCH_CUDA="12.6")
    assert again.returncode == 0, again.stdout + again.stderr  # 550 < 580 (PyPI's CUDA 13.0)
    assert "https://mirror.example/simple" in again.stdout and "12.6" in again.stdout
    log = fake.log()
    assert "--index-url https://mirror.example/simple" in log and "uninstall" not in log
    # Given again, the options win and are stored for the next run.
    cpu = fake.run("--skip-build", "--torch-index", "https://download.pytorch.org/whl/cpu", FAKE_TORCH_CUDA="12.6")
    assert cpu.returncode == 0, cpu.stdout + cpu.stderr
    assert "uninstall -y torch torchvision" in fake.log()
    (fake.root / "log.txt").unlink()
    last = fake.run("--skip-build", FAKE_TORCH_CUDA="cpu")
    assert last.returncode == 0, last.stdout + last.stderr
    assert "--index-url https://download.pytorch.org/whl/cpu" in fake.log() and "--cuda" not in fake.log()
    assert "CPU-only" in last.stdout


def test_help_says_a_rerun_keeps_the_torch_index():
    out = _script("--help").stdout
    assert "toist-setup.env" in out
    assert "toist-setup.env" in (ROOT / "docs" / "robot.md").read_text()


def test_relative_paths_are_made_absolute(fake: Fake):
    """The script cd's into the workspace before sourcing the venv: relative paths must not break it."""
    python = os.path.relpath(fake.python, fake.root)
    result = fake.run("--venv", "myvenv", workspace="ws", python=python)
    assert result.returncode == 0, result.stdout + result.stderr
    venv = fake.root / "myvenv"
    assert (venv / "bin" / "python").exists() and (venv / "COLCON_IGNORE").exists()
    assert f"-DPython3_EXECUTABLE={venv}/bin/python" in fake.log()
    assert f"source {fake.workspace}/install/setup.bash" in result.stdout


def test_a_new_relative_workspace_is_made_absolute(tmp_path: Path):
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--distro", "humble", "--skip-rosdep",
                             "--driver-version", "590.48.01", "--workspace", "new_ws"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    _dry_run_finished(result)
    assert f"-m venv --system-site-packages {tmp_path}/new_ws/venv\n" in result.stdout


@pytest.mark.parametrize("smi", ["Failed to initialize NVML: Driver/library version mismatch",
                                 "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."])
def test_failing_nvidia_smi_is_not_a_driver_version(fake: Fake, smi: str):
    result = fake.run("--skip-build", FAKE_SMI_OUT=smi, FAKE_SMI_RC="18")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert ": ok" not in out and "driver check: driver" not in out
    assert "WARNING" in out and smi in out
    assert "not working" in out.lower() and "reboot" in out and "not verified" in out.lower()


@pytest.mark.parametrize("version, ok", [("590.48.01", True), ("580", True), ("470.256.02", True),
                                         ("590.48.01\n", False), ("abc", False), ("590..1", False),
                                         ("", False), ("Failed to initialize NVML", False), ("5.9a", False)])
def test_driver_version_syntax(version: str, ok: bool):
    assert (_bash('is_driver_version "$V"', V=version).returncode == 0) == ok


def test_malformed_driver_version_option_is_refused(workspace: Path):
    result = _script("--dry-run", "--workspace", str(workspace), "--distro", "humble", "--driver-version", "5x0")
    assert result.returncode == 2 and "--driver-version" in result.stderr


def test_paths_are_printed_quoted(tmp_path: Path):
    workspace = tmp_path / "my ws"
    (workspace / "src").mkdir(parents=True)
    (workspace / "src" / "toist").symlink_to(ROOT)
    result = _script("--dry-run", "--workspace", str(workspace), "--distro", "humble", "--driver-version", "590.48.01")
    out = result.stdout
    _dry_run_finished(result)
    ws = f"'{workspace}'"
    assert f"+ cd {ws}\n" in out
    assert f"+ cd {ws} && set +u && source /opt/ros/humble/setup.bash && source '{workspace}/venv/bin/activate'" in out
    assert f"> '{workspace}/venv/toist-constraints.txt'" in out
    assert f"  source '{workspace}/install/setup.bash'\n  source '{workspace}/venv/bin/activate'\n" in out
    assert f"Check the GPU: '{workspace}/venv/bin/python' -c" in out


# --- Makefile: the development venv's stamps ---------------------------------------------------

def _make_tree(tmp_path: Path, venv_python: bool) -> Path:
    """A copy of the Makefile with every stamp up to date; .venv/bin/python only when asked."""
    import shutil
    import time
    tree = tmp_path / "tree"
    (tree / "requirements").mkdir(parents=True)
    (tree / "tools").mkdir()
    shutil.copy(ROOT / "Makefile", tree / "Makefile")
    old = time.time() - 1000
    for name in ("requirements/base.txt", "requirements/ros.txt", "requirements/weights.txt",
                 "requirements/lock.txt", "requirements/torch.txt", "tools/fix_ros_wheel_cmake.py"):
        (tree / name).write_text("")
        os.utime(tree / name, (old, old))
    if venv_python:
        (tree / ".venv" / "bin").mkdir(parents=True)
        (tree / ".venv" / "bin" / "python").write_text("#!/bin/sh\n")
        (tree / ".venv" / "bin" / "python").chmod(0o755)
        os.utime(tree / ".venv" / "bin" / "python", (old + 10, old + 10))
    (tree / ".stamps").mkdir()
    for i, stamp in enumerate(("venv", "torch", "deps")):
        (tree / ".stamps" / stamp).write_text("")
        os.utime(tree / ".stamps" / stamp, (old + 100 + i, old + 100 + i))
    return tree


def test_makefile_recreates_a_venv_deleted_by_hand(tmp_path: Path):
    tree = _make_tree(tmp_path, venv_python=False)
    result = subprocess.run(["make", "-n", ".stamps/deps"], cwd=tree, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "-m venv .venv" in result.stdout
    # torch's own dependencies (CUDA libraries, triton...) come at the locked versions too.
    assert "install --isolated -r requirements/torch.txt -c requirements/lock.txt" in result.stdout
    present = _make_tree(tmp_path / "present", venv_python=True)
    result = subprocess.run(["make", "-n", ".stamps/deps"], cwd=present, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "-m venv" not in result.stdout and "pip" not in result.stdout


def test_makefile_blames_colcon_only_for_colcon(tmp_path: Path):
    tree = _make_tree(tmp_path, venv_python=True)  # no .venv/bin/activate: source fails, not colcon
    result = subprocess.run(["make", "build"], cwd=tree, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "colcon build failed" not in result.stdout + result.stderr


def test_make_lock_keeps_the_old_lock_when_pip_freeze_fails(tmp_path: Path):
    tree = _make_tree(tmp_path, venv_python=True)
    (tree / ".venv" / "bin" / "python").write_text("#!/bin/sh\necho 'pip: broken' >&2\nexit 1\n")
    lock = tree / "requirements" / "lock.txt"
    written = lock.stat().st_mtime
    lock.write_text("torch==2.13.0\n")
    os.utime(lock, (written, written))  # the stamps stay up to date: only the freeze runs
    result = subprocess.run(["make", "lock"], cwd=tree, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "pip: broken" in result.stderr
    assert "install" not in result.stdout
    assert lock.read_text() == "torch==2.13.0\n"
    assert not (tree / "requirements" / "lock.txt.new").exists()


def test_make_lock_leaves_an_unchanged_lock_alone(tmp_path: Path):
    """An unchanged lock was still moved over the old one: every install stamp went stale and the
    next make ran pip again."""
    tree = _make_tree(tmp_path, venv_python=True)
    (tree / ".venv" / "bin" / "python").write_text("#!/bin/sh\necho 'torch==2.13.0'\n")
    lock = tree / "requirements" / "lock.txt"
    written = lock.stat().st_mtime
    lock.write_text("# Full version lock of the development environment (pip freeze), used as constraints.\n"
                    "# Regenerate with: make lock\ntorch==2.13.0\n")
    os.utime(lock, (written, written))
    assert subprocess.run(["make", "lock"], cwd=tree, capture_output=True, text=True, timeout=60).returncode == 0
    assert lock.stat().st_mtime == written and not (tree / "requirements" / "lock.txt.new").exists()
    assert subprocess.run(["make", "-q", ".stamps/deps"], cwd=tree, timeout=60).returncode == 0   # up to date
    (tree / ".venv" / "bin" / "python").write_text("#!/bin/sh\necho 'torch==2.14.0'\n")
    assert subprocess.run(["make", "lock"], cwd=tree, capture_output=True, text=True, timeout=60).returncode == 0
    assert lock.read_text().endswith("torch==2.14.0\n")


def test_a_failed_gpu_wheels_download_keeps_the_wheels_there_were(tmp_path: Path):
    tree = _make_tree(tmp_path, venv_python=True)
    (tree / ".venv" / "bin" / "python").write_text("#!/bin/sh\necho 'no index reachable' >&2\nexit 1\n")
    (tree / ".whl").mkdir()
    (tree / ".whl" / "pycocotools-2.0.10-cp312.whl").write_bytes(b"wheel")
    result = subprocess.run(["make", "gpu-wheels"], cwd=tree, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "download failed; .whl left as it was" in result.stdout
    assert (tree / ".whl" / "pycocotools-2.0.10-cp312.whl").read_bytes() == b"wheel"
    assert not (tree / ".whl.new").exists()


def test_make_demo_quotes_the_checkpoint_and_passes_a_text_encoder_and_more_options():
    result = subprocess.run(["make", "-n", "demo", "CHECKPOINT=/models/o'brien dir/toist.pth",
                             "TEXT_ENCODER=/models/roberta", "ARGS=--task 5 --out '/tmp/my demo'"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    joined = result.stdout.replace("\\\n", " ")   # make -n prints the recipe's continued lines as they are
    line = next(line for line in joined.splitlines() if "toist_ros.demo" in line)
    words = shlex.split(line[line.index("python -m toist_ros.demo"):])
    assert words[words.index("--checkpoint") + 1] == "/models/o'brien dir/toist.pth"
    assert words[words.index("--text-encoder") + 1] == "/models/roberta"
    assert words[words.index("--task") + 1] == "5" and words[words.index("--out") + 1] == "/tmp/my demo"


def test_the_offline_downloads_fetch_what_the_script_asks_each_distro_for():
    """docs/robot.md's offline `pip download` gave Humble's numba / numpy pins only: on Jazzy or
    Kilted (Python 3.12) numba < 0.58 has no wheel, and the script's `numba>=0.59` found nothing
    in the wheels folder. Every distro's numba and numpy specs must be in one of the commands
    (one command per Python), with the script's own minimums for the rest."""
    section = (ROOT / "docs" / "robot.md").read_text().split("## A robot without internet", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("pip download", 1)[1] for line in section.replace("\\\n", " ").splitlines()
                if "pip download" in line and "--index-url" not in line]
    minimums = _script_minimums()
    for distro in sorted(DISTROS):
        wanted = _bash(f"distro_numba_spec {distro}; distro_numpy_spec {distro}").stdout.split()
        assert len(wanted) == 2, wanted
        fitting = [c for c in commands if all(f"'{spec}'" in c for spec in wanted)]
        assert fitting, f"docs/robot.md offline: no pip download with {wanted} ({distro})"
        for package in ("torch", "torchvision", "transformers", "safetensors", "pycocotools"):
            assert f"'{package}>={minimums[package]}'" in fitting[0], f"{distro}: {package}>={minimums[package]}"
