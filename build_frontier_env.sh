#!/bin/bash
# Build, on a Frontier login node, the conda environment qml.py runs in: Python 3.12, PyTorch's ROCm
# wheels, Kokkos built with hipcc for the MI250X (gfx90a), PennyLane-Lightning and Lightning-Kokkos from
# one release tag against that Kokkos, mpi4py built against Cray MPICH, then requirements-frontier.txt.
#
#   bash build_frontier_env.sh [--dry-run] [--build-dir DIR] ENV_PREFIX
#
#   ENV_PREFIX   where the conda environment goes, e.g. /ccs/proj/<proj>/<user>/qml-env (a new path, or one
#                this script made before). Kokkos is installed inside it (ENV_PREFIX/opt), so the
#                environment stays whole; sources are cloned into ENV_PREFIX/build unless --build-dir says.
#   --dry-run    print every command, run none.
#   QML_MODULES  the modules to load, in order (space-separated; the launcher submit_qml.sbatch reads the
#                same variable). Default: OLCF's current PyTorch stack, below.
#
# Each step says what it does, checks what it did and stops with one line naming the step and what to do.
# Running it again skips the steps that are done, so after a failure fix the cause and run it again.
# It ends by starting lightning.kokkos and checking Kokkos runs on HIP, which needs a GPU: on a node
# without one it says so (run it again inside an allocation: every built step is skipped).
set -euo pipefail

# ---- Versions: each fact with where it comes from (olcf/olcf-user-docs and
# PennyLaneAI/pennylane-lightning sources, read 2026-07) ----

# OLCF, software/analytics/pytorch_frontier.rst, "Installing PyTorch" (lines 40-67): modules PrgEnv-gnu/8.7.0,
# cpe/26.03, miniforge3/23.11.0-0, rocm/7.1.1, craype-accel-amd-gfx90a; `conda create -p ... python=3.12
# -c conda-forge`; `pip install torch==2.10.0 torchvision==0.25.0 ... --index-url
# https://download.pytorch.org/whl/rocm7.1` ("the current recommendation on Frontier"). torchaudio, also
# in that line, is left out: qml.py does not use it.
# OLCF, software/software-news.rst, "Frontier: Software Changes (July 1, 2026)" (lines 11-26): cpe 23.12
# and cray-mpich 8.1.28 were removed; cpe 26.03 goes with cray-mpich 9.1.0.
DEFAULT_MODULES="PrgEnv-gnu/8.7.0 cpe/26.03 miniforge3/23.11.0-0 rocm/7.1.1 craype-accel-amd-gfx90a"
PYTHON_VERSION=3.12
TORCH_VERSION=2.10.0
TORCHVISION_VERSION=0.25.0
TORCH_INDEX=https://download.pytorch.org/whl/rocm7.1

# PennyLane-Lightning v0.45.0 (tag commit 862df1a4e855d1519ae5ec5ed2df3688268170d4): its
# pennylane_lightning/core/_version.py:19 says __version__ = "0.45.0"; both packages are built from this
# one tag, so they match (configure_pyproject_toml.py makes Lightning-Kokkos require
# pennylane_lightning==0.45.0). OLCF's Lightning-Kokkos recipe (quantum/quantum_software/hybrid_hpc.rst,
# lines 179-250, "ROCm 7.1.1") checks out v0.45.0 and installs PennyLane v0.45.0 ("version must match
# pennylane-lightning"); PennyLane 0.45.x is also what this project uses elsewhere.
LIGHTNING_TAG=v0.45.0
LIGHTNING_VERSION=0.45.0
PENNYLANE_SERIES=0.45
PENNYLANE_SPEC="pennylane==$PENNYLANE_SERIES.*"
LIGHTNING_URL=https://github.com/PennyLaneAI/pennylane-lightning.git

