"""``step()``: row i of the plan applied to the model output by the fused update (``fastsampler.kernels``).

Per step: a row lookup and one kernel call — no host read of a device value, no host→device copy, nothing that
breaks a ``torch.compile(fullgraph=True)`` graph (traced steps index a dense table by the step instead). The
run's index, history buffers, thresholding and the finiteness check live here too."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from fastsampler.adapters.thresholding import threshold_x0
from fastsampler.kernels.dispatch import get_kernel, resolve_kernel
from fastsampler.kernels.traced import apply_dense


class NonFiniteModelOutputError(FloatingPointError):
    """The model returned NaN or ±inf (or the sample passed to ``step()`` contained them)."""


class SteppingMixin:
    """``PlanScheduler``'s run state and ``step()``."""

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
