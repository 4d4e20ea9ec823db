"""Exact denoisers for Gaussian-mixture data, and a diffusers-style model built on them.

Data: x₀ ~ Σ_k w_k N(μ_k, τ²I) (means μ: K×D, one shared isotropic std τ). Noising: x = α x₀ + σ ε. Then

    p(x | k) = N(x; α μ_k, v I),   v = α²τ² + σ²
    r_k(x) = p(k | x) = softmax_k( log w_k + (α x·μ_k − ½ α² ‖μ_k‖²) / v )      (the ‖x‖² term cancels)
    E[x₀ | x, k] = μ_k + (α τ² / v)(x − α μ_k)
    x̂₀(x) = E[x₀ | x] = (σ² m + α τ² x) / v,   m = Σ_k r_k μ_k

and the other parameterisations follow from x̂₀: ε̂ = (x − α x̂₀)/σ, v̂ = α ε̂ − σ x̂₀, flow velocity ε̂ − x̂₀.
Everything is computed in float64; the softmax is the log-sum-exp-stable one. The posterior depends on
(x, α, σ) only through (x/σ, α/σ), so any scaling of the three (VP, VE with α = 1, flow) is accepted.

Class-conditional data labels each component; conditioning on class c restricts the mixture to its components
(weights renormalised). Classifier-free guidance at scale w is ε̂_u + w (ε̂_c − ε̂_u); since ε̂ is affine in x̂₀
for fixed x, this equals the ε̂ of x̂₀_u + w (x̂₀_c − x̂₀_u), which is what ``MixtureDenoiser`` returns.

For a single Gaussian N(μ, τ²I) the probability-flow ODE is linear: in y = x/α, ρ = σ/α,
y(ρ) = μ + (y(ρ₀) − μ)·√((τ² + ρ²)/(τ² + ρ₀²)) (``single_gaussian_solution``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from fastsampler.samplers.convert import PREDICTION_TYPES
from fastsampler.schedules.noise import ContinuousVP, make_betas

#: Per-pixel std of each digits component (data scaled to [−1, 1]). Why 0.1: it is just under one grey level
#: of the 17-level digits data (0.125), so a sample is a training image perturbed by less than one level;
#: the closest two of the 1797 images are 0.66 apart = 6.6 τ, so components never overlap and "which
#: component did a sample land in" is unambiguous; and ρ ≈ τ, where the ODE's last bend happens, lies inside
#: every preset's grid (SD's smallest training ρ is 0.029), so solvers are tested on the hard low-noise end.
DIGITS_TAU = 0.1

def _as_column(value: float | np.ndarray | torch.Tensor, batch: int) -> torch.Tensor:
    """A scalar or per-sample (B,) noise coefficient as a float64 (B, 1) column (a tensor that requires grad
    stays in the graph: learned time points differentiate through the model's noise level)."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        col = value.to(torch.float64)
    else:
        col = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value,
                                         dtype=np.float64))
    return col.reshape(-1, 1).expand(batch, 1) if col.numel() == 1 else col.reshape(batch, 1)


def _owned_tensor(values, dtype) -> torch.Tensor:
    """A private contiguous copy (later changes to the caller's array do not reach the mixture)."""
    values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    return torch.from_numpy(np.array(values, dtype=dtype, order="C", copy=True))


