"""Progress bars that read well on a terminal and in a log (CI, ``nohup``, a cluster job).

On a terminal (or a notebook) a bar is tqdm's own. Elsewhere tqdm would print one carriage-return line per
update — thousands of lines in a log — so the bar is throttled with tqdm's own options: one line every
:data:`LOG_INTERVAL_S` seconds at most (``mininterval``), plain ASCII at a fixed width. ``enabled=False`` (the
library's ``progress=False``, the CLI's ``--quiet`` / ``--no-progress``) turns it off.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

from tqdm.auto import tqdm

#: seconds between two progress lines when the output is not a terminal
LOG_INTERVAL_S = 10.0
LOG_WIDTH = 100


def _is_terminal(stream: TextIO | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def bar(iterable: Iterable | None = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """``tqdm(iterable, **options)``, off unless ``enabled``, and throttled for logs when its stream (``file``,
    default stderr) is not a terminal. Options given explicitly win."""
    stream = options.get("file", sys.stderr)
    notebook = tqdm.__module__.endswith("notebook")  # tqdm.auto picked the widget: it redraws in place
    if enabled and not notebook and not _is_terminal(stream):
        options.setdefault("mininterval", LOG_INTERVAL_S)
        options.setdefault("maxinterval", max(LOG_INTERVAL_S, options["mininterval"]))
        options.setdefault("ascii", True)
        options.setdefault("ncols", LOG_WIDTH)
    return tqdm(iterable, disable=not enabled, **options)


def write(message: str) -> None:
    """Print a line without breaking an active bar."""
    tqdm.write(message)


def quiet_option(command):
    """The CLI flag that turns progress off: ``--quiet`` (alias ``--no-progress``), passed as ``no_progress``."""
    import click

    return click.option("--quiet", "--no-progress", "no_progress", is_flag=True,
                        help=f"No progress bar (where output is not a terminal, a bar prints a line every "
                             f"{LOG_INTERVAL_S:g} s at most).")(command)
