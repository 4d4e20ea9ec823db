"""Every notebook in notebooks/ runs top to bottom on a fresh Jupyter kernel, without an error, within its time limit.

The sources are jupytext percent scripts; ``notebooks/run.py`` converts each one and executes it with nbclient
(``python notebooks/run.py`` does the same by hand). Each notebook takes about a minute on 2 CPU cores; the limit
per notebook leaves room for a loaded machine. Teacher trajectories and reference solutions go to a fresh cache, so
every run is a cold one, as in CI.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
TIMEOUT_S = 300  # per notebook, kernel start included

pytest.importorskip("jupytext", reason="notebook tests need the [notebooks] extra (in [test])")
pytest.importorskip("nbclient", reason="notebook tests need the [notebooks] extra (in [test])")


def _runner():
    spec = importlib.util.spec_from_file_location("notebooks_run", NOTEBOOKS_DIR / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _runner()


def test_notebooks_are_found():
    names = {p.stem for p in runner.notebooks()}
    assert {"quickstart", "solver_anatomy", "tuning", "guidance_artifacts"} <= names


def test_kernel_is_installed():
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    assert runner.KERNEL in specs, f"no {runner.KERNEL!r} Jupyter kernel (ipykernel installs one); found {specs}"


@pytest.mark.slow
@pytest.mark.parametrize("path", runner.notebooks(), ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path):
    nb, seconds = runner.execute(path, timeout=TIMEOUT_S, env={"FASTSAMPLER_CACHE": str(tmp_path / "cache")})
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook drew no figure"
    print(f"{path.name}: {seconds:.1f} s")


def test_run_writes_executed_notebooks_to_out_and_never_to_the_sources(tmp_path, monkeypatch):
    import jupytext
    import nbformat

    source = NOTEBOOKS_DIR / "quickstart.py"
    stat = source.stat()
    monkeypatch.setattr(runner, "execute", lambda path, timeout, figures: (jupytext.read(path), 0.0))
    assert runner.main(["--out", str(tmp_path / "runs"), "quickstart"]) == 0
    written = nbformat.read(tmp_path / "runs" / "quickstart.ipynb", as_version=4)
    assert written.cells and not (NOTEBOOKS_DIR / "quickstart.ipynb").exists()
    assert (source.stat().st_mtime_ns, source.stat().st_size) == (stat.st_mtime_ns, stat.st_size)
