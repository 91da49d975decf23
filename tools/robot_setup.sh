#!/usr/bin/env bash
# Install toist on a robot that already has ROS 2 Humble, Jazzy or Kilted from apt (/opt/ros).
#
# What it does, in order (each step is skipped when already done, so it can be re-run):
#   1. checks: the colcon workspace holds this repository in src/, the ROS distro, the system
#      Python it was built for, and (x86-64) the NVIDIA driver against the torch CUDA build;
#   2. rosdep install for the apt dependencies in package.xml (numpy, OpenCV, SciPy, YAML, ...);
#   3. a virtual environment with --system-site-packages (PEP 668 forbids pip in the system
#      Python on Ubuntu 24.04; system site packages keep the apt Python modules that rclpy and
#      the ROS tools import visible), with a COLCON_IGNORE file in it;
#   4. pip install of torch & co. into it, with numpy held below 2 (the apt ROS packages are
#      built against numpy 1.x);
#   5. colcon build --packages-select toist_ros with the venv's interpreter.
# Background and manual steps: docs/robot.md.
set -euo pipefail

# --- What the project promises (keep in step with docs/robot.md and setup.py) -------------
TORCH_MIN=2.5            # torch.serialization.safe_globals (checkpoint loading) is 2.5+
TORCHVISION_MIN=0.20     # the torchvision of torch 2.5
TRANSFORMERS_MIN=4.45     # tokenizers >= 0.20 reads the packaged tokenizer.json files
SAFETENSORS_MIN=0.4.3
PYCOCOTOOLS_MIN=2.0.7
NUMBA_MIN=0.55.1         # the 3D step's kernel; rosdistro's python3-numba key has no Ubuntu 22.04 / 24.04
NUMPY_MIN=1.21.5         # Ubuntu 22.04's python3-numpy; checked with torch 2.13 (docs/robot.md)
SUPPORTED_DISTROS="humble jazzy kilted"
# torch 2.13 on PyPI is built for CUDA 13.0 (x86-64); other builds come from download.pytorch.org.
PYPI_TORCH_CUDA=13.0

# --- Pure logic (also sourced by tests: `source tools/robot_setup.sh --functions-only`) ---

# The Python minor version the distro's apt packages were built for.
distro_python() {
  case "$1" in
    humble) echo 3.10 ;;          # Ubuntu 22.04
    jazzy | kilted) echo 3.12 ;;  # Ubuntu 24.04
    *) return 1 ;;
  esac
}

distro_ubuntu() {
  case "$1" in
    humble) echo 22.04 ;;
    jazzy | kilted) echo 24.04 ;;
    *) return 1 ;;
  esac
}

# The numpy requirement for the venv. Below 2 on every distro: cv_bridge and the message
# type support of the apt ROS packages are compiled against the system numpy 1.x (22.04:
# 1.21.5, 24.04: 1.26.4) and refuse to import under numpy 2. The lower bound is the
# project's minimum, or the first numpy with wheels for the distro's Python (1.26 for 3.12).
distro_numpy_spec() {
  case "$1" in
    humble) echo "numpy>=${NUMPY_MIN},<2" ;;
    jazzy | kilted) echo "numpy>=1.26,<2" ;;
    *) return 1 ;;
  esac
}

# numba for the distro's Python and numpy: on Humble below 0.58 (0.57 is the last that takes
# numpy 1.21; a newer one would replace Ubuntu 22.04's numpy in the venv, under apt's SciPy 1.8).
distro_numba_spec() {
  case "$1" in
    humble) echo "numba>=${NUMBA_MIN},<0.58" ;;
    jazzy | kilted) echo "numba>=0.59" ;;   # the first numba for Python 3.12
    *) return 1 ;;
  esac
}

# The CUDA version of the torch build an index serves: "13.0" for PyPI, "12.6" for .../cu126,
# "cpu" for .../cpu; empty when the URL does not say.
index_cuda() {
  local url="${1%/}"
  case "$url" in
    "" | https://pypi.org/simple | https://pypi.python.org/simple) echo "$PYPI_TORCH_CUDA" ;;
    */cpu) echo cpu ;;
    */cu[0-9][0-9][0-9])
      local digits="${url##*/cu}"
      echo "${digits:0:2}.${digits:2}" ;;
    *) echo "" ;;
  esac
}

