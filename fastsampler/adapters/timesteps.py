"""``set_timesteps``: the noise schedule at model timesteps, the grid and the whole coefficient plan.

The plan is built in float64 on the CPU from the grid (``fastsampler.schedules.grids``), the preset's builder and
the transforms its options switch on (``fastsampler.samplers``), refused when its coefficients would amplify
rounding beyond use, and cached: the same config and grid reuse the plan (plans are immutable)."""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fastsampler.adapters import options as opts
from fastsampler.adapters.plan_store import schedule_fingerprint
from fastsampler.plans.format import Plan
from fastsampler.samplers.rules import Nodes, compile_plan
from fastsampler.schedules.grids import Grid, GridSpec, flow_grid, vp_grid
from fastsampler.schedules.noise import ContinuousVP, DiscreteVP
from fastsampler.warn import warn


#: |coefficient| above which a plan is refused: such a plan amplifies fp32 rounding of the model output past
#: anything a sample survives (e.g. noise-form UniPC on flow sigmas divides by α = 1e-6 at the first node).
MAX_COEFFICIENT = 1e5


class _LRU:
    """A small thread-safe least-recently-used cache: set_timesteps() with the same config and grid reuses the
    plan (plans are immutable, so sharing them is safe)."""

    def __init__(self, size: int = 32):
        self._data: OrderedDict = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._data[key] = value
            if len(self._data) > self._size:
                self._data.popitem(last=False)


_PLAN_CACHE = _LRU()


OPTION_FILES = ("dc_ratios_file", "dc_cpr_file")  # options naming files whose contents shape the plan


class UntunedStepsWarning(UserWarning):
    """A scheduler with tuned plans runs a step count it has no plan for (the untuned solver, a silent fallback
    otherwise)."""