class GaussianMixture:
    """Σ_k w_k N(μ_k, τ²I) in D dimensions, optionally with a class label per component."""

    def __init__(self, means: np.ndarray | torch.Tensor, tau: float, weights: np.ndarray | torch.Tensor | None = None,
                 labels: np.ndarray | torch.Tensor | None = None):
        self.means = _owned_tensor(means, np.float64)
        if self.means.ndim != 2 or self.means.shape[0] == 0:
            raise ValueError(f"`means` must be a non-empty K×D array, got shape {tuple(self.means.shape)}")
        num_components = self.means.shape[0]
        if not tau > 0:
            raise ValueError(f"`tau` must be positive, got {tau}")
        self.tau = float(tau)
        w = np.full(num_components, 1.0 / num_components) if weights is None else np.asarray(weights, np.float64)
        if w.shape != (num_components,) or np.any(w <= 0):
            raise ValueError(f"`weights` must be {num_components} positive numbers")
        self.weights = _owned_tensor(w / w.sum(), np.float64)
        self.labels = None if labels is None else _owned_tensor(labels, np.int64)
        if self.labels is not None and self.labels.shape != (num_components,):
            raise ValueError(f"`labels` must have one entry per component ({num_components})")
        self.log_weights = self.weights.log()
        self.half_sq_norms = 0.5 * self.means.pow(2).sum(1)
        self.means_t = self.means.T.contiguous()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def class_mask(self, classes: torch.Tensor) -> torch.Tensor:
        """(B, K) mask of the components whose label is each sample's class."""
        if self.labels is None:
            raise ValueError("this mixture has no component labels; it cannot be conditioned on a class")
        mask = self.labels[None, :] == torch.as_tensor(classes).reshape(-1, 1).to(torch.int64)
        if not bool(mask.any(1).all()):
            raise ValueError("a requested class has no component in the mixture")
        return mask

    def posterior_logits(self, x: torch.Tensor, alpha, sigma, mask: torch.Tensor | None = None) -> torch.Tensor:
        """log r_k up to a per-sample constant: log w_k + (α x·μ_k − ½α²‖μ_k‖²)/v; −∞ outside ``mask``."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        a, s = _as_column(alpha, x.shape[0]), _as_column(sigma, x.shape[0])
        v = a**2 * self.tau**2 + s**2
        logits = torch.addmm(self.log_weights - (a**2 / v) * self.half_sq_norms, x * (a / v), self.means_t)
        return logits if mask is None else logits.masked_fill(~mask, -float("inf"))

    def responsibilities(self, x: torch.Tensor, alpha, sigma, classes: torch.Tensor | None = None) -> torch.Tensor:
        """r_k(x) = p(k | x), (B, K); restricted to each sample's class when ``classes`` is given."""
        mask = None if classes is None else self.class_mask(classes)
        return torch.softmax(self.posterior_logits(x, alpha, sigma, mask), dim=1)

    def denoise(self, x: torch.Tensor, alpha, sigma, classes: torch.Tensor | None = None) -> torch.Tensor:
        """E[x₀ | x] = (σ² m + α τ² x)/v with m = Σ r_k μ_k, (B, D) float64."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        a, s = _as_column(alpha, flat.shape[0]), _as_column(sigma, flat.shape[0])
        m = self.responsibilities(flat, a, s, classes) @ self.means
        return (s**2 * m + a * self.tau**2 * flat) / (a**2 * self.tau**2 + s**2)


@dataclass(frozen=True)
class MixtureDenoiser:
    """x̂₀(x; α, σ) of a mixture: unconditional, conditional on per-sample ``classes``, or CFG-guided.

    ``guidance_scale=None`` with classes: the conditional denoiser; a number w: x̂₀_u + w (x̂₀_c − x̂₀_u).
    """

    mixture: GaussianMixture
    classes: torch.Tensor | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if self.guidance_scale is not None and self.classes is None:
            raise ValueError("classifier-free guidance needs per-sample `classes`")
        if self.classes is not None:
            object.__setattr__(self, "classes", torch.as_tensor(self.classes).reshape(-1).to(torch.int64))
            self.mixture.class_mask(self.classes)  # validates labels and classes

    def __call__(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        if self.classes is not None and x.shape[0] != self.classes.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} samples but {self.classes.shape[0]} class labels")
        if self.classes is None:
            return self.mixture.denoise(x, alpha, sigma)
        conditional = self.mixture.denoise(x, alpha, sigma, self.classes)
        if self.guidance_scale is None:
            return conditional
        unconditional = self.mixture.denoise(x, alpha, sigma)
        return unconditional + self.guidance_scale * (conditional - unconditional)


def prediction_from_x0(prediction_type: str, x: torch.Tensor, x0: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The model output a scheduler expects, from x̂₀: ε̂ = (x − α x̂₀)/σ; v̂ = α ε̂ − σ x̂₀; flow ε̂ − x̂₀."""
    if prediction_type == "sample":
        return x0
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    a, s = _as_column(alpha, flat.shape[0]), _as_column(sigma, flat.shape[0])
    eps = (flat - a * x0) / s
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "flow_prediction":
        return eps - x0
    raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


