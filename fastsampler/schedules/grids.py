"""Timestep grids: which N noise levels a sampler visits, plus the final level it lands on.

A ``Grid`` holds the model timesteps t_0 > … > t_{N−1} and the stored sigmas ρ_0 … ρ_N (ρ_N the final
level: 0 for ``final_sigmas_type="zero"``). For VP models ρ is the VE sigma σ/α (diffusers'
``scheduler.sigmas``); for flow matching it is the flow noise level s with α = 1 − s, σ = s.

Spacings follow diffusers exactly where diffusers has them (linspace / leading / trailing, Karras,
exponential, beta, Lu's uniform-λ, flow shift and dynamic shift) and add DPM-Solver's time-quadratic
grid, a uniform-λ grid and a configurable Karras ρ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fastsampler.schedules.noise import (
    ContinuousVP,
    DiscreteVP,
    alpha_sigma_from_rho,
    flow_dynamic_shift,
    flow_shift_sigmas,
)

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing", "time_quadratic", "uniform_lambda")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclass(frozen=True)
class Grid:
    """Timesteps (length N) and stored sigmas (length N + 1, the final level last)."""

    timesteps: np.ndarray
    rhos: np.ndarray
    flow: bool

    def __post_init__(self) -> None:
        if len(self.rhos) != len(self.timesteps) + 1:
            raise ValueError("a grid needs exactly one more sigma than timesteps")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def alphas(self) -> np.ndarray:
        return alpha_sigma_from_rho(self.rhos, self.flow)[0]

    @property
    def sigmas(self) -> np.ndarray:
        return alpha_sigma_from_rho(self.rhos, self.flow)[1]

    @property
    def lambdas(self) -> np.ndarray:
        """λ_i = log(α_i/σ_i); +∞ at a zero final sigma."""
        a, s = alpha_sigma_from_rho(self.rhos, self.flow)
        with np.errstate(divide="ignore"):
            return np.log(a) - np.log(s)


@dataclass(frozen=True)
class GridSpec:
    """The grid options of a scheduler config (diffusers' names where they exist)."""

    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    use_karras_sigmas: bool = False
    karras_rho: float = 7.0
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    use_dynamic_shifting: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    sigma_min: float | None = None
    sigma_max: float | None = None
    # diffusers' schedulers disagree on the default flow grid: "dpm" (DPM-Solver/DEIS: 1 − linspace(1, 1/T,
    # N+1) shifted, flipped, last dropped) or "unipc" (linspace(1, 1/T, N+1)[:-1], then shifted).
    flow_grid: str = "dpm"
    # diffusers rounds Karras / Lu timesteps to integers except for the cosine (squaredcos_cap_v2) schedule.
    round_timesteps: bool = True

    def validate(self) -> None:
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"`timestep_spacing` must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")
        if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"`final_sigmas_type` must be one of {FINAL_SIGMAS_TYPES}, got {self.final_sigmas_type!r}")
        chosen = [n for n in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
                  if getattr(self, n)]
        if len(chosen) > 1:
            raise ValueError(f"only one of {chosen} can be set")
        if self.karras_rho <= 0:
            raise ValueError(f"`karras_rho` must be positive, got {self.karras_rho}")
        if self.flow_shift <= 0:
            raise ValueError(f"`flow_shift` must be positive, got {self.flow_shift}")
        if self.use_flow_sigmas and self.use_lu_lambdas:
            raise ValueError("`use_lu_lambdas` is not available with `use_flow_sigmas`")


def _karras(rho_min: float, rho_max: float, n: int, power: float) -> np.ndarray:
    """ρ_i = (ρ_max^{1/p} + i/(n−1)·(ρ_min^{1/p} − ρ_max^{1/p}))^p (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = rho_min ** (1 / power), rho_max ** (1 / power)
    return (hi + ramp * (lo - hi)) ** power


def _beta_sigmas(rho_min: float, rho_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """ρ_i = ρ_min + F⁻¹_Beta(a,b)(1 − i/(n−1))·(ρ_max − ρ_min) ("Beta sampling is all you need")."""
    import scipy.stats

    return rho_min + scipy.stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, n), a, b) * (rho_max - rho_min)


def _spaced_timesteps(spec: GridSpec, n: int, last_timestep: int, num_train_timesteps: int) -> np.ndarray:
    """diffusers' linspace / leading / trailing integer grids (note leading's T // (N + 1))."""
    if spec.timestep_spacing == "leading":
        ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + spec.steps_offset
    if spec.timestep_spacing == "trailing":
        ratio = num_train_timesteps / n
        return np.arange(last_timestep, 0, -ratio).round().astype(np.int64) - 1
    return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)


