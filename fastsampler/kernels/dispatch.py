"""Choose the update implementation: the fused Triton kernel on CUDA when available, else the torch path.

Force one with ``FASTSAMPLER_KERNEL=torch|triton`` or the scheduler option ``kernel="torch"|"triton"|"auto"``.
"""

from __future__ import annotations

import os

import torch

from fastsampler.kernels.reference import apply_row_torch

KERNELS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kernel(requested: str, device: torch.device) -> str:
    """The implementation to use for tensors on ``device``."""
    env = os.environ.get("FASTSAMPLER_KERNEL")
    choice = env if env else requested
    if choice not in KERNELS:
        source = "FASTSAMPLER_KERNEL" if env else "`kernel`"
        raise ValueError(f"{source} must be one of {KERNELS}, got {choice!r}")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("kernel='triton' was requested but triton is not installed (pip install triton)")
        if device.type != "cuda" and not interpret:
            raise RuntimeError("kernel='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return choice


def get_update(kind: str):
    """The update function for a resolved kernel name; both share ``apply_row_torch``'s signature."""
    if kind == "triton":
        from fastsampler.kernels.triton_update import apply_row_triton

        return apply_row_triton
    return apply_row_torch
