#!/bin/bash
# Builds, on a Frontier login node, the conda environment qml.py runs in (docs/frontier.md explains it):
#   bash build_frontier_env.sh [--dry-run] [--build-dir DIR] ENV_PREFIX
# ENV_PREFIX: a new path, or one this script made before; Kokkos is installed inside it (ENV_PREFIX/opt), the
# sources are cloned into ENV_PREFIX/build (or DIR). --dry-run prints every command and runs none. QML_MODULES
# (space-separated) replaces frontier-modules.txt's list. The steps below run in build order; one whose result
# is already there is skipped, and a failure is one line on stderr naming the step and what to do: fix the
# cause and run the same command again.
set -euo pipefail

# The pins; where each comes from: docs/frontier.md, "Where each version comes from".
PYTHON_VERSION=3.12                                  # OLCF, PyTorch on Frontier
TORCH_VERSION=2.10.0                                 # OLCF, PyTorch on Frontier
TORCHVISION_VERSION=0.25.0                           # OLCF, PyTorch on Frontier
TORCH_INDEX=https://download.pytorch.org/whl/rocm7.1 # OLCF, PyTorch on Frontier
KOKKOS_VERSION=5.1.0                                 # the Kokkos Lightning v0.45.0 is tested with
LIGHTNING_TAG=v0.45.0                                # OLCF's Lightning-Kokkos recipe
LIGHTNING_VERSION=0.45.0                             # the version that tag installs
PENNYLANE_SERIES=0.45                                # must match Lightning (OLCF's recipe)
MPI4PY_SPEC="mpi4py>=4.0"                            # requirements.txt's lower bound
MPI4PY_UNLOAD="rocm craype-accel-amd-gfx90a"         # OLCF: unloaded while mpi4py builds

ME=build_frontier_env.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
USAGE="usage: bash $ME [--dry-run] [--build-dir DIR] ENV_PREFIX"
usage_error() { echo "$ME: error: $1; $USAGE" >&2 && exit 2; }
fail() { local step=$1 && shift && echo "$ME: error: step $step failed: $*" >&2 && exit 1; } # step what-to-do...

DRY_RUN=0 PREFIX="" BUILD_DIR="" STEP="" ADVICE="" WHY="" N=0
while [ $# -gt 0 ]; do
    case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --build-dir) [ $# -ge 2 ] && [ -n "$2" ] || usage_error "--build-dir needs a directory"; BUILD_DIR=$2 && shift ;;
    --build-dir=*) BUILD_DIR=${1#--build-dir=} ;;
    -h | --help) echo "$USAGE   (e.g. /ccs/proj/<proj>/<user>/qml-env)" && exit 0 ;;
    -*) usage_error "unknown option '$1'" ;;
    *) [ -z "$PREFIX" ] || usage_error "one ENV_PREFIX only, got '$PREFIX' and '$1'"; PREFIX=$1 ;;
    esac
    shift
done
[ -n "$PREFIX" ] || usage_error "missing ENV_PREFIX (where the conda environment goes)"
PREFIX=$(realpath -ms -- "$PREFIX") && BUILD_DIR=$(realpath -ms -- "${BUILD_DIR:-$PREFIX/build}")
[[ $PREFIX$BUILD_DIR != *[[:space:]]* ]] || # Lightning's setup.py splits CMAKE_ARGS on spaces
    usage_error "ENV_PREFIX and --build-dir must not contain spaces (CMake arguments are split on them)"
PY=$PREFIX/bin/python KOKKOS_PREFIX=$PREFIX/opt/kokkos-$KOKKOS_VERSION REQUIREMENTS=$HERE/requirements-frontier.txt
LIGHTNING_SRC=$BUILD_DIR/pennylane-lightning-$LIGHTNING_TAG

