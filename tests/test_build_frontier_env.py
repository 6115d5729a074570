"""build_frontier_env.sh, run with bash on any Linux box: no Frontier, no GPU, no network.

Recording fakes stand in for module, conda, git, cmake, hipcc, cc and CC (on PATH) and for the
environment's python: `conda create` makes ENV_PREFIX/bin/python, which fakes `pip install` (writing
.dist-info directories) and runs the script's `python -c` probes for real against fake torch, mpi4py,
pennylane and pennylane_lightning modules that report what the fake installs left. So a second run finds
the first run's work and skips it, as on Frontier. Every fake appends its argv and the variables that
matter (MPICC, CMAKE_ARGS, ...) as one JSON line to a log. FAKE_FAIL=text makes a fake whose command
line contains text exit 1; FAKE_KOKKOS_DEVICE and FAKE_GPUS change what lightning.kokkos reports.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

REPO = Path(ROOT)
SCRIPT = REPO / "build_frontier_env.sh"
ME = "build_frontier_env.sh"
OLCF_MODULES = ["PrgEnv-gnu/8.7.0", "cpe/26.03", "miniforge3/23.11.0-0", "rocm/7.1.1", "craype-accel-amd-gfx90a"]
STEPS = ["env", "torch", "build-tools", "kokkos", "lightning", "lightning-kokkos", "mpi4py", "requirements"]
REQUIREMENTS = REPO / "requirements-frontier.txt"

# ---- the fakes ----

COMMON = r'''
import json, os, sys
TOOL = os.path.basename(sys.argv[0])
ARGV = sys.argv[1:]
ENV_KEYS = ("MPICC", "CMAKE_ARGS", "PL_BACKEND", "CMAKE_PREFIX_PATH", "LD_LIBRARY_PATH")


def log(kind="action", **extra):
    entry = {"tool": TOOL, "argv": ARGV, "kind": kind,
             "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}, **extra}
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\n")


def maybe_fail():
    pattern = os.environ.get("FAKE_FAIL")
    if pattern and pattern in " ".join([TOOL, *ARGV]):
        sys.exit(1)
'''

SIMPLE_TOOL = COMMON + r'''
log()
maybe_fail()
'''

CONDA = COMMON + r'''
log()
maybe_fail()
import shutil
assert ARGV[0] == "create" and "-p" in ARGV, ARGV
prefix = ARGV[ARGV.index("-p") + 1]
version = next(a.split("=", 1)[1] for a in ARGV if a.startswith("python="))
site = os.path.join(prefix, "lib", "python" + version, "site-packages")
shutil.copytree(os.environ["FAKE_SITE_TEMPLATE"], site)
os.makedirs(os.path.join(prefix, "bin"), exist_ok=True)
python = os.path.join(prefix, "bin", "python")
shutil.copy(os.environ["FAKE_PYTHON_SRC"], python)
os.chmod(python, 0o755)
with open(os.path.join(prefix, "fake-python-version"), "w") as f:
    f.write(version)
'''

GIT = COMMON + r'''
log()
maybe_fail()
assert ARGV[0] == "clone" and "--depth" in ARGV and "--branch" in ARGV, ARGV
tag, dest = ARGV[ARGV.index("--branch") + 1], ARGV[-1]
os.makedirs(os.path.join(dest, "scripts"))
open(os.path.join(dest, "scripts", "configure_pyproject_toml.py"), "w").close()
with open(os.path.join(dest, ".fake_version"), "w") as f:
    f.write(tag.lstrip("v"))
'''

CMAKE = COMMON + r'''
log()
maybe_fail()
if "-S" in ARGV:  # configure: remember it for --install
    build = ARGV[ARGV.index("-B") + 1]
    os.makedirs(build, exist_ok=True)
    with open(os.path.join(build, "fake-cache.json"), "w") as f:
        json.dump({"source": ARGV[ARGV.index("-S") + 1], "args": ARGV}, f)
elif ARGV[0] == "--install":
    with open(os.path.join(ARGV[1], "fake-cache.json")) as f:
        cache = json.load(f)
    args = cache["args"]
    prefix = next(a.split("=", 1)[1] for a in args if a.startswith("-DCMAKE_INSTALL_PREFIX="))
    version = open(os.path.join(cache["source"], ".fake_version")).read()
    hip = "-DKokkos_ENABLE_HIP=ON" in args and "-DCMAKE_CXX_COMPILER=hipcc" in args
    config = os.path.join(prefix, "lib64", "cmake", "Kokkos")
    os.makedirs(config, exist_ok=True)
    open(os.path.join(config, "KokkosConfig.cmake"), "w").close()
    with open(os.path.join(config, "KokkosConfigVersion.cmake"), "w") as f:
        f.write(f'set(PACKAGE_VERSION "{version}")\n')
    with open(os.path.join(config, "KokkosConfigCommon.cmake"), "w") as f:
        f.write("set(Kokkos_DEVICES %s)\n" % ("HIP;SERIAL" if hip else "SERIAL"))
'''

# The environment's python. -c runs the code for real, against the fake modules in the environment's
# site-packages only (the fake runs with -S: the test's own site-packages stay out).
PYTHON = COMMON + r'''
import re, shutil
PREFIX = os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0])))
VERSION = open(os.path.join(PREFIX, "fake-python-version")).read()
SITE = os.path.join(PREFIX, "lib", "python" + VERSION, "site-packages")


def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()


def installed(name):
    return any(d.startswith(norm(name) + "-") and d.endswith(".dist-info") for d in os.listdir(SITE))


def uninstall(name):
    for d in os.listdir(SITE):
        if d.startswith(norm(name) + "-") and d.endswith(".dist-info"):
            shutil.rmtree(os.path.join(SITE, d))


def install(name, version, files=None):
    uninstall(name)
    dist = os.path.join(SITE, f"{norm(name)}-{version}.dist-info")
    os.makedirs(dist)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for fname, text in (files or {}).items():
        with open(os.path.join(dist, fname), "w") as f:
            f.write(text)


def requirement_names(path):
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            yield re.match(r"[A-Za-z0-9_.-]+", line).group(0)


def kokkos_backend():
    cmake_args = os.environ.get("CMAKE_ARGS", "").split(" ")
    root = next((a.split("=", 1)[1] for a in cmake_args if a.startswith("-DKokkos_ROOT=")), None)
    common = os.path.join(root or "/nonexistent", "lib64", "cmake", "Kokkos", "KokkosConfigCommon.cmake")
    hip = "-DCMAKE_CXX_COMPILER=hipcc" in cmake_args and os.path.exists(common) and "HIP" in open(common).read()
    return "HIP" if hip else "Serial"


def pip(args):
    if args[0] == "uninstall":
        log()
        maybe_fail()
        for name in args[1:]:
            if not name.startswith("-"):
                uninstall(name)
        return
    assert args[0] == "install", args
    if "--dry-run" in args:  # the script's check that the requirements are installed
        log(kind="probe")
        sys.exit(0 if all(installed(n) for n in requirement_names(args[args.index("-r") + 1])) else 1)
    log()
    maybe_fail()
    index = args[args.index("--index-url") + 1] if "--index-url" in args else ""
    specs, i = [], 1
    while i < len(args):
        if args[i] in ("--index-url", "-r"):
            if args[i] == "-r":
                specs += list(requirement_names(args[i + 1]))
            i += 2
            continue
        if not args[i].startswith("-"):
            specs.append(args[i])
        i += 1
    for spec in specs:
        if os.path.isdir(spec):  # a Lightning clone, configured for one backend
            backend = open(os.path.join(spec, ".fake_backend")).read()
            name = {"lightning_qubit": "pennylane_lightning", "lightning_kokkos": "pennylane_lightning_kokkos"}[backend]
            files = {"direct_url.json": json.dumps({"url": "file://" + spec})}
            if backend == "lightning_kokkos":
                files["FAKE_KOKKOS"] = kokkos_backend()
            install(name, open(os.path.join(spec, ".fake_version")).read(), files)
            continue
        name, op, version = re.match(r"([A-Za-z0-9_.-]+)(==|~=|>=)?(.*)", spec).groups()
        version = (version[:-2] + ".1" if version.endswith(".*") else version) or "1.0"
        if name in ("torch", "torchvision") and "rocm" in index:
            version += "+" + index.rstrip("/").rsplit("/", 1)[1]
        files = {}
        if name == "mpi4py":
            cray = os.environ.get("MPICC") == "cc -shared" and "--no-binary=mpi4py" in args
            files["FAKE_MPI"] = ("MPI VERSION    : CRAY MPICH version 9.1.0.1 (ANL base 4.1.2)" if cray
                                 else "MPICH Version:      4.3.0")
        install(name, version, files)


if ARGV[:1] == ["-c"]:
    log(kind="probe", code=ARGV[1])
    code = ARGV[1]
    sys.argv = ["-c", *ARGV[2:]]
    sys.path.insert(0, SITE)
    import importlib.metadata  # noqa: F401  (imported before the interpreter's version is faked below)
    major, minor = map(int, VERSION.split("."))
    sys.version_info = (major, minor, 0, "final", 0)
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
elif ARGV[:2] == ["-m", "pip"]:
    pip(ARGV[2:])
elif ARGV[0].endswith("configure_pyproject_toml.py"):
    log()
    maybe_fail()
    with open(os.path.join(os.path.dirname(os.path.dirname(ARGV[0])), ".fake_backend"), "w") as f:
        f.write(os.environ["PL_BACKEND"])
else:
    raise SystemExit(f"fake python: unexpected arguments {ARGV}")
'''

# Fake modules for the environment's site-packages: each is importable only once the fake pip has
# installed its distribution, and reports what that install recorded.
GUARD = '''from importlib import metadata as _md
try:
    __version__ = _md.version({name!r})
except _md.PackageNotFoundError:
    raise ImportError("No module named {name!r}") from None
'''
SITE_MODULES = {
    "torch/__init__.py": GUARD.format(name="torch") + '''import os as _os


class version:
    hip = "7.1.52802" if "+rocm" in __version__ else None


class cuda:
    @staticmethod
    def device_count():
        return int(_os.environ.get("FAKE_GPUS", "1"))
''',
    "torchvision/__init__.py": GUARD.format(name="torchvision"),
    "mpi4py/__init__.py": GUARD.format(name="mpi4py") + '''

class rc:
    initialize = True
''',
    "mpi4py/MPI.py": '''from importlib import metadata as _md


def Get_library_version():
    return _md.distribution("mpi4py").read_text("FAKE_MPI")
''',
    "pennylane/__init__.py": GUARD.format(name="pennylane") + '''

def device(name, wires):
    if name == "lightning.kokkos":
        import pennylane_lightning.lightning_kokkos_ops  # noqa: F401  (raises when not installed)
    return object()
''',
    "pennylane_lightning/__init__.py": GUARD.format(name="pennylane_lightning"),
    "pennylane_lightning/lightning_kokkos_ops.py": GUARD.format(name="pennylane_lightning_kokkos") + '''import os as _os


def print_configuration():
    device = _os.environ.get("FAKE_KOKKOS_DEVICE") or _md.distribution("pennylane_lightning_kokkos").read_text(
        "FAKE_KOKKOS")
    return f"Kokkos Version: 5.1.0\\nArchitecture:\\n  Default Device: {device}\\n"
''',
}


def make_fakes(tmp_path):
    """Fake tools on PATH under tmp_path; returns run(*args, **env) -> (CompletedProcess, log entries of that run)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shebang = f"#!{sys.executable} -S\n"
    tools = {"module": SIMPLE_TOOL, "hipcc": SIMPLE_TOOL, "cc": SIMPLE_TOOL, "CC": SIMPLE_TOOL,
             "conda": CONDA, "git": GIT, "cmake": CMAKE}
    for name, text in tools.items():
        (bin_dir / name).write_text(shebang + text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "fake_python").write_text(shebang + PYTHON)
    template = tmp_path / "site_template"
    for rel, text in SITE_MODULES.items():
        (template / rel).parent.mkdir(parents=True, exist_ok=True)
        (template / rel).write_text(text)
    log = tmp_path / "log.jsonl"
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("QML_", "BASH_FUNC_", "CMAKE_", "FAKE_", "CRAY_", "PYTHON"))
            and k not in ("LD_LIBRARY_PATH", "MPICC", "PL_BACKEND", "LMOD_PKG")}
    base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_SITE_TEMPLATE=str(template),
                FAKE_PYTHON_SRC=str(tmp_path / "fake_python"), LMOD_PKG=str(tmp_path / "no-lmod"))

    def run(*args, **env):
        start = log.stat().st_size if log.exists() else 0
        proc = subprocess.run(["bash", str(SCRIPT), *map(str, args)], env=dict(base, **env), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, check=False)
        entries = []
        if log.exists():
            with open(log) as f:
                f.seek(start)
                entries = [json.loads(line) for line in f]
        return proc, entries

    run.tmp = tmp_path
    run.bin = bin_dir
    return run


