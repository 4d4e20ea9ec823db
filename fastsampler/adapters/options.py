"""Scheduler options: which preset implements which, and the checks that refuse bad values by name.

Every option is a parameter of ``PlanScheduler.__init__`` (diffusers reads the config keys from that signature)
and its default lives there only. Options that only some presets implement are listed in ``PRESET_OPTIONS``;
each preset declares the subset it implements (``_options``), so a new option is one line in the signature and
one name in the presets that implement it. An option a preset does not implement is:

* refused with a ValueError when passed explicitly (it would otherwise be silently ignored);
* dropped with one log line when it arrives inside a foreign scheduler's config (``from_config`` of a
  ``DPMSolverMultistepScheduler`` config into ``UniPCScheduler``, as diffusers does).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

import numpy as np

from fastsampler.samplers.convert import PREDICTION_TYPES
from fastsampler.schedules.noise import BETA_SCHEDULES

PRESET_OPTIONS = ("euler_at_final", "predict_x0", "disable_corrector", "solver_method", "exact_third_order",
                  "use_lu_lambdas", "lambda_min_clipped", "sde_eta")
NOISE_SCHEDULES = ("discrete", "vp_linear", "vp_cosine")
VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
MAX_ABS_MU = 20.0  # dynamic shift e^μ; Flux uses |μ| ≲ 1.2, and e^20 already maps every sigma to 1


def defaults(init) -> dict[str, Any]:
    """The default of every option, read from the scheduler's ``__init__`` signature."""
    return {name: p.default for name, p in inspect.signature(init).parameters.items()
            if p.default is not inspect.Parameter.empty}


def is_default(value: Any, default: Any) -> bool:
    if value in (None, []) and default in (None, []):
        return True
    if isinstance(value, float) and isinstance(default, float) and math.isinf(default):
        return value == default
    return value == default


def unsupported(options: Mapping[str, Any], supported: frozenset[str], init) -> list[str]:
    """The preset-specific options set away from their defaults that this preset does not implement."""
    base = defaults(init)
    return [k for k in PRESET_OPTIONS if k in options and k not in supported and not is_default(options[k], base[k])]


