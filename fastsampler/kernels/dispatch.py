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


def kernel_choice(requested: str) -> str:
    """The requested implementation name (the environment variable wins), checked."""
    if requested not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {requested!r}")
    env = os.environ.get("FASTSAMPLER_KERNEL")
    if env and env not in KERNELS:
        raise ValueError(f"FASTSAMPLER_KERNEL must be one of {KERNELS}, got {env!r}")
    return env or requested


def resolve_kernel(requested: str, device: torch.device) -> str:
    """The implementation to use for tensors on ``device``."""
    choice = kernel_choice(requested)
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
