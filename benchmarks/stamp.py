"""When and where a benchmark ran: the header every recorded result starts with."""

from __future__ import annotations

import datetime
import platform


def run_stamp(threads: str = "torch threads 1") -> dict[str, str]:
    """``date`` (UTC, ISO 8601) and ``machine`` (processor or architecture, and the threading used)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {threads}"}