# Kokkos 5.1.0: the version Lightning v0.45.0 is tested with. cmake/support_kokkos.cmake:8
# `set(KOKKOS_VERSION 5.1.0)`; .github/workflows/set_wheel_build_matrix.yml:91 kokkos_version ["5.1.0"],
# cloned with `git clone --branch 5.1.0` (tests_lkcuda_cpp.yml:69, wheel_linux_x86_64_rocm.yml:80);
# doc/lightning_kokkos/installation_hpc.rst:31 "Lightning-Kokkos is tested with Kokkos version 5.1.0".
# OLCF's recipe (hybrid_hpc.rst:198) builds the same 5.1.0.
KOKKOS_VERSION=5.1.0
KOKKOS_URL=https://github.com/kokkos/kokkos.git

# mpi4py: OLCF pytorch_frontier.rst "Optional: Install mpi4py" (lines 91-101) and
# software/python/parallel_h5py.rst (lines 150-154): `module unload rocm`, `module unload
# craype-accel-amd-gfx90a`, then `MPICC="cc -shared" pip install --no-cache-dir --no-binary=mpi4py mpi4py`,
# with `export LD_LIBRARY_PATH=$CRAY_LD_LIBRARY_PATH:$LD_LIBRARY_PATH` for non-default Cray modules.
# The lower bound is requirements.txt's.
MPI4PY_SPEC="mpi4py>=4.0"
MPI4PY_UNLOAD="rocm craype-accel-amd-gfx90a"

# Not checked here (no Frontier, no network): that these modules load together today; that the rocm7.1
# index holds torch 2.10.0 for Python 3.12 (with a "+rocm" local version); the exact text of Cray MPICH's
# MPI_Get_library_version (expected to contain "CRAY MPICH"); whether login nodes have GPUs; the Kokkos
# 5.1.0 install layout (KokkosConfigVersion.cmake, and `set(Kokkos_DEVICES ...)` in
# KokkosConfigCommon.cmake, read in Kokkos' cmake/ at a 4.6-era commit); and a real build of any of it.

ME=build_frontier_env.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STEPS=(env torch build-tools kokkos lightning lightning-kokkos mpi4py requirements)

usage() {
    echo "usage: bash $ME [--dry-run] [--build-dir DIR] ENV_PREFIX   (e.g. /ccs/proj/<proj>/<user>/qml-env)"
}

bad_usage() { # message: one line, exit 2
    echo "$ME: error: $1; usage: bash $ME [--dry-run] [--build-dir DIR] ENV_PREFIX" >&2
    exit 2
}

fail() { # step what-to-do...: one line, exit 1
    local step=$1
    shift
    echo "$ME: error: step $step failed: $*" >&2
    exit 1
}

absolute() { # path -> absolute path (it need not exist yet), without a trailing slash
    local p=$1
    [[ "$p" == /* ]] || p="$PWD/$p"
    while [[ "$p" == */ && "$p" != / ]]; do p=${p%/}; done
    echo "$p"
}

parse_args() {
    DRY_RUN=0
    PREFIX=""
    BUILD_DIR=""
    while [ $# -gt 0 ]; do
        case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --build-dir)
            [ $# -ge 2 ] && [ -n "$2" ] || bad_usage "--build-dir needs a directory"
            BUILD_DIR=$2
            shift
            ;;
        --build-dir=*) BUILD_DIR=${1#--build-dir=} ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*) bad_usage "unknown option '$1'" ;;
        *)
            [ -z "$PREFIX" ] || bad_usage "one ENV_PREFIX only, got '$PREFIX' and '$1'"
            PREFIX=$1
            ;;
        esac
        shift
    done
    [ -n "$PREFIX" ] || bad_usage "missing ENV_PREFIX (where the conda environment goes)"
    PREFIX=$(absolute "$PREFIX")
    BUILD_DIR=$(absolute "${BUILD_DIR:-$PREFIX/build}")
    # Lightning's setup.py splits CMAKE_ARGS (which names the Kokkos path) on spaces.
    [[ "$PREFIX$BUILD_DIR" != *[[:space:]]* ]] ||
        bad_usage "ENV_PREFIX and --build-dir must not contain spaces (CMake arguments are split on them)"
    PY=$PREFIX/bin/python
    KOKKOS_PREFIX=$PREFIX/opt/kokkos-$KOKKOS_VERSION
    REQUIREMENTS=$SCRIPT_DIR/requirements-frontier.txt
}

