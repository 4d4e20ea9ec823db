"""Moved to :mod:`fastsampler.runtime.distributed` (2026-12-07: one-way layers, ``ARCHITECTURE.md``).
This name stays for scripts and saved pipeline folders written against the earlier layout: it *is* that module
(same objects, same patches)."""

import sys

from fastsampler.runtime import distributed as _moved

sys.modules[__name__] = _moved
