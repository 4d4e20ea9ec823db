"""Argument checks the commands run before any work: a clean click usage error (exit code 2) that names the option
and what is allowed, never a traceback after minutes of sampling, and nothing written."""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path
from typing import Iterable

import click


def writable_folder(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a folder that exists or can be created and written; probes with a temporary folder it removes
    at once, so a failed check leaves nothing behind."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise click.BadParameter(f"{folder} exists and is not a folder", param_hint=option)
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise click.BadParameter(f"{folder}: {ancestor} is not a folder", param_hint=option)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fastsampler-probe-", dir=ancestor))
    except OSError as error:
        raise click.BadParameter(f"cannot write {folder}: {ancestor} is not writable ({error.strerror})",
                                 param_hint=option) from None
    return folder


def suggestion(name: str, known: Iterable[str], n: int = 3) -> str:
    """`` Did you mean 'X'?`` (or ``'X', 'Y' or 'Z'``) for the closest known names (difflib), or ``""``."""
    close = [repr(c) for c in difflib.get_close_matches(name, list(known), n=n, cutoff=0.6)]
    if not close:
        return ""
    return f" Did you mean {close[0] if len(close) == 1 else ', '.join(close[:-1]) + ' or ' + close[-1]}?"


def fastsampler_schedulers() -> list[str]:
    from fastsampler.lazy import LAZY_ATTRIBUTES

    return sorted(n for n in LAZY_ATTRIBUTES if n.endswith("Scheduler"))


def diffusers_schedulers() -> list[str]:
    import diffusers

    return sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))


def check_scheduler_name(name: str, option: str = "--scheduler", fastsampler_only: bool = False) -> None:
    """A scheduler name resolves: a fastsampler class (``UniPCScheduler`` or ``fastsampler.UniPCScheduler``), a
    diffusers class (unless ``fastsampler_only``), a dotted ``module.Class`` path, or a saved scheduler folder."""
    ours = fastsampler_schedulers()
    bare = name.removeprefix("fastsampler.")
    if bare in ours or (not fastsampler_only and Path(name).is_dir()):
        return
    if fastsampler_only:
        raise click.BadParameter(f"{name!r} is not a fastsampler scheduler.{suggestion(bare, ours)} "
                                 f"Allowed: {', '.join(ours)}.", param_hint=option)
    if "." in name.strip(".") and not name.startswith("fastsampler."):
        from fastsampler.eval.fid import resolve_scheduler_class

        try:
            resolve_scheduler_class(name)
        except (ImportError, ValueError) as error:
            raise click.BadParameter(f"{name!r}: {error}", param_hint=option) from None
        return
    theirs = diffusers_schedulers()
    if name in theirs:
        return
    known = theirs + [f"fastsampler.{n}" for n in ours]
    raise click.BadParameter(f"{name!r} is neither a diffusers scheduler, a fastsampler one (fastsampler.NAME) nor a "
                             f"scheduler folder.{suggestion(name, known) or suggestion(bare, ours)}",
                             param_hint=option)


def positive_ints(text: str, option: str) -> list[int]:
    """``"5,6,8"`` → ``[5, 6, 8]``; a usage error for anything but positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated positive integers, got {text!r}",
                                 param_hint=option) from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected comma-separated positive integers, got {text!r}", param_hint=option)
    return values