class TimestepsMixin:
    """``PlanScheduler``'s noise schedule, grid and plan building (``set_timesteps``)."""

    def _make_noise_schedule(self) -> DiscreteVP | ContinuousVP | None:
        c = self.config
        if c.use_flow_sigmas:
            return None
        if c.noise_schedule == "vp_linear":
            return ContinuousVP("linear")
        if c.noise_schedule == "vp_cosine":
            return ContinuousVP("cosine")
        return DiscreteVP.from_config(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule,
                                      c.trained_betas, c.rescale_betas_zero_snr)

    def _grid_spec(self) -> GridSpec:
        c = self.config
        return GridSpec(
            timestep_spacing=c.timestep_spacing, steps_offset=c.steps_offset, use_karras_sigmas=c.use_karras_sigmas,
            karras_rho=c.karras_rho, use_exponential_sigmas=c.use_exponential_sigmas,
            use_beta_sigmas=c.use_beta_sigmas, use_lu_lambdas=c.use_lu_lambdas, use_ays_sigmas=c.use_ays_sigmas,
            use_flow_sigmas=c.use_flow_sigmas,
            flow_shift=c.flow_shift, use_dynamic_shifting=c.use_dynamic_shifting,
            final_sigmas_type=c.final_sigmas_type, lambda_min_clipped=c.lambda_min_clipped, sigma_min=c.sigma_min,
            sigma_max=c.sigma_max, flow_grid=self._flow_grid, round_timesteps=c.beta_schedule != "squaredcos_cap_v2",
            flow_respacing=opts.flow_respacing(c), vp_rho_range=self._vp_rho_range(),
        )

    def _vp_rho_range(self) -> tuple[float, float] | None:
        """(ρ_min, ρ_max) of the config's discrete VP betas: the default ends of ``flow_respacing="rho"`` (as
        diffusers' UniPC, which takes them from ``alphas_cumprod`` even for a flow model)."""
        c = self.config
        respaced = c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas
        if not (c.use_flow_sigmas and respaced and opts.flow_respacing(c) == "rho"):
            return None
        vp = DiscreteVP.from_config(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas,
                                    c.rescale_betas_zero_snr)
        return float(vp.rhos.min()), float(vp.rhos.max())

    def _schedule_kind(self) -> str:
        if self.config.use_flow_sigmas:
            return "flow"
        return "discrete" if isinstance(self._noise_schedule, DiscreteVP) else self.config.noise_schedule

    def _alpha_sigma_at(self, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(α, σ) of the noise schedule at model timesteps (float64): what the model was trained to see."""
        t = np.asarray(timesteps, dtype=np.float64)
        if self.config.use_flow_sigmas:
            s = t / self.config.num_train_timesteps
            return 1.0 - s, s
        sched = self._noise_schedule
        rho = sched.rho_at(t) if isinstance(sched, DiscreteVP) else sched.rho_at(t / 1000.0)
        alpha = 1.0 / np.sqrt(1.0 + rho**2)
        return alpha, rho * alpha

    def model_timesteps(self, rho: np.ndarray) -> np.ndarray:
        """The model time of noise levels ρ (VP: σ/α; flow: s), inverse of the schedule (float64, fractional
        for discrete models: a teacher or a tuned grid may sit between training timesteps)."""
        rho = np.asarray(rho, dtype=np.float64)
        if self.config.use_flow_sigmas:
            return rho * self.config.num_train_timesteps
        sched = self._noise_schedule
        return sched.t_from_rho(rho) if isinstance(sched, DiscreteVP) else sched.t_from_rho(rho) * 1000.0

    def training_rho_range(self) -> tuple[float, float]:
        """(smallest, largest) noise level ρ the model was trained on."""
        c = self.config
        if c.use_flow_sigmas:
            return 1.0 / c.num_train_timesteps, 1.0
        sched = self._noise_schedule
        if isinstance(sched, DiscreteVP):
            return float(sched.rhos[0]), float(sched.rhos[-1])
        return float(sched.rho_at(sched.t_min)), float(sched.rho_at(sched.t_max))

    def _fingerprint(self, timesteps: np.ndarray) -> dict[str, Any]:
        return schedule_fingerprint(self._schedule_kind(), self.config.num_train_timesteps,
                                    *self._alpha_sigma_at(timesteps))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        final_sigma: float | None = None,
    ) -> None:
        """Build the grid and the whole coefficient plan (float64, CPU), or take the plan installed for
        ``num_inference_steps`` (``set_plan`` / a tuned scheduler folder); reset all per-run state.

        Exactly one of ``num_inference_steps``, ``timesteps`` (model timesteps, decreasing) and ``sigmas``
        (VP: σ/α, flow: the noise level before shifting; decreasing; a trailing 0 is taken as the final level).
        ``final_sigma`` (with ``sigmas``): the level the last step lands on, not a node (k-diffusion's last sigma).
        ``mu`` is the dynamic shift (Flux, SD3): flow_shift = e^μ; it needs ``use_dynamic_shifting=True``.
        With ``device`` the fused kernel's coefficient table is uploaded there now, not in the first ``step()``.
        """
        self._raise_pending_nonfinite()
        c = self.config
        given = [n for n, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of `num_inference_steps`, `timesteps`, `sigmas` (got {given or 'none'})")
        if num_inference_steps is not None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                    or num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
            if c.noise_schedule == "discrete" and not c.use_flow_sigmas and num_inference_steps > c.num_train_timesteps:
                raise ValueError(f"`num_inference_steps` ({num_inference_steps}) cannot exceed "
                                 f"`num_train_timesteps` ({c.num_train_timesteps})")
            num_inference_steps = int(num_inference_steps)
        if (timesteps is not None or sigmas is not None) and (
                c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas or c.use_lu_lambdas
                or c.use_ays_sigmas):
            raise ValueError("custom `timesteps`/`sigmas` cannot be combined with use_karras_sigmas / "
                             "use_exponential_sigmas / use_beta_sigmas / use_lu_lambdas / use_ays_sigmas")
        if final_sigma is not None and sigmas is None:
            raise ValueError("`final_sigma` goes with `sigmas` (the level their last step lands on)")
        if mu is not None:
            if not (c.use_flow_sigmas and c.use_dynamic_shifting):
                raise ValueError("`mu` (dynamic shifting) needs `use_flow_sigmas=True` and `use_dynamic_shifting=True`")
            mu = opts.validate_mu(mu)
        installed = self._plans.get(num_inference_steps) if num_inference_steps is not None else None
        if installed is not None:
            planned_mu = installed.meta.get("mu")
            if c.use_dynamic_shifting and (mu is None or planned_mu is None or abs(planned_mu - mu) > 1e-6):
                raise ValueError(f"the plan installed for {num_inference_steps} steps was built for mu={planned_mu!r}, "
                                 f"set_timesteps got mu={mu!r}; tune for this mu (image size) or remove the plan")
            self._install(installed, device)
            return
        if self._plans and num_inference_steps is not None and timesteps is None and sigmas is None:
            warn(f"{type(self).__name__}: no tuned plan for {num_inference_steps} steps (tuned: "
                 f"{', '.join(map(str, sorted(self._plans)))}); sampling with the untuned solver instead",
                 UntunedStepsWarning)
        if c.use_flow_sigmas:
            grid = flow_grid(self._grid_spec(), c.num_train_timesteps, num_inference_steps, timesteps, sigmas, mu,
                             final_sigma)
            self._flow_shift = math.exp(mu) if mu is not None else float(c.flow_shift)
        else:
            grid = vp_grid(self._noise_schedule, self._grid_spec(), num_inference_steps, timesteps, sigmas,
                           final_sigma)
        self._install(self._compiled_plan(grid, mu), device)

    @staticmethod
    def _cache() -> _LRU:
        """The plan cache shared by every scheduler (plans and Time-Shift candidate rows are immutable)."""
        return _PLAN_CACHE

    def _compiled_plan(self, grid: Grid, mu: float | None) -> Plan:
        key = (type(self).__name__, repr(sorted((k, v) for k, v in self.config.items() if not k.startswith("_"))),
               grid.timesteps.tobytes(), grid.rhos.tobytes(), grid.flow, mu, self._option_file_digests())
        plan = _PLAN_CACHE.get(key)
        if plan is None:
            nodes = Nodes.from_grid(grid)
            meta = {"scheduler": type(self).__name__, "schedule": self._fingerprint(grid.timesteps)}
            if mu is not None:
                meta["mu"] = mu
            try:
                builder, transforms = self._build_parts(nodes)
                plan = compile_plan(builder, nodes, self.config.prediction_type, transforms, meta)
            except FloatingPointError as exc:
                raise ValueError(f"{type(self).__name__}: {exc}; {self._bound_hint()}") from None
            self._check_bounds(plan)
            _PLAN_CACHE.put(key, plan)
        return plan

    def _option_file_digests(self) -> tuple:
        """Contents of the files options name (DC ratio / CPR files): a file rewritten at the same path (a refit)
        must not reuse the plan compiled from its old contents."""
        digests = []
        for option in OPTION_FILES:
            path = self.config.get(option)
            if path:
                try:
                    digests.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
                except OSError:
                    digests.append(None)  # the plug-in reports the missing file
        return tuple(digests)

    def _bound_hint(self) -> str:
        """Which options usually cause unusable coefficients (presets name their own noise-form option)."""
        return ("noise-form solvers divide by α, which is tiny at the first node of a flow grid or a zero-SNR "
                "schedule; use a data-form solver there")

    def _check_bounds(self, plan: Plan) -> None:
        """Refuse plans whose coefficients would amplify rounding beyond use, naming the cause: the conversion of
        the model output (``out_map``: x̂₀ = (x − σ·ε)/α divides by α) or the solver's own form (``coef``)."""
        worst_map = np.abs(plan.out_map).max(axis=1)
        worst_coef = np.abs(plan.coef).max(axis=(0, 2, 3))
        if max(worst_map.max(), worst_coef.max()) <= MAX_COEFFICIENT:
            return
        if worst_map.max() > MAX_COEFFICIENT:
            step, worst = int(np.argmax(worst_map > MAX_COEFFICIENT)), float(worst_map.max())
            cause = (f"prediction_type={self.config.prediction_type!r} is turned into the solver's prediction by "
                     f"dividing by α, which is {plan.alpha[step]:.3g} there; a flow-matching model predicts "
                     "prediction_type='flow_prediction', and a grid that starts below pure noise keeps α away from 0")
        else:
            step, worst = int(np.argmax(worst_coef > MAX_COEFFICIENT)), float(worst_coef.max())
            cause = self._bound_hint()
        raise ValueError(f"{type(self).__name__}: this configuration gives plan coefficients up to {worst:.3g} "
                         f"(step {step}, α = {plan.alpha[step]:.3g}), which would amplify rounding errors beyond "
                         f"use; {cause}")
