"""Plans installed in a scheduler: the current run's plan and its coefficient tables on the device, the plans kept
per step count (``set_plan``, tuned folders), and their round trip through ``save_pretrained`` /
``from_pretrained`` (``fastsampler_plans.json``; ``plan_store`` holds the file format and the checks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastsampler.adapters.plan_store import PLANS_FILE, check_plan, load_plans, save_plans
from fastsampler.kernels.dispatch import resolve_kernel
from fastsampler.plans.format import Plan
from fastsampler.schedules.noise import DiscreteVP


class InstalledPlansMixin:
    """``PlanScheduler``'s installed plans, their device tables and their folder round trip."""

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