# Time conditioning: the model's map from a scheduler timestep t to (α, σ) -----------------------------------

@dataclass(frozen=True)
class DiscreteVPTime:
    """Discrete VP: ρ(t) = √((1 − ᾱ_t)/ᾱ_t) on integers t, linear in t between them; α = 1/√(1+ρ²), σ = ρα."""

    alphas_cumprod: np.ndarray

    @classmethod
    def from_betas(cls, num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                   trained_betas: Any = None) -> "DiscreteVPTime":
        """ᾱ_t = Π_{s≤t}(1 − β_s) from diffusers' β schedules, all in float64."""
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        return cls(np.cumprod(1.0 - betas))

    @property
    def rhos(self) -> np.ndarray:
        return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    def rho(self, t: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """ρ at t, linear between integers (a differentiable torch version for a tensor t)."""
        if isinstance(t, torch.Tensor):
            rhos = torch.as_tensor(self.rhos, dtype=torch.float64)
            t = t.to(torch.float64).clamp(0, len(rhos) - 1)
            lo = t.detach().floor().clamp(max=len(rhos) - 2).long()
            w = t - lo
            return rhos[lo] * (1 - w) + rhos[lo + 1] * w
        return np.interp(np.asarray(t, dtype=np.float64), np.arange(len(self.alphas_cumprod)), self.rhos)

    def alpha_sigma(self, t):
        rho = self.rho(t)
        alpha = 1.0 / (1.0 + rho**2) ** 0.5
        return alpha, rho * alpha


@dataclass(frozen=True)
class ContinuousVPTime:
    """Continuous VP (``noise_schedule="vp_linear"`` / ``"vp_cosine"``): model time t·1000, ρ from the schedule."""

    schedule: ContinuousVP

    def alpha_sigma(self, t):
        if isinstance(t, torch.Tensor):  # differentiable: log α(t) in torch (linear schedule)
            if self.schedule.kind != "linear":
                raise NotImplementedError("a differentiable time input is implemented for vp_linear only")
            tt = t.to(torch.float64) / 1000.0
            b0, b1 = self.schedule.beta_0, self.schedule.beta_1
            log_alpha = -0.25 * tt**2 * (b1 - b0) - 0.5 * tt * b0
            alpha = torch.exp(log_alpha)
            return alpha, torch.sqrt(1.0 - alpha**2)
        rho = self.schedule.rho_at(np.asarray(t, dtype=np.float64) / 1000.0)
        alpha = 1.0 / np.sqrt(1.0 + rho**2)
        return alpha, rho * alpha


@dataclass(frozen=True)
class FlowTime:
    """Flow matching: s = t/T, α = 1 − s, σ = s."""

    num_train_timesteps: int = 1000

    def alpha_sigma(self, t):
        s = (t.to(torch.float64) if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)) \
            / self.num_train_timesteps
        return 1.0 - s, s


def time_conditioning(config: Mapping[str, Any]) -> DiscreteVPTime | ContinuousVPTime | FlowTime:
    """The (α, σ) map a model trained with this scheduler config is conditioned on."""
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    is_flow = bool(config.get("use_flow_sigmas")) or ("shift" in config and "beta_schedule" not in config)
    if is_flow:
        return FlowTime(num_train_timesteps)
    if config.get("noise_schedule") in ("vp_linear", "vp_cosine"):
        return ContinuousVPTime(ContinuousVP(config["noise_schedule"][3:]))
    if config.get("rescale_betas_zero_snr"):
        raise NotImplementedError("zero-terminal-SNR schedules are not supported by the mixture model")
    return DiscreteVPTime.from_betas(num_train_timesteps, config.get("beta_start", 0.0001),
                                     config.get("beta_end", 0.02), config.get("beta_schedule", "linear"),
                                     config.get("trained_betas"))


