"""Dynamic thresholding of x̂₀ (Saharia et al. 2022, "Imagen"), with diffusers' clamp.

s = quantile(|x̂₀|, ratio) per sample, then s ← clamp(s, 1, sample_max_value) and x̂₀ ← clamp(x̂₀, −s, s)/s.
With the default ``sample_max_value=1`` this is static clipping to [−1, 1]; pass a larger value for the
dynamic variant. A ``sample_max_value`` below 1 makes the clamp's bounds cross, and ``torch.clamp`` then returns
the upper one (as in diffusers): x̂₀ is clipped to ±sample_max_value and rescaled to ±1. Computed in float32
because ``torch.quantile`` needs it.
"""

from __future__ import annotations

import torch


def threshold_x0(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)
