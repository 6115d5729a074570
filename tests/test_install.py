"""The install files: a fresh environment gets everything; a tuned cluster environment keeps its builds."""

import ast
import os
import shutil
import subprocess
import sys

from conftest import PROGRAM_FILES, ROOT, cpu_env
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

# What the tutorial's qml-frontier environment has ("Environment Information"): ROCm wheels of torch,
# Lightning and Lightning-Kokkos built from a development checkout (Kokkos with HIP), mpi4py built against
# Cray MPICH, and the PennyLane that Lightning pulled in then (0.38: the tutorial pins none).
TUTORIAL_BUILDS = {"torch": "2.4.1", "torchvision": "0.19.1", "pennylane": "0.38.0",
                   "pennylane-lightning": "0.39.0.dev52", "pennylane-lightning-kokkos": "0.39.0.dev52",
                   "mpi4py": "4.0.0"}


def requirements(name):
    with open(os.path.join(ROOT, name)) as file:
        lines = (line.split("#")[0].strip() for line in file)
        return {canonicalize_name(req.name): req for req in map(Requirement, filter(None, lines))}


def test_frontier_requirements_name_none_of_the_tuned_builds():
    assert not set(requirements("requirements-frontier.txt")) & set(TUTORIAL_BUILDS)


def test_frontier_requirements_and_the_tuned_builds_cover_every_requirement():
    assert set(requirements("requirements.txt")) == set(requirements("requirements-frontier.txt")) | set(
        TUTORIAL_BUILDS)


def test_the_tutorials_builds_satisfy_the_fresh_install_ranges_too():
    fresh = requirements("requirements.txt")
    for name, version in TUTORIAL_BUILDS.items():
        assert fresh[name].specifier.contains(Version(version), prereleases=True), (name, str(fresh[name]))


def test_lightning_and_lightning_kokkos_are_asked_for_together():
    fresh = requirements("requirements.txt")
    assert fresh["pennylane-lightning"].specifier == fresh["pennylane-lightning-kokkos"].specifier


def imported_modules(path):
    """Top-level names of the modules a file imports (lazy_import("pennylane") counts as an import)."""
    with open(path) as file:
        tree = ast.parse(file.read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    imported |= {node.args[0].value for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_import"}
    return imported


def test_every_third_party_module_the_program_imports_is_required():
    ours = {os.path.basename(path)[:-3] for path in PROGRAM_FILES} | {"machinery"}
    imported = set().union(*(imported_modules(path) for path in PROGRAM_FILES))
    assert "pennylane" in imported and "scipy" in imported
    third_party = imported - set(sys.stdlib_module_names) - ours
    # import name -> distribution name where they differ
    distribution = {"pennylane_lightning": "pennylane-lightning", "hostlist": "python-hostlist", "PIL": "pillow"}
    needed = {canonicalize_name(distribution.get(module, module)) for module in third_party}
    provided_by_torch = {"numpy", "pillow"}  # torchvision depends on both
    assert needed - provided_by_torch <= set(requirements("requirements.txt")), needed


def test_the_machinery_never_imports_qml_py():
    # The arrows point one way: qml.py is the story, machinery/ its machinery.
    for path in PROGRAM_FILES:
        if os.path.basename(path) not in ("qml.py", "bench.py"):
            assert "qml" not in imported_modules(path), path


def test_fresh_install_asks_for_no_pre_release():
    # A specifier naming a pre-release (e.g. >=0.39.0.dev0) lets pip install development builds from the registry.
    for requirement in requirements("requirements.txt").values():
        assert not any(Version(spec.version).is_prerelease for spec in requirement.specifier), str(requirement)


def test_qml_py_copied_alone_names_the_folder_it_needs(tmp_path):
    shutil.copy(os.path.join(ROOT, "qml.py"), tmp_path)
    result = subprocess.run([sys.executable, str(tmp_path / "qml.py"), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env=cpu_env())
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "qml.py: error: no module machinery; keep qml.py beside its machinery/ folder"]
