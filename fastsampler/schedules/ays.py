"""Align Your Steps (Sabour, Fidler & Kreis, ICML 2024, arXiv 2404.14507): the published 10-step noise levels
and their log-linear interpolation to any step count.

Tables (σ = VE sigma, ρ = σ/α for VP models), 11 levels σ(t_10) … σ(t_0) each:

* ``sd1`` / ``sdxl``: Stable Diffusion's scaled-linear table (β 0.00085 → 0.012, T = 1000) at the published
  timesteps — diffusers' ``AysSchedules["StableDiffusionTimesteps"]`` / ``["StableDiffusionXLTimesteps"]`` — and
  t = 0. The paper prints these to three decimals (Table 3: 3.861 where the table gives 3.8637; within 0.1 %).
* ``svd``: diffusers' ``AysSchedules["StableDiffusionVideoSigmas"]`` with the paper's last level 0.002 in place of
  the 0 that diffusers appends (SVD is an EDM model: no timestep table).

Interpolation to n steps (the AYS authors' recipe, as ComfyUI and A1111 apply it): the levels are placed at a
uniform index grid on [0, 1] and log σ is interpolated linearly at n + 1 uniform points; the last level becomes 0.
At n = 10 this is the published schedule itself (ending …, σ(t_1), 0).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

AYS_MODELS = ("sd1", "sdxl", "svd")
_SD_TIMESTEPS = {"sd1": "StableDiffusionTimesteps", "sdxl": "StableDiffusionXLTimesteps"}
SVD_SIGMA_MIN = 0.002  # the paper's σ(t_0) for Stable Video Diffusion (diffusers' list ends in 0 instead)


def loglinear_interp(levels: np.ndarray, num: int) -> np.ndarray:
    """``num`` decreasing levels, log-linear in a uniform index grid through ``levels`` (decreasing, positive)."""
    levels = np.asarray(levels, dtype=np.float64)
    if levels.ndim != 1 or len(levels) < 2 or np.any(levels <= 0) or np.any(np.diff(levels) >= 0):
        raise ValueError("`levels` must be a strictly decreasing 1-D sequence of at least two positive values")
    if num < 2:
        raise ValueError(f"`num` must be at least 2, got {num}")
    rising = np.log(levels[::-1])
    return np.exp(np.interp(np.linspace(0.0, 1.0, num), np.linspace(0.0, 1.0, len(levels)), rising))[::-1].copy()


@lru_cache(maxsize=None)
def ays_table(model: str) -> tuple[float, ...]:
    """The 11 published AYS levels of ``model`` ("sd1", "sdxl" or "svd"), highest first, all positive."""
    from diffusers.schedulers.scheduling_utils import AysSchedules

    if model not in AYS_MODELS:
        raise ValueError(f"AYS `model` must be one of {AYS_MODELS}, got {model!r}")
    if model == "svd":
        levels = list(AysSchedules["StableDiffusionVideoSigmas"][:-1]) + [SVD_SIGMA_MIN]
        return tuple(float(v) for v in levels)
    from fastsampler.schedules.noise import DiscreteVP

    sd = DiscreteVP.from_config(1000, 0.00085, 0.012, "scaled_linear")
    timesteps = np.array(list(AysSchedules[_SD_TIMESTEPS[model]]) + [0], dtype=np.float64)
    return tuple(float(v) for v in sd.rho_at(timesteps))


def ays_sigmas(num_steps: int, model: str = "sd1") -> np.ndarray:
    """``num_steps`` + 1 AYS levels for ``model``, the last 0 (log-linear interpolation unless ``num_steps`` = 10)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive integer, got {num_steps!r}")
    table = np.array(ays_table(model))
    levels = table.copy() if num_steps + 1 == len(table) else loglinear_interp(table, num_steps + 1)
    levels[-1] = 0.0
    return levels
