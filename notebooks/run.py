"""Execute the notebooks: each jupytext percent script (the source in git) → a notebook → run top to bottom on a
fresh Jupyter kernel (nbclient), failing on the first error.

    python notebooks/run.py                       # every notebook; prints the time of each
    python notebooks/run.py --figures             # … and writes each key figure to notebooks/figures/<name>.png
    python notebooks/run.py --ipynb quickstart    # … and keeps the executed notebook (notebooks/quickstart.ipynb)
    python notebooks/run.py --out runs quickstart  # … keeps it as runs/quickstart.ipynb instead

Nothing is ever written to the percent scripts themselves (nor their timestamps touched).

A notebook is any ``notebooks/*.py`` in jupytext's percent format. The figures are the README's pictures:
``--figures`` sets ``FASTSAMPLER_NOTEBOOK_FIGURES``, and each notebook saves its key figure there (without it,
nothing is written). The kernel gets one torch thread unless ``OMP_NUM_THREADS`` is set (``THREADS``).
``tests/test_notebooks.py`` runs the same ``execute`` with a time limit per notebook.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
FIGURES_ENV = "FASTSAMPLER_NOTEBOOK_FIGURES"
KERNEL = "python3"
# One torch thread unless OMP_NUM_THREADS says otherwise (as `fastsampler bench`): the models are tiny, a second
# thread gains ~20 % on an idle 2-core machine, and on a shared one its spinning makes a run several times slower.
THREADS = 1


def notebooks() -> list[Path]:
    """The percent-format notebook sources, sorted by name."""
    return sorted(p for p in HERE.glob("*.py") if "format_name: percent" in p.read_text(encoding="utf-8")[:1000])


def execute(path: Path, timeout: float = 600.0, figures: Path | None = None, env: dict[str, str] | None = None,
            kernel_name: str = KERNEL):
    """Run the notebook ``path`` on a fresh kernel (cwd: this folder); returns (executed notebook, seconds).

    ``timeout`` bounds the whole notebook, kernel start included (nbclient's per-cell limit is set to what is left
    of it). Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell (its traceback in the
    message) and ``CellTimeoutError`` past the limit.
    """
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    kernel_env = {**os.environ, **(env or {})}
    kernel_env.setdefault("OMP_NUM_THREADS", str(THREADS))
    kernel_env.pop(FIGURES_ENV, None)
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        kernel_env[FIGURES_ENV] = str(figures.resolve())
    began = time.monotonic()
    deadline = began + timeout
    client = NotebookClient(nb, kernel_name=kernel_name, startup_timeout=min(120.0, timeout),
                            timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
                            resources={"metadata": {"path": str(HERE)}})
    client.execute(env=kernel_env)
    return nb, time.monotonic() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebook names (default: all), e.g. quickstart")
    parser.add_argument("--figures", action="store_true", help=f"write the key figures to {FIGURES}")
    parser.add_argument("--ipynb", action="store_true", help="write each executed notebook beside its source")
    parser.add_argument("--out", type=Path, default=None, help="write each executed notebook into this folder")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per notebook (default 600)")
    args = parser.parse_args(argv)
    paths = notebooks()
    if args.names:
        known = {p.stem: p for p in paths}
        unknown = [n for n in args.names if n not in known]
        if unknown:
            parser.error(f"unknown notebooks {unknown}; known: {sorted(known)}")
        paths = [known[n] for n in args.names]
    for path in paths:
        nb, seconds = execute(path, args.timeout, FIGURES if args.figures else None)
        print(f"{path.name}: {seconds:.1f} s", flush=True)
        if args.ipynb or args.out is not None:
            import nbformat

            folder = args.out if args.out is not None else path.parent
            folder.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, folder / path.with_suffix(".ipynb").name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
