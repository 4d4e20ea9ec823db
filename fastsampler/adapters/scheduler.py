"""The diffusers scheduler contract, implemented once over a coefficient plan: ``PlanScheduler``.

``PlanScheduler`` owns everything a pipeline touches (``set_timesteps``, ``step``, ``add_noise``,
``scale_noise``, ``scale_model_input``, ``step_index``/``begin_index``, config and folder round trips). A named
scheduler is a thin preset that says which plan builder to use (``_build_solver``) and which preset-specific
options it implements (``_options``). Its parts, one module each (mixins of this class):

* here — the config: its parameters, their validation and ``from_config`` (FlowMatch configs, foreign options);
* ``timesteps`` — ``set_timesteps``: the noise schedule at model timesteps, the grid, building and caching the plan;
* ``installed`` — the installed plans and their device tables, ``set_plan``, ``save_pretrained`` /
  ``from_pretrained``;
* ``stepping`` — ``step()`` and the run's state; ``forward`` — ``add_noise``, ``scale_noise``, ``get_velocity``;
* ``time_shift_mixin`` — the Time-Shift sampler's part.

``set_timesteps`` builds the whole plan in float64 on the CPU (or takes an installed plan for that number of
steps) and, given a device, uploads the fused kernel's coefficient table there; ``step`` is a row lookup and one
fused update (``fastsampler.kernels``): no host read of a device value, no host→device copy, nothing that breaks a
``torch.compile(fullgraph=True)`` graph.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from fastsampler.adapters import options as opts
from fastsampler.adapters.finite import DeferredFlag
from fastsampler.adapters.forward import ForwardProcessMixin
from fastsampler.adapters.installed import InstalledPlansMixin
from fastsampler.adapters.stepping import NonFiniteModelOutputError, SteppingMixin
from fastsampler.adapters.time_shift_mixin import TimeShiftMixin
from fastsampler.adapters.timesteps import TimestepsMixin, UntunedStepsWarning
from fastsampler.kernels.dispatch import kernel_choice
from fastsampler.plans.format import Plan
from fastsampler.samplers.rules import Nodes, Transform
from fastsampler.samplers.transforms import apply_plugins, time_shift
from fastsampler.schedules.noise import DiscreteVP

logger = logging.getLogger("fastsampler")
# the two exceptions live with the parts that raise them and stay importable from here
__all__ = ["PlanScheduler", "NonFiniteModelOutputError", "UntunedStepsWarning", "logger"]


class PlanScheduler(SteppingMixin, TimestepsMixin, InstalledPlansMixin, ForwardProcessMixin, TimeShiftMixin,
                    SchedulerMixin, ConfigMixin):
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

    def _build_solver(self, nodes: Nodes):
        raise NotImplementedError

    def _build_parts(self, nodes: Nodes) -> tuple[Any, tuple[Transform, ...]]:
        """The plan builder and the transforms this scheduler's options switch on (in their documented order;
        ``fastsampler.samplers.transforms``)."""
        return apply_plugins(self.config, self._build_solver(nodes), nodes)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