# ---- Helpers. Every command is printed (pasteable) and, unless --dry-run, run; its failure ends the step.
show() { local out="+" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "$out"; }
run() { show "$@" && [ "$DRY_RUN" = 1 ] || "$@" || fail "$STEP" "$ADVICE"; }
module_cmd() { # module arguments...: as run (Lmod's scripts are not written for set -u)
    show module "$@" && [ "$DRY_RUN" = 1 ] && return 0
    set +u; module "$@" || fail "$STEP" "$ADVICE"; set -u
}
need() { [ "$DRY_RUN" = 1 ] || command -v "$1" >/dev/null || fail "$STEP" "$1 not found on PATH: $2 provides it"; }
# `step NAME DESCRIPTION ADVICE` prints the header (failures then name the step and give the advice);
# `if todo CHECK...` skips the step when the check passes (never in a dry run); `verify CHECK...` after a build.
step() { N=$((N + 1)) STEP=$1 ADVICE=$3 WHY="" && echo "== step $N/8: $1: $2"; }
todo() { if [ "$DRY_RUN" = 0 ] && "$@"; then echo "-- step $N: already done, skipping" && return 1; fi; }
verify() { [ "$DRY_RUN" = 1 ] || "$@" || fail "$STEP" "it ran, but $WHY: $ADVICE"; }
probe() { [ -x "$PY" ] && "$PY" -c "$@" 2>/dev/null; } # python code, args -> its output
dist() { # distribution -> "VERSION url" (installed from a path or URL), "VERSION index" or "- missing"
    probe 'import sys, importlib.metadata as md; d = md.distribution(sys.argv[1])
print(d.version, "url" if d.read_text("direct_url.json") else "index")' "$1" || echo "- missing"
}
prepend_path() { # variable directories: those first, without empty or repeated entries
    local var=$1 joined="" dir dirs
    IFS=: read -r -a dirs <<<"$2:${!var:-}"
    for dir in "${dirs[@]}"; do [[ -z $dir || ":$joined:" == *":$dir:"* ]] || joined+=${joined:+:}$dir; done
    export "$var=$joined"
}
cray_libs_first() { # OLCF: with a non-default CPE, Cray's libraries come first, to build and to run
    echo "-- LD_LIBRARY_PATH: CRAY_LD_LIBRARY_PATH first"
    [ "$DRY_RUN" = 1 ] || [ -z "${CRAY_LD_LIBRARY_PATH:-}" ] || prepend_path LD_LIBRARY_PATH "$CRAY_LD_LIBRARY_PATH"
}
prepend_path PATH "$PREFIX/bin"                                    # its cmake and ninja build Kokkos and Lightning
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-8} # OLCF: login nodes are shared
[ "$DRY_RUN" = 0 ] || echo "-- dry run: printing the commands, running none"

# ---- Modules: frontier-modules.txt (one a line, '#' comments; submit_qml.sbatch reads it too) or QML_MODULES.
STEP=modules MODULE_FILE=$HERE/frontier-modules.txt
FILE_MODULES=$(awk '{ sub(/#.*/, ""); for (i = 1; i <= NF; i++) printf "%s%s", (n++ ? " " : ""), $i }' \
    "$MODULE_FILE" 2>/dev/null) || FILE_MODULES=""
[ -n "${QML_MODULES+set}" ] || [ -n "$FILE_MODULES" ] ||
    fail modules "$MODULE_FILE is missing or names no module: restore it (it ships beside $ME) or set QML_MODULES"
MODULES=${QML_MODULES-$FILE_MODULES}
echo "== modules: $MODULES"
if [ "$DRY_RUN" = 0 ] && [ -n "$MODULES" ] && ! type module >/dev/null 2>&1; then # Lmod's init script defines it
    # shellcheck disable=SC1091  # found at run time
    set +u && { source "${LMOD_PKG:-/usr/share/lmod/lmod}/init/bash" >/dev/null 2>&1 || true; } && set -u
    type module >/dev/null 2>&1 || fail modules "no 'module' command: run this on a Frontier login node (Lmod)," \
        "or set QML_MODULES='' after loading the modules yourself"
