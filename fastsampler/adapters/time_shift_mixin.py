"""The Time-Shift sampler's part of the scheduler contract (``time_shift=True``; Li et al., ICLR 2024).

The candidate rows come from ``fastsampler.samplers.transforms.time_shift``, the device-side statistic and row
selection from ``fastsampler.kernels.time_shift``; this mixin wires them into ``PlanScheduler``'s ``set_timesteps``
(candidate table), ``step()`` (the row of the time the model was given; the next step's time written into
``self.timesteps`` in place, on the device) and ``per_sample_timesteps``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fastsampler.kernels.time_shift import DeviceCandidates, apply_dense_rows, sample_variance
from fastsampler.plans.format import Plan
from fastsampler.samplers.rules import Nodes
from fastsampler.samplers.transforms import time_shift
from fastsampler.schedules.grids import Grid
from fastsampler.schedules.noise import DiscreteVP


class TimeShiftMixin:
    """Time-Shift methods of ``PlanScheduler`` (uses its plan cache, tables, kernel and state)."""

    def _time_shift_rows(self, plan: Plan) -> time_shift.CandidateRows | None:
        """The candidate rows of ``plan`` (None when Time-Shift is off), compiled with this scheduler's builder and
        transforms, cached. A plan these options did not build (``set_plan``, a tuned folder) is refused."""
        options = time_shift.options_from_config(self.config)
        if options is None:
            return None
        grid = Grid(plan.timesteps, plan.rho, plan.flow)
        installed = any(p is plan for p in self._plans.values())
        if installed and self._compiled_plan(grid, plan.meta.get("mu")).fingerprint() != plan.fingerprint():
            raise ValueError(f"{type(self).__name__}: `time_shift=True` compiles its candidate rows from the scheduler's "
                             f"options, but the plan installed for {plan.num_steps} steps (set_plan or a tuned scheduler "
                             "folder) was built otherwise; remove_plan() it or set time_shift=False")
        time_shift.warn_if_state_is_resumed(plan)
        key = ("time_shift", plan.fingerprint(), repr(sorted((k, v) for k, v in self.config.items() if k[0] != "_")))
        rows = self._cache().get(key)
        if rows is None:
            nodes = Nodes.from_grid(grid)
            rows = time_shift.candidate_rows(plan, nodes, *self._build_parts(nodes), self.config.prediction_type,
                                             *self._time_shift_schedule(), options)
            self._cache().put(key, rows)
        return rows

    def _time_shift_schedule(self) -> tuple[Any, tuple[float, float]]:
        """(λ at model times, the model's training time range) for the candidate times."""
        c, sched = self.config, self._noise_schedule

        def lambda_at(t: np.ndarray) -> np.ndarray:
            a, s = self._alpha_sigma_at(t)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.log(a) - np.log(s)

        if c.use_flow_sigmas or isinstance(sched, DiscreteVP):
            return lambda_at, (0.0, float(c.num_train_timesteps - (0 if c.use_flow_sigmas else 1)))
        return lambda_at, (sched.t_min * 1000.0, sched.t_max * 1000.0)

    def _time_shift_on(self, device: torch.device, dtype: torch.dtype, fused: bool) -> DeviceCandidates:
        """The candidate tables on ``device`` (``fused``: with the fused kernel's packed rows), uploaded once per plan,
        device and dtype."""
        key = ("time_shift", device, dtype, fused)
        table = self._device_tables.get(key)
        if table is None:
            rows = self._time_shift
            table = DeviceCandidates.upload(rows.dense, rows.packed if fused else None, rows.times, rows.variance,
                                            device, dtype, self.timesteps.dtype)
            self._device_tables[key] = table
        return table

    def _time_shift_choice(self, timestep: Any, i: int, sample: torch.Tensor, traced: bool) -> int | torch.Tensor | None:
        """The candidate row of step i, or None for the plan's own row. Input mode: the candidate whose time the model
        was given, i.e. ``timestep`` as the caller passed it (a pipeline's entry of ``timesteps``, or one per sample);
        target mode: per sample, the target nearest the sample's variance (not on a run's first step). Eager steps
        take the plan's own row where a row cannot shift; traced steps gather on every row (one graph)."""
        rows = self._time_shift
        if not traced and not rows.shiftable[i]:
            return None
        if rows.options.mode == "target":
            return None if self._taken == 0 else self._ts_device.nearest(sample_variance(sample), i)
        if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and timestep.device.type == "cpu" \
                and sample.device.type != "cpu" and not traced:
            timestep = timestep.item()  # `timesteps` kept in host memory (DDPMPipeline): reading it is no device sync
        if not isinstance(timestep, torch.Tensor):
            c = rows.index_of(float(timestep), i)
            return None if c == rows.center else c
        if timestep.numel() not in (1, sample.shape[0]):
            raise ValueError(f"`timestep` must be one value or one per sample ({sample.shape[0]}) with time_shift=True, "
                             f"got shape {tuple(timestep.shape)}")
        return self._ts_device.index_of(timestep, i)

    def _time_shift_update(self, choice: int | torch.Tensor, level: int, i: int, slot: int, sample: torch.Tensor,
                           model_output: torch.Tensor, noise: torch.Tensor | None, written: bool,
                           traced: bool) -> torch.Tensor:
        """The update with the chosen candidate row(s), gathered on the device: the fused kernel with its packed row
        (one row for the batch, eager), else the dense form (``apply_dense_rows``: one row, or one per sample)."""
        table, flat = self._ts_device, level * self.num_inference_steps + i

        def row(rows: torch.Tensor) -> torch.Tensor:  # (W·N, C, L) → the chosen (L,) or (B, L)
            return rows[flat, choice] if isinstance(choice, int) else rows[flat].index_select(0, choice).squeeze(0)

        args = (sample, model_output, self._history, self._state, noise, written)
        if self._device_table is not None and not traced and (isinstance(choice, int) or choice.numel() == 1):
            prev_sample, self._state = self._kernel.apply(self._time_shift.kernel_rows[level][i], *args,
                                                          coef=row(table.packed))
        else:
            prev_sample, self._state = apply_dense_rows(row(table.dense), slot, *args)
        return prev_sample

    def _time_shift_next(self, i: int, prev_sample: torch.Tensor, traced: bool) -> None:
        """Input mode: the time of step i + 1 from the variance of the sample just computed, written into
        ``self.timesteps[i + 1]`` — the tensor whose entries pipelines pass to the model — as the batch's time
        (nearest the batch-mean variance), on the device; the per-sample variances are kept for
        ``per_sample_timesteps``. (A ``timesteps`` tensor in host memory while sampling on an accelerator, as
        DDPMPipeline has it, costs one copy to the host per step.)"""
        j = i + 1
        if j >= self.num_inference_steps or (not traced and not self._time_shift.shiftable[j]):
            self._shift_variance = None
            return
        table, v = self._ts_device, sample_variance(prev_sample)
        self.timesteps[j:j + 1].copy_(table.times_of(table.nearest(v.mean().reshape(1), j), j))
        self._shift_variance = v

    def per_sample_timesteps(self, batch_size: int) -> torch.Tensor:
        """The model timesteps of the next ``step()``, one per sample, for loops that condition the model per sample
        (pass the same tensor to the model and to ``step()``). With ``time_shift=True`` (input mode) each sample's
        own time, chosen by the previous step from that sample's variance; otherwise, and on a run's first step, the
        grid's timestep for every sample. Pipelines pass scalar entries of ``timesteps`` and get the batch's time."""
        if self._plan is None:
            raise RuntimeError(f"{type(self).__name__}: call `set_timesteps()` before `per_sample_timesteps()`")
        i = self._step_index if self._step_index is not None else (self._begin_index or 0)
        if i >= self.num_inference_steps:
            raise IndexError(f"no step left: all {self.num_inference_steps} steps were taken")
        v = self._shift_variance
        if v is None:
            return self.timesteps[i:i + 1].expand(batch_size)
        if v.shape[0] != batch_size:
            raise ValueError(f"`batch_size` is {batch_size}, but the last step() had {v.shape[0]} samples")
        return self._ts_device.times_of(self._ts_device.nearest(v, i), i)
