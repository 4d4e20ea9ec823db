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
from fastsampler.schedules.spacings import beta_sigmas, karras_sigmas

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
    use_ays_sigmas: str | None = None  # Align Your Steps for "sd1" / "sdxl" / "svd" (fastsampler.schedules.ays)
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
    # flow + Karras / exponential / beta: "rho" (respace ρ = s/(1−s) between sigma_min/sigma_max or
    # ``vp_rho_range``; diffusers' UniPC) or "flowmatch" (shift, then respace s; FlowMatchEulerDiscreteScheduler)
    flow_respacing: str = "flowmatch"
    vp_rho_range: tuple[float, float] | None = None

    def validate(self) -> None:
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"`timestep_spacing` must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")
        if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"`final_sigmas_type` must be one of {FINAL_SIGMAS_TYPES}, got {self.final_sigmas_type!r}")
        chosen = [n for n in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                              "use_ays_sigmas") if getattr(self, n)]
        if len(chosen) > 1:
            raise ValueError(f"only one of {chosen} can be set")
        if self.karras_rho <= 0:
            raise ValueError(f"`karras_rho` must be positive, got {self.karras_rho}")
        if self.flow_shift <= 0:
            raise ValueError(f"`flow_shift` must be positive, got {self.flow_shift}")
        if self.use_flow_sigmas and self.use_lu_lambdas:
            raise ValueError("`use_lu_lambdas` is not available with `use_flow_sigmas`")
        if self.use_ays_sigmas is not None:
            from fastsampler.schedules.ays import AYS_MODELS

            if self.use_ays_sigmas not in AYS_MODELS:
                raise ValueError(f"`use_ays_sigmas` must be one of {AYS_MODELS} (or None), got {self.use_ays_sigmas!r}")
            if self.use_flow_sigmas:
                raise ValueError("`use_ays_sigmas` holds VP / EDM noise levels; it is not available with "
                                 "`use_flow_sigmas`")


def _sigma_spacing(spec: GridSpec, lo: float, hi: float, n: int) -> np.ndarray:
    """n decreasing noise levels from ``hi`` to ``lo``: Karras (ρ = ``karras_rho``), exponential or beta."""
    if lo >= hi:
        raise ValueError(f"the grid's smallest noise level ({lo:g}, `sigma_min`) must be below its largest "
                         f"({hi:g}, `sigma_max`)")
    if spec.use_karras_sigmas:
        return karras_sigmas(lo, hi, n, spec.karras_rho)
    if spec.use_exponential_sigmas:
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    return beta_sigmas(lo, hi, n)


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


def _check_final(final_sigma: float | None, levels: np.ndarray) -> float | None:
    """``final_sigma`` (or None) checked against the custom levels it ends: ≥ 0 and below the last of them."""
    if final_sigma is None:
        return None
    final = float(final_sigma)
    if not (math.isfinite(final) and 0.0 <= final < levels[-1]):
        raise ValueError(f"`final_sigma` must be ≥ 0 and below the last of `sigmas` ({levels[-1]}), got {final_sigma!r}")
    return final


@dataclass(frozen=True)
class _VP:
    """A VP schedule as the grid functions need it: ρ at model time t, t at ρ, the grid's ρ range."""

    schedule: DiscreteVP | ContinuousVP
    spec: GridSpec

    @property
    def discrete(self) -> bool:
        return isinstance(self.schedule, DiscreteVP)

    @property
    def T(self) -> int:
        return self.schedule.num_train_timesteps if self.discrete else 1000

    def rho_of_t(self, t: np.ndarray) -> np.ndarray:
        return self.schedule.rho_at(t) if self.discrete else self.schedule.rho_at(np.asarray(t) / self.T)

    def t_of_rho(self, rho: np.ndarray) -> np.ndarray:
        return self.schedule.t_from_rho(rho) if self.discrete else self.schedule.t_from_rho(rho) * self.T

    @property
    def rho_range(self) -> tuple[float, float]:
        """(ρ_min, ρ_max): the training ends, or ``sigma_min`` / ``sigma_max``."""
        sched, spec = self.schedule, self.spec
        lo, hi = (sched.rhos[0], sched.rhos[-1]) if self.discrete else (sched.rho_at(sched.t_min),
                                                                          sched.rho_at(sched.t_max))
        return (spec.sigma_min if spec.sigma_min is not None else float(lo),
                spec.sigma_max if spec.sigma_max is not None else float(hi))

    def at_timesteps(self, ts: np.ndarray) -> Grid:
        if self.discrete:
            ts = np.round(ts).astype(np.int64)
        rhos = self.rho_of_t(ts)
        return Grid(ts, np.append(rhos, _final(self.spec, self.schedule, rhos)), False)

    def at_sigmas(self, rhos: np.ndarray, round_timesteps: bool, final: float | None = None) -> Grid:
        ts = self.t_of_rho(rhos)
        if self.discrete:
            # diffusers rounds Karras / Lu / custom-sigma timesteps, truncates exponential / beta ones
            ts = (np.round(ts) if round_timesteps else ts).astype(np.int64)
        return Grid(ts, np.append(rhos, final if final is not None else _final(self.spec, self.schedule, rhos)),
                    False)


