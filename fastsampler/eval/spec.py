"""Scheduler specifications on the command line: ``NAME[:key=value,key=value]`` (shared by bench, fid, tune).

``NAME`` is a diffusers class (``DDIMScheduler``), one of ours (``UniPCScheduler`` or
``fastsampler.UniPCScheduler``) or any dotted path; values are JSON where they parse (``3``, ``0.8``, ``true``,
``[1, 0.9]``) and strings otherwise.
"""

from __future__ import annotations

import json
from typing import Any, Sequence


def parse_value(text: str) -> Any:
    """``"3"`` → 3, ``"false"`` → False, ``"0.5"`` → 0.5, ``"[1,2]"`` → [1, 2]; anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so ``dc_ratios=[1,0.9],x=1`` keeps its list."""
    parts, depth, current = [], 0, []
    for ch in text:
        depth += ch in "[{(" and 1 or 0
        depth -= ch in "]})" and 1 or 0
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def parse_scheduler(text: str) -> tuple[str, dict[str, Any]]:
    """``"Name:k=v,k2=[1,2]"`` → ``("Name", {"k": v, "k2": [1, 2]})``."""
    name, _, rest = text.partition(":")
    if not name.strip():
        raise ValueError(f"expected NAME[:key=value,...], got {text!r}")
    return name.strip(), parse_kwargs(_split_top_level(rest))