def _check_custom(values: Sequence[float], name: str, lo: float, hi: float) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or len(arr) == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite")
    if np.any(np.diff(arr) >= 0):
        raise ValueError(f"`{name}` must be strictly decreasing, got {arr.tolist()}")  # numpy: ok-sync
    if arr.min() < lo or arr.max() > hi:
        raise ValueError(f"`{name}` must lie in [{lo}, {hi}], got min {arr.min()} and max {arr.max()}")
    return arr


def vp_grid(
    schedule: DiscreteVP | ContinuousVP,
    spec: GridSpec,
    num_inference_steps: int | None = None,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
) -> Grid:
    """A grid for a VP model. Exactly one of ``num_inference_steps``, ``timesteps``, ``sigmas``."""
    discrete = isinstance(schedule, DiscreteVP)
    T = schedule.num_train_timesteps if discrete else 1000
    if discrete:
        rho_all = schedule.rhos
        rho_lo, rho_hi = rho_all[0], rho_all[-1]
        t_of_rho = schedule.t_from_rho
    else:
        rho_lo, rho_hi = schedule.rho_at(schedule.t_min), schedule.rho_at(schedule.t_max)
        t_of_rho = lambda r: schedule.t_from_rho(r) * T  # noqa: E731  (model time is t·T)
    rho_lo = spec.sigma_min if spec.sigma_min is not None else rho_lo
    rho_hi = spec.sigma_max if spec.sigma_max is not None else rho_hi

    def rho_of_t(t: np.ndarray) -> np.ndarray:
        return schedule.rho_at(t) if discrete else schedule.rho_at(np.asarray(t) / T)

    if timesteps is not None:
        ts = _check_custom(timesteps, "timesteps", 0, T - 1 if discrete else T)
        if discrete:
            if np.any(ts != np.round(ts)):
                raise ValueError("`timesteps` must be integers for a discrete-time model")
            ts = ts.astype(np.int64)
        rhos = rho_of_t(ts)
    elif sigmas is not None:
        rhos_in = _check_custom(sigmas, "sigmas", 0.0, math.inf)
        final = None
        if rhos_in[-1] == 0.0:
            rhos_in, final = rhos_in[:-1], 0.0
        if len(rhos_in) == 0:
            raise ValueError("`sigmas` needs at least one positive entry")
        rhos = rhos_in
        ts = t_of_rho(rhos)
        if discrete:
            ts = np.round(ts).astype(np.int64)
        return Grid(ts, np.append(rhos, final if final is not None else _final(spec, schedule, rhos)), False)
    else:
        n = num_inference_steps
        if spec.use_karras_sigmas:
            rhos = _karras(rho_lo, rho_hi, n, spec.karras_rho)
        elif spec.use_exponential_sigmas:
            rhos = np.exp(np.linspace(math.log(rho_hi), math.log(rho_lo), n))
        elif spec.use_beta_sigmas:
            rhos = _beta_sigmas(rho_lo, rho_hi, n)
        elif spec.use_lu_lambdas:
            # diffusers' "Lu lambdas": uniform in log ρ (= −λ) between the training ends.
            rhos = np.exp(np.linspace(math.log(rho_hi), math.log(rho_lo), n))
        elif spec.timestep_spacing == "uniform_lambda":
            rhos = np.exp(np.linspace(math.log(rho_hi), math.log(rho_lo), n + 1))[:-1]
        elif spec.timestep_spacing == "time_quadratic":
            # DDIM / DPM-Solver "time_quadratic": t_i = (√t_max + i/N (√t_min − √t_max))²
            t_hi = (T - 1) if discrete else schedule.t_max * T
            t_lo = 0.0 if discrete else schedule.t_min * T
            ts = np.linspace(math.sqrt(t_hi), math.sqrt(t_lo), n + 1)[:-1] ** 2
            if discrete:
                ts = np.round(ts).astype(np.int64)
            rhos = rho_of_t(ts)
            return Grid(ts, np.append(rhos, _final(spec, schedule, rhos)), False)
        else:
            if not discrete:
                if spec.timestep_spacing != "linspace":
                    raise ValueError(f"`timestep_spacing={spec.timestep_spacing!r}` is defined for discrete "
                                     "timesteps; continuous VP schedules support 'linspace', 'uniform_lambda', "
                                     "'time_quadratic' and the sigma spacings")
                ts = np.linspace(schedule.t_max, schedule.t_min, n + 1)[:-1] * T
                rhos = rho_of_t(ts)
                return Grid(ts, np.append(rhos, _final(spec, schedule, rhos)), False)
            last = T
            if spec.lambda_min_clipped > -math.inf:
                lam = -np.log(rho_all)  # decreasing in t
                last = T - int(np.searchsorted(lam[::-1], spec.lambda_min_clipped))
            ts = _spaced_timesteps(spec, n, last, T)
            rhos = rho_of_t(ts)
            return Grid(ts, np.append(rhos, _final(spec, schedule, rhos)), False)
        ts = t_of_rho(rhos)
        if discrete and (spec.use_karras_sigmas or spec.use_lu_lambdas) and spec.round_timesteps:
            ts = np.round(ts)
        if discrete:
            ts = ts.astype(np.int64)  # diffusers truncates the exponential / beta timesteps
    return Grid(ts, np.append(rhos, _final(spec, schedule, rhos)), False)


