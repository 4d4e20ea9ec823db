"""Noise schedules: α(t), σ(t), λ(t) = log(α/σ) and the inverse λ → t.

Three families, all evaluated in float64 on the CPU:

* ``DiscreteVP``: ᾱ_t = Π_{s≤t}(1 − β_s) on integer t ∈ [0, T); α = √ᾱ, σ = √(1 − ᾱ).
  Between integers the VE sigma ρ = σ/α is interpolated linearly in t (diffusers' ``np.interp``).
* ``ContinuousVP``: the continuous-time linear (β(t) = β₀ + t(β₁ − β₀)) and cosine schedules of
  Song et al. / Nichol & Dhariwal, as in DPM-Solver's ``NoiseScheduleVP``; t ∈ (0, 1], model time t·T.
* ``FlowMatching``: x_t = (1 − s)·x₀ + s·ε, so α = 1 − s and σ = s, with model time s·T.

Every solver only needs the nodes' (α_i, σ_i); the VE sigma ρ = σ/α = e^{−λ} is the common currency
(it is diffusers' ``scheduler.sigmas`` for VP models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta) for ᾱ(t) = cos²((t + 0.008)/1.008 · π/2)."""
    def alpha_bar(t: np.ndarray) -> np.ndarray:
        return np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    i = np.arange(num_train_timesteps, dtype=np.float64)
    t1, t2 = i / num_train_timesteps, (i + 1) / num_train_timesteps
    return np.minimum(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale √ᾱ so that √ᾱ_T = 0 and √ᾱ_0 is unchanged (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    s0, sT = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - sT) * s0 / (s0 - sT)
    alphas_bar = sqrt_ab**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: np.ndarray | list[float] | None = None,
) -> np.ndarray:
    """The training β's of a discrete VP model, as diffusers builds them, in float64."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or np.any(betas <= 0) or np.any(betas >= 1):
            raise ValueError("`trained_betas` must be a non-empty 1-D sequence of values in (0, 1)")
        return betas
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise ValueError(f"`beta_schedule` must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def alpha_sigma_from_rho(rho: np.ndarray | float, flow: bool) -> tuple[np.ndarray, np.ndarray]:
    """(α, σ) of a node given its stored sigma: VP: ρ = σ/α, so α = 1/√(1+ρ²); flow: α = 1 − s, σ = s."""
    rho = np.asarray(rho, dtype=np.float64)
    if flow:
        return 1.0 - rho, rho
    alpha = 1.0 / np.sqrt(1.0 + rho**2)
    return alpha, rho * alpha


@dataclass(frozen=True)
class DiscreteVP:
    """Discrete-time VP schedule given by ᾱ on integer timesteps 0..T−1."""

    alphas_cumprod: np.ndarray

    @classmethod
    def from_config(cls, num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                    trained_betas=None, rescale_betas_zero_snr: bool = False) -> "DiscreteVP":
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if beta_schedule in ("linear", "scaled_linear") and trained_betas is None:
            # Training code (diffusers' DDPMScheduler) builds these with torch.linspace in float32.
            lo, hi = (beta_start, beta_end) if beta_schedule == "linear" else (beta_start**0.5, beta_end**0.5)
            betas32 = torch.linspace(lo, hi, num_train_timesteps, dtype=torch.float32)
            betas = (betas32 if beta_schedule == "linear" else betas32**2).double().numpy()
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        # ᾱ as the model was trained on it: a float32 cumulative product (as diffusers computes it). Its
        # rounding moves late-t noise levels by ~1e-5 relative, which is visible at parity tolerance; from
        # here on everything is float64.
        alphas_cumprod = torch.cumprod(1.0 - torch.from_numpy(betas).float(), dim=0).double().numpy()
        if rescale_betas_zero_snr:
            # ᾱ_T = 0 would make λ_T = −∞; diffusers keeps it at 2^-24 so every node stays finite.
            alphas_cumprod[-1] = 2.0**-24
        return cls(alphas_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def rhos(self) -> np.ndarray:
        """VE sigma ρ_t = √((1 − ᾱ_t)/ᾱ_t) at each integer t."""
        return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    def rho_at(self, t: np.ndarray) -> np.ndarray:
        """ρ at (possibly fractional) t, linear in t between the integers."""
        return np.interp(np.asarray(t, dtype=np.float64), np.arange(self.num_train_timesteps), self.rhos)

    def t_from_rho(self, rho: np.ndarray) -> np.ndarray:
        """Inverse of ρ(t) by linear interpolation of log ρ (diffusers' ``_sigma_to_t``), clipped to [0, T−1]."""
        log_rhos = np.log(self.rhos)
        log_rho = np.log(np.maximum(np.asarray(rho, dtype=np.float64), 1e-10))
        return np.interp(log_rho, log_rhos, np.arange(self.num_train_timesteps, dtype=np.float64))

    def lambda_at(self, t: np.ndarray) -> np.ndarray:
        return -np.log(self.rho_at(t))


@dataclass(frozen=True)
class ContinuousVP:
    """Continuous-time VP schedules (DPM-Solver's ``NoiseScheduleVP``): 'linear' or 'cosine'.

    linear: log α(t) = −¼ t²(β₁ − β₀) − ½ t β₀;  cosine: log α(t) = log cos((t+s)/(1+s)·π/2) − log cos(s/(1+s)·π/2).
    """

    kind: str = "linear"
    beta_0: float = 0.1
    beta_1: float = 20.0
    cosine_s: float = 0.008
    t_max: float = 1.0
    t_min: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "cosine"):
            raise ValueError(f"continuous VP schedule must be 'linear' or 'cosine', got {self.kind!r}")
        if self.kind == "cosine":
            # Past this t, α gets so small that λ is no longer usable (DPM-Solver clips likewise).
            object.__setattr__(self, "t_max", 0.9946)

    def log_alpha(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "linear":
            return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        s = self.cosine_s
        return np.log(np.cos((t + s) / (1 + s) * math.pi / 2)) - math.log(math.cos(s / (1 + s) * math.pi / 2))

    def lambda_at(self, t: np.ndarray) -> np.ndarray:
        log_a = self.log_alpha(t)
        return log_a - 0.5 * np.log1p(-np.exp(2 * log_a))

    def rho_at(self, t: np.ndarray) -> np.ndarray:
        return np.exp(-self.lambda_at(t))

    def t_from_lambda(self, lam: np.ndarray) -> np.ndarray:
        """Closed-form inverse λ → t."""
        lam = np.asarray(lam, dtype=np.float64)
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)  # log α = −½ log(1 + e^{−2λ})
        if self.kind == "linear":
            d = self.beta_1 - self.beta_0
            tmp = 2.0 * log_alpha  # = −½ t² d − t β₀
            return (-self.beta_0 + np.sqrt(self.beta_0**2 - 2.0 * d * tmp)) / d
        s = self.cosine_s
        log_a0 = math.log(math.cos(s / (1 + s) * math.pi / 2))
        return 2.0 * (1 + s) / math.pi * np.arccos(np.exp(log_alpha + log_a0)) - s

    def t_from_rho(self, rho: np.ndarray) -> np.ndarray:
        return self.t_from_lambda(-np.log(rho))


def flow_shift_sigmas(s: np.ndarray, shift: float) -> np.ndarray:
    """SD3's static shift s' = shift·s / (1 + (shift − 1)·s)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_dynamic_shift(s: np.ndarray, mu: float) -> np.ndarray:
    """Flux's exponential time shift e^μ / (e^μ + (1/s − 1)), equal to the static shift with shift = e^μ."""
    s = np.asarray(s, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
