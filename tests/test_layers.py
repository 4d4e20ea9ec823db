"""The import direction of ARCHITECTURE.md: import-linter's contracts (``.importlinter``) hold, every module of the
package sits on one of their lines, and nothing below the façade reaches back up through ``fastsampler`` itself."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import pytest
from importlinter import cli as importlinter_cli  # a test dependency: missing, the test must fail, not skip

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastsampler"
CONFIG = ROOT / ".importlinter"


def _layers() -> list[list[str]]:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    lines = parser["importlinter:contract:layers"]["layers"].strip().splitlines()
    return [[name.strip() for name in line.split("|")] for line in lines]


def test_contracts_hold(capsys):
    code = importlinter_cli.lint_imports(config_filename=str(CONFIG), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out


def test_every_module_sits_on_a_layer():
    placed = {name for line in _layers() for name in line}
    rooms = {f"fastsampler.{p.stem}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    rooms |= {f"fastsampler.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert rooms - placed == set(), "modules on no line of .importlinter: place them"
    assert placed - rooms == set(), ".importlinter names modules that do not exist"


def _submodules() -> set[str]:
    return {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def test_nothing_imports_the_facade():
    """``import fastsampler`` then ``fastsampler.Name`` hides an upward import (the façade resolves names from every
    layer); a module imports what it uses from where it lives. ``from fastsampler import progress`` (a module) is
    fine."""
    submodules, offenders = _submodules(), []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(alias.name == "fastsampler" for alias in node.names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} import fastsampler")
            elif isinstance(node, ast.ImportFrom) and node.module == "fastsampler" and not node.level:
                names = [alias.name for alias in node.names if alias.name not in submodules]
                if names:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} from fastsampler import {names}")
    assert offenders == []


MOVED = {"fastsampler.tuning.model": "fastsampler.models.denoisers",
         "fastsampler.eval.digits": "fastsampler.models.digits",
         "fastsampler.eval.cond_pipeline": "fastsampler.models.digits_pipeline",
         "fastsampler.eval.conditions": "fastsampler.models.conditions",
         "fastsampler.eval.features": "fastsampler.models.features",
         "fastsampler.eval.distributed": "fastsampler.runtime.distributed"}


@pytest.mark.parametrize("old", MOVED)
def test_an_old_module_path_is_the_moved_module(old):
    """Scripts and saved pipeline folders written against the layout before 2026-12-07 import the same objects."""
    import importlib

    assert importlib.import_module(old) is importlib.import_module(MOVED[old])
