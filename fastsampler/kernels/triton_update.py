"""Fused Triton kernel for one plan row: every input read once, every output written once, no host sync.

Per element, all arithmetic in fp32 (the equivalent torch code is ``fastsampler.kernels.reference``):

    P      = c_x·X + c_o·O                (or read from the write slot if a hook — thresholding — stored it)
    D̂      = Σ_j s_j·src_j               → history[write_slot]    (D̂ = P unless the row mixes its store)
    X_next = Σ_j a_j·src_j               → a fresh tensor in X's dtype
    R'_r   = Σ_j u_{r,j}·src_j           → the register buffer, in place (rows that write r)

over src = (X, P, Z, R_0…R_{R−1}, H_0…H_{K−1}). The packed row (``RowView.packed``) has the write slot substituted
by D̂'s own combination, so no output reads the slot being written and one pass suffices. Each program handles
its own elements, so updating registers and the write slot in place is safe. The number of registers R and of
slots K are compile-time constants; which registers are read or written and whether Z is read are compile-time
flags; which history slots are read is a runtime bit mask (the ring buffer rotates, so a constant would compile a
kernel per rotation), and masked-out slots move no memory — like the torch path, which skips zero terms, a NaN
left in an unused slot cannot leak in through 0·NaN.

Coefficients are read inside the kernel from a float32 row on the device (``coef``: the scheduler uploads its
whole table in ``set_timesteps(device=…)`` and passes a row view), so a step makes neither a host/device
synchronisation nor a host→device copy.

Layout and dtype rules:

* X and O may each be fp32, fp16 or bf16; Z is read as whatever float dtype it has; history and registers are
  fp32 and must be contiguous (they are written in place; the scheduler allocates them so).
* Inputs X, O, Z that are not contiguous are copied first (Triton indexes flat memory).
* The state is one (R, …) fp32 register buffer (``init_state``), updated in place.
* float64 samples and K > MAX_SLOTS use the torch path (``fastsampler.kernels.dispatch`` decides).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from fastsampler.plans.format import RowView

MAX_SLOTS = 8
MAX_REGISTERS = 4
# The jit decorator picks the interpreter or the compiler when this module is imported. (The interpreter also
# only works if TRITON_INTERPRET=1 was set before triton itself was first imported — see tests/conftest.py.)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Under the interpreter autotuning and device queries fail: exactly one config there. On a GPU three configs
# are tuned on the first call for each key — well under a second, cached on disk (cache_results) for later
# processes; it synchronises, so make the first call outside CUDA-graph capture.
_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


@triton.autotune(configs=_CONFIGS,
                 key=["n", "R", "K", "HAS_Z", "COMPUTE_P", "MIX_STORE", "READ_REGS", "WRITE_REGS"],
                 cache_results=True)
@triton.jit
def _plan_row_kernel(
    x_ptr,       # X, the current sample (n elements)
    o_ptr,       # O, the model output (n elements; unread unless COMPUTE_P)
    z_ptr,       # Z, the noise (read only when HAS_Z)
    reg_ptr,     # registers, R×n fp32, register r at reg_ptr + r·n (updated in place)
    h_ptr,       # history, K×n fp32, slot k at h_ptr + k·n
    coef_ptr,    # packed fp32 row [c_x, c_o, M (2+R)×C row-major], C = 3 + R + K
    xn_ptr,      # X_next out (n elements, X's dtype)
    n,           # elements per tensor
    write_slot,  # history slot of this step's stored prediction
    used_slots,  # bit k set ⇔ the fused row reads slot k
    R: tl.constexpr, R_PAD: tl.constexpr, K: tl.constexpr, HAS_Z: tl.constexpr, COMPUTE_P: tl.constexpr,
    MIX_STORE: tl.constexpr, READ_REGS: tl.constexpr, WRITE_REGS: tl.constexpr, BLOCK: tl.constexpr,
):
    C: tl.constexpr = 3 + R + K
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    n64 = tl.cast(n, tl.int64)  # slot offsets k·n in int64 (n may arrive as i32 or as the constexpr 1)
    # Scalars are broadcast to vectors before they enter a mask: the interpreter rejects scalar & vector masks.
    used = tl.zeros_like(offs) + used_slots
    d_ptr = h_ptr + tl.cast(write_slot, tl.int64) * n64 + offs
    m_ptr = coef_ptr + 2
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if COMPUTE_P:
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(coef_ptr + 0) * x + tl.load(coef_ptr + 1) * o
    else:
        p = tl.load(d_ptr, mask=mask, other=0.0)
    # Register outputs as one (R_PAD, BLOCK) tile: each source is loaded once and added as a rank-1 update.
    ridx = tl.arange(0, R_PAD)
    rrow = m_ptr + (2 + ridx) * C
    rlive = ridx < R
    acc = tl.load(m_ptr + C + 0) * x + tl.load(m_ptr + C + 1) * p
    if MIX_STORE:
        sacc = tl.load(m_ptr + 0) * x + tl.load(m_ptr + 1) * p
    if WRITE_REGS != 0:
        racc = tl.load(rrow + 0, mask=rlive, other=0.0)[:, None] * x[None, :] \
            + tl.load(rrow + 1, mask=rlive, other=0.0)[:, None] * p[None, :]
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(m_ptr + C + 2) * z
        if MIX_STORE:
            sacc += tl.load(m_ptr + 2) * z
        if WRITE_REGS != 0:
            racc += tl.load(rrow + 2, mask=rlive, other=0.0)[:, None] * z[None, :]
    for r in tl.static_range(R):
        if (READ_REGS >> r) & 1:
            v = tl.load(reg_ptr + r * n64 + offs, mask=mask, other=0.0)
            acc += tl.load(m_ptr + C + 3 + r) * v
            if MIX_STORE:
                sacc += tl.load(m_ptr + 3 + r) * v
            if WRITE_REGS != 0:
                racc += tl.load(rrow + 3 + r, mask=rlive, other=0.0)[:, None] * v[None, :]
    for k in tl.static_range(K):
        live = ((used >> k) & 1) != 0
        h = tl.load(h_ptr + k * n64 + offs, mask=mask & live, other=0.0)
        acc += tl.load(m_ptr + C + 3 + R + k) * h
        if MIX_STORE:
            sacc += tl.load(m_ptr + 3 + R + k) * h
        if WRITE_REGS != 0:
            racc += tl.load(rrow + 3 + R + k, mask=rlive, other=0.0)[:, None] * h[None, :]
    if MIX_STORE:
        tl.store(d_ptr, sacc, mask=mask)
    elif COMPUTE_P:
        tl.store(d_ptr, p, mask=mask)
    tl.store(xn_ptr + offs, acc.to(xn_ptr.dtype.element_ty), mask=mask)
    for r in tl.static_range(R):
        if (WRITE_REGS >> r) & 1:
            value = tl.sum(tl.where(ridx[:, None] == r, racc, 0.0), axis=0)
            tl.store(reg_ptr + r * n64 + offs, value, mask=mask)


def init_state(registers: int, like: torch.Tensor) -> torch.Tensor | None:
    """The register buffer: (R, *shape) fp32 on ``like``'s device (None without registers)."""
    if registers == 0:
        return None
    return torch.zeros((registers, *like.shape), dtype=torch.float32, device=like.device)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _check_like(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.shape != x.shape or t.device != x.device:
        raise ValueError(f"`{name}` is {tuple(t.shape)} on {t.device}; expected {tuple(x.shape)} on {x.device}")


def _check_buffer(name: str, t: torch.Tensor, count: int, x: torch.Tensor) -> None:
    if t.shape != (count, *x.shape) or t.device != x.device or t.dtype != torch.float32:
        raise ValueError(f"`{name}` is {tuple(t.shape)} {t.dtype} on {t.device}; expected ({count}, "
                         f"{', '.join(map(str, x.shape))}) float32 on {x.device}")
    if not t.is_contiguous():
        raise ValueError(f"`{name}` must be contiguous (it is written in place)")


def apply_row_triton(row: RowView, x: torch.Tensor, out: torch.Tensor, history: torch.Tensor,
                     state: torch.Tensor | None, noise: torch.Tensor | None, prediction_written: bool = False,
                     coef: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``apply_row_torch`` with a register buffer as the state: returns (X_next, state).

    ``coef``: ``row.packed`` as a float32 tensor on x's device (the scheduler's pre-uploaded table row); without
    it the row is copied to the device on every call.
    """
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError("apply_row_triton needs CUDA tensors (for CPU tensors, TRITON_INTERPRET=1 must be set "
                           "before triton is first imported)")
    if x.dtype == torch.float64:
        raise ValueError("apply_row_triton computes in fp32; float64 samples take the torch path")
    k, r = row.slots, row.registers
    if k > MAX_SLOTS or r > MAX_REGISTERS:
        raise ValueError(f"the fused kernel handles up to {MAX_SLOTS} slots and {MAX_REGISTERS} registers "
                         f"(row has {k} and {r}); use the torch path")
    _check_like("out", out, x)
    _check_buffer("history", history, k, x)
    if r:
        if state is None:
            raise ValueError(f"the row has {r} registers but `state` is None (see init_state)")
        _check_buffer("state", state, r, x)
    if row.uses_noise:
        if noise is None:
            raise ValueError("the row reads noise Z but `noise` is None")
        _check_like("noise", noise, x)
    if coef is None:
        coef = torch.tensor(row.packed, dtype=torch.float32, device=x.device)
    elif coef.dtype != torch.float32 or coef.device != x.device or coef.numel() != len(row.packed) \
            or not coef.is_contiguous():
        raise ValueError(f"`coef` must be a contiguous float32 tensor of {len(row.packed)} elements on {x.device}")

    xc = _flat(x)
    oc = _flat(out) if not prediction_written else xc  # placeholders are never dereferenced (flags off)
    zc = _flat(noise) if row.uses_noise else xc
    regs = state if r else history
    x_next = torch.empty_like(xc, memory_format=torch.contiguous_format)
    n = xc.numel()
    if n:
        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK"]),)

        guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
        with guard:  # launch on x's GPU, not on the current device
            _plan_row_kernel[grid](xc, oc, zc, regs, history, coef, x_next, n, row.write_slot, row.kernel_slots,
                                   R=r, R_PAD=triton.next_power_of_2(max(r, 1)), K=k, HAS_Z=row.uses_noise,
                                   COMPUTE_P=not prediction_written, MIX_STORE=row.mixes_store,
                                   READ_REGS=row.kernel_registers, WRITE_REGS=row.writes_registers)
    return x_next, state


__all__ = ["apply_row_triton", "init_state", "MAX_SLOTS", "MAX_REGISTERS"]