@pytest.fixture
def fakes(tmp_path):
    return make_fakes(tmp_path)


# The shared build: one run from nothing (with Cray library paths that hold empty entries), then the
# same command again. Tests that need a finished environment copy it (the fakes find everything from
# their own location, so a copy is a finished environment at its new path).
CRAY_ENV = {"CRAY_LD_LIBRARY_PATH": "/opt/cray/a::/opt/cray/b:", "LD_LIBRARY_PATH": ":/mine"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = make_fakes(tmp_path_factory.mktemp("built"))
    prefix = run.tmp / "env"
    first = run(prefix, **CRAY_ENV)
    assert first[0].returncode == 0, first[0].stdout + first[0].stderr
    run.prefix, run.first, run.rerun = prefix, first, run(prefix)
    return run


def finished_env(built, fakes):
    """A copy of the shared finished environment, for the fakes of this test."""
    prefix = fakes.tmp / "env"
    shutil.copytree(built.prefix, prefix, symlinks=True)
    return prefix


def site(prefix):
    return prefix / "lib" / "python3.12" / "site-packages"


# ---- reading the log ----

def is_hip_check(entry):
    return entry["kind"] == "probe" and "lightning.kokkos" in entry.get("code", "")


def labelled(entries):
    """What the run did: (short label, log entry) per command, probes left out but the final HIP check kept."""
    labels = []
    for e in entries:
        tool, argv = e["tool"], e["argv"]
        if is_hip_check(e):
            label = "hip-check"
        elif e["kind"] == "probe":
            continue
        elif tool == "python" and argv[:2] == ["-m", "pip"]:
            words = [a for a in argv[3:] if not a.startswith("-") and "://" not in a]
            label = f"pip {argv[2]} " + " ".join(Path(w).name if w.startswith("/") else w for w in words)
        elif tool == "python":
            label = f"configure {e['env']['PL_BACKEND']}"
        elif tool == "git":
            label = f"git clone {argv[-2].rsplit('/', 1)[1]} {argv[argv.index('--branch') + 1]}"
        elif tool == "cmake":
            label = "cmake configure" if "-S" in argv else f"cmake {argv[0]}"
        elif tool == "conda":
            label = "conda create"
        else:
            label = " ".join([tool, *argv])
        labels.append((label, e))
    return labels


def actions(entries):
    return [label for label, _ in labelled(entries)]


def entry(entries, label):
    """The one log entry of the command with this label."""
    (found,) = [e for lab, e in labelled(entries) if lab == label]
    return found


def error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


EXPECTED_ORDER = [
    *(f"module load {m}" for m in OLCF_MODULES),
    "conda create",
    "pip install torch==2.10.0 torchvision==0.25.0",
    "pip install cmake ninja tomlkit",
    "git clone kokkos.git 5.1.0",
    "cmake configure",
    "cmake --build",
    "cmake --install",
    "git clone pennylane-lightning.git v0.45.0",
    "configure lightning_qubit",
    "pip install pennylane==0.45.* pennylane-lightning-v0.45.0",
    "git clone pennylane-lightning.git v0.45.0",
    "configure lightning_kokkos",
    "pip install pennylane-lightning-v0.45.0",
    "module unload rocm craype-accel-amd-gfx90a",
    "pip install mpi4py>=4.0",
    "module load rocm/7.1.1",
    "module load craype-accel-amd-gfx90a",
    "pip install requirements-frontier.txt",
    "hip-check",
]


# ---- tests ----

def test_dry_run_prints_every_command_and_runs_none(fakes):
    prefix = fakes.tmp / "env"
    proc, entries = fakes("--dry-run", prefix)
    assert proc.returncode == 0, proc.stderr
    assert entries == [] and not prefix.exists(), "a dry run ran something"
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert [c for c in commands if c.startswith("module load")][:5] == [f"module load {m}" for m in OLCF_MODULES]
    py = f"{prefix}/bin/python"
    src = f"{prefix}/build/pennylane-lightning-v0.45.0"
    kokkos = f"{prefix}/opt/kokkos-5.1.0"
    expected = [
        f"conda create -y -p {prefix} -c conda-forge python=3.12",
        f"{py} -m pip install torch==2.10.0 torchvision==0.25.0 --index-url https://download.pytorch.org/whl/rocm7.1",
        f"git clone --branch 5.1.0 --depth 1 https://github.com/kokkos/kokkos.git {prefix}/build/kokkos-5.1.0",
        f"cmake --install {prefix}/build/kokkos-5.1.0/build",
        f"git clone --branch v0.45.0 --depth 1 https://github.com/PennyLaneAI/pennylane-lightning.git {src}",
        f"env PL_BACKEND=lightning_qubit {py} {src}/scripts/configure_pyproject_toml.py",
        f"env CMAKE_ARGS=-DCMAKE_CXX_COMPILER=CC {py} -m pip install pennylane==0.45.* {src}",
        f"env PL_BACKEND=lightning_kokkos {py} {src}/scripts/configure_pyproject_toml.py",
        (f"env CMAKE_PREFIX_PATH={kokkos} 'CMAKE_ARGS=-DCMAKE_CXX_COMPILER=hipcc -DKokkos_ROOT={kokkos}' "
         f"{py} -m pip install {src}"),
        "module unload rocm craype-accel-amd-gfx90a",
        f"env 'MPICC=cc -shared' {py} -m pip install --no-cache-dir --no-binary=mpi4py --force-reinstall mpi4py>=4.0",
        f"{py} -m pip install -r {REQUIREMENTS}",
    ]
    parsed = [shlex.split(c) for c in commands if not c.startswith(f"{py} -c ")]
    for want in expected:
        assert shlex.split(want) in parsed, want
    kokkos_cmake = next(c for c in parsed if c[:2] == ["cmake", "-S"])
    for flag in ("-DKokkos_ENABLE_HIP=ON", "-DKokkos_ARCH_AMD_GFX90A=ON", "-DCMAKE_CXX_COMPILER=hipcc",
                 "-DKokkos_ENABLE_SERIAL=ON", "-DCMAKE_CXX_STANDARD=20", f"-DCMAKE_INSTALL_PREFIX={kokkos}"):
        assert flag in kokkos_cmake, flag
    assert any(c.startswith(f"{py} -c ") and "lightning.kokkos" in c for c in commands), "no HIP check printed"
    assert re.findall(r"^== step (\d+)/8: ([\w-]+): ", proc.stdout, re.MULTILINE) == [
        (str(i), name) for i, name in enumerate(STEPS, 1)]
    assert "QML_CONDA_ENV=" not in proc.stdout


def test_run_with_fakes_calls_the_steps_in_order_with_the_pinned_versions(built):
    prefix, (proc, entries) = built.prefix, built.first
    assert actions(entries) == EXPECTED_ORDER
    torch = entry(entries, "pip install torch==2.10.0 torchvision==0.25.0")
    assert torch["argv"][-2:] == ["--index-url", "https://download.pytorch.org/whl/rocm7.1"]
    kokkos = entry(entries, "cmake configure")["argv"]
    for flag in ("-DKokkos_ENABLE_HIP=ON", "-DKokkos_ARCH_AMD_GFX90A=ON", "-DCMAKE_CXX_COMPILER=hipcc"):
        assert flag in kokkos, flag
    kokkos_prefix = f"{prefix}/opt/kokkos-5.1.0"
    assert f"-DCMAKE_INSTALL_PREFIX={kokkos_prefix}" in kokkos
    qubit = entry(entries, "pip install pennylane==0.45.* pennylane-lightning-v0.45.0")
    assert qubit["env"]["CMAKE_ARGS"] == "-DCMAKE_CXX_COMPILER=CC"
    lk = entry(entries, "pip install pennylane-lightning-v0.45.0")
    assert lk["env"]["CMAKE_ARGS"].split() == ["-DCMAKE_CXX_COMPILER=hipcc", f"-DKokkos_ROOT={kokkos_prefix}"]
    assert lk["env"]["CMAKE_PREFIX_PATH"].split(":")[0] == kokkos_prefix
    mpi = entry(entries, "pip install mpi4py>=4.0")
    assert mpi["env"]["MPICC"] == "cc -shared"
    assert "--no-binary=mpi4py" in mpi["argv"] and "--no-cache-dir" in mpi["argv"]
    out = proc.stdout.strip().splitlines()
    assert f"QML_CONDA_ENV={prefix}" in out
    assert f"sbatch --export=QML_CONDA_ENV={prefix} submit_qml.sbatch 1,2,4,8" in out
    assert "-- Kokkos default device: HIP" in out
    assert proc.stderr == ""


def test_cray_libraries_come_first_without_empty_entries(built):
    # CRAY_ENV: CRAY_LD_LIBRARY_PATH="/opt/cray/a::/opt/cray/b:", LD_LIBRARY_PATH=":/mine"
    mpi = entry(built.first[1], "pip install mpi4py>=4.0")
    assert mpi["env"]["LD_LIBRARY_PATH"] == "/opt/cray/a:/opt/cray/b:/mine"


def test_rerun_skips_every_step_and_still_checks_hip(built):
    proc, entries = built.rerun
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for n in range(1, len(STEPS) + 1):
        assert f"-- step {n}: already done, skipping" in proc.stdout.splitlines(), n
    assert actions(entries) == [f"module load {m}" for m in OLCF_MODULES] + ["hip-check"]
    assert f"QML_CONDA_ENV={built.prefix}" in proc.stdout.splitlines()


@pytest.mark.parametrize("fail, step, not_after", [
    ("torch==2.10.0", "torch", "git"),
    ("cmake --build", "kokkos", "configure_pyproject_toml.py"),
])
def test_failing_step_ends_with_one_line_naming_it_and_runs_nothing_after(fakes, fail, step, not_after):
    proc, entries = fakes(fakes.tmp / "env", FAKE_FAIL=fail)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert error_line(proc).startswith(f"{ME}: error: step {step} failed: ")
    last = [e for e in entries if e["kind"] != "probe"][-1]
    assert fail in " ".join([last["tool"], *last["argv"]]), "the failing command was not the last one"
    assert not any(not_after in " ".join(e["argv"]) for e in entries if e["kind"] != "probe")
    assert "QML_CONDA_ENV=" not in proc.stdout


def test_mpi4py_from_a_wheel_is_rebuilt_and_a_failed_build_resumes_there(built, fakes):
    prefix = finished_env(built, fakes)
    (dist,) = site(prefix).glob("mpi4py-*.dist-info")
    (dist / "FAKE_MPI").write_text("MPICH Version:      4.3.0")  # as a PyPI wheel's bundled MPICH says
    failed, entries = fakes(prefix, FAKE_FAIL="mpi4py>=4.0")
    assert failed.returncode == 1
    assert error_line(failed).startswith(f"{ME}: error: step mpi4py failed: ")
    assert actions(entries)[-1] == "pip install mpi4py>=4.0"  # nothing after: no requirements, no check
    proc, entries = fakes(prefix)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = [int(m) for m in re.findall(r"^-- step (\d+): already done, skipping$", proc.stdout, re.MULTILINE)]
    assert skipped == [1, 2, 3, 4, 5, 6, 8]
    assert actions(entries)[len(OLCF_MODULES):] == [
        "module unload rocm craype-accel-amd-gfx90a", "pip install mpi4py>=4.0",
        "module load rocm/7.1.1", "module load craype-accel-amd-gfx90a", "hip-check"]
    assert "--force-reinstall" in entry(entries, "pip install mpi4py>=4.0")["argv"]


def test_torch_of_another_build_is_replaced(built, fakes):
    prefix = finished_env(built, fakes)
    for name in ("torch", "torchvision"):  # the same versions, without HIP: a CUDA or CPU build
        (dist,) = site(prefix).glob(f"{name}-*.dist-info")
        version = dist.name.split("-")[1].split("+")[0]
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        dist.rename(dist.with_name(f"{name}-{version}.dist-info"))
    proc, entries = fakes(prefix)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert actions(entries)[len(OLCF_MODULES):] == [
        "pip uninstall torch torchvision", "pip install torch==2.10.0 torchvision==0.25.0", "hip-check"]


def test_hip_check_fails_in_one_line_when_kokkos_runs_on_openmp(built):
    proc, entries = built(built.prefix, FAKE_KOKKOS_DEVICE="OpenMP")
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith(f"{ME}: error: step hip-check failed: ") and "OpenMP, not HIP" in line
    assert "pip uninstall -y pennylane_lightning_kokkos" in line
    assert actions(entries)[-1] == "hip-check" and "QML_CONDA_ENV=" not in proc.stdout


def test_hip_check_on_a_node_without_gpu_says_where_to_run_it(built):
    proc, _ = built(built.prefix, FAKE_GPUS="0")
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith(f"{ME}: error: step hip-check failed: ") and "no GPU" in line and "salloc" in line


def test_existing_directory_that_is_no_environment_is_left_alone(fakes):
    prefix = fakes.tmp / "precious"
    prefix.mkdir()
    (prefix / "data.txt").write_text("keep me")
    proc, entries = fakes(prefix)
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith(f"{ME}: error: step env failed: ") and "new ENV_PREFIX" in line
    assert not any(e["tool"] == "conda" for e in entries)
    assert (prefix / "data.txt").read_text() == "keep me"


def test_modules_come_from_qml_modules_in_order(fakes):
    modules = "PrgEnv-gnu/8.7.0 cpe/25.09 rocm/6.4.2 miniforge3/23.11.0-0"
    proc, _ = fakes("--dry-run", fakes.tmp / "env", QML_MODULES=modules)
    assert proc.returncode == 0, proc.stderr
    loaded = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ module ")]
    assert loaded == [*(f"module load {m}" for m in modules.split()),
                      "module unload rocm craype-accel-amd-gfx90a", "module load rocm/6.4.2"]


def test_module_that_does_not_load_fails_in_one_line(fakes):
    proc, entries = fakes(fakes.tmp / "env", FAKE_FAIL="load cpe/26.03")
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith(f"{ME}: error: step modules failed: module load cpe/26.03 failed")
    assert "QML_MODULES" in line and not any(e["tool"] == "conda" for e in entries)


def test_without_a_module_command_it_says_where_to_run(fakes):
    (fakes.bin / "module").unlink()
    proc, entries = fakes(fakes.tmp / "env")
    assert proc.returncode == 1 and entries == []
    assert "step modules failed: no 'module' command" in error_line(proc)


@pytest.mark.parametrize("args", [[], ["--bogus", "/x"], ["/a", "/b"], ["--build-dir"], ["/path with space"]])
def test_bad_usage_exits_2_with_one_line(fakes, args):
    proc, entries = fakes(*args)
    assert proc.returncode == 2 and entries == []
    line = error_line(proc)
    assert line.startswith(f"{ME}: error: ") and "usage: bash build_frontier_env.sh" in line


def test_the_builders_modules_are_the_launchers_default():
    # The job must load the stack the environment was built with: submit_qml.sbatch loads frontier-modules.txt.
    build = re.search(r'^DEFAULT_MODULES="([^"]+)"', SCRIPT.read_text(), re.M)
    launcher = [line.split("#")[0].strip() for line in (REPO / "frontier-modules.txt").read_text().splitlines()]
    assert build and build[1].split() == [module for module in launcher if module]
