"""The fused Triton update against the torch reference, under TRITON_INTERPRET=1 on CPU (see conftest.py),
or natively on a GPU: rows of every solver's plan, odd sizes, fp32/fp16/bf16, non-contiguous inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastsampler import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.kernels.reference import apply_row_torch
from parity_util import index_model

triton = pytest.importorskip("triton")
from fastsampler.kernels.triton_update import apply_row_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

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
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       # The interpreter truncates fp32 → bf16 stores where torch rounds: allow one bf16 ulp.
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def plan_rows(name: str, steps: int = 7):
    cls, opts = PLANS[name]
    s = cls(**opts)
    s.set_timesteps(steps)
    return s, [(w, i, s._rows[w][i]) for w in range(s.plan.levels) for i in range(steps) if i >= w or w == 0]


def slots_of(row) -> int:
    return (len(row.packed) - 9) // 2  # packed = [d_x, d_o, s_write] + 2 × (3 + K)


def inputs(shape, dtype, k, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(shape, generator=g).to(DEVICE)  # noqa: E731
    x, out, saved, noise = mk().to(dtype), mk().to(dtype), mk(), mk()
    history = torch.randn((k, *shape), generator=g).to(DEVICE)
    if noncontiguous and len(shape) >= 2:
        x, out = x.transpose(-1, -2).contiguous().transpose(-1, -2), out.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not x.is_contiguous()
    return x, out, saved, noise, history


def compare(row, x, out, saved, noise, history, written=False):
    h_ref, h_tri = history.clone(), history.clone()
    xr, sr = apply_row_torch(row, x, out, h_ref, saved, noise, written)
    xt, st = apply_row_triton(row, x, out, h_tri, saved, noise, written)
    tol = TOL[x.dtype]
    assert xt.dtype == x.dtype and xt.shape == x.shape
    torch.testing.assert_close(xt.float(), xr.float(), **tol)
    torch.testing.assert_close(h_tri, h_ref, rtol=2e-5, atol=2e-5)
    if row.s_terms is not None:
        torch.testing.assert_close(st.float(), sr.float(), rtol=2e-5, atol=2e-5)
    else:
        assert st is saved


@pytest.mark.parametrize("name", list(PLANS))
def test_every_row_of_every_plan(name):
    _, rows = plan_rows(name)
    for w, i, row in rows:
        x, out, saved, noise, history = inputs((2, 3, 5), torch.float32, slots_of(row), seed=i)
        compare(row, x, out, saved, noise if row.uses_noise else None, history)


@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (3, 5, 17), (1, 4, 33, 31)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sizes_and_dtypes(shape, dtype):
    _, rows = plan_rows("unipc3")
    row = rows[-1][2]  # a full-history row that reads S, writes S and three history slots
    x, out, saved, noise, history = inputs(shape, dtype, slots_of(row))
    compare(row, x, out, saved, None, history)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noncontiguous_inputs_and_prewritten_prediction(dtype):
    for name in ("dpm++3S", "sde-dpm++2M"):
        _, rows = plan_rows(name)
        row = rows[-2][2]
        x, out, saved, noise, history = inputs((2, 9, 13), dtype, slots_of(row), noncontiguous=True)
        compare(row, x, out, saved, noise if row.uses_noise else None, history)
        compare(row, x, out, saved, noise if row.uses_noise else None, history, written=True)


@pytest.mark.parametrize("name", ["dpm++2M", "unipc3", "dpm++3S", "sde-dpm++2M"])
def test_scheduler_loop_with_triton_matches_torch(name):
    """A whole sampling loop with kernel='triton' (device-resident coefficient table) equals kernel='torch'."""
    cls, opts = PLANS[name]
    outs = []
    for kernel in ("torch", "triton"):
        s = cls(**opts, kernel=kernel)
        s.set_timesteps(6)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        for i, t in enumerate(s.timesteps):
            x = s.step(index_model(x, i), t, x, generator=gen).prev_sample
        outs.append(x)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_kernel_benchmark_dry_run():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernels.py"), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dry run ok" in done.stdout
