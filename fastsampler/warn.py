"""Warnings that point at the user's line: the stack level is the first frame outside fastsampler and the
libraries that call into it (diffusers' pipelines, torch), however deep inside them the warning is raised."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

#: folders whose frames are skipped: a warning from our code, reached through a diffusers pipeline, names the
#: user's call of the pipeline
_INSIDE = (str(Path(__file__).resolve().parent), "/diffusers/", "/torch/", "/contextlib.py")


def caller_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` called by this function's caller) of the first frame outside
    :data:`_INSIDE`."""
    frame, level = sys._getframe(2), 2  # 1: warnings.warn's caller (our code) — its own level
    while frame is not None and any(part in str(Path(frame.f_code.co_filename).resolve()) for part in _INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the user's line (see :func:`caller_stacklevel`)."""
    warnings.warn(message, category, stacklevel=caller_stacklevel())
