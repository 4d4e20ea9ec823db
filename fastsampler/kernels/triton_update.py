"""Fused Triton kernel for one plan row: every input read once, every output written once, no host sync.

Per element, all arithmetic in fp32 (equivalent torch code: ``fastsampler.kernels.reference.apply_row_torch``):

    D      = d_x·X + d_o·O                          → history[write_slot]   (read back instead if a hook wrote it)
    X_next = a_x·X + a_s·S + a_z·Z + Σ_k a_k·H_k    (H_write_slot is D, taken from registers)
    S_new  = u_x·X + u_s·S + u_z·Z + Σ_k u_k·H_k    (rows that save)

The coefficients are read inside the kernel from a float32 row on the device (``coef``; the scheduler uploads
its whole table once and passes a row view), so a step makes neither a host/device synchronisation nor a
host→device copy. Which sources a row touches is known on the host (``row.x_terms`` / ``row.s_terms``, plain
Python data): S and Z are compile-time flags, and history slots whose coefficients are all zero are masked out
of the load, so they cost no memory traffic and — like the torch path, which skips zero terms — a NaN/inf left
in an unused slot cannot leak into the result through 0·NaN.

Layout and dtype rules:

* X and O may each be fp32, fp16 or bf16; S and Z are read as whatever float dtype they have (fp32 in
  practice) and converted to fp32 in registers.
* Inputs X, O, S, Z that are not contiguous are copied to contiguous tensors first (Triton indexes flat
  memory; a strided tensor would be read in the wrong order). ``history`` is written in place, so it must be
  contiguous (a ValueError otherwise — the scheduler allocates it contiguous).
* Outputs are fresh, contiguous tensors: X_next in X's dtype; S_new in fp32. Unlike the torch path, which
  returns ``x`` itself when a row saves exactly its input (``s_terms == ((SRC_X, 1.0),)``), the kernel always
  writes S_new to a fresh fp32 tensor (4 bytes/element more on such rows, and no aliasing of the caller's
  sample). Rows that do not save return ``saved`` unchanged.
* float64 inputs (history float64) and K > MAX_SLOTS history slots fall back to the torch path.
* A row that reads S or Z while ``saved`` / ``noise`` is None is an error (the torch path fails too).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from fastsampler.kernels.reference import apply_row_torch
from fastsampler.kernels.row import SRC_S, SRC_SLOTS, SRC_Z, Row

MAX_SLOTS = 6
# The jit decorator picks the interpreter or the compiler when this module is imported. (The interpreter also
# only works if TRITON_INTERPRET=1 was set before triton itself was first imported — see tests/conftest.py.)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Under the interpreter autotuning and device queries fail: exactly one config there. On a GPU three configs
# are tuned on the first call for each (size, K, flags, dtypes) key — well under a second, cached on disk
# (cache_results) for later processes; it synchronises, so don't make that first call inside CUDA-graph capture.
# Re-running the kernel while tuning is harmless: it only overwrites its outputs with the same values.
_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


@triton.autotune(configs=_CONFIGS, key=["n", "K", "HAS_S", "HAS_Z", "WRITE_S", "WRITE_D"], cache_results=True)
@triton.jit
def _plan_row_kernel(
    x_ptr,       # X, the current sample (n elements, fp32/fp16/bf16)
    o_ptr,       # O, the model output (n elements, any float dtype; unread when WRITE_D is False)
    s_ptr,       # S, the saved state (read only when HAS_S)
    z_ptr,       # Z, the noise (read only when HAS_Z)
    h_ptr,       # history, K×n fp32, slot k at h_ptr + k·n; slot write_slot receives D
    coef_ptr,    # packed fp32 row [d_x, d_o, s_write, x_coef (3+K), s_coef (3+K)]
    xn_ptr,      # X_next out (n elements, X's dtype)
    sn_ptr,      # S_new out (n elements, fp32; unwritten unless WRITE_S)
    n,           # elements per tensor
    write_slot,  # history slot of this step's prediction D
    used_slots,  # bit k set ⇔ some coefficient of slot k is non-zero (others are not loaded)
    K: tl.constexpr, HAS_S: tl.constexpr, HAS_Z: tl.constexpr,
    WRITE_S: tl.constexpr, WRITE_D: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    n64 = tl.cast(n, tl.int64)  # slot offsets k·n in int64 (n may arrive as i32 or as the constexpr 1)
    d_ptr = h_ptr + tl.cast(write_slot, tl.int64) * n64 + offs
    # Scalars are broadcast to vectors before they enter a mask: the interpreter rejects scalar & vector masks.
    zero = tl.zeros_like(offs)
    slot = zero + write_slot
    used = zero + used_slots
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if WRITE_D:
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(coef_ptr + 0) * x + tl.load(coef_ptr + 1) * o
        tl.store(d_ptr, d, mask=mask)
    else:  # a hook (thresholding) already stored D
        d = tl.load(d_ptr, mask=mask, other=0.0)
    xc = coef_ptr + 3           # x_coef over (X, S, Z, H_0..H_K-1)
    sc = coef_ptr + 3 + (3 + K)  # s_coef, same order
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
    for k in tl.static_range(K):
        live = ((used >> k) & 1) != 0
        # D's slot comes from registers; an unused slot is not loaded (masked lanes move no memory).
        h = tl.load(h_ptr + k * n64 + offs, mask=mask & live & (slot != k), other=0.0)
        h = tl.where(live & (slot == k), d, h)
        acc += tl.load(xc + 3 + k) * h
        if WRITE_S:
            sacc += tl.load(sc + 3 + k) * h
    tl.store(xn_ptr + offs, acc.to(xn_ptr.dtype.element_ty), mask=mask)
    if WRITE_S:
        tl.store(sn_ptr + offs, sacc, mask=mask)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _check_like(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.shape != x.shape or t.device != x.device:
        raise ValueError(f"`{name}` is {tuple(t.shape)} on {t.device}; expected {tuple(x.shape)} on {x.device}")


def apply_row_triton(row: Row, x: torch.Tensor, out: torch.Tensor, history: torch.Tensor,
                     saved: torch.Tensor | None, noise: torch.Tensor | None, prediction_written: bool = False,
                     coef: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``apply_row_torch``: returns (X_next, S_new).

    ``coef``: ``row.packed`` as a float32 tensor on x's device (the scheduler's pre-uploaded table row).
    S_new is a fresh fp32 tensor on rows that save (never an alias of ``x``), ``saved`` itself otherwise.
    """
    k = history.shape[0]
    if x.dtype == torch.float64 or history.dtype != torch.float32 or k > MAX_SLOTS:
        return apply_row_torch(row, x, out, history, saved, noise, prediction_written)
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError("apply_row_triton needs CUDA tensors (for CPU tensors, TRITON_INTERPRET=1 must be set "
                           "before triton is first imported)")
    _check_like("out", out, x)
    if history.shape[1:] != x.shape or history.device != x.device:
        raise ValueError(f"`history` is {tuple(history.shape)} on {history.device}; expected (K, "
                         f"{', '.join(map(str, x.shape))}) on {x.device}")
    if not history.is_contiguous():
        raise ValueError("`history` must be contiguous (it is written in place)")
    if not 0 <= row.write_slot < k:
        raise ValueError(f"row writes slot {row.write_slot} but history has {k} slots")
    if len(row.packed) != 3 + 2 * (3 + k):
        raise ValueError(f"row has {(len(row.packed) - 9) // 2} slots but history has {k}")
    terms = row.x_terms + (row.s_terms or ())
    has_s = any(j == SRC_S for j, _ in terms)
    has_z = any(j == SRC_Z for j, _ in terms)
    if has_s and saved is None:
        raise ValueError("the row reads the saved state S but `saved` is None")
    if has_z and noise is None:
        raise ValueError("the row reads noise Z but `noise` is None")
    for name, t in (("saved", saved if has_s else None), ("noise", noise if has_z else None)):
        if t is not None:
            _check_like(name, t, x)
    used_slots = 0
    for j, _ in terms:
        if j >= SRC_SLOTS:
            used_slots |= 1 << (j - SRC_SLOTS)
    write_s = row.s_terms is not None
    if coef is None:
        # A host→device copy of ~20 floats on every call; schedulers upload their table once and pass a row.
        coef = torch.tensor(row.packed, dtype=torch.float32, device=x.device)
    elif coef.dtype != torch.float32 or coef.device != x.device or coef.numel() != len(row.packed) \
            or not coef.is_contiguous():
        raise ValueError(f"`coef` must be a contiguous float32 tensor of {len(row.packed)} elements on {x.device}")

    xc, oc = _flat(x), _flat(out)
    sc = _flat(saved) if has_s else xc  # placeholders are never dereferenced (constexpr flags off)
    zc = _flat(noise) if has_z else xc
    x_next = torch.empty_like(xc, memory_format=torch.contiguous_format)
    s_new = torch.empty(xc.shape, dtype=torch.float32, device=xc.device) if write_s else x_next
    n = xc.numel()
    if n:
        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK"]),)

        # Launch on x's GPU, not on the current device.
        guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            _plan_row_kernel[grid](xc, oc, sc, zc, history, coef, x_next, s_new, n, row.write_slot, used_slots,
                                   K=k, HAS_S=has_s, HAS_Z=has_z, WRITE_S=write_s,
                                   WRITE_D=not prediction_written)
    return x_next, (s_new if write_s else saved)


__all__ = ["apply_row_triton", "MAX_SLOTS"]
