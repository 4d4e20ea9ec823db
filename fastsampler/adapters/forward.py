"""The forward process at model timesteps: ``add_noise``, ``scale_noise`` (flow img2img) and ``get_velocity``, with
or without ``set_timesteps``: x_t = α_t x₀ + σ_t ε with the training ᾱ at integer timesteps of a discrete schedule
(exactly as ``DDPMScheduler``), the continuous schedule elsewhere, s = t / num_train_timesteps for flow models."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fastsampler.schedules.noise import DiscreteVP


class ForwardProcessMixin:
    """``PlanScheduler``'s forward (noising) process."""

    def _timestep_array(self, timesteps: int | float | Sequence[float] | torch.Tensor) -> np.ndarray:
        if isinstance(timesteps, torch.Tensor):
            return np.asarray(timesteps.detach().cpu(), dtype=np.float64).reshape(-1)  # ok-sync: once per run
        return np.asarray(timesteps, dtype=np.float64).reshape(-1)

    def _forward_coefficients(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) as (B, 1, …) tensors in ``like``'s dtype and device, at the model timesteps: the training
        ᾱ at integer timesteps of a discrete schedule (exactly as ``DDPMScheduler``), the schedule elsewhere."""
        t = self._timestep_array(timesteps)
        c = self.config
        if not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(t > c.num_train_timesteps):
            raise ValueError(f"`timesteps` must lie in [0, {c.num_train_timesteps}], got {t.tolist()}")  # numpy: ok-sync
        shape = (-1,) + (1,) * (like.ndim - 1)
        if isinstance(self._noise_schedule, DiscreteVP) and np.all(t == np.round(t)) and np.all(t < c.num_train_timesteps):
            ab = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[torch.from_numpy(t.astype(np.int64)).to(like.device)]
            return (ab**0.5).reshape(shape), ((1 - ab) ** 0.5).reshape(shape)
        a, s = self._alpha_sigma_at(t)
        return (torch.from_numpy(a).to(like.device, like.dtype).reshape(shape),
                torch.from_numpy(s).to(like.device, like.dtype).reshape(shape))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: int | float | Sequence[float] | torch.Tensor) -> torch.Tensor:
        """x_t = α_t x₀ + σ_t ε at the given model timesteps (one per sample, or one for all), with or without
        ``set_timesteps``: equal to ``DDPMScheduler.add_noise`` at integer timesteps of a discrete schedule, and
        to FlowMatch's (1 − s) x₀ + s ε with s = t / num_train_timesteps for flow models."""
        a, s = self._forward_coefficients(timesteps, original_samples)
        return a * original_samples + s * noise

    def scale_noise(self, sample: torch.Tensor, timestep: int | float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Flow img2img: x_s = (1 − s)·x₀ + s·ε (``add_noise`` under the name SD3/Flux call)."""
        if not self.config.use_flow_sigmas:
            raise ValueError("`scale_noise` is for flow-matching configs (use_flow_sigmas=True); use `add_noise`")
        return self.add_noise(sample, noise, timestep)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = α ε − σ x₀ at the given timesteps (for v-prediction training), with the same α, σ as ``add_noise``."""
        a, s = self._forward_coefficients(timesteps, sample)
        return a * noise - s * sample