fi
for m in $MODULES; do
    ADVICE="module load $m failed: run 'module avail ${m%%/*}' for the versions this system has, then set"
    ADVICE+=" QML_MODULES to a list that loads" && module_cmd load "$m"
done
cray_libs_first

has_env() {
    WHY="$PY does not exist" && [ -x "$PY" ] || return 1
    local v && v=$(probe 'import sys; print("%d.%d" % sys.version_info[:2])') || v=none
    WHY="$PREFIX holds Python $v, not $PYTHON_VERSION" && [ "$v" = "$PYTHON_VERSION" ]
}
step env "conda environment with Python $PYTHON_VERSION at $PREFIX" \
    "conda create failed: check that the miniforge3 module loaded and that $PREFIX is on a writable file system"
if todo has_env; then
    need conda "the miniforge3 module"
    # conda create -y deletes an environment that is there first: never touch a path this script did not make.
    [ "$DRY_RUN" = 1 ] || [ -z "$(ls -A "$PREFIX" 2>/dev/null)" ] || fail env "$PREFIX exists but is not" \
        "a Python $PYTHON_VERSION environment ($WHY): give a new ENV_PREFIX (or remove this one yourself)"
    run conda create -y -p "$PREFIX" -c conda-forge "python=$PYTHON_VERSION"
    verify has_env
fi

has_torch() {
    local t v h && read -r t v h <<<"$(probe 'import torch, torchvision
print(torch.__version__, torchvision.__version__, torch.version.hip or "none")' || echo none none none)"
    WHY="torch $t, torchvision $v, HIP $h (wanted torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION, HIP)"
    [ "${t%%+*}" = "$TORCH_VERSION" ] && [ "${v%%+*}" = "$TORCHVISION_VERSION" ] && [ "$h" != none ]
}
step torch "torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION from $TORCH_INDEX" \
    "check this node reaches $TORCH_INDEX (pip's output above names the missing wheel)"
if todo has_torch; then
    # pip keeps a torch 2.10.0 of another build (CUDA, CPU): "==2.10.0" matches any local version.
    if [ "$DRY_RUN" = 0 ] && probe 'import torch' >/dev/null; then run "$PY" -m pip uninstall -y torch torchvision; fi
    run "$PY" -m pip install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" --index-url "$TORCH_INDEX"
    verify has_torch
fi

has_build_tools() {
    for n in cmake ninja tomlkit; do WHY="$n is not in $PREFIX" && [ "$(dist "$n")" != "- missing" ] || return 1; done
}
step build-tools "cmake, ninja and tomlkit (to build Kokkos and Lightning)" \
    "check this node reaches PyPI (pip's output above)"
if todo has_build_tools; then run "$PY" -m pip install cmake ninja tomlkit && verify has_build_tools; fi

clone() { # url tag destination: a fresh shallow clone of one tag
    need git "the system (or a git module)" && run rm -rf "$3" && run git clone --branch "$2" --depth 1 "$1" "$3"
}
has_kokkos() { # the installed CMake config (lib64 or lib) names this version and HIP among its devices
    local dir && for dir in "$KOKKOS_PREFIX"/lib{64,}/cmake/Kokkos; do [ ! -f "$dir/KokkosConfig.cmake" ] || break; done
    WHY="no Kokkos $KOKKOS_VERSION in $KOKKOS_PREFIX" &&
        grep -q "PACKAGE_VERSION \"$KOKKOS_VERSION\"" "$dir/KokkosConfigVersion.cmake" 2>/dev/null || return 1
    WHY="the Kokkos in $KOKKOS_PREFIX was built without HIP" &&
        grep -Eiq '^[[:space:]]*set\(Kokkos_DEVICES .*HIP' "$dir/KokkosConfigCommon.cmake" 2>/dev/null
}
step kokkos "Kokkos $KOKKOS_VERSION with HIP for gfx90a (hipcc), into $KOKKOS_PREFIX" \
    "read the cmake output above; hipcc comes from the rocm module; run again to rebuild from a fresh clone"
