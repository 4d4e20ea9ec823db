"""Dynamic compensation (DC-Solver; Zhao, Wang, Zhou & Lu, ECCV 2024, arXiv 2409.03755) as a plan transform.

At step i, once K + 1 predictions exist (K = ``dc_order``, default 2), the prediction the step stores is replaced
by the Lagrange interpolation in model time of the newest K + 1 predictions at a shifted time

    τ_i = t_{i−1} + ρ_i (t_i − t_{i−1}),      D̂_i = Σ_{k=0..K} L_k(τ_i) · m_{i−k},
    L_k(τ) = Π_{j≠k} (τ − t_{i−j}) / (t_{i−k} − t_{i−j})

(m_i the raw prediction P of this step, m_{i−k} the stored ones). ρ_i = 1 gives τ_i = t_i and D̂_i = m_i: the plain
solver, exactly. The replacement is persistent: later steps read D̂_i as history. UniPC's corrector keeps using the
raw m_i (a rule's ``p`` term) and its predictor the compensated one, as in the official code, where the
compensation runs after the corrector and before the predictor. The interpolation variable is the model timestep
(the official diffusers code's; the LDM code's continuous t differs by an affine map, which leaves L_k unchanged).

The released code covers UniPC only; the paper's claim that DC is a plug-in for predictor-only samplers is served
by the same transform on DPM-Solver++ and DEIS (there the store is simply a time-shifted newest prediction).

Where the ratios come from (``plugin``): ``dc_ratios`` (one per step) > ``dc_ratios_file`` (JSON, ratios per step
count and guidance) > ``dc_cpr_file`` (cascade polynomial regression, evaluated at the step count and
``dc_guidance_scale``, clamped) > none (the plain solver). Files are versioned JSON carrying the configuration
they were fitted for; a mismatch warns.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fastsampler.samplers.rules import Combo, Nodes, PlanShape, Rule, Transform
from fastsampler.warn import warn

RATIOS_FORMAT = "fastsampler-dc-ratios/1"
CPR_FORMAT = "fastsampler-dc-cpr/1"
CPR_CLAMP = (0.3, 1.7)  # CPR extrapolates wildly outside its fitting box (reference note §2.4)
#: Scheduler options a ratio file records and checks (ratios are only valid for the configuration they fit).
FITTED_CONFIG_KEYS = ("prediction_type", "solver_order", "solver_type", "algorithm_type", "predict_x0",
                      "disable_corrector", "timestep_spacing", "use_karras_sigmas", "final_sigmas_type",
                      "beta_schedule", "beta_start", "beta_end", "use_flow_sigmas", "flow_shift", "dc_order")


def lagrange_weights(nodes: Sequence[Any], tau: Any) -> list[Any]:
    """[L_k(τ)] for the Lagrange basis through ``nodes``; plain arithmetic, so τ may be a float or a torch
    tensor that requires grad (the ratio search differentiates through it)."""
    weights = []
    for k, t_k in enumerate(nodes):
        w = 1.0
        for j, t_j in enumerate(nodes):
            if j != k:
                w = w * (tau - t_j) / (t_k - t_j)
        weights.append(w)
    return weights


def shifted_time(nodes: Nodes, i: int, ratio: Any) -> Any:
    """τ_i = t_{i−1} + ρ_i (t_i − t_{i−1})."""
    t_i, t_prev = float(nodes.timesteps[i]), float(nodes.timesteps[i - 1])
    return t_prev + ratio * (t_i - t_prev)


def compensation_nodes(nodes: Nodes, i: int, order: int) -> list[float] | None:
    """The model times t_i, t_{i−1}, …, t_{i−K} of step i's interpolation, or None when they are not distinct
    (repeated timesteps: the interpolation is undefined, the step stays uncompensated)."""
    ts = [float(nodes.timesteps[i - k]) for k in range(order + 1)]
    return ts if len(set(ts)) == len(ts) else None


@dataclass(frozen=True)
class DynamicCompensation(Transform):
    """Replace step i's stored prediction by Σ_k L_k(τ_i) m_{i−k} (see the module docstring)."""

    ratios: tuple[float, ...]
    order: int = 2

    name = "dc"

    def shape(self, shape: PlanShape) -> PlanShape:
        return dataclasses.replace(shape, history=max(shape.history, self.order + 1))

    def rewrite(self, rule: Rule, i: int, available: int, nodes: Nodes, shape: PlanShape) -> Rule:
        ratio = self.ratios[i]
        if ratio == 1.0 or available < self.order:
            return rule
        ts = compensation_nodes(nodes, i, self.order)
        if ts is None:
            return rule
        weights = lagrange_weights(ts, shifted_time(nodes, i, ratio))
        newest = rule.store if rule.store is not None else Combo(p=1.0)
        store = weights[0] * newest + Combo(d=(0.0, *weights[1:]))
        return dataclasses.replace(rule, store=store)

    def options(self) -> dict[str, Any]:
        return {"ratios": list(self.ratios), "order": self.order}


# Ratio files and cascade polynomial regression --------------------------------------------------------------