def _positive_finite(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite positive number, got {value!r}")


def validate_schedule_options(c: Mapping[str, Any]) -> None:
    """Noise-schedule and grid options a scheduler checks at construction, each error naming its option."""
    if c["trained_betas"] is None and c["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"`beta_schedule` must be one of {BETA_SCHEDULES}, got {c['beta_schedule']!r}")
    if c["trained_betas"] is None and c["beta_schedule"] in ("linear", "scaled_linear"):
        lo, hi = c["beta_start"], c["beta_end"]
        for name in ("beta_start", "beta_end"):
            v = c[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ValueError(f"`{name}` must lie in (0, 1), got {v!r}")
        if lo > hi:
            raise ValueError(f"`beta_start` ({lo}) must not exceed `beta_end` ({hi})")
    if c["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {c['prediction_type']!r}")
    if c["prediction_type"] == "flow_prediction" and not c["use_flow_sigmas"]:
        raise ValueError("`prediction_type='flow_prediction'` needs `use_flow_sigmas=True` (a flow-matching model)")
    if c["noise_schedule"] not in NOISE_SCHEDULES:
        raise ValueError(f"`noise_schedule` must be one of {NOISE_SCHEDULES}, got {c['noise_schedule']!r}")
    if c["time_shift_type"] != "exponential":
        raise ValueError(f"`time_shift_type` must be 'exponential', got {c['time_shift_type']!r}")
    # diffusers' ranges: the ratio is a quantile level (0 = the smallest |x̂₀|); a clamp bound below 1 makes
    # torch.clamp(s, 1, bound) return the bound, i.e. clip x̂₀ to ±bound then rescale to ±1. Zero or negative
    # bounds would divide by zero or flip signs, so only those are refused.
    ratio, bound = c["dynamic_thresholding_ratio"], c["sample_max_value"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"`dynamic_thresholding_ratio` must be a quantile level in [0, 1], got {ratio!r}")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0.0:
        raise ValueError(f"`sample_max_value` must be positive (the largest |x̂₀| scale), got {bound!r}")
    if c["variance_type"] not in VARIANCE_TYPES:
        raise ValueError(f"`variance_type` must be one of {VARIANCE_TYPES}, got {c['variance_type']!r}")
    if isinstance(c["num_train_timesteps"], bool) or not isinstance(c["num_train_timesteps"], int) \
            or c["num_train_timesteps"] < 2:
        raise ValueError(f"`num_train_timesteps` must be an integer ≥ 2, got {c['num_train_timesteps']!r}")
    steps_offset = c["steps_offset"]
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) \
            or not 0 <= steps_offset < c["num_train_timesteps"]:
        raise ValueError(f"`steps_offset` must be an integer in [0, num_train_timesteps), got {steps_offset!r}")
    _positive_finite("flow_shift", c["flow_shift"])
    _positive_finite("karras_rho", c["karras_rho"])
    for name in ("sigma_min", "sigma_max"):
        _positive_finite(name, c[name], allow_none=True)
    if c["sigma_min"] is not None and c["sigma_max"] is not None and c["sigma_min"] >= c["sigma_max"]:
        raise ValueError(f"`sigma_min` ({c['sigma_min']}) must be below `sigma_max` ({c['sigma_max']})")
    respacing = c.get("flow_respacing")
    if respacing not in FLOW_RESPACINGS:
        raise ValueError(f"`flow_respacing` must be one of {FLOW_RESPACINGS} (None: 'rho', or 'flowmatch' with "
                         f"use_dynamic_shifting), got {respacing!r}")
    if respacing == "rho" and c["use_dynamic_shifting"]:
        raise ValueError("`flow_respacing='rho'` places the noise levels between sigma_min and sigma_max and would "
                         "ignore `mu`; with use_dynamic_shifting use flow_respacing='flowmatch'")
    respaced = c["use_karras_sigmas"] or c["use_exponential_sigmas"] or c["use_beta_sigmas"]
    if c["use_flow_sigmas"] and respaced and flow_respacing(c) == "flowmatch" and c["sigma_max"] is not None \
            and c["sigma_max"] > 1.0:
        raise ValueError(f"`sigma_max` is a flow noise level s in (0, 1] with flow_respacing='flowmatch', got "
                         f"{c['sigma_max']}; flow_respacing='rho' takes sigma_min / sigma_max as ρ = s/(1−s)")
    lmc = c["lambda_min_clipped"]
    if not (isinstance(lmc, (int, float)) and not math.isnan(lmc)):
        raise ValueError(f"`lambda_min_clipped` must be a number (−inf: no clipping), got {lmc!r}")


FLOW_RESPACINGS = (None, "rho", "flowmatch")


def flow_respacing(c: Mapping[str, Any]) -> str:
    """How a flow-matching grid is respaced by Karras / exponential / beta sigmas.

    ``"rho"``: in ρ = s/(1 − s) (the VE σ of the flow model) between ``sigma_min`` and ``sigma_max`` (in ρ), by
    default the ρ range of the config's betas, then s = ρ/(1 + ρ); the shift does not enter. This is diffusers'
    ``UniPCMultistepScheduler`` (its tests fix these values) and the default. ``"flowmatch"``: shift s (static or
    by ``mu``) first, then respace s between the shifted ends, as ``FlowMatchEulerDiscreteScheduler``; the default
    with ``use_dynamic_shifting`` (``mu`` must count) and for configs converted from a FlowMatch scheduler.
    """
    chosen = c.get("flow_respacing")
    if chosen is not None:
        return chosen
    return "flowmatch" if c.get("use_dynamic_shifting") else "rho"


def validate_mu(mu: Any) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float, np.floating)) or not math.isfinite(mu) \
            or abs(mu) > MAX_ABS_MU:
        raise ValueError(f"`mu` (dynamic shift, flow_shift = e^mu) must be a finite number in "
                         f"[-{MAX_ABS_MU:g}, {MAX_ABS_MU:g}], got {mu!r}")
    return float(mu)


def refuse_foreign_model(config: Mapping[str, Any], cls_name: str) -> None:
    """Configs of models whose noise schedule we do not implement, refused by the option that says so (their
    keys would otherwise be dropped by ``from_config`` and the model sampled as a discrete linear-β VP model)."""
    if "sigma_data" in config or config.get("_class_name", "").startswith("EDM"):
        raise ValueError(f"{cls_name} does not support EDM models (config has `sigma_data` / `sigma_schedule`); "
                         "their noise schedule is σ(t) = t in the EDM preconditioning, not a VP or flow schedule")
    if config.get("timestep_type") == "continuous":
        raise ValueError(f"{cls_name} does not support `timestep_type='continuous'` (EDM-style continuous "
                         "timesteps c_noise = ¼ log σ, e.g. Stable Video Diffusion)")