if todo has_kokkos; then
    need hipcc "the rocm module" && need cmake "step build-tools (pip install cmake)"
    src=$BUILD_DIR/kokkos-$KOKKOS_VERSION && clone https://github.com/kokkos/kokkos.git "$KOKKOS_VERSION" "$src"
    # OLCF's recipe: Serial on the host, HIP for the MI250X, C++20 (Kokkos 5), shared libraries.
    run cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_INSTALL_PREFIX=$KOKKOS_PREFIX" \
        -DCMAKE_CXX_STANDARD=20 -DCMAKE_CXX_COMPILER=hipcc -DBUILD_SHARED_LIBS=ON -DKokkos_ENABLE_SERIAL=ON \
        -DKokkos_ENABLE_HIP=ON -DKokkos_ARCH_AMD_GFX90A=ON -DKokkos_ENABLE_COMPLEX_ALIGN=OFF \
        -DKokkos_ENABLE_EXAMPLES=OFF -DKokkos_ENABLE_TESTS=OFF -DKokkos_ENABLE_LIBDL=OFF
    run cmake --build "$src/build" && run cmake --install "$src/build" && verify has_kokkos
fi

from_tag() { # distribution: true when it is Lightning's version, installed from the clone
    local got && got=$(dist "$1")
    WHY="$1 is '$got', not $LIGHTNING_VERSION built from $LIGHTNING_TAG" && [ "$got" = "$LIGHTNING_VERSION url" ]
}
has_lightning() {
    local got && got=$(dist pennylane)
    WHY="pennylane is '$got', not $PENNYLANE_SERIES.*" && [[ $got == "$PENNYLANE_SERIES".* ]] &&
        from_tag pennylane_lightning
}
configure_lightning() { # PL_BACKEND: the tag's clone, set up to build that backend
    clone https://github.com/PennyLaneAI/pennylane-lightning.git "$LIGHTNING_TAG" "$LIGHTNING_SRC"
    run env PL_BACKEND="$1" "$PY" "$LIGHTNING_SRC/scripts/configure_pyproject_toml.py"
}
step lightning "PennyLane $PENNYLANE_SERIES.* and PennyLane-Lightning $LIGHTNING_TAG built from source (CC)" \
    "read pip's output above; CC is the Cray C++ wrapper of the PrgEnv module; run again to rebuild"
if todo has_lightning; then
    need CC "the PrgEnv module (Cray compiler wrappers)" && configure_lightning lightning_qubit
    # PennyLane in the same resolve: it requires pennylane-lightning, which the clone provides (none from PyPI).
    run env CMAKE_ARGS=-DCMAKE_CXX_COMPILER=CC "$PY" -m pip install "pennylane==$PENNYLANE_SERIES.*" "$LIGHTNING_SRC"
    verify has_lightning
fi

step lightning-kokkos "Lightning-Kokkos $LIGHTNING_TAG built with hipcc against $KOKKOS_PREFIX" \
    "read pip's output above; hipcc comes from the rocm module, Kokkos from step kokkos; run again to rebuild"
if todo from_tag pennylane_lightning_kokkos; then
    need hipcc "the rocm module" && configure_lightning lightning_kokkos
    # Kokkos_ROOT and CMAKE_PREFIX_PATH name our Kokkos: found nowhere, Lightning would quietly build a
    # Serial-only Kokkos of its own (the HIP check catches it). No -DENABLE_MPI: no circuit spans ranks.
    run env "CMAKE_PREFIX_PATH=$KOKKOS_PREFIX${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}" \
        "CMAKE_ARGS=-DCMAKE_CXX_COMPILER=hipcc -DKokkos_ROOT=$KOKKOS_PREFIX" "$PY" -m pip install "$LIGHTNING_SRC"
    verify from_tag pennylane_lightning_kokkos
fi

