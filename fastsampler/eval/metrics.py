"""Sample-quality measures against the reference ODE solution of a Gaussian mixture.

* ``rmse``: √(mean (x − x_ref)²) over every sample and coordinate (the ODE error);
* ``component_mismatch``: the fraction of samples whose mixture component differs from the reference's,
  the component being argmax_k p(k | x₀ = x) = argmax_k log w_k − ‖x − μ_k‖²/(2τ²) (max responsibility at
  zero noise; the nearest mean when weights are equal);
* ``overshoot``: mean relu(|x| − 1) over every coordinate, how far samples leave the data range [−1, 1]
  (guidance pushes samples out; a component of std τ already gives a small baseline, so compare with the
  reference's own value).
"""

from __future__ import annotations

import torch

from fastsampler.eval.gmm import GaussianMixture


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def rmse(x: torch.Tensor, reference: torch.Tensor) -> float:
    """√(mean (x − x_ref)²)."""
    return float((_flat(x) - _flat(reference)).pow(2).mean().sqrt())


def component_of(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """argmax_k p(k | x₀ = x) (B,): the responsibilities at α = 1, σ = 0."""
    return mixture.posterior_logits(_flat(x), 1.0, 0.0).argmax(dim=1)


def component_mismatch(mixture: GaussianMixture, x: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of samples that land in a different component than the reference sample."""
    return float((component_of(mixture, x) != component_of(mixture, reference)).to(torch.float64).mean())


def overshoot(x: torch.Tensor, limit: float = 1.0) -> float:
    """mean relu(|x| − limit) over every coordinate."""
    return float(torch.relu(_flat(x).abs() - limit).mean())