# ---- Running commands: every command goes through `run` (or `run_module`), which prints it and, unless
# --dry-run, runs it; a failure ends the current step with its advice. ----

show() { # command... -> "+ command", quoted so that it can be pasted back into a shell
    local out="+" arg
    for arg in "$@"; do
        out+=" $(printf '%q' "$arg")"
    done
    echo "$out"
}

run() {
    show "$@"
    if [ "$DRY_RUN" = 0 ]; then
        "$@" || fail "$STEP" "$ADVICE"
    fi
}

have_module() {
    # Lmod's `module` is a shell function (inherited when exported) or, elsewhere, an executable; a
    # shell that has neither can get the function from Lmod's init script.
    type module >/dev/null 2>&1 && return 0
    local init=${LMOD_PKG:-/usr/share/lmod/lmod}/init/bash
    if [ -f "$init" ]; then
        set +u
        # shellcheck disable=SC1090  # Lmod's own init script, found at run time
        source "$init" >/dev/null 2>&1 || true
        set -u
    fi
    type module >/dev/null 2>&1
}

lmod() { # module arguments...: module's scripts are not written for nounset
    local rc=0
    set +u
    module "$@" || rc=$?
    set -u
    return "$rc"
}

run_module() { # subcommand modules...
    show module "$@"
    if [ "$DRY_RUN" = 0 ]; then
        lmod "$@" || fail "$STEP" "$ADVICE"
    fi
}

need() { # tool what-provides-it: checked before a step uses the tool (not in --dry-run)
    [ "$DRY_RUN" = 1 ] || command -v "$1" >/dev/null 2>&1 ||
        fail "$STEP" "$1 not found on PATH: $2 provides it (check QML_MODULES, then 'module list')"
}

prepend_path() { # variable directories: put directories first, dropping empty and repeated entries
    local var=$1 joined="" dir
    local -a dirs
    IFS=: read -r -a dirs <<<"$2:${!var:-}"
    for dir in "${dirs[@]}"; do
        if [ -n "$dir" ] && [[ ":$joined:" != *":$dir:"* ]]; then
            joined+="${joined:+:}$dir"
        fi
    done
    export "$var=$joined"
}

cray_libs_first() {
    # OLCF: with non-default Cray modules (cpe/26.03), their libraries must come first when building
    # against Cray MPICH and when running.
    echo "-- LD_LIBRARY_PATH: CRAY_LD_LIBRARY_PATH first"
    if [ "$DRY_RUN" = 0 ] && [ -n "${CRAY_LD_LIBRARY_PATH:-}" ]; then
        prepend_path LD_LIBRARY_PATH "$CRAY_LD_LIBRARY_PATH"
    fi
}

fresh_clone() { # url tag destination: a shallow clone of one tag, replacing an earlier one
    need git "the system (or a git module)"
    run rm -rf "$3"
    run mkdir -p "$(dirname "$3")"
    run git clone --branch "$2" --depth 1 "$1" "$3"
}

# ---- Probes: what is already in the environment (never run in --dry-run) ----

probe() { # python-code args... -> its output; fails when Python fails
    [ -x "$PY" ] || return 1
    "$PY" -c "$1" "${@:2}" 2>/dev/null
}

DIST_PROBE='import sys, importlib.metadata as md
for name in sys.argv[1:]:
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        print(name, "-", "missing")
        continue
    print(name, dist.version, "url" if dist.read_text("direct_url.json") else "index")'

dist() { # distribution -> "version origin": origin is url (installed from a path or URL), index or missing
    local out
    out=$(probe "$DIST_PROBE" "$1") || out="$1 - missing"
    echo "${out#* }"
}