has_mpi4py() { # the MPI library's version, asked without MPI_Init (which a login node may not allow)
    local lib && lib=$(probe 'import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI
print(" ".join(MPI.Get_library_version().split()))') || lib="no importable mpi4py"
    WHY="mpi4py's MPI library is '${lib:0:60}', not Cray MPICH" && [[ ${lib,,} == *"cray mpich"* ]]
}
step mpi4py "mpi4py built against Cray MPICH (MPICC=\"cc -shared\", without $MPI4PY_UNLOAD)" \
    "read pip's output above; cc is the Cray C wrapper: 'module list' must show PrgEnv-gnu and cray-mpich"
if todo has_mpi4py; then
    # shellcheck disable=SC2086  # a list of module names
    need cc "the PrgEnv module (Cray compiler wrappers)" && module_cmd unload $MPI4PY_UNLOAD && cray_libs_first
    # --force-reinstall: pip would keep the mpi4py that is there, which is not built against Cray MPICH.
    run env "MPICC=cc -shared" "$PY" -m pip install --no-cache-dir --no-binary=mpi4py --force-reinstall "$MPI4PY_SPEC"
    for m in $MODULES; do # load again, as the list names them, the modules unloaded above
        [[ " $MPI4PY_UNLOAD " != *" ${m%%/*} "* ]] || module_cmd load "$m"
    done
    cray_libs_first && verify has_mpi4py
fi

has_requirements() { # pip's resolver, offline: succeeds only when every requirement is installed
    WHY="$REQUIREMENTS is not satisfied" && "$PY" -m pip install --no-index --dry-run -q -r "$REQUIREMENTS" &>/dev/null
}
step requirements "what qml.py needs beyond them: $REQUIREMENTS" \
    "check $REQUIREMENTS exists (it ships next to this script) and that this node reaches PyPI"
if todo has_requirements; then
    [ "$DRY_RUN" = 1 ] || [ -f "$REQUIREMENTS" ] || fail requirements "$ADVICE"
    run "$PY" -m pip install -r "$REQUIREMENTS" && verify has_requirements
fi

# ---- The check: Kokkos, once lightning.kokkos starts it, names its default device ("no-gpu": torch sees none).
HIP_CHECK='import re, sys, torch
if torch.cuda.device_count() == 0:
    print("no-gpu")
    sys.exit()
import pennylane as qml
qml.device("lightning.kokkos", wires=2)
from pennylane_lightning.lightning_kokkos_ops import print_configuration
space = re.search(r"Default Device: (\S+)", print_configuration())
print(space.group(1) if space else "unknown")'
STEP=hip-check && echo "== check: lightning.kokkos runs on Kokkos' HIP backend" && show "$PY" -c "$HIP_CHECK"
if [ "$DRY_RUN" = 1 ]; then echo "-- dry run: nothing was run" && exit 0; fi
out=$("$PY" -c "$HIP_CHECK") ||
    fail hip-check "lightning.kokkos did not start (the Python error is above): fix it, then run 'bash $ME $PREFIX'"
space=${out##*$'\n'}
case "$space" in
HIP) echo "-- Kokkos default device: HIP" ;;
no-gpu) fail hip-check "this node has no GPU, so Kokkos' HIP backend cannot start here: run the same command in" \
    "an allocation (salloc -A <project> -N 1 -t 30); every built step is skipped" ;;
*) fail hip-check "lightning.kokkos runs on Kokkos $space, not HIP (Lightning-Kokkos did not find the Kokkos in" \
    "$KOKKOS_PREFIX): run '$PY -m pip uninstall -y pennylane_lightning_kokkos' and this script again" ;;
esac

echo "== done: the environment is ready (the sources in $BUILD_DIR are no longer needed)"
echo "QML_CONDA_ENV=$PREFIX"
EXPORT=QML_CONDA_ENV=$PREFIX # and, when they are not frontier-modules.txt's, the modules it was built with
[ "$MODULES" = "$FILE_MODULES" ] || EXPORT+=",QML_MODULES='$MODULES'"
echo "sbatch --export=$EXPORT submit_qml.sbatch 1,2,4,8"
