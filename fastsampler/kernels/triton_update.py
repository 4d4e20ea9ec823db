"""Fused Triton kernel for one plan row: one read of every input, one write of every output.

Per element (all arithmetic in fp32):

    D      = d_x·X + d_o·O                          → history[write_slot]   (or read back if a hook wrote it)
    X_next = a_x·X + a_s·S + a_z·Z + Σ_k a_k·H_k    (H_write_slot is D from registers)
    S_new  = u_x·X + u_s·S + u_z·Z + Σ_k u_k·H_k    (rows that save)

The coefficients come from a float32 row on the device (``coef``: the scheduler uploads its whole table once),
read inside the kernel, so a step makes no host/device synchronisation and no host→device copy.

Layout rule: X and O may be fp32, fp16 or bf16 (independently); a non-contiguous X or O is copied to a
contiguous tensor first (Triton indexes flat memory); outputs are contiguous, X_next in X's dtype, S_new in
fp32. float64 inputs use the torch path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastsampler.kernels.reference import apply_row_torch
from fastsampler.kernels.row import Row

MAX_SLOTS = 6
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Under the interpreter autotuning and device queries fail: one fixed config there.
_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


@triton.autotune(configs=_CONFIGS, key=["K", "HAS_S", "HAS_Z", "WRITE_S", "WRITE_D"])
@triton.jit
def _plan_row_kernel(x_ptr, o_ptr, s_ptr, z_ptr, h_ptr, coef_ptr, xn_ptr, sn_ptr,
                     n, write_slot,
                     K: tl.constexpr, HAS_S: tl.constexpr, HAS_Z: tl.constexpr,
                     WRITE_S: tl.constexpr, WRITE_D: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d_slot = h_ptr + write_slot.to(tl.int64) * n + offs
    if WRITE_D:
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(coef_ptr + 0) * x + tl.load(coef_ptr + 1) * o
        tl.store(d_slot, d, mask=mask)
    else:
        d = tl.load(d_slot, mask=mask, other=0.0).to(tl.float32)
    # packed row: [d_x, d_o, s_write, x_coef (X, S, Z, H_0..H_K-1), s_coef (same)]
    xc = coef_ptr + 3
    sc = coef_ptr + 3 + (3 + K)
    acc = tl.load(xc + 0) * x
    if WRITE_S:
        sacc = tl.load(sc + 0) * x
    if HAS_S:
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(xc + 1) * s
        if WRITE_S:
            sacc += tl.load(sc + 1) * s
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(xc + 2) * z
        if WRITE_S:
            sacc += tl.load(sc + 2) * z
    slot = tl.zeros_like(offs) + write_slot  # as a vector: the interpreter rejects scalar-and-vector masks
    for k in tl.static_range(K):
        is_new = slot == k
        h = tl.load(h_ptr + k * n + offs, mask=mask & (slot != k), other=0.0).to(tl.float32)  # skip D's slot
        h = tl.where(is_new, d, h)
        acc += tl.load(xc + 3 + k) * h
        if WRITE_S:
            sacc += tl.load(sc + 3 + k) * h
    tl.store(xn_ptr + offs, acc.to(xn_ptr.dtype.element_ty), mask=mask)
    if WRITE_S:
        tl.store(sn_ptr + offs, sacc, mask=mask)


def apply_row_triton(row: Row, x: torch.Tensor, out: torch.Tensor, history: torch.Tensor,
                     saved: torch.Tensor | None, noise: torch.Tensor | None, prediction_written: bool = False,
                     coef: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``apply_row_torch``; returns (X_next, S_new) with S_new a fresh fp32 tensor on saving
    rows (``saved`` itself otherwise)."""
    k = history.shape[0]
    if x.dtype == torch.float64 or history.dtype != torch.float32 or k > MAX_SLOTS:
        return apply_row_torch(row, x, out, history, saved, noise, prediction_written)
    if not history.is_contiguous():
        raise ValueError("the history buffer must be contiguous")
    if coef is None:
        # One small host→device copy per call: schedulers pass the pre-uploaded row instead.
        coef = torch.as_tensor(row.packed, dtype=torch.float32, device=x.device)
    xc = x.contiguous()
    oc = out.contiguous()
    has_s = saved is not None and any(j == 1 for j, _ in row.x_terms + (row.s_terms or ()))
    has_z = noise is not None
    write_s = row.s_terms is not None
    sc = saved.contiguous() if has_s else xc
    zc = noise.contiguous() if has_z else xc
    x_next = torch.empty_like(xc)
    s_new = torch.empty(xc.shape, dtype=torch.float32, device=xc.device) if write_s else xc
    n = xc.numel()

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    _plan_row_kernel[grid](xc, oc, sc, zc, history, coef, x_next, s_new, n, row.write_slot,
                           K=k, HAS_S=has_s, HAS_Z=has_z, WRITE_S=write_s, WRITE_D=not prediction_written)
    return x_next, (s_new if write_s else saved)