def _vp_sigma_spaced(vp: _VP, n: int) -> Grid:
    """Karras / exponential / beta spacing of ρ between the grid's ends."""
    lo, hi = vp.rho_range
    return vp.at_sigmas(_sigma_spacing(vp.spec, lo, hi, n), vp.spec.use_karras_sigmas and vp.spec.round_timesteps)


def _vp_lu_lambdas(vp: _VP, n: int) -> Grid:
    """diffusers' "Lu lambdas": uniform in log ρ (= −λ) between the ends, n nodes."""
    lo, hi = vp.rho_range
    return vp.at_sigmas(np.exp(np.linspace(math.log(hi), math.log(lo), n)), vp.spec.round_timesteps)


def _vp_uniform_lambda(vp: _VP, n: int) -> Grid:
    """Uniform in λ from ρ_max down to ρ_min, the final level not a node."""
    lo, hi = vp.rho_range
    return vp.at_sigmas(np.exp(np.linspace(math.log(hi), math.log(lo), n + 1))[:-1], False)


def _vp_time_quadratic(vp: _VP, n: int) -> Grid:
    """DDIM / DPM-Solver "time_quadratic": t_i = (√t_max + i/N (√t_min − √t_max))²."""
    sched = vp.schedule
    t_hi, t_lo = ((vp.T - 1), 0.0) if vp.discrete else (sched.t_max * vp.T, sched.t_min * vp.T)
    return vp.at_timesteps(np.linspace(math.sqrt(t_hi), math.sqrt(t_lo), n + 1)[:-1] ** 2)


def _vp_spaced(vp: _VP, n: int) -> Grid:
    """linspace / leading / trailing timesteps (discrete), linspace in t (continuous)."""
    spec, sched = vp.spec, vp.schedule
    if not vp.discrete:
        if spec.timestep_spacing != "linspace":
            raise ValueError(f"`timestep_spacing={spec.timestep_spacing!r}` is defined for discrete timesteps; "
                             "continuous VP schedules support 'linspace', 'uniform_lambda', 'time_quadratic' and the "
                             "sigma spacings")
        return vp.at_timesteps(np.linspace(sched.t_max, sched.t_min, n + 1)[:-1] * vp.T)
    last = vp.T
    if spec.lambda_min_clipped > -math.inf:
        lam = -np.log(sched.rhos)  # decreasing in t
        last = vp.T - int(np.searchsorted(lam[::-1], spec.lambda_min_clipped))
        if last < 1:
            raise ValueError(f"`lambda_min_clipped` ({spec.lambda_min_clipped:g}) clips every timestep; it must be "
                             f"below the schedule's largest λ ({lam[0]:.3g})")
    ts = _spaced_timesteps(spec, n, last, vp.T)
    if ts.max() > vp.T - 1:
        raise ValueError(f"`steps_offset` ({spec.steps_offset}) pushes timesteps up to {ts.max()}, past the last "
                         f"training timestep {vp.T - 1}")
    return vp.at_timesteps(ts)


def _vp_ays(vp: _VP, n: int) -> Grid:
    """Align Your Steps: the published levels of ``use_ays_sigmas``, log-linearly interpolated to n steps, ending
    in 0 (ρ beyond the model's range reach its nearest timestep)."""
    from fastsampler.schedules.ays import ays_sigmas

    return vp.at_sigmas(ays_sigmas(n, vp.spec.use_ays_sigmas)[:-1], vp.spec.round_timesteps, 0.0)