@dataclass
class MixtureModel:
    """A diffusers-style model whose output is exact: ``model(x, t)`` → the ``prediction_type`` output at t.

    t is the scheduler's timestep (int or float, scalar or per-sample tensor), mapped to (α, σ) exactly as the
    model was trained (``time_conditioning``). ``num_calls`` counts evaluations (one per call: a CFG batch of
    unconditional and conditional halves counts once, as in a pipeline).
    """

    denoiser: MixtureDenoiser
    time: DiscreteVPTime | ContinuousVPTime | FlowTime
    prediction_type: str = "epsilon"
    num_calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.prediction_type == "flow_prediction" and not isinstance(self.time, FlowTime):
            raise ValueError("flow_prediction needs a flow-matching time conditioning")

    @classmethod
    def from_scheduler_config(cls, denoiser: MixtureDenoiser, config: Mapping[str, Any],
                              prediction_type: str | None = None) -> "MixtureModel":
        kind = prediction_type or config.get("prediction_type") or "flow_prediction"
        return cls(denoiser, time_conditioning(config), kind)

    def alpha_sigma(self, t: float | torch.Tensor):
        """(α, σ) at model time t: numpy, or torch when t is a tensor that requires grad (differentiable)."""
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return self.time.alpha_sigma(t)
        t = t.detach().cpu().to(torch.float64).numpy() if isinstance(t, torch.Tensor) else np.float64(t)
        return self.time.alpha_sigma(t)

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        self.num_calls += 1
        alpha, sigma = self.alpha_sigma(t)
        x0 = self.denoiser(x, alpha, sigma)
        out = prediction_from_x0(self.prediction_type, x, x0, alpha, sigma)
        return out.reshape(x.shape).to(x.dtype)


# Ready-made mixtures -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data / 8.0 - 1.0, digits.target  # pixel values 0..16 → [−1, 1]


def digits_mixture(tau: float = DIGITS_TAU) -> GaussianMixture:
    """sklearn's 1797 8×8 digits (64 dims, scaled to [−1, 1]) as equally weighted, class-labelled means."""
    means, labels = _digits()
    return GaussianMixture(means, tau, labels=labels)


def single_gaussian(mu: np.ndarray | torch.Tensor, tau: float) -> GaussianMixture:
    """N(μ, τ²I) as a one-component mixture."""
    return GaussianMixture(np.asarray(mu, dtype=np.float64).reshape(1, -1), tau)


def single_gaussian_solution(x_start: torch.Tensor, mu: torch.Tensor, tau: float, alpha_start: float,
                             sigma_start: float, rho_end: float = 0.0) -> torch.Tensor:
    """y(ρ_end) = x/α of the PF-ODE for N(μ, τ²I) data started from x_start at (α₀, σ₀).

    y(ρ) = μ + z √(τ² + ρ²) with the conserved z = (x₀ − α₀μ)/√(α₀²τ² + σ₀²) (= (y₀ − μ)/√(τ² + ρ₀²)),
    which also covers α₀ = 0 (pure noise, ρ₀ = ∞). At ρ_end = 0 this is the ODE's x₀.
    """
    mu = torch.as_tensor(mu, dtype=torch.float64).reshape(1, -1)
    z = (x_start.reshape(x_start.shape[0], -1).to(torch.float64) - alpha_start * mu) / np.sqrt(
        alpha_start**2 * tau**2 + sigma_start**2)
    return mu + z * np.sqrt(tau**2 + rho_end**2)
