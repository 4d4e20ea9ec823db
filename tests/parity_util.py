"""Drive two schedulers with the same model and noise and compare (shared by the parity tests)."""

from __future__ import annotations

import inspect

import torch


def index_model(x: torch.Tensor, i: int) -> torch.Tensor:
    """A smooth, nonlinear stand-in model that depends on the call index, not the timestep value, so parity
    tests compare solver arithmetic even where schedulers round timesteps differently."""
    g = torch.Generator().manual_seed(1000 + i)
    w = torch.randn(x.shape[1:], generator=g, dtype=torch.float64).to(x.dtype)
    return 0.6 * torch.tanh(x) + 0.3 * w + 0.05 * i / (i + 3.0) * x


def run_loop(scheduler, steps: int, x: torch.Tensor, *, seed: int = 0, model=index_model,
             set_kwargs: dict | None = None) -> torch.Tensor:
    scheduler.set_timesteps(steps, **(set_kwargs or {})) if steps is not None else scheduler.set_timesteps(**set_kwargs)
    gen = torch.Generator().manual_seed(seed)
    x = x * scheduler.init_noise_sigma
    kw = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(scheduler.timesteps):
        out = model(scheduler.scale_model_input(x, t), i)
        x = scheduler.step(out, t, x, **kw).prev_sample
    return x