done_env() {
    if [ ! -x "$PY" ]; then
        WHY="$PY does not exist"
        return 1
    fi
    local version
    version=$(probe 'import sys; print("%d.%d" % tuple(sys.version_info[:2]))') || version="none"
    WHY="$PREFIX holds Python $version, not $PYTHON_VERSION"
    [ "$version" = "$PYTHON_VERSION" ]
}

TORCH_PROBE='import torch, torchvision
print(torch.__version__, torchvision.__version__, torch.version.hip or "none")'

done_torch() {
    local torch="" vision="" hip=""
    read -r torch vision hip <<<"$(probe "$TORCH_PROBE" || echo "none none none")"
    WHY="torch $torch, torchvision $vision, HIP $hip (wanted torch $TORCH_VERSION, torchvision \
$TORCHVISION_VERSION, a HIP build)"
    [ "${torch%%+*}" = "$TORCH_VERSION" ] && [ "${vision%%+*}" = "$TORCHVISION_VERSION" ] && [ "$hip" != none ]
}

done_build_tools() {
    local name
    for name in cmake ninja tomlkit; do
        WHY="$name is not installed in $PREFIX"
        [ "$(dist "$name")" != "- missing" ] || return 1
    done
}

kokkos_config_dir() { # -> the directory of the installed KokkosConfig.cmake (GNUInstallDirs: lib64 or lib)
    local dir
    for dir in "$KOKKOS_PREFIX/lib64/cmake/Kokkos" "$KOKKOS_PREFIX/lib/cmake/Kokkos"; do
        if [ -f "$dir/KokkosConfig.cmake" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

done_kokkos() {
    local dir
    WHY="no KokkosConfig.cmake under $KOKKOS_PREFIX"
    dir=$(kokkos_config_dir) || return 1
    WHY="the Kokkos in $KOKKOS_PREFIX is not version $KOKKOS_VERSION"
    grep -q "PACKAGE_VERSION \"$KOKKOS_VERSION\"" "$dir/KokkosConfigVersion.cmake" 2>/dev/null || return 1
    # KokkosConfigCommon.cmake records the enabled backends: set(Kokkos_DEVICES ...).
    WHY="the Kokkos in $KOKKOS_PREFIX was built without HIP"
    grep -Eiq '^[[:space:]]*set\(Kokkos_DEVICES .*HIP' "$dir/KokkosConfigCommon.cmake" 2>/dev/null
}

from_tag() { # distribution -> true when it is Lightning's version, installed from the cloned tag
    local got
    got=$(dist "$1")
    WHY="$1 is '$got', not $LIGHTNING_VERSION built from $LIGHTNING_TAG"
    [ "$got" = "$LIGHTNING_VERSION url" ]
}

done_lightning() {
    local pennylane
    pennylane=$(dist pennylane)
    WHY="pennylane is '$pennylane', not $PENNYLANE_SERIES.*"
    [[ "$pennylane" == "$PENNYLANE_SERIES".* ]] || return 1
    from_tag pennylane_lightning
}

done_lightning_kokkos() {
    from_tag pennylane_lightning_kokkos
}

# mpi4py.rc.initialize = False: the MPI library is asked for its version without MPI_Init, which a login
# node may not allow (MPI_Get_library_version may be called before MPI_Init).
MPI_PROBE='import mpi4py
mpi4py.rc.initialize = False
from mpi4py import MPI
print(" ".join(MPI.Get_library_version().split()))'

done_mpi4py() {
    local library
    library=$(probe "$MPI_PROBE") || library="no importable mpi4py"
    WHY="mpi4py's MPI library is '${library:0:60}', not Cray MPICH"
    [[ "${library,,}" == *"cray mpich"* ]]
}

done_requirements() {
    WHY="$REQUIREMENTS is not satisfied"
    [ -x "$PY" ] || return 1
    # pip's own resolver, offline: succeeds only when every requirement is already installed.
    "$PY" -m pip install --no-index --dry-run --quiet -r "$REQUIREMENTS" >/dev/null 2>&1
}

# ---- The steps ----

step_info() { # name -> DESC and ADVICE (the "what to do" of its failure line)
    case "$1" in
    env)
        DESC="conda environment with Python $PYTHON_VERSION at $PREFIX"
        ADVICE="conda create failed: check that the miniforge3 module loaded and that $PREFIX is a new path \
on a writable file system"
        ;;
    torch)
        DESC="torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION from $TORCH_INDEX"
        ADVICE="check this node reaches $TORCH_INDEX (pip's output above names the missing wheel)"
        ;;
    build-tools)
        DESC="cmake, ninja and tomlkit in the environment (to build Kokkos and Lightning)"
        ADVICE="check this node reaches PyPI (pip's output above)"
        ;;
    kokkos)
        DESC="Kokkos $KOKKOS_VERSION with HIP for gfx90a (hipcc), into $KOKKOS_PREFIX"
        ADVICE="read the cmake output above; hipcc comes from the rocm module; run again to rebuild from a fresh clone"
        ;;
    lightning)
        DESC="PennyLane $PENNYLANE_SPEC and PennyLane-Lightning $LIGHTNING_TAG built from source (CC)"
        ADVICE="read pip's output above; CC is the Cray C++ wrapper of the PrgEnv module; run again to rebuild"
        ;;
    lightning-kokkos)
        DESC="Lightning-Kokkos $LIGHTNING_TAG built with hipcc against $KOKKOS_PREFIX"
        ADVICE="read pip's output above; hipcc comes from the rocm module and Kokkos from step kokkos; \
run again to rebuild"
        ;;
    mpi4py)
        DESC="mpi4py built against Cray MPICH (MPICC=\"cc -shared\", without $MPI4PY_UNLOAD)"
        ADVICE="read pip's output above; cc is the Cray C wrapper: 'module list' must show PrgEnv-gnu and cray-mpich"
        ;;
    requirements)
        DESC="what qml.py needs beyond them: $REQUIREMENTS"
        ADVICE="check $REQUIREMENTS exists (it ships next to this script) and that this node reaches PyPI"
        ;;
    esac
}

