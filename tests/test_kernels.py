"""The fused Triton update against the torch reference ``apply_row_torch``.

Without a GPU this runs under Triton's interpreter on CPU tensors. TRITON_INTERPRET=1 is set in conftest.py:
setting it at the top of this module is too late, because by then other modules (diffusers, torch._dynamo,
fastsampler itself) have imported triton, and a kernel launched through the interpreter after that fails with
"Cannot call @triton.jit'd outside of the scope of a kernel" (triton 3.9). On a GPU the same tests run natively.

Covered: every row of every solver's plan, hand-built rows for each kind of term (plain multistep, reads S,
writes S, noise, prediction already written), odd sizes and empty tensors, fp32/fp16/bf16 and mixed input
dtypes, non-contiguous inputs, NaN in sources a row does not use, argument errors, whole scheduler loops, and
the benchmark script's ``--dry-run``.
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
from fastsampler.kernels.row import SRC_S, SRC_SLOTS, SRC_X, SRC_Z, Row
from parity_util import index_model

triton = pytest.importorskip("triton")
from fastsampler.kernels.triton_update import MAX_SLOTS, apply_row_triton  # noqa: E402

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


def plan_rows(name: str, steps: int = 7):
    cls, opts = PLANS[name]
    s = cls(**opts)
    s.set_timesteps(steps)
    return [s._rows[w][i] for w in range(s.plan.levels) for i in range(steps) if i >= w or w == 0]


def slots_of(row: Row) -> int:
    return (len(row.packed) - 9) // 2  # packed = [d_x, d_o, s_write] + 2 × (3 + K)


def hand_row(write_slot: int, d: tuple[float, float], x: dict[int, float], s: dict[int, float] | None = None,
             k: int = 3) -> Row:
    """A row from {source index: coefficient}; sources are X=0, S=1, Z=2, slot j = 3 + j."""
    xc, sc = np.zeros(3 + k), None if s is None else np.zeros(3 + k)
    for j, c in x.items():
        xc[j] = c
    for j, c in (s or {}).items():
        sc[j] = c
    return Row.from_coefficients(write_slot, *d, xc, sc)


H = SRC_SLOTS  # shorthand: history slot j is source H + j
HAND_ROWS = {
    "plain multistep (3rd order)": hand_row(1, (0.7, -0.4), {SRC_X: 0.8, H + 1: 0.3, H + 0: -0.2, H + 2: 0.05}),
    "first step (only D)": hand_row(0, (0.0, 1.3), {SRC_X: 0.9, H + 0: 0.1}),
    "singlestep: reads S": hand_row(2, (1.1, -0.6), {SRC_S: 0.6, H + 0: 0.25, H + 2: 0.15}),
    "UniPC corrector: writes S": hand_row(0, (0.5, 0.5), {SRC_X: 0.7, H + 0: 0.2, H + 2: 0.1},
                                          {SRC_X: 0.95, SRC_S: 0.02, H + 0: 0.03, H + 1: -0.01}),
    "saves its input (S = X)": hand_row(1, (0.3, 0.9), {SRC_X: 0.5, H + 1: 0.5}, {SRC_X: 1.0}),
    "SDE: noise": hand_row(2, (0.0, 1.0), {SRC_X: 0.6, H + 2: 0.3, H + 1: 0.1, SRC_Z: 0.2}),
    "noise into S as well": hand_row(0, (0.2, 0.8), {SRC_X: 0.6, SRC_Z: 0.4, H + 0: 0.1}, {SRC_Z: 0.5, SRC_S: 0.5}),
    "all-zero row": hand_row(1, (0.0, 0.0), {}, {}),
    "one slot": hand_row(0, (0.5, 1.5), {SRC_X: 0.9, H + 0: 0.1}, k=1),
    "max slots": hand_row(MAX_SLOTS - 1, (0.5, 1.5), {SRC_X: 0.5, **{H + j: 0.1 * (j + 1) for j in range(MAX_SLOTS)}},
                          k=MAX_SLOTS),
}


def make_inputs(shape, dtype, k, seed=0, out_dtype=None, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)

    def mk(dt=torch.float32):
        return torch.randn(shape, generator=g).to(dt).to(DEVICE)

    x, out, saved, noise = mk(dtype), mk(out_dtype or dtype), mk(), mk()
    history = torch.randn((k, *shape), generator=g).to(DEVICE)
    if noncontiguous:  # same values, other strides: transposed x/out, a strided slice for S, broadcast noise
        x, out = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (x, out))
        saved = torch.stack([saved, torch.zeros_like(saved)], -1)[..., 0]
        noise = noise[:1].expand(shape)
        assert not any(t.is_contiguous() for t in (x, out, saved, noise))
    return x, out, saved, noise, history


def compare(row, x, out, saved, noise, history, written=False, coef=None):
    """Both paths on copies of the same inputs: X_next, the whole history and S_new must agree, inputs untouched."""
    inputs = [t.clone() if t is not None else None for t in (x, out, saved, noise)]
    h_ref, h_tri = history.clone(), history.clone()
    xr, sr = apply_row_torch(row, x, out, h_ref, saved, noise, written)
    xt, st = apply_row_triton(row, x, out, h_tri, saved, noise, written, coef=coef)
    assert xt.dtype == x.dtype and xt.shape == x.shape and xt.is_contiguous()
    torch.testing.assert_close(xt.float(), xr.float(), **TOL[x.dtype])
    # D written to its slot (or left alone when already written); every other slot untouched
    torch.testing.assert_close(h_tri, h_ref, equal_nan=True, **F32)
    if row.s_terms is None:
        assert st is saved
    else:
        assert st.dtype == torch.float32 and st.shape == x.shape
        assert st is not x and (x.numel() == 0 or st.data_ptr() != x.data_ptr())  # fresh (torch may alias x)
        torch.testing.assert_close(st, sr.float(), **F32)
    for before, after in zip(inputs, (x, out, saved, noise)):
        if before is not None:
            torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
    return xt, st


@pytest.mark.parametrize("name", list(PLANS))
def test_every_row_of_every_plan(name):
    for i, row in enumerate(plan_rows(name)):
        x, out, saved, noise, history = make_inputs((2, 3, 5), torch.float32, slots_of(row), seed=i)
        compare(row, x, out, saved, noise if row.uses_noise else None, history)


@pytest.mark.parametrize("written", [False, True], ids=["writes-D", "prediction-written"])
@pytest.mark.parametrize("name", list(HAND_ROWS))
def test_hand_built_rows(name, written):
    row = HAND_ROWS[name]
    x, out, saved, noise, history = make_inputs((3, 37), torch.float32, slots_of(row))
    reads_s = any(j == SRC_S for j, _ in row.x_terms + (row.s_terms or ()))
    xt, st = compare(row, x, out, saved if reads_s or row.s_terms is not None else None,
                     noise if row.uses_noise or name == "noise into S as well" else None, history, written)
    if name == "saves its input (S = X)":
        torch.testing.assert_close(st, x, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (3, 5, 17), (1, 4, 33, 31), (0,), (2, 0, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sizes_and_dtypes(shape, dtype):
    row = plan_rows("unipc3")[-1]  # full-history UniPC row: reads S, writes S, three history slots
    x, out, saved, noise, history = make_inputs(shape, dtype, slots_of(row))
    compare(row, x, out, saved, None, history)


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.float16)])
def test_mixed_input_dtypes(x_dtype, out_dtype):
    row = HAND_ROWS["UniPC corrector: writes S"]
    x, out, saved, noise, history = make_inputs((5, 11), x_dtype, slots_of(row), out_dtype=out_dtype)
    compare(row, x, out, saved, None, history)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noncontiguous_inputs(dtype):
    for name in ("SDE: noise", "UniPC corrector: writes S", "noise into S as well"):
        row = HAND_ROWS[name]
        x, out, saved, noise, history = make_inputs((2, 9, 13), dtype, slots_of(row), noncontiguous=True)
        for written in (False, True):
            compare(row, x, out, saved, noise, history, written)


def test_unused_sources_are_not_read():
    """NaN in history slots, S or Z that the row's coefficients don't use must not leak in through 0·NaN
    (the torch path skips zero terms)."""
    row = HAND_ROWS["plain multistep (3rd order)"]  # uses slots 0, 1, 2 of 4; no S, no Z
    x, out, saved, noise, history = make_inputs((4, 25), torch.float32, 4)
    history[3] = float("nan")
    saved.fill_(float("nan"))
    noise.fill_(float("inf"))
    row4 = hand_row(1, (0.7, -0.4), {SRC_X: 0.8, H + 1: 0.3, H + 0: -0.2, H + 2: 0.05}, k=4)
    xt, _ = compare(row4, x, out, saved, noise, history)
    assert torch.isfinite(xt).all()
    # and the slot being written is not read back when the kernel writes it
    history[row.write_slot] = float("nan")
    xt, _ = compare(row, x, out, None, None, history[:3].contiguous())
    assert torch.isfinite(xt).all()


def test_device_resident_coefficient_table():
    """``coef`` as the scheduler passes it: a row view into one uploaded table (non-zero storage offset)."""
    rows = plan_rows("unipc3")
    table = torch.tensor(np.stack([r.packed for r in rows]), dtype=torch.float32, device=DEVICE)
    for i in (1, len(rows) - 1):
        x, out, saved, _, history = make_inputs((3, 50), torch.float16, slots_of(rows[i]), seed=i)
        compare(rows[i], x, out, saved, None, history, coef=table[i])


def test_argument_errors():
    row = HAND_ROWS["singlestep: reads S"]
    x, out, saved, noise, history = make_inputs((4, 8), torch.float32, 3)
    with pytest.raises(ValueError, match="saved"):
        apply_row_triton(row, x, out, history, None, None)
    with pytest.raises(ValueError, match="noise"):
        apply_row_triton(HAND_ROWS["SDE: noise"], x, out, history, saved, None)
    with pytest.raises(ValueError, match="contiguous"):
        apply_row_triton(row, x, out, history.transpose(1, 2).contiguous().transpose(1, 2), saved, None)
    with pytest.raises(ValueError, match="coef"):
        apply_row_triton(row, x, out, history, saved, None, coef=torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="slots"):
        apply_row_triton(row, x, out, history[:2], saved, None)
    with pytest.raises(ValueError, match="out"):
        apply_row_triton(row, x, out[:2], history, saved, None)


def test_float64_falls_back_to_torch():
    row = HAND_ROWS["UniPC corrector: writes S"]
    x, out, saved, _, history = (t.double() for t in make_inputs((9,), torch.float32, 3))
    h_ref, h_tri = history.clone(), history.clone()
    xr, sr = apply_row_torch(row, x, out, h_ref, saved, None)
    xt, st = apply_row_triton(row, x, out, h_tri, saved, None)
    assert xt.dtype == torch.float64
    torch.testing.assert_close((xt, st, h_tri), (xr, sr, h_ref), rtol=0, atol=0)


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


def test_kernel_benchmark_dry_run(tmp_path):
    """``benchmarks/kernels.py --dry-run`` runs every code path once at tiny size (interpreter on CPU); the
    script sets TRITON_INTERPRET itself, so it is removed from the child's environment here."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernels.py"), "--dry-run",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dry run ok" in done.stdout
    assert list(tmp_path.glob("kernels_*.json")) and list(tmp_path.glob("kernels_*.md"))
