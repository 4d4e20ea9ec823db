"""Single-Gaussian data N(μ, τ²I): exact denoiser and closed-form probability-flow ODE solution.

In VE variables y = x/α, ρ = σ/α the PF-ODE is dy/dρ = ε̂ and, for Gaussian data, its solution is
y(ρ) = μ + (y(ρ₀) − μ)·√((τ² + ρ²)/(τ² + ρ₀²)).
"""

from __future__ import annotations

import numpy as np
import torch

from fastsampler.schedules.noise import ContinuousVP


class GaussianModel:
    """ε-, v-, x₀- or flow-prediction model for N(μ, τ²I) data on a continuous VP or flow schedule."""

    def __init__(self, mu: torch.Tensor, tau: float, prediction_type: str = "epsilon", flow: bool = False,
                 schedule: ContinuousVP | None = None, num_train_timesteps: int = 1000):
        self.mu, self.tau, self.prediction_type, self.flow = mu, tau, prediction_type, flow
        self.schedule = schedule or ContinuousVP("linear")
        self.T = num_train_timesteps

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[float, float]:
        t = float(np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t, dtype=np.float64))
        if self.flow:
            s = t / self.T
            return 1.0 - s, s
        rho = float(self.schedule.rho_at(t / self.T))
        a = 1.0 / np.sqrt(1.0 + rho**2)
        return a, rho * a

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        x0 = self.mu + self.tau**2 * a / (a**2 * self.tau**2 + s**2) * (x - a * self.mu)
        eps = (x - a * x0) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0,
                "flow_prediction": eps - x0}[self.prediction_type]

    def solution(self, y0: torch.Tensor, rho0: float, rho1: float) -> torch.Tensor:
        """y(ρ₁) from y(ρ₀) = y0."""
        return self.mu + (y0 - self.mu) * np.sqrt((self.tau**2 + rho1**2) / (self.tau**2 + rho0**2))