def fitted_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a scheduler config that ratios depend on (recorded in ratio and CPR files)."""
    return {k: options.get(k) for k in FITTED_CONFIG_KEYS if k in options}


def _check_fitted(path: str, recorded: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    current = fitted_config(options)
    diff = {k: (recorded[k], current[k]) for k in recorded if k in current and recorded[k] != current[k]}
    if diff:
        warn(f"{path} was fitted for another configuration ({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in diff.items())}); its ratios may not suit this scheduler")


def _read_json(path: str, fmt: str) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read DC file {path}: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise ValueError(f"{path} is not a DC file of format {fmt!r}")
    return obj


def ratios_from_file(path: str, num_steps: int, guidance_scale: float | None,
                     options: Mapping[str, Any]) -> list[float] | None:
    """The ratios a ratio file holds for this step count (and guidance scale, within 1e-6), or None."""
    obj = _read_json(path, RATIOS_FORMAT)
    _check_fitted(path, obj.get("config", {}), options)
    for entry in obj.get("entries", []):
        g = entry.get("guidance_scale")
        if entry["num_steps"] == num_steps and (g is None or guidance_scale is None or abs(g - guidance_scale) < 1e-6):
            return [float(r) for r in entry["ratios"]]
    return None


def cpr_features(num_steps: int, guidance_scale: float) -> np.ndarray:
    """(N, 36) design matrix of the cascade: ρ(i) = Σ_k c_k(g, n) s^k, c_k = Σ_j A_kj(n) g^{2−j},
    A_kj = Σ_l W_kjl n^{2−l}, with g = CFG/12, n = NFE/50, s = i/NFE for i = 1..NFE (reference note §2.4)."""
    g, n = guidance_scale / 12.0, num_steps / 50.0
    s = np.arange(1, num_steps + 1) / num_steps
    powers_s = np.stack([s**k for k in range(4)], axis=1)  # (N, 4)
    powers_g = np.array([g**2, g, 1.0])
    powers_n = np.array([n**2, n, 1.0])
    return np.einsum("ik,j,l->ikjl", powers_s, powers_g, powers_n).reshape(num_steps, 36)


def cpr_predict(coefficients: np.ndarray, num_steps: int, guidance_scale: float,
                clamp: tuple[float, float] = CPR_CLAMP) -> list[float]:
    """Ratios for (NFE, CFG) from the 4×3×3 CPR coefficients, clamped, with ρ_1 = ρ_2 = 1 as the official code."""
    ratios = np.clip(cpr_features(num_steps, guidance_scale) @ np.asarray(coefficients).reshape(36), *clamp)
    ratios[:2] = 1.0
    return [float(r) for r in ratios]


def _warn_outside(path: str, fitted_on: Sequence[Sequence[float]] | None, num_steps: int,
                  guidance_scale: float) -> None:
    """The regression is a quadratic: beyond the (NFE, guidance) range it was fitted on it extrapolates, and
    extrapolated ratios can double the error (digits, w = 15 from a fit on 1.5–7.5), so say so."""
    if not fitted_on:
        return
    steps, scales = [p[0] for p in fitted_on], [p[1] for p in fitted_on]
    if not (min(steps) <= num_steps <= max(steps) and min(scales) <= guidance_scale <= max(scales)):
        warn(f"`dc_cpr_file` {path} was fitted on NFE {min(steps)}–{max(steps)} and guidance "
             f"{min(scales):g}–{max(scales):g}; NFE {num_steps} at guidance {guidance_scale:g} extrapolates "
             "the regression (tune ratios for this setting: fastsampler.tune(..., method='dc'))", RuntimeWarning)


def ratios_from_cpr(path: str, num_steps: int, guidance_scale: float | None,
                    options: Mapping[str, Any]) -> list[float]:
    obj = _read_json(path, CPR_FORMAT)
    _check_fitted(path, obj.get("config", {}), options)
    if guidance_scale is None:
        raise ValueError("`dc_cpr_file` needs `dc_guidance_scale` (the guidance scale the pipeline samples with)")
    _warn_outside(path, obj.get("fitted_on"), num_steps, guidance_scale)
    return cpr_predict(np.asarray(obj["coefficients"], dtype=np.float64), num_steps, guidance_scale,
                       tuple(obj.get("clamp", CPR_CLAMP)))


# Plug-in ------------------------------------------------------------------------------------------------------

def _check_ratios(ratios: Sequence[float], num_steps: int, source: str) -> tuple[float, ...]:
    values = tuple(float(r) for r in ratios)
    if len(values) != num_steps:
        raise ValueError(f"{source} has {len(values)} ratios but the run has {num_steps} steps; give one per step")
    if not all(np.isfinite(values)) or any(r <= 0 for r in values):
        raise ValueError(f"{source} must be finite positive numbers (1.0 = no compensation), got {list(values)}")
    return values


def plugin(options: Mapping[str, Any], builder, nodes: Nodes):
    """DC from the options ``dc_ratios`` / ``dc_ratios_file`` / ``dc_cpr_file`` (with ``dc_guidance_scale``) and
    ``dc_order``; none of them set, or all ratios 1: no transform."""
    ratios, source = options.get("dc_ratios"), "`dc_ratios`"
    order = options.get("dc_order", 2)
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"`dc_order` must be 1, 2 or 3, got {order!r}")
    n, guidance = nodes.num_steps, options.get("dc_guidance_scale")
    if ratios is None and options.get("dc_ratios_file"):
        ratios, source = ratios_from_file(options["dc_ratios_file"], n, guidance, options), "`dc_ratios_file`"
    if ratios is None and options.get("dc_cpr_file"):
        ratios, source = ratios_from_cpr(options["dc_cpr_file"], n, guidance, options), "`dc_cpr_file`"
    if ratios is None:
        return builder, None
    ratios = _check_ratios(ratios, n, source)
    if all(r == 1.0 for r in ratios):
        return builder, None
    if "macro_start" in builder.registers:
        raise ValueError("dynamic compensation (`dc_ratios`) needs a multistep solver; solver_method='singlestep' "
                         "integrates from a macro-step start and has no history to interpolate")
    return builder, DynamicCompensation(ratios, order)