# The oldest Linux driver a CUDA major release runs on (NVIDIA's CUDA minor version
# compatibility: 13.x >= 580, 12.x >= 525, 11.x >= 450).
driver_minimum() {
  case "${1%%.*}" in
    13) echo 580 ;;
    12) echo 525 ;;
    11) echo 450 ;;
    *) return 1 ;;
  esac
}

# The driver NVIDIA ships with that CUDA toolkit (Linux x86-64, from the CUDA release notes);
# all of the toolkit's features need it. Empty when not known here.
driver_toolkit() {
  case "$1" in
    13.0) echo 580.65.06 ;;
    12.8) echo 570.26 ;;
    12.6) echo 560.28.03 ;;
    *) echo "" ;;
  esac
}

# 0 when dotted version $1 >= $2.
version_ge() {
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

# Check driver $1 against torch CUDA build $2. Prints what it found; returns 1 when CUDA
# cannot work with this driver (the message says what to do), 0 otherwise.
check_driver() {
  local driver="$1" cuda="$2" minimum toolkit
  if [ "$cuda" = cpu ]; then
    echo "driver check: CPU-only torch build chosen; the driver does not matter"
    return 0
  fi
  if [ -z "$cuda" ]; then
    echo "driver check: cannot tell the CUDA version of this --torch-index; pass --cuda X.Y"
    return 0
  fi
  minimum="$(driver_minimum "$cuda")" || {
    echo "driver check: no driver table for CUDA $cuda; skipped"
    return 0
  }
  toolkit="$(driver_toolkit "$cuda")"
  if ! version_ge "$driver" "$minimum"; then
    cat <<EOF
ERROR: NVIDIA driver $driver is too old for torch's CUDA $cuda build: it needs driver >= $minimum.
With this driver torch finds no GPU, and the node (device:=auto) runs on the CPU, many times
slower. Do one of:
  - upgrade the driver to >= ${toolkit:-$minimum}, e.g. sudo ubuntu-drivers install (or
    sudo apt install nvidia-driver-580), reboot, check with nvidia-smi, rerun this script;
EOF
    if [ "${minimum}" -ge 580 ] && version_ge "$driver" 525; then
      cat <<EOF
  - or keep the driver and install a torch build for CUDA 12.6, which runs on driver >= 525:
    rerun with --torch-index https://download.pytorch.org/whl/cu126
    (see https://pytorch.org/get-started/locally/ for the builds your torch version offers);
EOF
    fi
    cat <<EOF
  - or install anyway and run on the CPU: rerun with --skip-driver-check.
EOF
    return 1
  fi
  if [ -n "$toolkit" ] && ! version_ge "$driver" "$toolkit"; then
    echo "driver check: driver $driver runs torch's CUDA $cuda build (>= $minimum, CUDA minor version"
    echo "  compatibility); NVIDIA ships CUDA $cuda with $toolkit, upgrade if a CUDA error names the driver"
    return 0
  fi
  echo "driver check: driver $driver >= ${toolkit:-$minimum} for torch's CUDA $cuda build: ok"
}

# 0 when $1 is a driver version (digits and dots, e.g. 580.65.06), not an nvidia-smi error
# such as "Failed to initialize NVML: Driver/library version mismatch".
is_driver_version() {
  [[ "$1" =~ ^[0-9]+(\.[0-9]+)*$ ]]
}

# A Jetson (JetPack / L4T) board: PyPI's torch has no CUDA for its integrated GPU.
is_jetson() {
  [ "${TOIST_ARCH:-$(uname -m)}" = aarch64 ] && [ -e "${TOIST_TEGRA_RELEASE:-/etc/nv_tegra_release}" ]
}

if [ "${1:-}" = --functions-only ]; then
  # shellcheck disable=SC2317  # exit is reached when the file is run instead of sourced
  return 0 2>/dev/null || exit 0
fi

# --- Options -------------------------------------------------------------------------------
usage() {
  cat <<EOF
Usage: tools/robot_setup.sh [options]

Sets up toist in a colcon workspace on a robot with ROS 2 ${SUPPORTED_DISTROS// /, } from apt:
rosdep install, a virtual environment with system site packages, torch & co. from pip,
colcon build --packages-select toist_ros. Safe to re-run. See docs/robot.md.

Options:
  --workspace DIR      colcon workspace holding this repository in DIR/src (default: the
                       workspace this repository lies in, else ~/toist_ws)
  --venv DIR           virtual environment (default: WORKSPACE/venv)
  --distro NAME        humble, jazzy or kilted (default: \$ROS_DISTRO, else the one in /opt/ros)
  --python PATH        the system Python ROS was built for (default: /usr/bin/python3)
  --torch-index URL    pip index for torch/torchvision (default: PyPI, CUDA $PYPI_TORCH_CUDA build); e.g.
                       https://download.pytorch.org/whl/cu126 for drivers >= 525,
                       https://download.pytorch.org/whl/cpu for no GPU
  --cuda X.Y           CUDA version of that build, when the URL does not end in cuXYZ/cpu
                       (both are stored in VENV/toist-setup.env: a re-run without --torch-index
                       and --cuda reuses them; pass --torch-index https://pypi.org/simple to go
                       back to PyPI's build)
  --driver-version V   use V (digits and dots, e.g. 580.65.06) as the NVIDIA driver version
                       instead of asking nvidia-smi
  --skip-driver-check  install even when the driver is too old for the torch build (CPU only)
  --skip-rosdep        do not run rosdep install (apt dependencies installed by hand)
  --skip-build         stop before colcon build
  --dry-run            print the commands instead of running them; exits 5 after listing
                       the checks that failed (a real run would stop at the first)
  -h, --help           this text

Torch CUDA build -> minimum NVIDIA driver (Linux): CUDA 13.x >= 580, CUDA 12.x >= 525
(NVIDIA ships 13.0 with 580.65.06, 12.8 with 570.26, 12.6 with 560.28.03).
EOF
}

# Default workspace: the one this repository is cloned into (WS/src/toist), else ~/toist_ws.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$(basename "$(dirname "$REPO")")" = src ]; then
  WORKSPACE="$(dirname "$(dirname "$REPO")")"
else
  WORKSPACE="$HOME/toist_ws"
fi
VENV=""
DISTRO="${ROS_DISTRO:-}"
PYTHON=/usr/bin/python3
TORCH_INDEX=""
CUDA=""
DRIVER=""
SKIP_DRIVER_CHECK=0
SKIP_ROSDEP=0
SKIP_BUILD=0
DRY_RUN=0

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --workspace) need_value "$@"; WORKSPACE="$2"; shift 2 ;;
    --venv) need_value "$@"; VENV="$2"; shift 2 ;;
    --distro) need_value "$@"; DISTRO="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
    --torch-index) need_value "$@"; TORCH_INDEX="$2"; shift 2 ;;
    --cuda) need_value "$@"; CUDA="$2"; shift 2 ;;
    --driver-version) need_value "$@"; DRIVER="$2"; shift 2 ;;
    --skip-driver-check) SKIP_DRIVER_CHECK=1; shift ;;
    --skip-rosdep) SKIP_ROSDEP=1; shift ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$DRIVER" ] && ! is_driver_version "$DRIVER"; then
  echo "error: --driver-version $DRIVER is not a driver version (digits and dots, e.g. 580.65.06)" >&2
  exit 2
