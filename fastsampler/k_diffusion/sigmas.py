"""Noise-level sequences as k-diffusion takes them: ``get_sigmas_*(n, …)`` → a decreasing float tensor of n + 1
levels ending in 0 (float64 inside, ``dtype`` float32 by default, as ComfyUI's SIGMAS and MPS want).

* ``get_sigmas_karras`` (Karras et al. 2022, eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ),
  ``get_sigmas_exponential`` (uniform in log σ), ``get_sigmas_polyexponential`` (log σ = u^ρ(log σ_max − log
  σ_min) + log σ_min, u = 1 → 0), ``get_sigmas_beta`` (Beta(0.6, 0.6) quantiles, Lee et al. 2024),
  ``get_sigmas_kl_optimal`` (AYS paper: σ_i = tan((1 − i/(n−1)) atan σ_max + i/(n−1) atan σ_min)).
* ``get_sigmas_ays``: Align Your Steps (``fastsampler.schedules.ays``).
* ``get_sigmas_scheduler`` / ``get_sigmas_pretrained``: the levels one of our schedulers visits at n steps —
  every grid it has (trailing, time-quadratic, uniform-λ, flow shift, …) and a plan tuned by
  ``fastsampler.tune`` — for ComfyUI's ``SamplerCustom`` or any k-diffusion sampler.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fastsampler.schedules.ays import ays_sigmas
from fastsampler.schedules.grids import beta_sigmas, karras_sigmas


def _check_steps(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"`n` (steps) must be a positive integer, got {n!r}")
    return int(n)


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"need 0 < `sigma_min` < `sigma_max` < inf, got sigma_min={sigma_min!r}, "
                         f"sigma_max={sigma_max!r}")


def _with_zero(levels: np.ndarray, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(np.append(levels, 0.0), dtype=dtype, device=device)


def _spaced(n: int, sigma_min: float, sigma_max: float, device, dtype, spacing) -> torch.Tensor:
    """n levels from σ_max down to σ_min by ``spacing(n)`` (a single step: σ_max alone), then 0."""
    n = _check_steps(n)
    _check_range(sigma_min, sigma_max)
    levels = np.array([sigma_max]) if n == 1 else spacing(n)
    return _with_zero(levels, device, dtype)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Karras et al. (2022) levels with exponent ``rho``."""
    if not rho > 0:
        raise ValueError(f"`rho` must be positive, got {rho!r}")
    return _spaced(n, sigma_min, sigma_max, device, dtype, lambda m: karras_sigmas(sigma_min, sigma_max, m, rho))


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device="cpu",
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Levels uniform in log σ."""
    return _spaced(n, sigma_min, sigma_max, device, dtype,
                   lambda m: np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), m)))


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device="cpu",
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log σ = u^ρ (log σ_max − log σ_min) + log σ_min with u from 1 to 0 (ρ = 1: exponential)."""
    if not rho > 0:
        raise ValueError(f"`rho` must be positive, got {rho!r}")
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return _spaced(n, sigma_min, sigma_max, device, dtype,
                   lambda m: np.exp(np.linspace(1.0, 0.0, m) ** rho * (hi - lo) + lo))


def get_sigmas_beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6,
                    device="cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Beta(α, β) quantiles mapped linearly onto [σ_min, σ_max] (diffusers' ``use_beta_sigmas``)."""
    return _spaced(n, sigma_min, sigma_max, device, dtype,
                   lambda m: beta_sigmas(sigma_min, sigma_max, m, alpha, beta))


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float, device="cpu",
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Levels uniform in atan σ (the AYS paper's KL-optimal schedule for a point-mass data distribution)."""
    def spacing(m: int) -> np.ndarray:
        levels = np.tan(np.linspace(math.atan(sigma_max), math.atan(sigma_min), m))
        levels[0], levels[-1] = sigma_max, sigma_min  # tan(atan σ) loses digits for large σ
        return levels

    return _spaced(n, sigma_min, sigma_max, device, dtype, spacing)


def get_sigmas_ays(n: int, model: str = "sd1", device="cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Align Your Steps for ``model`` ("sd1", "sdxl", "svd"), log-linearly interpolated to ``n`` steps."""
    return torch.tensor(ays_sigmas(_check_steps(n), model), dtype=dtype, device=device)


def get_sigmas_scheduler(scheduler, n: int, device="cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The n + 1 levels (VP: σ/α; flow: the shifted s) that ``scheduler`` — one of ours, tuned or not — visits
    at ``n`` steps."""
    scheduler.set_timesteps(_check_steps(n))
    return torch.tensor(np.asarray(scheduler.plan.rho, dtype=np.float64), dtype=dtype, device=device)


def load_scheduler(path: str | Path, subfolder: str | None = None):
    """The scheduler saved in ``path`` (its own class, tuned plans included)."""
    import json

    from fastsampler import lazy

    folder = Path(path) / (subfolder or "")
    config = folder / "scheduler_config.json"
    if not config.is_file():
        raise ValueError(f"`path` {str(path)!r}{f' / {subfolder!r}' if subfolder else ''} holds no "
                         "scheduler_config.json (for a pipeline folder pass subfolder='scheduler')")
    name = json.loads(config.read_text()).get("_class_name")
    if name not in lazy.LAZY_ATTRIBUTES or not name.endswith("Scheduler"):
        raise ValueError(f"{str(config)!r} names {name!r}, not a fastsampler scheduler")
    from fastsampler.adapters.registry import SCHEDULERS

    return SCHEDULERS[name].from_pretrained(folder)


def get_sigmas_pretrained(path: str | Path, n: int, subfolder: str | None = None, device="cpu",
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``get_sigmas_scheduler`` of the scheduler saved in ``path`` (a tuned plan's own levels)."""
    return get_sigmas_scheduler(load_scheduler(path, subfolder), n, device, dtype)