build_env() {
    need conda "the miniforge3 module"
    # conda create -y on an existing environment would delete it first: never touch a path we did not make.
    if [ "$DRY_RUN" = 0 ] && [ -e "$PREFIX" ] && [ -n "$(ls -A "$PREFIX" 2>/dev/null)" ]; then
        fail env "$PREFIX exists but is not a Python $PYTHON_VERSION environment ($WHY):" \
            "give a new ENV_PREFIX (or remove this one yourself)"
    fi
    run conda create -y -p "$PREFIX" -c conda-forge "python=$PYTHON_VERSION"
}

build_torch() {
    # pip keeps an installed torch 2.10.0 of another build (CUDA, CPU): "==2.10.0" matches any local version.
    if [ "$DRY_RUN" = 0 ] && probe 'import torch' >/dev/null; then
        run "$PY" -m pip uninstall -y torch torchvision
    fi
    run "$PY" -m pip install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" --index-url "$TORCH_INDEX"
}

build_build_tools() {
    run "$PY" -m pip install cmake ninja tomlkit
}

build_kokkos() {
    local src=$BUILD_DIR/kokkos-$KOKKOS_VERSION
    need hipcc "the rocm module"
    need cmake "step build-tools (pip install cmake)"
    fresh_clone "$KOKKOS_URL" "$KOKKOS_VERSION" "$src"
    # The flags of OLCF's recipe and Lightning's installation_hpc.rst: Serial on the host, HIP for the MI250X,
    # C++20 (Kokkos 5), shared libraries (Lightning-Kokkos links them through their install path).
    run cmake -S "$src" -B "$src/build" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        "-DCMAKE_INSTALL_PREFIX=$KOKKOS_PREFIX" \
        -DCMAKE_CXX_STANDARD=20 \
        -DCMAKE_CXX_COMPILER=hipcc \
        -DBUILD_SHARED_LIBS=ON \
        -DKokkos_ENABLE_SERIAL=ON \
        -DKokkos_ENABLE_HIP=ON \
        -DKokkos_ARCH_AMD_GFX90A=ON \
        -DKokkos_ENABLE_COMPLEX_ALIGN=OFF \
        -DKokkos_ENABLE_EXAMPLES=OFF \
        -DKokkos_ENABLE_TESTS=OFF \
        -DKokkos_ENABLE_LIBDL=OFF
    run cmake --build "$src/build"
    run cmake --install "$src/build"
}

