"""The finiteness check of ``step()``: a clear error naming the first step whose prediction was NaN/inf.

The sum of a step's prediction is non-finite exactly when the prediction is (barring an fp32 overflow of the
sum), and costs a fraction of an elementwise ``isfinite`` pass. Reading it on the host would stall an
accelerator, so there the first bad step index is kept in a device flag, copied without blocking into pinned
host memory after each step, and read on a later step once the copy has landed (``torch.cuda.Event.query``),
never waiting for it. Hence a run that stops early (SDXL ``denoising_end``) still reports a NaN from an earlier
step, no step ever synchronises, and nothing stops CUDA-graph capture (during capture or ``torch.compile``
tracing only the device flag is updated). What the device had not finished checking when the run ended is
reported by the next ``set_timesteps()`` or by ``PlanScheduler.raise_if_nonfinite()``.
"""

from __future__ import annotations

from collections import deque

import torch

MAX_PENDING = 4  # async copies in flight; beyond that the flag keeps accumulating and is copied later


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class DeferredFlag:
    """The first step index at which a prediction was non-finite, kept on the device (−1: none so far)."""

    def __init__(self) -> None:
        self.flag: torch.Tensor | None = None
        self._pending: deque = deque()

    def update(self, prediction: torch.Tensor, step: int) -> None:
        """Fold this step's test into the device flag; no host read."""
        bad = ~torch.isfinite(prediction.sum())
        flag = self.flag if self.flag is not None else torch.full((), -1, dtype=torch.int64, device=prediction.device)
        self.flag = torch.where(bad & (flag < 0), torch.full_like(flag, step), flag)

    def publish(self) -> None:
        """Start a non-blocking copy of the flag to the host (skipped while tracing or capturing a graph)."""
        if self.flag is None or torch.compiler.is_compiling() or _capturing(self.flag.device) \
                or len(self._pending) >= MAX_PENDING:
            return
        if self.flag.device.type == "cuda":
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_(self.flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((event, host.numpy()))  # a view of the pinned buffer: read without a Tensor call
        else:  # other devices (and CPU when forced in tests): a plain copy, complete at once
            self._pending.append((None, self.flag.detach().to("cpu", copy=True).numpy()))

    def poll(self) -> int | None:
        """The first bad step among the copies that have landed, without waiting (None: none known yet)."""
        first = None
        while self._pending:
            event, host = self._pending[0]
            if event is not None and not event.query():
                break
            self._pending.popleft()
            value = int(host)  # a host buffer whose copy has completed: no sync
            if value >= 0:
                first = value if first is None else min(first, value)
        return first

    def drain(self) -> int | None:
        """Wait for everything (outside the sampling loop only): the first bad step, if any; then reset."""
        first = self.poll()
        for event, _ in self._pending:
            if event is not None:
                event.synchronize()
        later = self.poll()
        if self.flag is not None:
            value = int(self.flag)  # ok-sync: called between runs, not from step()
            later = value if value >= 0 else later
        self.flag = None
        self._pending.clear()
        candidates = [v for v in (first, later) if v is not None]
        return min(candidates) if candidates else None
