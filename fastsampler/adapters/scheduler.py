"""The diffusers scheduler contract, implemented once over a coefficient plan.

``PlanScheduler`` owns everything a pipeline touches (``set_timesteps``, ``step``, ``add_noise``,
``scale_noise``, ``scale_model_input``, ``step_index``/``begin_index``, config round trips). A named scheduler
is a thin preset that says which plan builder to use (``_build_solver``) and which options it accepts.

``set_timesteps`` computes the whole plan in float64 on the CPU; ``step`` is a row lookup and one fused update
(``fastsampler.kernels``): no ``.item()``, ``.tolist()``, ``nonzero()`` or per-step host→device copies.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from fastsampler.adapters.thresholding import threshold_x0
from fastsampler.kernels.dispatch import get_update, kernel_choice, resolve_kernel
from fastsampler.kernels.row import Row
from fastsampler.samplers.convert import PREDICTION_TYPES
from fastsampler.samplers.plan import Nodes, Plan, compile_plan
from fastsampler.schedules.grids import Grid, GridSpec, flow_grid, vp_grid
from fastsampler.schedules.noise import BETA_SCHEDULES, ContinuousVP, DiscreteVP

NOISE_SCHEDULES = ("discrete", "vp_linear", "vp_cosine")
VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


class _LRU:
    """A small least-recently-used cache: set_timesteps() with the same config and grid reuses the plan."""

    def __init__(self, size: int = 32):
        self._data: OrderedDict = OrderedDict()
        self._size = size

    def get(self, key):
        if key is None or key not in self._data:
            return None
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key, value) -> None:
        self._data[key] = value
        if len(self._data) > self._size:
            self._data.popitem(last=False)


_PLAN_CACHE = _LRU()
_ROWS_CACHE = _LRU()


class NonFiniteModelOutputError(FloatingPointError):
    """The model returned NaN or ±inf."""


class PlanScheduler(SchedulerMixin, ConfigMixin):
    """Base of every fastsampler scheduler (not used directly: pick a preset such as ``UniPCScheduler``)."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    # Preset hooks -------------------------------------------------------------------------------------
    _algorithm_types: ClassVar[tuple[str, ...]] = ()
    _algorithm_remap: ClassVar[dict[str, str]] = {}
    _solver_types: ClassVar[tuple[str, ...]] = ()
    _solver_remap: ClassVar[dict[str, str]] = {}
    _max_order: ClassVar[int] = 3
    _flow_grid: ClassVar[str] = "dpm"
    # Options a preset does not implement: setting one away from its default is an error, not a no-op.
    _unsupported: ClassVar[tuple[str, ...]] = ()

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
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        karras_rho: float = 7.0,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
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
        noise_schedule: str = "discrete",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        variance_type: str | None = None,
        kernel: str = "auto",
        check_finite: bool = True,
    ):
        self._validate_config()
        self._noise_schedule = self._make_noise_schedule()
        if isinstance(self._noise_schedule, DiscreteVP):
            self.alphas_cumprod = torch.from_numpy(self._noise_schedule.alphas_cumprod.astype(np.float32))
            self.betas = torch.from_numpy(
                1.0 - self._noise_schedule.alphas_cumprod / np.concatenate([[1.0], self._noise_schedule.alphas_cumprod[:-1]])
            ).float()
        self.init_noise_sigma = 1.0
        self._flow_shift = float(flow_shift)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy()).to(torch.int64)
        self.sigmas: torch.Tensor | None = None
        self._plan: Plan | None = None
        self._rows: list[list[Row]] | None = None
        self._grid: Grid | None = None
        self._reset_state()

    # Configuration ------------------------------------------------------------------------------------
    @property
    def algorithm(self) -> str:
        """The resolved ``algorithm_type`` (the config keeps what was passed, ``None`` meaning the default)."""
        a = self.config.algorithm_type
        a = self._algorithm_remap.get(a, a) if a is not None else self._algorithm_types[0]
        return a

    @property
    def solver_kind(self) -> str:
        s = self.config.solver_type
        return self._solver_remap.get(s, s) if s is not None else self._solver_types[0]

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """diffusers' ``from_config``; a FlowMatch scheduler's config (SD3, Flux) also switches on flow matching:
        ``use_flow_sigmas=True``, ``prediction_type="flow_prediction"`` and ``flow_shift`` = its ``shift``
        (explicit keyword arguments win)."""
        source = dict(config) if config is not None else {}
        if "shift" in source and "beta_start" not in source and "use_flow_sigmas" not in source:
            if source.get("shift_terminal") or source.get("invert_sigmas") or source.get("stochastic_sampling"):
                raise ValueError("this FlowMatch config uses shift_terminal / invert_sigmas / stochastic_sampling, "
                                 f"which {cls.__name__} does not implement")
            kwargs.setdefault("use_flow_sigmas", True)
            kwargs.setdefault("prediction_type", "flow_prediction")
            kwargs.setdefault("flow_shift", float(source["shift"]))
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _validate_config(self) -> None:
        c = self.config
        name = type(self).__name__
        if c.beta_schedule not in BETA_SCHEDULES and c.trained_betas is None:
            raise ValueError(f"`beta_schedule` must be one of {BETA_SCHEDULES}, got {c.beta_schedule!r}")
        if c.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {c.prediction_type!r}")
        if c.prediction_type == "flow_prediction" and not c.use_flow_sigmas:
            raise ValueError("`prediction_type='flow_prediction'` needs `use_flow_sigmas=True` (a flow-matching model)")
        if self.algorithm not in self._algorithm_types:
            raise ValueError(f"{name}: `algorithm_type` must be one of {self._algorithm_types}, got {c.algorithm_type!r}")
        if self.solver_kind not in self._solver_types:
            raise ValueError(f"{name}: `solver_type` must be one of {self._solver_types}, got {c.solver_type!r}")
        if not isinstance(c.solver_order, int) or not 1 <= c.solver_order <= self._max_order:
            raise ValueError(f"{name}: `solver_order` must be an integer in 1..{self._max_order}, got {c.solver_order!r}")
        if c.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"`noise_schedule` must be one of {NOISE_SCHEDULES}, got {c.noise_schedule!r}")
        if c.time_shift_type != "exponential":
            raise ValueError(f"`time_shift_type` must be 'exponential', got {c.time_shift_type!r}")
        if not 0.0 < c.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"`dynamic_thresholding_ratio` must be in (0, 1], got {c.dynamic_thresholding_ratio}")
        if c.sample_max_value < 1.0:
            raise ValueError(f"`sample_max_value` must be ≥ 1, got {c.sample_max_value}")
        if c.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"`variance_type` must be one of {VARIANCE_TYPES}, got {c.variance_type!r}")
        if c.num_train_timesteps < 2:
            raise ValueError(f"`num_train_timesteps` must be ≥ 2, got {c.num_train_timesteps}")
        defaults = {"euler_at_final": False, "predict_x0": True, "disable_corrector": None,
                    "solver_method": "multistep", "exact_third_order": False, "use_lu_lambdas": False,
                    "lambda_min_clipped": -float("inf")}
        for opt in self._unsupported:
            value = getattr(c, opt)
            if value != defaults[opt] and not (opt == "disable_corrector" and value == []):
                raise ValueError(f"{name} does not support `{opt}` (got {value!r}); leave it at {defaults[opt]!r}")
        self._grid_spec().validate()
        kernel_choice(c.kernel)

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

    def _grid_spec(self, flow_shift: float | None = None) -> GridSpec:
        c = self.config
        return GridSpec(
            timestep_spacing=c.timestep_spacing, steps_offset=c.steps_offset, use_karras_sigmas=c.use_karras_sigmas,
            karras_rho=c.karras_rho, use_exponential_sigmas=c.use_exponential_sigmas,
            use_beta_sigmas=c.use_beta_sigmas, use_lu_lambdas=c.use_lu_lambdas, use_flow_sigmas=c.use_flow_sigmas,
            flow_shift=c.flow_shift if flow_shift is None else flow_shift,
            use_dynamic_shifting=c.use_dynamic_shifting, final_sigmas_type=c.final_sigmas_type,
            lambda_min_clipped=c.lambda_min_clipped, sigma_min=c.sigma_min, sigma_max=c.sigma_max,
            flow_grid=self._flow_grid, round_timesteps=c.beta_schedule != "squaredcos_cap_v2",
        )

    def _build_solver(self, nodes: Nodes):
        raise NotImplementedError

    # Pipeline contract --------------------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        if self.num_inference_steps is not None and not 0 <= begin_index <= self.num_inference_steps:
            raise ValueError(f"`begin_index` must be in 0..{self.num_inference_steps}, got {begin_index}")
        self._begin_index = int(begin_index)

    def _reset_state(self) -> None:
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._taken = 0
        self._history: torch.Tensor | None = None
        self._saved: torch.Tensor | None = None
        self._device_table: torch.Tensor | None = None
        self._buffer_key: tuple | None = None
        self._nonfinite_step: torch.Tensor | None = None  # device-side flag of the deferred finiteness test
        self._thresholding = bool(self.config.thresholding)
        self._check = bool(self.config.check_finite)
        # DDPM's fixed_* variances only matter to ancestral sampling; learned ones add output channels to drop.
        self._learned_variance = self.config.variance_type in ("learned", "learned_range")
        self._levels = self._plan.levels if self._plan is not None else 1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the grid and the whole coefficient plan (float64, CPU); reset all per-run state.

        Exactly one of ``num_inference_steps``, ``timesteps`` (model timesteps, decreasing) and ``sigmas``
        (VP: σ/α, flow: the noise level before shifting; decreasing; a trailing 0 is taken as the final level).
        ``mu`` is the dynamic shift (Flux, SD3): flow_shift = e^μ; it needs ``use_dynamic_shifting=True``.
        """
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
                c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas or c.use_lu_lambdas):
            raise ValueError("custom `timesteps`/`sigmas` cannot be combined with use_karras_sigmas / "
                             "use_exponential_sigmas / use_beta_sigmas / use_lu_lambdas")
        if mu is not None and not (c.use_flow_sigmas and c.use_dynamic_shifting):
            raise ValueError("`mu` (dynamic shifting) needs `use_flow_sigmas=True` and `use_dynamic_shifting=True`")
        if c.use_flow_sigmas:
            grid = flow_grid(self._grid_spec(), c.num_train_timesteps, num_inference_steps, timesteps, sigmas, mu)
            self._flow_shift = math.exp(mu) if mu is not None else float(c.flow_shift)
        else:
            grid = vp_grid(self._noise_schedule, self._grid_spec(), num_inference_steps, timesteps, sigmas)
        self._install_grid(grid, device)

    def _install_grid(self, grid: Grid, device: str | torch.device | None, plan: Plan | None = None) -> None:
        nodes = Nodes.from_grid(grid)
        key = None
        if plan is None:
            key = (type(self).__name__, repr(sorted((k, v) for k, v in self.config.items() if k != "_use_default_values")),
                   grid.timesteps.tobytes(), grid.rhos.tobytes(), grid.flow)
            plan = _PLAN_CACHE.get(key)
            if plan is None:
                plan = compile_plan(self._build_solver(nodes), nodes, self.config.prediction_type)
                for table in (plan.conv, plan.x0_conv, plan.d_from_x0, plan.x_coef, plan.s_coef, plan.s_write):
                    table.flags.writeable = False  # shared through the cache
                _PLAN_CACHE.put(key, plan)
        self._grid, self._plan = grid, plan
        self._rows = _ROWS_CACHE.get(key) if key is not None else None
        if self._rows is None:
            self._rows = [
                [Row.from_coefficients(plan.write_slot[i], *plan.conv[i], plan.x_coef[w, i],
                                       plan.s_coef[w, i] if plan.s_write[w, i] else None)
                 for i in range(plan.num_steps)]
                for w in range(plan.levels)
            ]
            if key is not None:
                _ROWS_CACHE.put(key, self._rows)
        self._x0_rows = [(float(a), float(b)) for a, b in plan.x0_conv]
        self._d_from_x0 = [(float(a), float(b)) for a, b in plan.d_from_x0]
        discrete = isinstance(self._noise_schedule, DiscreteVP)
        ts = torch.from_numpy(np.asarray(grid.timesteps))
        self.timesteps = ts.to(device=device, dtype=torch.int64 if discrete else torch.float32)
        self._timesteps_np = np.asarray(grid.timesteps, dtype=np.float64)
        self.sigmas = torch.from_numpy(grid.rhos.astype(np.float32))  # stays on CPU, as in diffusers
        self._alpha_sigma = torch.from_numpy(np.stack([grid.alphas, grid.sigmas], axis=1))
        self.num_inference_steps = grid.num_steps
        self._reset_state()

    def set_plan(self, plan: Plan, device: str | torch.device | None = None) -> None:
        """Run a saved plan (e.g. from a schedule search) instead of building one."""
        grid = Grid(np.asarray(plan.meta["timesteps"]), np.asarray(plan.meta["rho"]), bool(plan.meta["flow"]))
        if plan.x_coef.shape[1] != grid.num_steps or plan.conv.shape[0] != grid.num_steps:
            raise ValueError(f"the plan has {plan.x_coef.shape[1]} rows but its grid {grid.num_steps} steps")
        if plan.meta.get("prediction_type", self.config.prediction_type) != self.config.prediction_type:
            raise ValueError(f"the plan was built for prediction_type={plan.meta['prediction_type']!r}, this "
                             f"scheduler has {self.config.prediction_type!r}")
        self._install_grid(grid, device, plan)

    def index_for_timestep(self, timestep: float | torch.Tensor,
                           schedule_timesteps: torch.Tensor | None = None) -> int:
        """diffusers' rule: the first match, the second if the timestep repeats, the last index if absent.
        Host-side lookup on a CPU copy (called once per run, never per step)."""
        value = float(np.asarray(timestep.detach().cpu() if isinstance(timestep, torch.Tensor) else timestep))
        table = self._timesteps_np if schedule_timesteps is None else \
            np.asarray(schedule_timesteps.detach().cpu(), dtype=np.float64)
        hits = np.flatnonzero(np.isclose(table, value, rtol=0, atol=1e-4))
        if len(hits) == 0:
            return len(table) - 1
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
        elif isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            # A device timestep can't be read without a sync: assume the run starts at the first timestep.
            # Pipelines that start later (img2img) call set_begin_index first.
            self._step_index = 0
        else:
            self._step_index = self.index_for_timestep(timestep)

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
        if self._rows is None:
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
        row = self._rows[min(self._taken, self._levels - 1)][i]
        history = self._history
        if history is None or self._buffer_key != (sample.shape, sample.device, sample.dtype):
            history = self._buffers(sample)
        noise = None
        if row.uses_noise:
            noise = variance_noise.to(device=sample.device, dtype=history.dtype) if variance_noise is not None else \
                randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=history.dtype)
        written = False
        if self._thresholding:
            self._write_thresholded(row, i, sample, model_output, history)
            written = True
        if self._device_table is not None:
            prev_sample, self._saved = self._update(row, sample, model_output, history, self._saved, noise, written,
                                                    coef=self._device_table[min(self._taken, self._levels - 1), i])
        else:
            prev_sample, self._saved = self._update(row, sample, model_output, history, self._saved, noise, written)
        if self._check:
            self._check_finite(history[row.write_slot], i)
        self._step_index = i + 1
        self._taken += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _buffers(self, sample: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        h = self._history
        if h is None or h.shape[1:] != sample.shape or h.device != sample.device or h.dtype != dtype:
            if h is not None and self._taken > 0:
                raise ValueError(f"`sample` changed shape/device mid-run: {tuple(h.shape[1:])} on {h.device} → "
                                 f"{tuple(sample.shape)} on {sample.device}; call set_timesteps() first")
            self._history = torch.zeros((self._plan.slots, *sample.shape), dtype=dtype, device=sample.device)
            kind = resolve_kernel(self.config.kernel, sample.device)
            self._update = get_update(kind)
            self._device_table = None
            if kind == "triton":
                # The whole coefficient table goes to the device once; step() then passes a row view.
                packed = np.stack([[r.packed for r in level] for level in self._rows])
                self._device_table = torch.as_tensor(packed, dtype=torch.float32, device=sample.device)
            self._buffer_key = (sample.shape, sample.device, sample.dtype)
        return self._history

    def _write_thresholded(self, row: Row, i: int, x: torch.Tensor, out: torch.Tensor, history: torch.Tensor) -> None:
        cx, co = self._x0_rows[i]
        xf, of = x.to(history.dtype), out.to(history.dtype)
        x0 = threshold_x0(xf * cx + of * co, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        ex, e0 = self._d_from_x0[i]
        d = history[row.write_slot]
        torch.mul(x0.to(history.dtype), e0, out=d)
        if ex != 0.0:
            d.add_(xf, alpha=ex)

    def _check_finite(self, prediction: torch.Tensor, i: int) -> None:
        # NaN/inf in the model output reaches this step's prediction D; the sum of D is non-finite exactly
        # then (barring an fp32 overflow of the sum) and costs a fraction of an elementwise isfinite pass.
        # On an accelerator reading the flag would sync, so there it is kept on the device and read once,
        # on the last step (the pipeline syncs then anyway).
        total = prediction.sum()
        if not self._defer_checks(prediction.device):
            if not math.isfinite(total):  # a CPU tensor: no device to sync with
                self._raise_nonfinite(i)
            return
        bad = ~torch.isfinite(total)
        flag = self._nonfinite_step if self._nonfinite_step is not None else \
            torch.full((), -1, dtype=torch.int64, device=prediction.device)
        self._nonfinite_step = torch.where(bad & (flag < 0), torch.full_like(flag, i), flag)
        if i == self.num_inference_steps - 1:
            first = int(self._nonfinite_step)  # ok-sync: once per run, at the end
            self._nonfinite_step = None
            if first >= 0:
                self._raise_nonfinite(first)

    @staticmethod
    def _defer_checks(device: torch.device) -> bool:
        """Whether reading a flag on ``device`` would stall the host (any accelerator)."""
        return device.type != "cpu"

    def _raise_nonfinite(self, i: int) -> None:
        t = self._timesteps_np[i]
        raise NonFiniteModelOutputError(
            f"{type(self).__name__}: the model output at step {i} (timestep {t:g}) contains NaN or inf; "
            "check the model and its dtype (fp16 overflow?), or pass check_finite=False to skip this test")

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = α_t x₀ + σ_t ε at the given timesteps (or at the current/begin index once one is set)."""
        if self._plan is None:
            raise RuntimeError(f"{type(self).__name__}: call `set_timesteps()` before `add_noise()`")
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        if self._begin_index is None:
            idx = [self.index_for_timestep(t) for t in timesteps.detach().cpu()]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * timesteps.shape[0]
        a_s = self._alpha_sigma[idx].to(device=original_samples.device, dtype=original_samples.dtype)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        return a_s[:, 0].reshape(shape) * original_samples + a_s[:, 1].reshape(shape) * noise

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Flow img2img: x_s = (1 − s)·x₀ + s·ε (same as ``add_noise``; SD3/Flux call this name)."""
        if not self.config.use_flow_sigmas:
            raise ValueError("`scale_noise` is for flow-matching configs (use_flow_sigmas=True); use `add_noise`")
        t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor([timestep])
        return self.add_noise(sample, noise, t.reshape(-1)[:1].expand(sample.shape[0]) if t.numel() == 1 else t)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = α ε − σ x₀ at integer training timesteps (for v-prediction training)."""
        if not isinstance(self._noise_schedule, DiscreteVP):
            raise ValueError("`get_velocity` is defined for discrete VP schedules")
        ab = torch.from_numpy(self._noise_schedule.alphas_cumprod)[timesteps.cpu().long()]
        shape = (-1,) + (1,) * (sample.ndim - 1)
        a = ab.sqrt().reshape(shape).to(sample.device, sample.dtype)
        s = (1 - ab).sqrt().reshape(shape).to(sample.device, sample.dtype)
        return a * noise - s * sample

    @property
    def plan(self) -> Plan | None:
        """The compiled plan of the current run (after ``set_timesteps``)."""
        return self._plan

    def __len__(self) -> int:
        return self.config.num_train_timesteps