lightning_src() { echo "$BUILD_DIR/pennylane-lightning-$LIGHTNING_TAG"; }

configure_lightning() { # PL_BACKEND compiler what-provides-it: the tag's clone, set up to build that backend
    need "$2" "$3"
    fresh_clone "$LIGHTNING_URL" "$LIGHTNING_TAG" "$(lightning_src)"
    run env PL_BACKEND="$1" "$PY" "$(lightning_src)/scripts/configure_pyproject_toml.py"
}

build_lightning() {
    configure_lightning lightning_qubit CC "the PrgEnv module (Cray compiler wrappers)"
    # PennyLane in the same resolve: it requires pennylane-lightning, which the clone then provides, so no
    # other Lightning comes from PyPI.
    run env CMAKE_ARGS=-DCMAKE_CXX_COMPILER=CC "$PY" -m pip install "$PENNYLANE_SPEC" "$(lightning_src)"
}

build_lightning_kokkos() {
    configure_lightning lightning_kokkos hipcc "the rocm module"
    # Kokkos_ROOT and CMAKE_PREFIX_PATH both point at our Kokkos: found nowhere, Lightning would quietly
    # fetch and build a Serial-only Kokkos instead (cmake/support_kokkos.cmake), which the HIP check catches.
    # No -DENABLE_MPI: each rank of qml.py simulates its own circuits, none is distributed over ranks.
    local prefix_path=$KOKKOS_PREFIX${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
    run env "CMAKE_PREFIX_PATH=$prefix_path" \
        "CMAKE_ARGS=-DCMAKE_CXX_COMPILER=hipcc -DKokkos_ROOT=$KOKKOS_PREFIX" \
        "$PY" -m pip install "$(lightning_src)"
}

build_mpi4py() {
    need cc "the PrgEnv module (Cray compiler wrappers)"
    # OLCF: unloading ROCm before building mpi4py prevents library linking issues; it may be loaded again
    # afterwards (the modules of QML_MODULES with these names are), and the HIP check below needs it.
    # shellcheck disable=SC2086  # a list of module names
    run_module unload $MPI4PY_UNLOAD
    cray_libs_first
    # --force-reinstall: this step only runs when the installed mpi4py is not built against Cray MPICH,
    # and pip would otherwise keep it.
    run env "MPICC=cc -shared" "$PY" -m pip install --no-cache-dir --no-binary=mpi4py --force-reinstall "$MPI4PY_SPEC"
    local m
    for m in $MODULES; do
        if [[ " $MPI4PY_UNLOAD " == *" ${m%%/*} "* ]]; then
            run_module load "$m"
        fi
    done
    cray_libs_first
}

build_requirements() {
    [ "$DRY_RUN" = 1 ] || [ -f "$REQUIREMENTS" ] || fail requirements "$ADVICE"
    run "$PY" -m pip install -r "$REQUIREMENTS"
}

do_step() { # number name
    local n=$1 fn=${2//-/_}
    STEP=$2
    step_info "$STEP"
    echo "== step $n/${#STEPS[@]}: $STEP: $DESC"
    WHY=""
    if [ "$DRY_RUN" = 0 ] && "done_$fn"; then
        echo "-- step $n: already done, skipping"
        return 0
    fi
    "build_$fn"
    if [ "$DRY_RUN" = 0 ] && ! "done_$fn"; then
        fail "$STEP" "it ran, but $WHY: $ADVICE"
    fi
}

load_modules() {
    STEP=modules
    echo "== modules: $MODULES"
    if [ "$DRY_RUN" = 0 ] && [ -n "$MODULES" ] && ! have_module; then
        fail modules "no 'module' command: run this on a Frontier login node (Lmod)," \
            "or set QML_MODULES='' after loading the modules yourself"
    fi
    local m
    for m in $MODULES; do
        ADVICE="module load $m failed: run 'module avail ${m%%/*}' for the versions this system has, \
then set QML_MODULES to a list that loads"
        run_module load "$m"
    done
    cray_libs_first
}

# Starts lightning.kokkos (which starts Kokkos) and prints Kokkos' default execution space; "no-gpu" where
# torch sees no GPU, since Kokkos' HIP backend cannot start there. Kokkos only reports "Default Device"
# once initialized (Kokkos_Core.cpp declares it in pre_initialize_internal).
HIP_CHECK='import re, sys
import torch
if torch.cuda.device_count() == 0:
    print("no-gpu")
    sys.exit()
import pennylane as qml
qml.device("lightning.kokkos", wires=2)
from pennylane_lightning.lightning_kokkos_ops import print_configuration
space = re.search(r"Default Device: (\S+)", print_configuration())
print(space.group(1) if space else "unknown")'

hip_check() {
    STEP="hip-check"
    echo "== check: lightning.kokkos runs on Kokkos' HIP backend"
    show "$PY" -c "$HIP_CHECK"
    [ "$DRY_RUN" = 0 ] || return 0
    local out space
    out=$("$PY" -c "$HIP_CHECK") ||
        fail hip-check "lightning.kokkos did not start (the Python error is above):" \
            "run 'bash $ME $PREFIX' again after fixing it"
    space=${out##*$'\n'}
    case "$space" in
    HIP) echo "-- Kokkos default device: HIP" ;;
    no-gpu)
        fail hip-check "this node has no GPU, so Kokkos' HIP backend cannot start here: run the same command" \
            "in an allocation (salloc -A <project> -N 1 -t 30); every built step is skipped"
        ;;
    *)
        fail hip-check "lightning.kokkos runs on Kokkos $space, not HIP (Lightning-Kokkos did not find the Kokkos" \
            "in $KOKKOS_PREFIX): run '$PY -m pip uninstall -y pennylane_lightning_kokkos' and this script again"
        ;;
    esac
}