def _final(spec: GridSpec, schedule: DiscreteVP | ContinuousVP, rhos: np.ndarray) -> float:
    if spec.final_sigmas_type == "zero":
        return 0.0
    if isinstance(schedule, DiscreteVP):
        return float(schedule.rhos[0])
    return float(schedule.rho_at(schedule.t_min))


def flow_grid(
    spec: GridSpec,
    num_train_timesteps: int,
    num_inference_steps: int | None = None,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    mu: float | None = None,
) -> Grid:
    """A grid for a flow-matching model (α = 1 − s, σ = s); timesteps are s·T as floats."""
    T = num_train_timesteps
    if spec.use_dynamic_shifting and mu is None:
        raise ValueError("`mu` must be passed to `set_timesteps` when `use_dynamic_shifting=True`")

    def shift(s: np.ndarray) -> np.ndarray:
        if spec.use_dynamic_shifting:
            return flow_dynamic_shift(s, mu)
        return flow_shift_sigmas(s, spec.flow_shift)

    final = None
    if timesteps is not None:
        s = _check_custom(timesteps, "timesteps", 0.0, T) / T
        if s[-1] == 0.0:
            s, final = s[:-1], 0.0
    elif sigmas is not None:
        s = _check_custom(sigmas, "sigmas", 0.0, 1.0)
        if s[-1] == 0.0:
            s, final = s[:-1], 0.0
        s = shift(s)
    else:
        n = num_inference_steps
        if spec.use_karras_sigmas or spec.use_exponential_sigmas or spec.use_beta_sigmas:
            # Build the spacing in VE-sigma space ρ = s/(1 − s), then map back s = ρ/(1 + ρ).
            lo = spec.sigma_min if spec.sigma_min is not None else 1.0 / T / (1 - 1.0 / T)
            hi = spec.sigma_max if spec.sigma_max is not None else (1 - 1.0 / T) / (1.0 / T)
            if spec.use_karras_sigmas:
                rho = _karras(lo, hi, n, spec.karras_rho)
            elif spec.use_exponential_sigmas:
                rho = np.exp(np.linspace(math.log(hi), math.log(lo), n))
            else:
                rho = _beta_sigmas(lo, hi, n)
            s = rho / (1.0 + rho)
        elif spec.timestep_spacing == "uniform_lambda":
            lam = np.linspace(math.log(1.0 / (T - 1)), math.log(T - 1), n + 1)[:-1]
            s = shift(1.0 / (1.0 + np.exp(lam)))
        elif spec.timestep_spacing == "time_quadratic":
            # quadratic in t = s·T between s = 1 and 1/T, then shifted (DDIM's "quad" spacing)
            s = shift(np.linspace(1.0, math.sqrt(1.0 / T), n + 1)[:-1] ** 2)
        elif spec.timestep_spacing == "leading":
            # "trailing" and "linspace" both start at the top, which the default flow grid does; "leading" would not.
            raise ValueError("`timestep_spacing='leading'` is defined for discrete VP timesteps; flow sigmas "
                             "support 'linspace'/'trailing' (the default grid), 'uniform_lambda' or 'time_quadratic'")
        elif spec.flow_grid == "unipc":
            s = shift(np.linspace(1.0, 1.0 / T, n + 1)[:-1])
            if abs(s[0] - 1.0) < 1e-6:
                s[0] -= 1e-6  # keep λ finite at the first node
        else:
            s = np.flip(shift(1.0 - np.linspace(1.0, 1.0 / T, n + 1)))[:-1].copy()
    if np.any(s <= 0) or np.any(s > 1):
        raise ValueError("flow sigmas must lie in (0, 1]")
    if s[0] >= 1.0:
        s = s.copy()
        s[0] = 1.0 - 1e-6  # s = 1 means α = 0 (λ = −∞): nudge it, as diffusers' UniPC does
    if final is None:
        final = 0.0 if spec.final_sigmas_type == "zero" else float(s[-1])
    return Grid(s * T, np.append(s, final), True)


def sigmas_to_alpha_sigma(rhos: np.ndarray, flow: bool) -> tuple[np.ndarray, np.ndarray]:
    return alpha_sigma_from_rho(rhos, flow)
