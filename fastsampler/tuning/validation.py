"""Validation inside a tuning run: the per-sample loss against the teacher, and where the validation loss comes from.

Without held-out noises the last ``fraction`` of the fitting batch is held out *inside* the batch: the model still
sees the whole batch (per-sample conditions that follow the batch position stay aligned — a model called on a
slice of the batch would pair samples with the wrong labels), and only the loss is split.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from fastsampler.plans.format import Plan
from fastsampler.tuning.holdout import Holdout


def per_sample_loss(final: torch.Tensor, target: torch.Tensor, loss: str = "final", slack: float = 0.0) -> torch.Tensor:
    """(B,) the loss of each sample: mean squared error, (``"distance"``) its root — the RMS distance, which weighs
    the rare far sample less — or (``"relaxed"``) the squared RMS distance beyond ``slack``."""
    mse = (final.to(torch.float64) - target.to(torch.float64)).pow(2).flatten(1).mean(1)
    if loss == "distance":
        return mse.clamp_min(1e-30).sqrt()
    if loss == "relaxed":
        return torch.relu(mse.clamp_min(1e-30).sqrt() - slack).pow(2)
    return mse


def check_fraction(search: str, fraction: float) -> None:
    """Refuse a ``validation_fraction`` outside (0, 1), naming the search it belongs to."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"{search}: `validation_fraction` must lie in (0, 1), got {fraction!r}")


class Validation:
    """Held-out noises (``holdout``) or the batch's own tail: the loss of candidate parameters there."""

    def __init__(self, holdout: Holdout | None, batch: int, fraction: float):
        self.holdout = holdout
        held = 0 if holdout is not None else max(1, int(round(batch * fraction)))
        if holdout is None and batch - held < 1:
            raise ValueError(f"a batch of {batch} fitting noises cannot spare {held} for validation: pass more "
                             "noises or `validation_noise`")
        self.fit = torch.arange(batch - held)
        self.held = torch.arange(batch - held, batch)
        self.describe = (f"held-out noises ({holdout.noise.shape[0]})" if holdout is not None
                         else f"in-batch (last {held} of {batch} fitting noises)")

    def loss(self, per_sample: torch.Tensor, materialise: Callable[[], Plan]) -> float:
        if self.holdout is not None:
            return self.holdout.loss(materialise())
        value = float(per_sample.detach()[self.held].mean())  # ok-sync: tuning, host side
        return value if math.isfinite(value) else math.inf