fi

# Absolute paths: the script cd's into the workspace before it sources the venv's activate.
absolute() {
  case "$1" in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "${1#./}" ;;
  esac
}
if [ -d "$WORKSPACE" ]; then
  WORKSPACE="$(cd "$WORKSPACE" && pwd)"
else
  WORKSPACE="$(absolute "$WORKSPACE")"  # not there yet
fi
VENV="$(absolute "${VENV:-$WORKSPACE/venv}")"
case "$PYTHON" in */*) PYTHON="$(absolute "$PYTHON")" ;; esac
VPY="$VENV/bin/python"

# The torch build chosen on the first run (--torch-index, --cuda), kept for plain re-runs: without
# it a re-run would take PyPI's build, stop on the driver check or swap the installed build.
SETTINGS="$VENV/toist-setup.env"
CUDA_GIVEN="$CUDA"
REUSED_SETTINGS=0
if [ -z "$TORCH_INDEX$CUDA" ] && [ -f "$SETTINGS" ]; then
  while IFS='=' read -r key value; do
    case "$key" in
      TORCH_INDEX) TORCH_INDEX="$value" ;;
      CUDA) CUDA="$value" ;;
    esac
  done <"$SETTINGS"
  CUDA_GIVEN="$CUDA"
  REUSED_SETTINGS=1
fi

say() { echo "==> $*"; }
die() { echo "ERROR: $*" >&2; exit 1; }
# One argument as the shell would need it typed ('...' when it holds special characters).
quote() {
  case "$1" in
    *[!A-Za-z0-9_./:=@%+,-]* | "") printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}
# Run a command, or only print it with --dry-run (as "+ command", arguments quoted).
run() {
  local line="+" arg
  for arg in "$@"; do line="$line $(quote "$arg")"; done
  echo "$line"
  [ "$DRY_RUN" = 1 ] || "$@"
}
# A problem that --dry-run reports and carries on past (this machine may not be the robot);
# the dry run still exits non-zero at the end, listing them, since the real run would stop.
DRY_RUN_PROBLEMS=()
problem() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "WARNING (dry run, continuing): $*"
    DRY_RUN_PROBLEMS+=("$*")
  else
    die "$*"
  fi
}

# --- 1. Checks -----------------------------------------------------------------------------
if [ -z "$DISTRO" ]; then
  found=()
  for d in $SUPPORTED_DISTROS; do [ -e "/opt/ros/$d/setup.bash" ] && found+=("$d"); done
  [ "${#found[@]}" -eq 1 ] ||
    die "cannot tell the ROS distro (in /opt/ros: ${found[*]:-none}); pass --distro or source its setup.bash"
  DISTRO="${found[0]}"
fi
case " $SUPPORTED_DISTROS " in
  *" $DISTRO "*) ;;
  *) die "ROS distro '$DISTRO' is not supported; supported: $SUPPORTED_DISTROS" ;;
esac
ROS_SETUP="/opt/ros/$DISTRO/setup.bash"
WANT_PY="$(distro_python "$DISTRO")"
NUMPY_SPEC="$(distro_numpy_spec "$DISTRO")"
NUMBA_SPEC="$(distro_numba_spec "$DISTRO")"
say "ROS 2 $DISTRO (Ubuntu $(distro_ubuntu "$DISTRO"), Python $WANT_PY); workspace $WORKSPACE; venv $VENV"
say "numpy requirement: $NUMPY_SPEC"
[ "$REUSED_SETTINGS" = 0 ] ||
  say "torch build of the earlier run (from $SETTINGS): ${TORCH_INDEX:-PyPI}${CUDA:+, CUDA $CUDA}"
[ -e "$ROS_SETUP" ] || problem "$ROS_SETUP not found: install ROS 2 $DISTRO from apt first (docs/robot.md)"

# This repository must be in the workspace's src/ (colcon builds what lies there).
# (-L: src/toist may be a symlink; depth 3: src/<repo>/package.xml or one folder deeper.)
if [ -z "$(find -L "$WORKSPACE/src" -maxdepth 3 -name package.xml \
  -exec grep -l "<name>toist_ros</name>" {} + 2>/dev/null)" ]; then
  problem "no toist_ros package under $WORKSPACE/src: clone this repository to $WORKSPACE/src/toist"
fi

# The venv must use the interpreter the apt ROS packages were built for.
if [ -x "$PYTHON" ]; then
  have_py="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [ "$have_py" = "$WANT_PY" ] ||
    problem "$PYTHON is Python $have_py, ROS 2 $DISTRO needs $WANT_PY (Ubuntu $(distro_ubuntu "$DISTRO"))"
  # Ubuntu splits venv/ensurepip into python3-venv.
  "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
    problem "$PYTHON cannot create virtual environments: sudo apt install python3-venv"
else
  problem "$PYTHON not found"
fi

JETSON=0
if is_jetson; then
  JETSON=1
  say "Jetson detected ($(head -n1 "${TOIST_TEGRA_RELEASE:-/etc/nv_tegra_release}" 2>/dev/null | cut -c1-60))"
fi

# Which CUDA the chosen torch build needs, and whether this machine's driver runs it.
[ -n "$CUDA" ] || CUDA="$(index_cuda "$TORCH_INDEX")"
if [ "$JETSON" = 1 ]; then
  say "driver check skipped: on a Jetson the driver comes with JetPack"
elif [ "$SKIP_DRIVER_CHECK" = 1 ]; then
  say "driver check skipped (--skip-driver-check)"
else
  SMI_BROKEN=0
  if [ -z "$DRIVER" ] && command -v nvidia-smi >/dev/null 2>&1; then
    smi_rc=0
    smi_out="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1)" || smi_rc=$?
    DRIVER="${smi_out%%$'\n'*}"  # the first GPU's
    DRIVER="${DRIVER// /}"
    if [ "$smi_rc" != 0 ] || ! is_driver_version "$DRIVER"; then
      cat >&2 <<EOF

WARNING: an NVIDIA driver is installed (nvidia-smi is there) but it is NOT WORKING:
  nvidia-smi (exit code $smi_rc): ${smi_out%%$'\n'*}
Usually a reboot is due after a driver install or upgrade (the kernel module and the driver
libraries differ: "Driver/library version mismatch"). Until nvidia-smi prints the driver
version torch finds no GPU and the node runs on the CPU. The driver check is NOT VERIFIED:
reboot, check nvidia-smi, and rerun this script.

EOF
      DRIVER=""
      SMI_BROKEN=1
    fi
  fi
  if [ "$SMI_BROKEN" = 1 ]; then
    say "driver check not verified (nvidia-smi fails, see the warning above); going on"
  elif [ -z "$DRIVER" ]; then
    say "no NVIDIA driver found (no nvidia-smi): torch will run on the CPU"
  elif ! check_driver "$DRIVER" "$CUDA"; then
    # A real run stops here (exit 3); a dry run lists it with the others and exits 5 at the end.
    [ "$DRY_RUN" = 1 ] || exit 3
    DRY_RUN_PROBLEMS+=("NVIDIA driver $DRIVER is too old for torch's CUDA $CUDA build (the ERROR above says what to do)")
  fi
fi

# --- 2. rosdep -----------------------------------------------------------------------------
if [ "$SKIP_ROSDEP" = 1 ]; then
  say "rosdep skipped (--skip-rosdep)"
else
  command -v rosdep >/dev/null 2>&1 || problem "rosdep not found: sudo apt install python3-rosdep"
  ls /etc/ros/rosdep/sources.list.d/*.list >/dev/null 2>&1 ||
    problem "rosdep is not initialised: sudo rosdep init && rosdep update"
  say "apt dependencies of package.xml (may ask for the sudo password)"
  echo "+ cd $(quote "$WORKSPACE")"
  (
    [ "$DRY_RUN" = 1 ] || cd "$WORKSPACE"
    run rosdep install --from-paths src --ignore-src -y --rosdistro "$DISTRO"
  )
fi

# --- 3. Virtual environment ----------------------------------------------------------------
if [ -x "$VPY" ]; then
  cfg="$VENV/pyvenv.cfg"
  grep -qiE '^include-system-site-packages *= *true' "$cfg" 2>/dev/null ||
    die "$VENV exists without system site packages (rclpy's apt dependencies would be hidden); remove it and rerun"
  venv_py="$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [ "$venv_py" = "$WANT_PY" ] || die "$VENV is Python $venv_py, ROS 2 $DISTRO needs $WANT_PY; remove it and rerun"
  say "virtual environment $VENV exists"
else
  say "virtual environment $VENV (with system site packages)"
  run "$PYTHON" -m venv --system-site-packages "$VENV"
fi
# colcon must not crawl the venv when it looks for packages.
run touch "$VENV/COLCON_IGNORE"

# --- 4. pip --------------------------------------------------------------------------------
CONSTRAINTS="$VENV/toist-constraints.txt"
say "pip constraints in $CONSTRAINTS: $NUMPY_SPEC"
if [ "$DRY_RUN" = 1 ]; then
  echo "+ echo $(quote "$NUMPY_SPEC") > $(quote "$CONSTRAINTS")"
else
  printf '# written by tools/robot_setup.sh: keep numpy at the ABI of the apt ROS packages\n%s\n' \
    "$NUMPY_SPEC" >"$CONSTRAINTS"
fi
PIP=("$VPY" -m pip --disable-pip-version-check)

# PyPI's aarch64 torch has no CUDA for a Jetson's integrated GPU; NVIDIA builds it per JetPack.
jetson_torch_help() {
  cat <<EOF
This is a Jetson: PyPI's torch has no CUDA for its GPU. Install NVIDIA's PyTorch for your
JetPack release into the venv first, then rerun this script (it keeps that torch):
  $(quote "$VENV/bin/pip") install <torch wheel for your JetPack, from NVIDIA's PyTorch for Jetson downloads>
  $(quote "$VENV/bin/pip") install <the torchvision wheel built for that torch, or build it from source>
Check: $(quote "$VPY") -c 'import torch; print(torch.__version__, torch.cuda.is_available())'
It must print True. Details: docs/robot.md, "Jetson".
EOF
}
if [ "$JETSON" = 1 ]; then
  if [ "$DRY_RUN" = 1 ]; then
    jetson_torch_help
  elif ! "$VPY" -c 'import torch, torchvision' 2>/dev/null; then
    jetson_torch_help
    exit 4
  fi
  say "Jetson: keeping the torch/torchvision installed in the venv (no torch from PyPI)"
else
  torch_args=("torch>=$TORCH_MIN" "torchvision>=$TORCHVISION_MIN" -c "$CONSTRAINTS")
  [ -z "$TORCH_INDEX" ] || torch_args+=(--index-url "$TORCH_INDEX")
  # Switching the CUDA build of an installed torch: pip sees it as satisfied, so uninstall it
  # first (not --force-reinstall, which reinstalls numpy & co. into the venv as well).
  if [ "$DRY_RUN" = 0 ] && [ "$CUDA" != "" ]; then
    have_cuda="$("$VPY" -c 'import torch; print(torch.version.cuda or "cpu")' 2>/dev/null || true)"
    have_cuda="$(echo "$have_cuda" | cut -d. -f1-2)"  # "12.6.77" -> "12.6"
    if [ -n "$have_cuda" ] && [ "$have_cuda" != "$CUDA" ]; then
      say "installed torch is built for CUDA $have_cuda, want $CUDA: uninstalling torch and torchvision first"
      run "${PIP[@]}" uninstall -y torch torchvision
    fi
  fi
  say "torch and torchvision (CUDA ${CUDA:-?} build${TORCH_INDEX:+ from $TORCH_INDEX})"
  run "${PIP[@]}" install "${torch_args[@]}"
  # Kept for the next run (see SETTINGS above).
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "+ printf 'TORCH_INDEX=%s\\nCUDA=%s\\n' $(quote "$TORCH_INDEX") $(quote "$CUDA_GIVEN") > $(quote "$SETTINGS")"
  else
    printf '# written by tools/robot_setup.sh: the torch build of this venv, reused by a re-run\nTORCH_INDEX=%s\nCUDA=%s\n' \
      "$TORCH_INDEX" "$CUDA_GIVEN" >"$SETTINGS"
  fi
fi
say "transformers, safetensors, pycocotools, numba"
run "${PIP[@]}" install "transformers>=$TRANSFORMERS_MIN" "safetensors>=$SAFETENSORS_MIN" \
  "pycocotools>=$PYCOCOTOOLS_MIN" "$NUMBA_SPEC" "$NUMPY_SPEC" -c "$CONSTRAINTS"

# --- 5. colcon build -----------------------------------------------------------------------
if [ "$SKIP_BUILD" = 1 ]; then
  say "colcon build skipped (--skip-build)"
else
  # `python -m colcon` from the venv (colcon from apt is visible through the system site
  # packages); the -D options make CMake (FindPython3 on Jazzy+, PYTHON_EXECUTABLE on Humble's
  # rosidl_generator_py) use the venv's interpreter and numpy headers for the generated code.
  if [ "$DRY_RUN" = 1 ] || "$VPY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("colcon.__main__") is None)' 2>/dev/null; then
    COLCON=("$VPY" -m colcon)
  elif command -v colcon >/dev/null 2>&1; then
    COLCON=(colcon)
  else
    die "colcon not found: sudo apt install python3-colcon-common-extensions"
  fi
  say "colcon build of toist_ros"
  echo "+ cd $(quote "$WORKSPACE") && set +u && source $(quote "$ROS_SETUP") && source $(quote "$VENV/bin/activate")"
  if [ "$DRY_RUN" = 0 ]; then
    cd "$WORKSPACE"
    # ROS's and venv's setup scripts read unset variables.
    set +u
    # shellcheck disable=SC1090
    source "$ROS_SETUP"
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    set -u
  fi
  run "${COLCON[@]}" build --packages-select toist_ros \
    --cmake-args "-DPython3_EXECUTABLE=$VPY" "-DPYTHON_EXECUTABLE=$VPY"
fi

cat <<EOF

Done. In every shell that runs the node (or add both lines to ~/.bashrc):
  source $(quote "$WORKSPACE/install/setup.bash")
  source $(quote "$VENV/bin/activate")
Then, for example:
  ros2 launch toist_ros perception.launch.py image_topic:=/camera/color/image_raw task:=2
Check the GPU: $(quote "$VPY") -c 'import torch; print(torch.cuda.is_available())'
EOF

if [ "${#DRY_RUN_PROBLEMS[@]}" -gt 0 ]; then
  {
    echo
    echo "DRY RUN FAILED: the install would stop at the first of these ${#DRY_RUN_PROBLEMS[@]} problem(s):"
    printf '  - %s\n' "${DRY_RUN_PROBLEMS[@]}"
  } >&2
  exit 5
fi
