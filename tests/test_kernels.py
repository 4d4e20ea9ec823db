"""The fused Triton update against the torch reference ``apply_row_torch``.

Without a GPU this runs under Triton's interpreter on CPU tensors. TRITON_INTERPRET=1 is set in conftest.py:
setting it at the top of this module is too late, because by then other modules (diffusers, torch._dynamo,
fastsampler itself) have imported triton, and a kernel launched through the interpreter after that fails with
"Cannot call @triton.jit'd outside of the scope of a kernel" (triton 3.9). On a GPU the same tests run natively.

Covered: every row of every solver's plan, hand-built rows for each kind of term (plain multistep, reads or
writes registers, two registers that read each other, a store that mixes history or a register, noise, P already
written), odd sizes and empty tensors, fp32/fp16/bf16 and mixed input dtypes, non-contiguous inputs, NaN in
sources a row does not use, argument errors, whole scheduler loops, and the benchmark script's ``--dry-run``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastsampler import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.kernels.reference import apply_row_torch
from fastsampler.plans.format import (OUT_NEXT, OUT_REGISTERS, OUT_STORE, SRC_P, SRC_X, SRC_Z, Plan, RowView,
                                      num_sources, src_register, src_slot)
from parity_util import index_model

triton = pytest.importorskip("triton")
from fastsampler.kernels.triton_update import MAX_REGISTERS, MAX_SLOTS, apply_row_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set (see conftest.py)", allow_module_level=True)

PLANS = {
    "dpm++2M": (DPMSolverPlusPlusScheduler, {}),
    "dpm++3M": (DPMSolverPlusPlusScheduler, dict(solver_order=3)),
    "dpm++3S": (DPMSolverPlusPlusScheduler, dict(solver_order=3, solver_method="singlestep")),
    "sde-dpm++2M": (DPMSolverPlusPlusScheduler, dict(algorithm_type="sde-dpmsolver++")),
    "dpm2-noise-v": (DPMSolverPlusPlusScheduler, dict(algorithm_type="dpmsolver", prediction_type="v_prediction")),
    "unipc3": (UniPCScheduler, dict(solver_order=3)),
    "unipc2-bh1": (UniPCScheduler, dict(solver_type="bh1")),
    "deis3": (DEISScheduler, dict(solver_order=3)),
    "deis3-flow": (DEISScheduler, dict(solver_order=3, use_flow_sigmas=True, prediction_type="flow_prediction")),
}
# fp32/fp16: same arithmetic up to fused multiply-adds. bf16: the interpreter truncates fp32 → bf16 stores where
# torch rounds to nearest, so allow one bf16 ulp (2⁻⁷ relative; rtol slightly above it).
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=1e-5)}
F32 = dict(rtol=2e-5, atol=2e-5)


def plan_rows(name: str, steps: int = 7) -> list[RowView]:
    cls, opts = PLANS[name]
    s = cls(**opts)
    s.set_timesteps(steps)
    return [s.plan.rows[w][i] for w in range(s.plan.levels) for i in range(steps) if i >= w or w == 0]


def hand_row(write_slot: int, out_map: tuple[float, float], nxt: dict[int, float], k: int = 3, r: int = 0,
             store: dict[int, float] | None = None, registers: dict[int, dict[int, float]] | None = None) -> RowView:
    """Step ``write_slot`` of a hand-made plan (steps before it are zero rows), from {source index: coefficient}
    per output (source indices from ``src``)."""
    n, i = write_slot + 1, write_slot
    coef = np.zeros((1, n, OUT_REGISTERS + r, num_sources(r, k)))
    coef[0, :, OUT_STORE, SRC_P] = 1.0
    if store is not None:
        coef[0, i, OUT_STORE, SRC_P] = 0.0
        for j, c in store.items():
            coef[0, i, OUT_STORE, j] = c
    for j, c in nxt.items():
        coef[0, i, OUT_NEXT, j] = c
    writes = np.zeros((1, n, r), dtype=bool)
    for q, terms in (registers or {}).items():
        writes[0, i, q] = True
        for j, c in terms.items():
            coef[0, i, OUT_REGISTERS + q, j] = c
    out_maps = np.zeros((n, 2))
    out_maps[i] = out_map
    plan = Plan(out_map=out_maps, coef=coef, writes=writes, write_slot=np.arange(n) % k,
                timesteps=np.linspace(999.0, 0.0, n), rho=np.append(np.linspace(2.0, 1.0, n), 0.0), flow=False,
                data_form=True, registers=tuple(f"r{q}" for q in range(r)), meta={"prediction_type": "epsilon"})
    return plan.rows[0][i]


def src(name: str, r: int = 0) -> int:
    """Source index by name: 'X', 'P', 'Z', 'R0'…, 'H0'… (H after the r registers)."""
    fixed = {"X": SRC_X, "P": SRC_P, "Z": SRC_Z}
    if name in fixed:
        return fixed[name]
    return src_register(int(name[1:])) if name[0] == "R" else src_slot(r, int(name[1:]))


def row_(write_slot, out_map, nxt, k=3, r=0, store=None, registers=None):
    """``hand_row`` with sources by name."""
    conv = lambda d: {src(n, r): c for n, c in d.items()}  # noqa: E731
    return hand_row(write_slot, out_map, conv(nxt), k, r, None if store is None else conv(store),
                    None if registers is None else {q: conv(t) for q, t in registers.items()})


HAND_ROWS = {
    "plain multistep (3rd order)": row_(1, (0.7, -0.4), {"X": 0.8, "H1": 0.3, "H0": -0.2, "H2": 0.05}),
    "first step (only P)": row_(0, (0.0, 1.3), {"X": 0.9, "H0": 0.1}),
    "singlestep: reads a register": row_(2, (1.1, -0.6), {"R0": 0.6, "H0": 0.25, "H2": 0.15}, r=1),
    "UniPC: reads and writes a register, raw P": row_(0, (0.5, 0.5), {"X": 0.7, "R0": 0.1, "H0": 0.2, "H2": 0.1},
                                                      r=1, registers={0: {"P": 0.03, "R0": 0.95, "H1": -0.01}}),
    "saves its input (R = X)": row_(1, (0.3, 0.9), {"X": 0.5, "H1": 0.5}, r=1, registers={0: {"X": 1.0}}),
    "SDE: noise": row_(2, (0.0, 1.0), {"X": 0.6, "H2": 0.3, "H1": 0.1, "Z": 0.2}),
    "noise into a register as well": row_(0, (0.2, 0.8), {"X": 0.6, "Z": 0.4, "H0": 0.1}, r=1,
                                          registers={0: {"Z": 0.5, "R0": 0.5}}),
    "all-zero row": row_(1, (0.0, 0.0), {}, r=1, registers={0: {}}),
    "one slot": row_(0, (0.5, 1.5), {"X": 0.9, "H0": 0.1}, k=1),
    "max slots": row_(MAX_SLOTS - 1, (0.5, 1.5), {"X": 0.5, **{f"H{j}": 0.1 * (j + 1) for j in range(MAX_SLOTS)}},
                      k=MAX_SLOTS),
    "store mixes history (DC)": row_(2, (0.4, 0.6), {"X": 0.8, "H2": 0.15, "H1": 0.05, "P": 0.02}, k=3,
                                     store={"P": 0.7, "H1": 0.4, "H0": -0.1}),
    "store mixes a register (momentum)": row_(1, (0.0, 1.0), {"X": 0.9, "H1": 0.1, "H0": 0.02}, k=2, r=1,
                                              store={"P": 0.3, "R0": 0.7}, registers={0: {"P": 0.3, "R0": 0.7}}),
    "two registers, cross-dependent": row_(0, (0.3, 0.7), {"X": 0.5, "R0": 0.2, "R1": 0.1, "H0": 0.2}, k=2, r=2,
                                           registers={0: {"R1": 0.9, "P": 0.1}, 1: {"R0": 0.6, "X": 0.4}}),
    "writes one of two registers": row_(1, (0.3, 0.7), {"X": 0.5, "R1": 0.3, "H1": 0.2}, k=2, r=2,
                                        registers={1: {"R0": 0.5, "H0": 0.5}}),
    "max registers": row_(0, (0.3, 0.7), {"X": 0.5, **{f"R{q}": 0.1 for q in range(MAX_REGISTERS)}}, k=1,
                          r=MAX_REGISTERS, registers={q: {"X": 0.1 * q, "P": 0.2} for q in range(MAX_REGISTERS)}),
}


def make_inputs(shape, dtype, row: RowView, seed=0, out_dtype=None, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)

    def mk(dt=torch.float32):
        return torch.randn(shape, generator=g).to(dt).to(DEVICE)

    x, out, noise = mk(dtype), mk(out_dtype or dtype), mk()
    regs = torch.randn((row.registers, *shape), generator=g).to(DEVICE)
    history = torch.randn((row.slots, *shape), generator=g).to(DEVICE)
    if noncontiguous:  # same values, other strides: transposed x/out, broadcast noise
        x, out = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (x, out))
        noise = noise[:1].expand(shape)
        assert not any(t.is_contiguous() for t in (x, out, noise))
    return x, out, regs, (noise if row.uses_noise else None), history


def compare(row: RowView, x, out, regs, noise, history, written=False, coef=None):
    """Both paths on copies of the same inputs: X_next, the whole history and every register must agree; inputs
    untouched."""
    inputs = [t.clone() if t is not None else None for t in (x, out, noise)]
    h_ref, h_tri = history.clone(), history.clone()
    state_ref = tuple(regs[q].clone() for q in range(row.registers))
    state_tri = regs.clone() if row.registers else None
    xr, sr = apply_row_torch(row, x, out, h_ref, state_ref, noise, written)
    xt, st = apply_row_triton(row, x, out, h_tri, state_tri, noise, written, coef=coef)
    assert xt.dtype == x.dtype and xt.shape == x.shape and xt.is_contiguous()
    torch.testing.assert_close(xt.float(), xr.float(), **TOL[x.dtype])
    # the stored prediction in its slot (or left alone when already written); every other slot untouched
    torch.testing.assert_close(h_tri, h_ref, equal_nan=True, **F32)
    for q in range(row.registers):
        assert st is state_tri  # updated in place
        if row.register_terms[q] is None:
            assert sr[q] is state_ref[q]
        else:
            assert sr[q] is not x and (x.numel() == 0 or sr[q].data_ptr() != x.data_ptr())
        torch.testing.assert_close(st[q], sr[q].float(), equal_nan=True, **F32)
    for before, after in zip(inputs, (x, out, noise)):
        if before is not None:
            torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
    return xt, st


@pytest.mark.parametrize("name", list(PLANS))
def test_every_row_of_every_plan(name):
    for i, row in enumerate(plan_rows(name)):
        compare(row, *make_inputs((2, 3, 5), torch.float32, row, seed=i))


@pytest.mark.parametrize("written", [False, True], ids=["computes-P", "P-written"])
@pytest.mark.parametrize("name", list(HAND_ROWS))
def test_hand_built_rows(name, written):
    row = HAND_ROWS[name]
    xt, st = compare(row, *make_inputs((3, 37), torch.float32, row), written=written)
    if name == "saves its input (R = X)":
        x = make_inputs((3, 37), torch.float32, row)[0]
        torch.testing.assert_close(st[0], x, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (3, 5, 17), (1, 4, 33, 31), (0,), (2, 0, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sizes_and_dtypes(shape, dtype):
    row = plan_rows("unipc3")[-1]  # full-history UniPC row: reads and writes its register, four history slots
    compare(row, *make_inputs(shape, dtype, row))


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.float16)])
def test_mixed_input_dtypes(x_dtype, out_dtype):
    row = HAND_ROWS["UniPC: reads and writes a register, raw P"]
    compare(row, *make_inputs((5, 11), x_dtype, row, out_dtype=out_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noncontiguous_inputs(dtype):
    for name in ("SDE: noise", "UniPC: reads and writes a register, raw P", "noise into a register as well",
                 "store mixes history (DC)"):
        row = HAND_ROWS[name]
        inputs = make_inputs((2, 9, 13), dtype, row, noncontiguous=True)
        for written in (False, True):
            compare(row, *inputs, written=written)


def test_unused_sources_are_not_read():
    """NaN in history slots, registers or Z that the row's coefficients don't use must not leak in through 0·NaN
    (the torch path skips zero terms)."""
    row = row_(1, (0.7, -0.4), {"X": 0.8, "H1": 0.3, "H0": -0.2, "H2": 0.05}, k=4, r=2,
               registers={1: {"X": 1.0}})
    x, out, regs, _, history = make_inputs((4, 25), torch.float32, row)
    history[3] = float("nan")
    regs[0] = float("nan")
    noise = torch.full_like(x, float("inf"))
    xt, st = compare(row, x, out, regs, noise, history)
    assert torch.isfinite(xt).all() and torch.isfinite(st[1]).all()
    # and the slot being written is not read back when the kernel writes it
    plain = HAND_ROWS["plain multistep (3rd order)"]
    x, out, regs, _, history = make_inputs((4, 25), torch.float32, plain)
    history[plain.write_slot] = float("nan")
    xt, _ = compare(plain, x, out, regs, None, history)
    assert torch.isfinite(xt).all()


def test_device_resident_coefficient_table():
    """``coef`` as the scheduler passes it: a row view into one uploaded table (non-zero storage offset)."""
    s = UniPCScheduler(solver_order=3)
    s.set_timesteps(7)
    table = torch.tensor(s.plan.packed, dtype=torch.float32, device=DEVICE)
    for w, i in ((0, 0), (1, 1), (s.plan.levels - 1, 6)):
        row = s.plan.rows[w][i]
        compare(row, *make_inputs((3, 50), torch.float16, row, seed=i), coef=table[w, i])


def test_argument_errors():
    row = HAND_ROWS["singlestep: reads a register"]
    x, out, regs, _, history = make_inputs((4, 8), torch.float32, row)
    with pytest.raises(ValueError, match="state"):
        apply_row_triton(row, x, out, history, None, None)
    with pytest.raises(ValueError, match="noise"):
        apply_row_triton(HAND_ROWS["SDE: noise"], x, out, history, None, None)
    with pytest.raises(ValueError, match="contiguous"):
        apply_row_triton(row, x, out, history.transpose(1, 2).contiguous().transpose(1, 2), regs, None)
    with pytest.raises(ValueError, match="coef"):
        apply_row_triton(row, x, out, history, regs, None, coef=torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="history"):
        apply_row_triton(row, x, out, history[:2], regs, None)
    with pytest.raises(ValueError, match="out"):
        apply_row_triton(row, x, out[:2], history, regs, None)
    with pytest.raises(ValueError, match="float64"):
        apply_row_triton(row, x.double(), out.double(), history, regs, None)


def test_float64_and_large_tables_take_the_torch_path():
    from fastsampler.kernels.dispatch import resolve_kernel

    dev = torch.device(DEVICE)
    assert resolve_kernel("triton", dev, torch.float32, 3, 1) == "triton"
    assert resolve_kernel("triton", dev, torch.float64, 3, 1) == "torch"
    assert resolve_kernel("triton", dev, torch.float32, MAX_SLOTS + 1, 0) == "torch"
    assert resolve_kernel("triton", dev, torch.float32, 3, MAX_REGISTERS + 1) == "torch"
    s = UniPCScheduler(kernel="triton")
    s.set_timesteps(5)
    x = torch.randn(2, 3, dtype=torch.float64, device=DEVICE)
    for i, t in enumerate(s.timesteps):
        x = s.step(index_model(x, i), t, x).prev_sample
    assert x.dtype == torch.float64 and s._kernel.name == "torch"


@pytest.mark.parametrize("name,opts", [
    ("dpm++2M", {}), ("unipc3", {}), ("dpm++3S", {}), ("sde-dpm++2M", {}), ("deis3", {}),
    ("dpm++2M", dict(thresholding=True)),  # prediction_written=True inside the scheduler
])
def test_scheduler_loop_with_triton_matches_torch(name, opts):
    """A whole sampling loop with kernel='triton' (device-resident coefficient table) equals kernel='torch'."""
    cls, base = PLANS[name]
    results = []
    for kernel in ("torch", "triton"):
        s = cls(**base, **opts, kernel=kernel)
        s.set_timesteps(6)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        for i, t in enumerate(s.timesteps):
            x = s.step(index_model(x, i), t, x, generator=gen).prev_sample
        results.append(x)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_kernel_benchmark_dry_run(tmp_path):
    """``benchmarks/kernel_bandwidth.py --dry-run`` runs every code path once at tiny size (interpreter on CPU); the
    script sets TRITON_INTERPRET itself, so it is removed from the child's environment here."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_bandwidth.py"), "--dry-run",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dry run ok" in done.stdout
    assert list(tmp_path.glob("kernel_bandwidth_*.json")) and list(tmp_path.glob("kernel_bandwidth_*.md"))
