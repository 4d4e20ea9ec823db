"""Choose the update implementation: the fused Triton kernel on CUDA when available, else the torch path.

Force one with ``FASTSAMPLER_KERNEL=torch|triton`` or the scheduler option ``kernel="torch"|"triton"|"auto"``.
float64 samples and plans with more slots or registers than the kernel is built for always take the torch path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastsampler.kernels import reference

KERNELS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_choice(requested: str) -> str:
    """The requested implementation name (the environment variable wins), checked."""
    if requested not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {requested!r}")
    env = os.environ.get("FASTSAMPLER_KERNEL")
    if env and env not in KERNELS:
        raise ValueError(f"FASTSAMPLER_KERNEL must be one of {KERNELS}, got {env!r}")
    return env or requested


def resolve_kernel(requested: str, device: torch.device, dtype: torch.dtype = torch.float32, slots: int = 0,
                   registers: int = 0) -> str:
    """The implementation to use for samples of ``dtype`` on ``device`` with a plan of this shape."""
    choice = kernel_choice(requested)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if choice == "auto":
        choice = "triton" if device.type == "cuda" and triton_available() else "torch"
    elif choice == "triton":
        if not triton_available():
            raise RuntimeError("kernel='triton' was requested but triton is not installed (pip install triton)")
        if device.type != "cuda" and not interpret:
            raise RuntimeError("kernel='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if choice == "triton":
        from fastsampler.kernels.triton_update import MAX_REGISTERS, MAX_SLOTS

        if dtype == torch.float64 or slots > MAX_SLOTS or registers > MAX_REGISTERS:
            return "torch"  # the fused kernel computes in fp32 and is built for small tables
    return choice


@dataclass(frozen=True)
class Kernel:
    """An update implementation: ``apply(row, x, out, history, state, noise, prediction_written[, coef])`` and
    the empty state it starts a run from."""

    name: str
    apply: Callable[..., tuple[torch.Tensor, Any]]
    init_state: Callable[[int, torch.Tensor], Any]
    uses_device_table: bool


def get_kernel(kind: str) -> Kernel:
    if kind == "triton":
        from fastsampler.kernels import triton_update

        return Kernel("triton", triton_update.apply_row_triton, triton_update.init_state, True)
    return Kernel("torch", reference.apply_row_torch, reference.init_state, False)
