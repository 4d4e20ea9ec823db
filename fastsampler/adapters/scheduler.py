"""The diffusers scheduler contract, implemented once over a coefficient plan.

``PlanScheduler`` owns everything a pipeline touches (``set_timesteps``, ``step``, ``add_noise``,
``scale_noise``, ``scale_model_input``, ``step_index``/``begin_index``, config and folder round trips). A named
scheduler is a thin preset that says which plan builder to use (``_build_solver``) and which preset-specific
options it implements (``_options``).

``set_timesteps`` builds the whole plan in float64 on the CPU (or takes an installed plan for that number of
steps) and, given a device, uploads the fused kernel's coefficient table there; ``step`` is a row lookup and one
fused update (``fastsampler.kernels``): no host read of a device value, no host→device copy, nothing that breaks a
``torch.compile(fullgraph=True)`` graph.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from fastsampler.adapters import options as opts
from fastsampler.adapters.finite import DeferredFlag
from fastsampler.adapters.time_shift_mixin import TimeShiftMixin
from fastsampler.adapters.plan_store import PLANS_FILE, check_plan, load_plans, save_plans, schedule_fingerprint
from fastsampler.adapters.thresholding import threshold_x0
from fastsampler.kernels.dispatch import get_kernel, kernel_choice, resolve_kernel
from fastsampler.kernels.traced import apply_dense
from fastsampler.plans.format import Plan
from fastsampler.samplers.rules import Nodes, Transform, compile_plan
from fastsampler.samplers.transforms import apply_plugins, time_shift
from fastsampler.schedules.grids import Grid, GridSpec, flow_grid, vp_grid
from fastsampler.schedules.noise import ContinuousVP, DiscreteVP
from fastsampler.warn import warn

logger = logging.getLogger("fastsampler")

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


class NonFiniteModelOutputError(FloatingPointError):
    """The model returned NaN or ±inf (or the sample passed to ``step()`` contained them)."""


class UntunedStepsWarning(UserWarning):
    """A scheduler with tuned plans runs a step count it has no plan for (the untuned solver, a silent fallback
    otherwise)."""


class PlanScheduler(TimeShiftMixin, SchedulerMixin, ConfigMixin):
    """Base of every fastsampler scheduler (not used directly: pick a preset such as ``UniPCScheduler``)."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers if not e.name.startswith("EDM")] + [
        "FlowMatchEulerDiscreteScheduler"]
    order = 1

    # Preset hooks -------------------------------------------------------------------------------------
    _algorithm_types: ClassVar[tuple[str, ...]] = ()
    _algorithm_remap: ClassVar[dict[str, str]] = {}
    _solver_types: ClassVar[tuple[str, ...]] = ()
    _solver_remap: ClassVar[dict[str, str]] = {}
    _max_order: ClassVar[int] = 3
    _flow_grid: ClassVar[str] = "dpm"
    # The preset-specific options (fastsampler.adapters.options.PRESET_OPTIONS) this preset implements.
    _options: ClassVar[frozenset[str]] = frozenset()

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str | None = None,
        solver_type: str | None = None,
        lower_order_final: bool | None = None,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        karras_rho: float = 7.0,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_ays_sigmas: str | None = None,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        flow_respacing: str | None = None,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        predict_x0: bool = True,
        disable_corrector: list[int] | None = None,
        solver_method: str = "multistep",
        exact_third_order: bool = False,
        sde_eta: float = 1.0,
        noise_schedule: str = "discrete",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        variance_type: str | None = None,
        kernel: str = "auto",
        check_finite: bool = True,
        dc_ratios: list[float] | None = None,
        dc_order: int = 2,
        dc_ratios_file: str | None = None,
        dc_cpr_file: str | None = None,
        dc_guidance_scale: float | None = None,
        momentum: str | None = None,
        momentum_beta: float | None = None,
        momentum_order: int | None = None,
        time_shift: bool = False,
        time_shift_window: int | None = None,
        time_shift_cutoff: int | None = None,
        time_shift_mode: str = "input",
        time_shift_data_variance: float = 0.0,
        epsilon_scaling: float | list[float] | None = None,
        dualfast: bool = False,
        dualfast_scale: float | None = None,
        dualfast_reference: str = "previous",
        dualfast_space: str | None = None,
    ):
        self._validate_config()
        # Resolved values, so that the saved config loads in diffusers' own schedulers too.
        self.register_to_config(algorithm_type=self.algorithm, solver_type=self.solver_kind,
                                disable_corrector=list(disable_corrector or []),
                                lower_order_final=self._lower_order_final_default() if lower_order_final is None
                                else lower_order_final)
        self._noise_schedule = self._make_noise_schedule()
        if isinstance(self._noise_schedule, DiscreteVP):
            ab = self._noise_schedule.alphas_cumprod
            self.alphas_cumprod = torch.from_numpy(ab.astype(np.float32))
            self.betas = torch.from_numpy(1.0 - ab / np.concatenate([[1.0], ab[:-1]])).float()
        self.init_noise_sigma = 1.0
        self._flow_shift = float(flow_shift)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy()).to(torch.int64)
        self.sigmas: torch.Tensor | None = None
        self._plan: Plan | None = None
        self._time_shift = None  # Time-Shift candidate rows (time_shift.CandidateRows), when the option is on
        self._plans: dict[int, Plan] = {}
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._finite = DeferredFlag()
        self._reset_state()

    # Configuration ------------------------------------------------------------------------------------
    @property
    def algorithm(self) -> str:
        """The resolved ``algorithm_type``."""
        a = self.config.algorithm_type
        return self._algorithm_remap.get(a, a) if a is not None else self._algorithm_types[0]

    def _lower_order_final_default(self) -> bool:
        """diffusers' default for the scheduler this config mirrors: True for multistep solvers, False for
        ``DPMSolverSinglestepScheduler`` (whose last step still drops to first order at σ = 0 or an uneven count)."""
        return self.config.get("solver_method", "multistep") != "singlestep"

    @property
    def solver_kind(self) -> str:
        s = self.config.solver_type
        return self._solver_remap.get(s, s) if s is not None else self._solver_types[0]

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """diffusers' ``from_config``, plus:

        * a FlowMatch scheduler's config (SD3, Flux) switches on flow matching: ``use_flow_sigmas=True``,
          ``prediction_type="flow_prediction"`` and ``flow_shift`` = its ``shift`` (explicit keyword arguments win);
        * EDM and continuous-timestep configs are refused by name (we would sample them as the wrong model);
        * options of another preset that this one does not implement, arriving inside the config, are dropped with
          one log line (as diffusers ignores them); passed explicitly they still raise.
        """
        source = dict(config) if config is not None else {}
        opts.refuse_foreign_model(source, cls.__name__)
        if "shift" in source and "beta_start" not in source and "use_flow_sigmas" not in source:
            if source.get("shift_terminal") or source.get("invert_sigmas") or source.get("stochastic_sampling"):
                raise ValueError("this FlowMatch config uses shift_terminal / invert_sigmas / stochastic_sampling, "
                                 f"which {cls.__name__} does not implement")
            kwargs.setdefault("use_flow_sigmas", True)
            kwargs.setdefault("prediction_type", "flow_prediction")
            kwargs.setdefault("flow_shift", float(source["shift"]))
            kwargs.setdefault("flow_respacing", "flowmatch")  # Karras / exponential / beta as that scheduler does
        # options of another fastsampler scheduler left at None (an S3 folder's usf_preset / usf_schedule) set
        # nothing: drop them rather than let diffusers warn that they "will be ignored"
        accepted = inspect.signature(cls.__init__).parameters
        source = {k: v for k, v in source.items() if not (v is None and k not in accepted and not k.startswith("_"))}
        config = source if config is not None else config
        dropped = [k for k in opts.unsupported(source, cls._options, cls.__init__) if k not in kwargs]
        if dropped and config is not None:
            logger.info("%s ignores %s from the config (options it does not implement)", cls.__name__,
                        ", ".join(f"{k}={source[k]!r}" for k in dropped))
            base = opts.defaults(cls.__init__)
            config = {**source, **{k: base[k] for k in dropped}}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _validate_config(self) -> None:
        c = self.config
        name = type(self).__name__
        opts.validate_schedule_options(c)
        if self.algorithm not in self._algorithm_types:
            raise ValueError(f"{name}: `algorithm_type` must be one of {self._algorithm_types}, got {c.algorithm_type!r}")
        if self.solver_kind not in self._solver_types:
            raise ValueError(f"{name}: `solver_type` must be one of {self._solver_types}, got {c.solver_type!r}")
        if isinstance(c.solver_order, bool) or not isinstance(c.solver_order, int) \
                or not 1 <= c.solver_order <= self._max_order:
            raise ValueError(f"{name}: `solver_order` must be an integer in 1..{self._max_order}, got {c.solver_order!r}")
        bad = opts.unsupported(c, self._options, PlanScheduler.__init__)
        if bad:
            base = opts.defaults(PlanScheduler.__init__)
            raise ValueError(f"{name} does not support `{bad[0]}` (got {getattr(c, bad[0])!r}); leave it at "
                             f"{base[bad[0]]!r}")
        self._grid_spec().validate()
        if c.use_flow_sigmas and c.flow_shift != 1.0 and opts.flow_respacing(c) == "rho" \
                and (c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas):
            logger.warning("%s: flow_shift=%s does not enter flow_respacing='rho' (the noise levels run between "
                           "sigma_min and sigma_max in ρ, as diffusers' UniPC); pass flow_respacing='flowmatch' to "
                           "shift first, as FlowMatchEulerDiscreteScheduler", name, c.flow_shift)
        kernel_choice(c.kernel)
        time_shift.options_from_config(c)

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

    def _build_solver(self, nodes: Nodes):
        raise NotImplementedError

    def _build_parts(self, nodes: Nodes) -> tuple[Any, tuple[Transform, ...]]:
        """The plan builder and the transforms this scheduler's options switch on (in their documented order;
        ``fastsampler.samplers.transforms``)."""
        return apply_plugins(self.config, self._build_solver(nodes), nodes)

    # Noise schedule at model timesteps --------------------------------------------------------------------
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

    # Pipeline contract --------------------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or (
                self.num_inference_steps is not None and not 0 <= begin_index <= self.num_inference_steps):
            raise ValueError(f"`begin_index` must be an integer in 0..{self.num_inference_steps}, got {begin_index!r}")
        self._begin_index = int(begin_index)

    def _reset_state(self) -> None:
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._taken = 0
        self._history: torch.Tensor | None = None
        self._state: Any = None
        self._kernel = None
        self._device_table: torch.Tensor | None = None
        self._buffer_key: tuple | None = None
        self._ts_device = None  # the Time-Shift candidate tables on the run's device (DeviceCandidates)
        self._shift_variance: torch.Tensor | None = None  # Time-Shift: per-sample variances for the next step
        self._thresholding = bool(self.config.thresholding)
        self._check = bool(self.config.check_finite)
        # DDPM's fixed_* variances only matter to ancestral sampling; learned ones add output channels to drop.
        self._learned_variance = self.config.variance_type in ("learned", "learned_range")

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

    def _install(self, plan: Plan, device: str | torch.device | None) -> None:
        time_shift_rows = self._time_shift_rows(plan)  # may refuse the plan: before anything changes
        if self._plan is not plan:
            self._device_tables.clear()  # tables of one plan at a time
        self._plan = plan
        self._rows = plan.rows
        self._levels = plan.levels
        self._slots = plan.slots
        self._uses_noise = plan.uses_noise
        self._x0_maps = [plan.x0_map(i) for i in range(plan.num_steps)]
        self._p_from_x0 = [plan.p_from_x0(i) for i in range(plan.num_steps)]
        discrete = isinstance(self._noise_schedule, DiscreteVP)
        ts = torch.from_numpy(np.array(plan.timesteps))
        self.timesteps = ts.to(device=device, dtype=torch.int64 if discrete else torch.float32)
        self._timesteps_np = np.array(plan.timesteps, dtype=np.float64)
        self.sigmas = torch.from_numpy(plan.rho.astype(np.float32))  # stays on CPU, as in diffusers
        self.num_inference_steps = plan.num_steps
        self._time_shift = time_shift_rows
        self._reset_state()
        if device is not None:
            dev = torch.device(device)
            fused = resolve_kernel(self.config.kernel, dev, torch.float32, plan.slots, plan.num_registers) == "triton"
            if fused:
                self._table_on(dev)
            self._dense_on(dev, torch.float32)
            if self._time_shift is not None:
                self._time_shift_on(dev, torch.float32, fused)

    def _dense_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``Plan.dense`` on ``device`` (for traced steps) as a (W·N, L) table — one flat index keeps the step
        symbolic under ``torch.compile`` — uploaded once per plan, device and dtype."""
        key = ("dense", self._plan.fingerprint(), device, dtype)
        table = self._device_tables.get(key)
        if table is None:
            dense = self._plan.dense
            table = torch.tensor(dense.reshape(-1, dense.shape[-1]), dtype=dtype, device=device)
            self._device_tables[key] = table
        return table

    def _table_on(self, device: torch.device) -> torch.Tensor:
        """The plan's packed coefficient table on ``device``, uploaded once per plan and device."""
        key = ("packed", self._plan.fingerprint(), device)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.tensor(self._plan.packed, dtype=torch.float32, device=device)
            self._device_tables[key] = table
        return table

    # Plans --------------------------------------------------------------------------------------------
    def set_plan(self, plan: Plan, device: str | torch.device | None = None) -> None:
        """Install ``plan`` for its number of steps (later ``set_timesteps(plan.num_steps)`` runs it, and
        ``save_pretrained`` keeps it) and make it the current run's plan.

        Refused, naming the difference, when the plan was built for another noise schedule, prediction type or
        grid kind."""
        if not isinstance(plan, Plan):
            raise TypeError(f"`plan` must be a fastsampler Plan, got {type(plan).__name__}")
        self._accept(plan)
        self._install(plan, device)

    def _accept(self, plan: Plan) -> None:
        """Keep ``plan`` for its step count after the checks every plan passes, however it arrives (``set_plan``,
        a scheduler folder): built for this schedule / prediction type / grid kind, coefficients within bounds."""
        check_plan(plan, self._fingerprint(plan.timesteps), self.config.prediction_type, self.config.use_flow_sigmas)
        self._check_bounds(plan)
        self._plans[plan.num_steps] = plan

    def remove_plan(self, num_inference_steps: int) -> None:
        """Forget the plan installed for ``num_inference_steps`` (set_timesteps builds from the config again)."""
        self._plans.pop(num_inference_steps, None)

    @property
    def plan(self) -> Plan | None:
        """The plan of the current run (after ``set_timesteps``)."""
        return self._plan

    @property
    def plans(self) -> dict[int, Plan]:
        """The installed plans, by number of steps (a copy)."""
        return dict(self._plans)

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs) -> None:
        """diffusers' ``save_pretrained`` plus the installed plans (``fastsampler_plans.json``)."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        save_plans(save_directory, [self._plans[n] for n in sorted(self._plans)])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = None, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """diffusers' ``from_pretrained`` plus the plans saved in the folder (local folders)."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                         return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = loaded[0] if isinstance(loaded, tuple) else loaded
        folder = Path(str(pretrained_model_name_or_path))
        if subfolder:
            folder = folder / subfolder
        if folder.is_dir():
            for plan in load_plans(folder):
                try:
                    scheduler._accept(plan)
                except ValueError as exc:
                    raise ValueError(f"{folder / PLANS_FILE} (plan for {plan.num_steps} steps): {exc}") from None
        return loaded

    # Stepping -----------------------------------------------------------------------------------------
    def index_for_timestep(self, timestep: float | torch.Tensor,
                           schedule_timesteps: torch.Tensor | None = None) -> int:
        """The first index whose timestep equals ``timestep``, or the last index if none does (diffusers'
        fallback). Host-side lookup on a CPU copy (once per run, never per step)."""
        t = timestep.detach().reshape(-1)[:1].cpu() if isinstance(timestep, torch.Tensor) else timestep
        value = float(np.asarray(t, dtype=np.float64).reshape(-1)[0])
        table = self._timesteps_np if schedule_timesteps is None else \
            np.asarray(schedule_timesteps.detach().cpu(), dtype=np.float64)
        hits = np.flatnonzero(np.isclose(table, value, rtol=0, atol=1e-4))
        return int(hits[0]) if len(hits) else len(table) - 1

    @staticmethod
    def _on_accelerator(device: torch.device) -> bool:
        """Whether reading a value on ``device`` would stall the host (any accelerator)."""
        return device.type != "cpu"

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        """The run's first index: ``set_begin_index`` if called; for a timestep that is a view into
        ``self.timesteps`` (what pipelines pass), its position, without reading the device; else a lookup of the
        value (one host read, on this first step only)."""
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        if isinstance(timestep, torch.Tensor):
            table = self.timesteps
            if timestep.device == table.device and timestep.dtype == table.dtype and table.stride(0) == 1 \
                    and timestep.untyped_storage().data_ptr() == table.untyped_storage().data_ptr():
                index = timestep.storage_offset() - table.storage_offset()
                if 0 <= index < len(table):
                    self._step_index = index
                    return
        index = self.index_for_timestep(timestep)  # ok-sync: first step only
        value = float(np.asarray(timestep.detach().reshape(-1)[:1].cpu() if isinstance(timestep, torch.Tensor)
                                 else timestep, dtype=np.float64).reshape(-1)[0])
        if not np.isclose(self._timesteps_np[index], value, rtol=0, atol=1e-4):
            raise ValueError(f"{type(self).__name__}: timestep {value:g} is not one of this run's timesteps; call "
                             "set_begin_index() or pass the entries of `scheduler.timesteps`")
        self._step_index = index

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Identity: the model takes x_t as it is for VP and flow parameterisations."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        eta: float = 0.0,
        variance_noise: torch.Tensor | None = None,
    ) -> SchedulerOutput | tuple:
        """Advance ``sample`` from timesteps[i] to timesteps[i+1] with row i of the plan.

        ``generator`` / ``variance_noise`` feed the SDE variants; ``eta`` is accepted for Stable Diffusion's
        call signature and must be 0 (these are ODE solvers; use an SDE ``algorithm_type`` for noise).
        """
        if self._plan is None:
            raise RuntimeError(f"{type(self).__name__}: call `set_timesteps()` before `step()`")
        if eta:
            raise ValueError(f"`eta` must be 0 for {type(self).__name__} (got {eta}); for stochastic sampling use "
                             "algorithm_type='sde-dpmsolver++'")
        if self._learned_variance and model_output.shape[1] == 2 * sample.shape[1]:
            model_output = model_output[:, :sample.shape[1]]  # IF / unCLIP: [prediction, variance] channels
        if model_output.shape != sample.shape:
            raise ValueError(f"`model_output` shape {tuple(model_output.shape)} does not match `sample` shape "
                             f"{tuple(sample.shape)}")
        if model_output.device != sample.device:
            raise ValueError(f"`model_output` is on {model_output.device} but `sample` is on {sample.device}")
        if not sample.is_floating_point():
            raise TypeError(f"`sample` must be a floating-point tensor, got {sample.dtype}")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise IndexError(f"step() called after the last of {self.num_inference_steps} timesteps; call "
                             "set_timesteps() to start a new run")
        level = min(self._taken, self._levels - 1)
        if self._buffer_key != (sample.shape, sample.device, sample.dtype):
            self._buffers(sample)
        history = self._history
        slot = i % self._slots
        traced = torch.compiler.is_compiling()
        row = None if traced else self._rows[level][i]
        noise = None
        if (self._uses_noise if traced else row.uses_noise):
            noise = self._noise(sample, generator, variance_noise)
        written = False
        if self._thresholding:
            self._write_thresholded(slot, i, sample, model_output, history)
            written = True
        choice = self._time_shift_choice(timestep, i, sample, traced) if self._time_shift is not None else None
        if choice is not None:
            prev_sample = self._time_shift_update(choice, level, i, slot, sample, model_output, noise, written, traced)
        elif traced:  # one graph for every steady-state step: the row is a tensor indexed by the step
            flat = (self._levels - 1 if self._taken >= self._levels - 1 else self._taken) * self.num_inference_steps + i
            prev_sample, self._state = apply_dense(self._dense_table[flat], slot, sample, model_output, history,
                                                   self._state, noise, written)
        elif self._device_table is not None:
            prev_sample, self._state = self._kernel.apply(row, sample, model_output, history, self._state, noise,
                                                          written, coef=self._device_table[level, i])
        else:
            prev_sample, self._state = self._kernel.apply(row, sample, model_output, history, self._state, noise,
                                                          written)
        if self._time_shift is not None and self._time_shift.options.mode == "input":
            self._time_shift_next(i, prev_sample, traced)
        if self._check:
            self._check_finite(history[slot], sample, model_output, i)
        self._step_index = i + 1
        self._taken += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _noise(self, sample: torch.Tensor, generator, variance_noise: torch.Tensor | None) -> torch.Tensor:
        dtype = self._history.dtype
        if variance_noise is None:
            return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=dtype)
        if variance_noise.shape != sample.shape:
            raise ValueError(f"`variance_noise` shape {tuple(variance_noise.shape)} does not match `sample` shape "
                             f"{tuple(sample.shape)}")
        return variance_noise.to(device=sample.device, dtype=dtype)

    def _buffers(self, sample: torch.Tensor) -> None:
        """History, state and kernel for this sample's shape, device and dtype (first step of a run)."""
        h = self._history
        if h is not None and self._taken > 0:
            old = self._buffer_key
            raise ValueError(f"`sample` changed mid-run: shape {tuple(old[0])} {old[2]} on {old[1]} → "
                             f"{tuple(sample.shape)} {sample.dtype} on {sample.device}; call set_timesteps() first")
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        plan = self._plan
        self._history = torch.zeros((plan.slots, *sample.shape), dtype=dtype, device=sample.device)
        kind = resolve_kernel(self.config.kernel, sample.device, sample.dtype, plan.slots, plan.num_registers)
        self._kernel = get_kernel(kind)
        self._state = self._kernel.init_state(plan.num_registers, self._history[0])
        self._device_table = self._table_on(sample.device) if self._kernel.uses_device_table else None
        self._dense_table = self._dense_on(sample.device, dtype)
        if self._time_shift is not None:
            self._ts_device = self._time_shift_on(sample.device, dtype, self._kernel.uses_device_table)
        if self._thresholding:
            self._threshold_table = torch.tensor([[*self._x0_maps[i], *self._p_from_x0[i]]
                                                  for i in range(plan.num_steps)], dtype=dtype, device=sample.device)
        self._buffer_key = (sample.shape, sample.device, sample.dtype)

    def _write_thresholded(self, slot: int, i: int, x: torch.Tensor, out: torch.Tensor, history: torch.Tensor) -> None:
        """P from the clamped x̂₀ (thresholding), written to this step's slot before the update."""
        if torch.compiler.is_compiling():  # coefficients as tensors indexed by the step: one graph for all steps
            cx, co, ex, e0 = self._threshold_table[i].unbind(0)
        else:
            (cx, co), (ex, e0) = self._x0_maps[i], self._p_from_x0[i]
        xf, of = x.to(history.dtype), out.to(history.dtype)
        x0 = threshold_x0(xf * cx + of * co, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        p = x0.to(history.dtype) * e0
        history[slot] = p + xf * ex if torch.compiler.is_compiling() or ex != 0.0 else p

    def _check_finite(self, prediction: torch.Tensor, sample: torch.Tensor, model_output: torch.Tensor,
                      i: int) -> None:
        if torch.compiler.is_compiling() or self._on_accelerator(prediction.device):
            self._finite.update(prediction, i)
            self._finite.publish()
            first = self._finite.poll()
            if first is not None:
                self._finite.drain()
                self._raise_nonfinite(first)
            return
        if not math.isfinite(prediction.sum()):  # a CPU tensor: no device to sync with
            self._raise_nonfinite(i, sample, model_output)

    def _raise_nonfinite(self, i: int, sample: torch.Tensor | None = None,
                         model_output: torch.Tensor | None = None) -> None:
        t = self._timesteps_np[i] if self._plan is not None and i < len(self._timesteps_np) else float("nan")
        if sample is not None and not bool(torch.isfinite(sample).all()):
            what = "the `sample` passed to step()"
        elif model_output is not None:
            what = "the model output"
        else:
            what = "the model output (or the sample passed to step())"
        raise NonFiniteModelOutputError(
            f"{type(self).__name__}: {what} at step {i} (timestep {t:g}) contains NaN or inf; check the model and "
            "its dtype (fp16 overflow?), or pass check_finite=False to skip this test")

    def _raise_pending_nonfinite(self) -> None:
        first = self._finite.drain()
        if first is not None:
            self._raise_nonfinite(first)

    def raise_if_nonfinite(self) -> None:
        """Wait for the accelerator's pending finiteness checks of this run and raise if one failed (on the CPU
        every step checks at once)."""
        self._raise_pending_nonfinite()

    # Forward process ----------------------------------------------------------------------------------
    def _timestep_array(self, timesteps: int | float | Sequence[float] | torch.Tensor) -> np.ndarray:
        if isinstance(timesteps, torch.Tensor):
            return np.asarray(timesteps.detach().cpu(), dtype=np.float64).reshape(-1)  # ok-sync: once per run
        return np.asarray(timesteps, dtype=np.float64).reshape(-1)

    def _forward_coefficients(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) as (B, 1, …) tensors in ``like``'s dtype and device, at the model timesteps: the training
        ᾱ at integer timesteps of a discrete schedule (exactly as ``DDPMScheduler``), the schedule elsewhere."""
        t = self._timestep_array(timesteps)
        c = self.config
        if not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(t > c.num_train_timesteps):
            raise ValueError(f"`timesteps` must lie in [0, {c.num_train_timesteps}], got {t.tolist()}")  # numpy: ok-sync
        shape = (-1,) + (1,) * (like.ndim - 1)
        if isinstance(self._noise_schedule, DiscreteVP) and np.all(t == np.round(t)) and np.all(t < c.num_train_timesteps):
            ab = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[torch.from_numpy(t.astype(np.int64)).to(like.device)]
            return (ab**0.5).reshape(shape), ((1 - ab) ** 0.5).reshape(shape)
        a, s = self._alpha_sigma_at(t)
        return (torch.from_numpy(a).to(like.device, like.dtype).reshape(shape),
                torch.from_numpy(s).to(like.device, like.dtype).reshape(shape))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: int | float | Sequence[float] | torch.Tensor) -> torch.Tensor:
        """x_t = α_t x₀ + σ_t ε at the given model timesteps (one per sample, or one for all), with or without
        ``set_timesteps``: equal to ``DDPMScheduler.add_noise`` at integer timesteps of a discrete schedule, and
        to FlowMatch's (1 − s) x₀ + s ε with s = t / num_train_timesteps for flow models."""
        a, s = self._forward_coefficients(timesteps, original_samples)
        return a * original_samples + s * noise

    def scale_noise(self, sample: torch.Tensor, timestep: int | float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Flow img2img: x_s = (1 − s)·x₀ + s·ε (``add_noise`` under the name SD3/Flux call)."""
        if not self.config.use_flow_sigmas:
            raise ValueError("`scale_noise` is for flow-matching configs (use_flow_sigmas=True); use `add_noise`")
        return self.add_noise(sample, noise, timestep)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = α ε − σ x₀ at the given timesteps (for v-prediction training), with the same α, σ as ``add_noise``."""
        a, s = self._forward_coefficients(timesteps, sample)
        return a * noise - s * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