main() {
    parse_args "$@"
    MODULES=${QML_MODULES-$DEFAULT_MODULES}
    # The environment's cmake and ninja (step build-tools) build Kokkos and Lightning.
    prepend_path PATH "$PREFIX/bin"
    # Login nodes are shared: OLCF asks users to limit parallel builds there. cmake --build (Kokkos, and
    # Lightning's setup.py) reads this.
    export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-8}
    [ "$DRY_RUN" = 0 ] || echo "-- dry run: printing the commands, running none"
    load_modules
    local i
    for i in "${!STEPS[@]}"; do
        do_step "$((i + 1))" "${STEPS[i]}"
    done
    hip_check
    if [ "$DRY_RUN" = 1 ]; then
        echo "-- dry run: nothing was run"
        return 0
    fi
    echo "== done: the environment is ready (the sources in $BUILD_DIR are no longer needed)"
    echo "QML_CONDA_ENV=$PREFIX"
    if [ "$MODULES" = "$DEFAULT_MODULES" ]; then
        echo "sbatch --export=QML_CONDA_ENV=$PREFIX submit_qml.sbatch 1,2,4,8"
    else # the job must load the modules this environment was built with, not the launcher's default list
        echo "sbatch --export=QML_CONDA_ENV=$PREFIX,QML_MODULES='$MODULES' submit_qml.sbatch 1,2,4,8"
    fi
}

main "$@"
