"""The cache folder: teacher trajectories (``tuning``), FID reference statistics (``eval.fid``), search studies.

``$FASTSAMPLER_CACHE`` when set, else ``~/.cache/fastsampler``; callers add their own subfolder.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$FASTSAMPLER_CACHE``, else ``~/.cache/fastsampler`` (read at each call, so a test may set it)."""
    return Path(os.environ.get("FASTSAMPLER_CACHE", Path.home() / ".cache" / "fastsampler"))