def _vp_kind(spec: GridSpec) -> str:
    if spec.use_ays_sigmas is not None:
        return "ays"
    if spec.use_karras_sigmas or spec.use_exponential_sigmas or spec.use_beta_sigmas:
        return "sigma_spaced"
    if spec.use_lu_lambdas:
        return "lu_lambdas"
    if spec.timestep_spacing in ("uniform_lambda", "time_quadratic"):
        return spec.timestep_spacing
    return "spaced"


_VP_GRIDS = {"sigma_spaced": _vp_sigma_spaced, "lu_lambdas": _vp_lu_lambdas, "uniform_lambda": _vp_uniform_lambda,
             "time_quadratic": _vp_time_quadratic, "spaced": _vp_spaced, "ays": _vp_ays}


def vp_grid(
    schedule: DiscreteVP | ContinuousVP,
    spec: GridSpec,
    num_inference_steps: int | None = None,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    final_sigma: float | None = None,
) -> Grid:
    """A grid for a VP model. Exactly one of ``num_inference_steps``, ``timesteps``, ``sigmas``; with ``sigmas``,
    ``final_sigma`` is the level the last step lands on (default: a trailing 0, else ``final_sigmas_type``)."""
    vp = _VP(schedule, spec)
    if timesteps is not None:
        ts = _check_custom(timesteps, "timesteps", 0, vp.T - 1 if vp.discrete else vp.T)
        if vp.discrete and np.any(ts != np.round(ts)):
            raise ValueError("`timesteps` must be integers for a discrete-time model")
        return vp.at_timesteps(ts)
    if sigmas is not None:
        rhos = _check_custom(sigmas, "sigmas", 0.0, math.inf)
        final = _check_final(final_sigma, rhos)
        if final is None and rhos[-1] == 0.0:
            rhos, final = rhos[:-1], 0.0
        if len(rhos) == 0:
            raise ValueError("`sigmas` needs at least one positive entry")
        return vp.at_sigmas(rhos, True, final)
    return _VP_GRIDS[_vp_kind(spec)](vp, num_inference_steps)


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
    final_sigma: float | None = None,
) -> Grid:
    """A grid for a flow-matching model (α = 1 − s, σ = s); timesteps are s·T as floats. With ``sigmas``,
    ``final_sigma`` is the level (before shifting) the last step lands on, as in ``vp_grid``."""
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
        final = _check_final(final_sigma, s)
        if final is None and s[-1] == 0.0:
            s, final = s[:-1], 0.0
        elif final is not None:
            final = float(shift(np.array([final]))[0]) if final > 0 else 0.0
        s = shift(s)
    else:
        n = num_inference_steps
        if (spec.use_karras_sigmas or spec.use_exponential_sigmas or spec.use_beta_sigmas) \
                and spec.flow_respacing == "rho":
            # As UniPCMultistepScheduler: respace the VE σ ρ = s/(1−s) of the flow model, then s = ρ/(1+ρ).
            lo, hi = spec.vp_rho_range or (None, None)
            rho = _sigma_spacing(spec, spec.sigma_min if spec.sigma_min is not None else lo,
                                 spec.sigma_max if spec.sigma_max is not None else hi, n)
            s = rho / (1.0 + rho)
        elif spec.use_karras_sigmas or spec.use_exponential_sigmas or spec.use_beta_sigmas:
            # As FlowMatchEulerDiscreteScheduler: shift (static or dynamic μ) first, then respace the flow noise
            # level s between the shifted ends (sigma_min / sigma_max override them, in s).
            # Its lowest level with a static shift is shifted twice (its sigma_min is already shifted at
            # construction, then shifted again with the grid); with `mu` once.
            lowest = np.array([1.0 / T]) if spec.use_dynamic_shifting else flow_shift_sigmas(np.array([1.0 / T]),
                                                                                               spec.flow_shift)
            lo = spec.sigma_min if spec.sigma_min is not None else float(shift(lowest)[0])
            hi = spec.sigma_max if spec.sigma_max is not None else 1.0
            s = _sigma_spacing(spec, lo, hi, n)
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

