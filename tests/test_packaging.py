"""Packaging facts: toist_core works without ROS; the ROS package files agree with each other."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


_NO_ROS_PROBE = r"""
import importlib, pkgutil, sys

ROS_ROOTS = {"rclpy", "rosidl_runtime_py", "rosidl_parser", "builtin_interfaces", "std_msgs",
             "sensor_msgs", "diagnostic_msgs", "toist_ros", "launch", "launch_ros"}

class NoRos:
    # Behaves as if ROS were not installed at all.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ROS_ROOTS:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: no ROS here)")
        return None

sys.meta_path.insert(0, NoRos())
sys.path.insert(0, ROOT)
import toist_core
names = [m.name for m in pkgutil.walk_packages(toist_core.__path__, "toist_core.")]
for name in names:
    importlib.import_module(name)
import training
print("IMPORTED", len(names))
"""


def test_toist_core_imports_without_ros():
    """Training machines have no ROS: every toist_core module (and training) imports without it."""
    # -I: no PYTHONPATH, so neither the colcon install overlay nor the repo root leaks in;
    # cwd "/" keeps the repository off the path except where the probe puts it.
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"ROOT = {str(ROOT)!r}\n" + _NO_ROS_PROBE],
        capture_output=True, text=True, cwd="/", timeout=300,
        env={"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORTED" in result.stdout


def test_package_xml_is_format_3_ament_cmake():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "toist_ros"
    assert root.find("export/build_type").text == "ament_cmake"
    assert "rosidl_interface_packages" in [e.text for e in root.findall("member_of_group")]


def test_the_declared_license_is_the_license_file():
    """package.xml and setup.py declared Apache-2.0 and no LICENSE file said what that grants."""
    declared = ET.parse(ROOT / "package.xml").getroot().findtext("license")
    assert declared == "Apache-2.0"
    assert 'license="Apache-2.0"' in (ROOT / "setup.py").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text


def test_cmake_generates_every_interface_file():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    files = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("msg/*.msg"), *ROOT.glob("srv/*.srv")])
    assert files, "no interface files"
    for f in files:
        assert f'"{f}"' in cmake, f"{f} is not in rosidl_generate_interfaces"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme.split("\n## ")[0]
    assert "make test" in ci


def test_pip_install_gives_the_libraries_and_the_toist_command(tmp_path):
    """`pip install .` (here into a target dir, no deps, offline) ships code, assets and `toist`."""
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    licenses = [p for p in target.glob("*.dist-info/**/LICENSE") if p.read_text() == (ROOT / "LICENSE").read_text()]
    assert licenses, "the installed distribution carries no LICENSE"
    for path in ["toist_core/inference/segmenter.py", "toist_core/checkpoint/load.py", "toist_core/cli/__init__.py",
                 "toist_core/assets/tiny_tokenizer/tokenizer.json", "toist_ros/node.py",
                 "toist_core/data/coco_id2name.json", "training/configs/pronoun.yaml",
                 "training/train.py", "toist_ros/perception_node.py",
                 "toist_core/assets/default_model/model.safetensors",
                 "toist_core/assets/default_model/tokenizer/tokenizer.json",
                 "toist_core/assets/default_model/MODEL_CARD.md"]:
        assert (target / path).is_file(), f"{path} is not installed"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    help_text = subprocess.run([str(target / "bin" / "toist"), "--help"], capture_output=True, text=True,
                               env=env, cwd=tmp_path, timeout=120)
    assert help_text.returncode == 0, help_text.stderr[-3000:]
    for command in ("predict", "export", "synth", "evaluate", "train"):
        assert command in help_text.stdout


def test_the_dev_environment_has_a_toist_command_that_works_from_any_directory(tmp_path):
    """`make setup` writes .venv/bin/toist; docs/ros.md tells users to run it from anywhere."""
    command = ROOT / ".venv" / "bin" / "toist"
    if not command.exists():
        import pytest

        pytest.skip("written by `make setup` (part of `make test`)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only .venv activated, no overlay
    result = subprocess.run([str(command), "synth", "--help"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: toist synth" in result.stdout


def test_the_warnings_and_errors_the_readme_names_are_in_the_public_api():
    """The README says the whole public API is in `toist_core`: the warnings and errors it tells
    users to expect (to catch or filter) must be importable from there."""
    import builtins
    import re

    import toist_core

    section = (ROOT / "README.md").read_text().split("## Inference API", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(\w+(?:Warning|Error))`", section)) - set(dir(builtins))
    assert {"UntrainedTaskWarning", "SlowPrecisionWarning", "NonFiniteOutputError"} <= named, named
    missing = sorted(name for name in named if not hasattr(toist_core, name))
    assert not missing, f"README names {missing}, which `toist_core` does not export"
    assert all(hasattr(toist_core, name) for name in toist_core.__all__)
    assert set(toist_core.__all__) <= set(dir(toist_core))   # lazy, yet listed (dir(), tab completion)


def test_every_import_the_docs_show_works():
    """The `from toist_core... import ...` / `from training... import ...` lines of the README's
    and docs' Python blocks name modules and objects that exist (docs drift silently)."""
    import importlib
    import re

    pattern = re.compile(r"^\s*from ((?:toist_core|training)(?:\.\w+)*) import \(?([\w, ]+)\)?", re.M)
    checked = 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
        for module_name, names in (match for block in blocks for match in pattern.findall(block)):
            module = importlib.import_module(module_name)
            for name in filter(None, (n.strip() for n in names.split(","))):
                assert hasattr(module, name), f"{doc.name}: `from {module_name} import {name}`: no such name"
                checked += 1
    assert checked >= 5, checked  # the pattern still finds the imports
