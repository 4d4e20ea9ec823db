"""No module in a folder users run scripts from may share its name with an importable top-level module.

``python benchmarks/x.py`` puts ``benchmarks/`` first on ``sys.path``; a file there named like an installed
package (``kernels``, ``optuna``, ``datasets``, …) then replaces that package for every importer — transformers 5
installs ``kernels`` and diffusers imports it, so ``benchmarks/kernels.py`` broke ``import fastsampler`` when run
as a script. The same holds for the notebooks' folder, the repository root (``python -m`` / ``python setup.py``)
and ``tests/`` (conftest puts it on ``sys.path``).

Each name is looked up in a fresh interpreter whose ``sys.path`` has these folders removed, so what
``importlib.util.find_spec`` finds there is what the folder's module would shadow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_DIRS = ("", "benchmarks", "notebooks", "tests")
OURS = {"fastsampler"}  # the package itself lives in the root; its import is meant to find it


def local_modules(folder: Path) -> set[str]:
    """Top-level names a script in ``folder`` would import from it: ``*.py`` files and regular packages (a folder
    without ``__init__.py`` is a namespace portion, which any regular module elsewhere outranks)."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return {n for n in names if n.isidentifier()} - OURS


FIND_ELSEWHERE = """
import importlib.util, json, os, sys
folders = {os.path.realpath(f) for f in json.loads(sys.argv[1])}
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) not in folders]
found = {}
for name in json.loads(sys.argv[2]):
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        found[name] = spec.origin or str(list(spec.submodule_search_locations or []))
print(json.dumps(found))
"""


def shadowed(folders: dict[str, set[str]]) -> dict[str, str]:
    """``{folder/name: where the environment's module of that name lives}`` for every clash."""
    names = sorted(set().union(*folders.values()))
    dirs = [str(ROOT / d) for d in SCRIPT_DIRS]
    done = subprocess.run([sys.executable, "-c", FIND_ELSEWHERE, json.dumps(dirs), json.dumps(names)],
                          capture_output=True, text=True, cwd=ROOT / "tests", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {f"{d or '.'}/{n}": found[n] for d, ns in folders.items() for n in sorted(ns) if n in found}


def test_no_script_folder_module_shadows_an_installed_module():
    folders = {d: local_modules(ROOT / d) for d in SCRIPT_DIRS}
    clashes = shadowed(folders)
    assert not clashes, ("rename these; each hides a module of the same name when its folder is first on "
                         f"sys.path: {clashes}")


@pytest.mark.parametrize("name", ["json", "kernels_probe_not_installed"])
def test_the_check_sees_a_clash_and_only_a_clash(name):
    """The lookup reports a name the environment has (stdlib ``json``) and nothing for a made-up one."""
    clashes = shadowed({"": {name}})
    assert (f"./{name}" in clashes) == (name == "json")
