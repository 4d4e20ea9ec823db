"""A diffusers VP model as k-diffusion's denoiser D(x, σ): what ``CompVisDenoiser`` / ``CompVisVDenoiser`` do for
a CompVis model, for a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` and its scheduler config.

D(x, σ) = x̂₀ of the model at x_VP = c_in x, c_in = α = 1/√(1 + σ²), σ_VP = σ α, at the model time t(σ): the
fractional index where log σ falls in the model's table σ_j = √((1 − ᾱ_j)/ᾱ_j) (linear in log σ between
neighbours, as k-diffusion's ``DiscreteSchedule.sigma_to_t``), or the nearest index with ``quantize=True`` (as
ComfyUI). x̂₀ from the model's prediction type (``fastsampler.samplers.convert``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from fastsampler.samplers.convert import x0_coefficients
from fastsampler.schedules.noise import DiscreteVP


class DiffusersDenoiser:
    """``model(x, sigma, **kwargs)`` → D for the k-diffusion functions; ``kwargs`` go to the network (e.g.
    ``class_labels``, ``encoder_hidden_states``). ``sigma_min`` / ``sigma_max``: the table's ends."""

    def __init__(self, network: torch.nn.Module, scheduler_config: Mapping[str, Any], quantize: bool = False):
        c = scheduler_config
        if c.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"`scheduler_config` prediction_type must be epsilon, v_prediction or sample for a "
                             f"VP model, got {c.get('prediction_type')!r}")
        self.network, self.quantize = network, quantize
        self.prediction_type = c.get("prediction_type", "epsilon")
        self.table = DiscreteVP.from_config(c.get("num_train_timesteps", 1000), c.get("beta_start", 0.0001),
                                            c.get("beta_end", 0.02), c.get("beta_schedule", "linear"),
                                            c.get("trained_betas"), c.get("rescale_betas_zero_snr", False))
        self.sigma_min, self.sigma_max = float(self.table.rhos[0]), float(self.table.rhos[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model time of each σ (fractional, or the nearest index with ``quantize``)."""
        t = self.table.t_from_rho(sigma.detach().to("cpu", torch.float64).numpy())  # ok-sync: once a model call
        return torch.as_tensor(np.round(t) if self.quantize else t, device=sigma.device)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha = (1.0 / torch.sqrt(1.0 + sigma.to(x.dtype) ** 2)).reshape(shape)  # x.dtype: MPS has no float64
        x_vp = x * alpha
        t = self.timestep(sigma).to(x.dtype if x.is_floating_point() else torch.float32)
        output = self.network(x_vp, t, **kwargs)
        output = output.sample if hasattr(output, "sample") else output
        output = output[:, :x.shape[1]]  # learned-variance models: the prediction channels
        # per sample (each may sit at its own σ), on the device: x0_coefficients is plain arithmetic
        c_x, c_o = x0_coefficients(self.prediction_type, alpha, sigma.to(x.dtype).reshape(shape) * alpha)
        return c_x * x_vp + c_o * output
