"""One graph: ``step()`` under ``torch.compile(fullgraph=True)``, coefficient tables uploaded in set_timesteps,
and (on a GPU) a whole sampling loop captured in a CUDA graph.

The compile tests use dynamo's ``eager`` / ``aot_eager`` backends: they check tracing (no graph break, one graph
for the steady state) without paying for code generation; inductor itself is exercised on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from fastsampler import DEISScheduler, DPMSolverPlusPlusScheduler, NonFiniteModelOutputError, UniPCScheduler
from parity_util import index_model

SCHEDULERS = [
    (DPMSolverPlusPlusScheduler, {}),
    (DPMSolverPlusPlusScheduler, dict(solver_order=3)),
    (DPMSolverPlusPlusScheduler, dict(solver_method="singlestep", solver_order=3)),
    (UniPCScheduler, {}),
    (UniPCScheduler, dict(solver_order=3, solver_type="bh1")),
    (DEISScheduler, {}),
    (DPMSolverPlusPlusScheduler, dict(thresholding=True, sample_max_value=1.5)),
]
IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for c, o in SCHEDULERS]


def model(x: torch.Tensor, i: int) -> torch.Tensor:
    return 0.5 * torch.tanh(x) + 0.05 * i * x


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("cls,opts", SCHEDULERS, ids=IDS)
def test_steady_state_step_is_one_graph(cls, opts):
    """After the run's first step (which allocates the buffers), every step traces with fullgraph=True into one
    graph: a second frame at most for the step where the step counter becomes symbolic, plus one per warm-up
    level."""
    eager, compiled = cls(**opts), cls(**opts)
    eager.set_timesteps(10)
    compiled.set_timesteps(10)
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(compiled.step, fullgraph=True, backend=counter)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    for i, t in enumerate(eager.timesteps):
        x = eager.step(model(x, i), t, x).prev_sample
        y = (compiled.step if i == 0 else step)(model(y, i), compiled.timesteps[i], y).prev_sample
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    assert counter.frame_count <= compiled.plan.levels + 1, counter.frame_count
    # a second run reuses the graphs
    frames = counter.frame_count
    compiled.set_timesteps(10)
    y = torch.randn(2, 3, 8, 8)
    for i, t in enumerate(compiled.timesteps):
        y = (compiled.step if i == 0 else step)(model(y, i), t, y).prev_sample
    assert counter.frame_count == frames


@pytest.mark.slow
def test_whole_loop_compiles_with_aot_autograd():
    """The traced update through AOTAutograd (the functionalisation inductor uses), float64 against eager."""
    eager, compiled = UniPCScheduler(solver_order=3), UniPCScheduler(solver_order=3)
    for s in (eager, compiled):
        s.set_timesteps(8)
    step = torch.compile(compiled.step, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    for i, t in enumerate(eager.timesteps):
        x = eager.step(model(x, i), t, x).prev_sample
        y = (compiled.step if i == 0 else step)(model(y, i), t, y).prev_sample
    torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)


def test_nonfinite_output_is_reported_after_a_compiled_run():
    """Inside a compiled step nothing is read on the host; the flag is read by the next set_timesteps() (or
    raise_if_nonfinite())."""
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(6)
    step = torch.compile(s.step, fullgraph=True, backend="eager")
    x = torch.randn(2, 8)
    for i, t in enumerate(s.timesteps):
        out = model(x, i)
        if i == 3:
            out[0, 0] = float("nan")
        x = (s.step if i == 0 else step)(out, t, x).prev_sample
    with pytest.raises(NonFiniteModelOutputError, match="step 3 "):
        s.raise_if_nonfinite()
    s.set_timesteps(6)  # the flag was consumed: the next run starts clean


def test_coefficient_table_is_uploaded_in_set_timesteps(monkeypatch):
    """With a device, set_timesteps uploads the fused kernel's table; step() then makes no host→device copy
    (checked by forbidding tensor creation from host data during the steps)."""
    monkeypatch.setenv("FASTSAMPLER_KERNEL", "triton")
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = UniPCScheduler(solver_order=3)
    s.set_timesteps(6, device=device)
    assert any(key[0] == "packed" for key in s._device_tables), "no table uploaded in set_timesteps"
    x = torch.randn(2, 3, 4, 4, device=device)
    outs = [index_model(x, i) for i in range(6)]
    real_tensor, real_as_tensor = torch.tensor, torch.as_tensor

    def forbid(*args, **kwargs):
        raise AssertionError("step() created a tensor from host data")

    monkeypatch.setattr(torch, "tensor", forbid)
    monkeypatch.setattr(torch, "as_tensor", forbid)
    try:
        for i, t in enumerate(s.timesteps):
            x = s.step(outs[i], t, x).prev_sample
    finally:
        monkeypatch.setattr(torch, "tensor", real_tensor)
        monkeypatch.setattr(torch, "as_tensor", real_as_tensor)
    assert s._kernel.name == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_whole_sampling_loop_captures_in_a_cuda_graph():
    """Warm up one run, then capture a second run's loop (a fixed model) in a CUDA graph and replay it."""
    s = UniPCScheduler(solver_order=2)
    x0 = torch.randn(2, 4, 32, 32, device="cuda")

    def run(x):
        for i, t in enumerate(s.timesteps):
            x = s.step(0.1 * x + 0.01 * i, t, x).prev_sample
        return x

    s.set_timesteps(8, device="cuda")
    expected = run(x0.clone())
    s.set_timesteps(8, device="cuda")
    s.set_begin_index(0)
    static_x = x0.clone()
    s.step(0.1 * static_x, s.timesteps[0], static_x)  # first step allocates the buffers (outside capture)
    s.set_timesteps(8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = run(static_x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, expected, rtol=1e-5, atol=1e-5)
