"""``S3Scheduler``: a USF / S³ solver schedule (arXiv 2312.07243) as a drop-in diffusers scheduler.

The schedule comes from the config, so ``save_pretrained`` / ``from_pretrained`` / ``from_config`` carry it:

* ``usf_schedule`` — a schedule in its JSON form (``USFSchedule.to_dict()``; a ``USFSchedule`` is accepted and
  stored as its dict): fixed per-step choices for N steps, with or without time points;
* ``usf_preset`` — a named point of the space built for whatever grid ``set_timesteps`` makes (``PRESETS``:
  ``dpmsolver++2m``, ``dpmsolver++3m``, ``unipc-bh1-2``, ``unipc-bh2-3``, …; honours ``lower_order_final``);
* neither: ``DEFAULT_PRESET``.

A schedule with N steps runs only with N steps: ``set_timesteps(N)`` (or no number when it carries time points,
which then make the grid). ``S3Scheduler.from_released(path)`` loads a released S³ ``.pth`` (or its JSON export;
see ``fastsampler.samplers.usf_released`` for what is supported).

ConfigMixin reads a scheduler's config keys from the signature of ``cls.__init__``; an ``__init__(**kwargs)``
would hide the base options, so ``S3Scheduler.__init__`` has the base signature with the two options appended
and calls the base initialiser undecorated (the options are registered once).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from diffusers.configuration_utils import register_to_config
# DiffusionPipeline.from_pretrained looks the loading base class up by name in the class's module.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from fastsampler.adapters.scheduler import PlanScheduler
from fastsampler.samplers.rules import Nodes
from fastsampler.samplers.usf import USF
from fastsampler.samplers.usf_presets import PRESETS, preset_schedule
from fastsampler.samplers.usf_released import load_released
from fastsampler.samplers.usf_schedule import USFSchedule

DEFAULT_PRESET = "unipc-bh2-2"


def _init(self, *args: Any, usf_preset: str | None = None, usf_schedule: Mapping[str, Any] | None = None,
          **kwargs: Any) -> None:
    if isinstance(usf_schedule, USFSchedule):  # keep the config JSON-able
        self.register_to_config(usf_schedule=usf_schedule.to_dict())
    PlanScheduler.__init__.__wrapped__(self, *args, **kwargs)


_BASE = inspect.signature(PlanScheduler.__init__)
_init.__signature__ = _BASE.replace(parameters=[
    *_BASE.parameters.values(),
    inspect.Parameter("usf_preset", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None"),
    inspect.Parameter("usf_schedule", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation="Mapping[str, Any] | None"),
])


class S3Scheduler(PlanScheduler):
    """USF / S³ (Liu, Ning, Yang & Wang, ICLR 2024, arXiv 2312.07243): per-step solver choices searched for a
    model, run on the plan engine. Options ``usf_schedule`` / ``usf_preset`` (module docstring)."""

    # The resolved algorithm/solver names are stored for config interchange with diffusers' schedulers only.
    _algorithm_types = ("dpmsolver++",)
    _algorithm_remap = {"dpmsolver": "dpmsolver++", "sde-dpmsolver++": "dpmsolver++", "sde-dpmsolver": "dpmsolver++",
                        "deis": "dpmsolver++"}
    _solver_types = ("midpoint",)
    _solver_remap = {"heun": "midpoint", "bh1": "midpoint", "bh2": "midpoint", "logrho": "midpoint"}
    _options = frozenset({"use_lu_lambdas", "lambda_min_clipped"})

    __init__ = register_to_config(_init)

    # Configuration ------------------------------------------------------------------------------------
    def _validate_config(self) -> None:
        super()._validate_config()
        c = self.config
        preset, schedule = c.get("usf_preset"), c.get("usf_schedule")
        if preset is not None and schedule is not None:
            raise ValueError("S3Scheduler: set `usf_schedule` or `usf_preset`, not both")
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"S3Scheduler: `usf_preset` must be one of {sorted(PRESETS)}, got {preset!r}")
        try:
            self._usf_schedule = USFSchedule.from_dict(schedule) if schedule is not None else None
        except ValueError as exc:
            raise ValueError(f"S3Scheduler: `usf_schedule` is invalid: {exc}") from None

    @property
    def usf_schedule(self) -> USFSchedule | None:
        """The fixed schedule of ``usf_schedule`` (None for a preset, which is built per grid)."""
        return self._usf_schedule

    @property
    def usf_preset(self) -> str | None:
        """The preset in use (None when ``usf_schedule`` is set)."""
        if self._usf_schedule is not None:
            return None
        return self.config.get("usf_preset") or DEFAULT_PRESET

    def _build_solver(self, nodes: Nodes) -> USF:
        schedule = self._usf_schedule
        if schedule is None:
            schedule = preset_schedule(self.usf_preset, nodes, self.config.lower_order_final)
        elif schedule.num_steps != nodes.num_steps:
            raise ValueError(f"S3Scheduler: `usf_schedule` has {schedule.num_steps} steps, the grid {nodes.num_steps}")
        return USF(schedule)

    # Grid -----------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
                      mu: float | None = None, final_sigma: float | None = None) -> None:
        """As ``PlanScheduler.set_timesteps``; with a fixed ``usf_schedule`` the number of steps must be the
        schedule's, and its time points (if any) make the grid unless ``timesteps`` / ``sigmas`` are given."""
        schedule = self._usf_schedule
        if schedule is not None and timesteps is None and sigmas is None and num_inference_steps not in self._plans:
            n = schedule.num_steps
            if num_inference_steps is not None and num_inference_steps != n:
                raise ValueError(f"S3Scheduler: the `usf_schedule` has {n} steps, set_timesteps got "
                                 f"num_inference_steps={num_inference_steps} (call the pipeline with "
                                 f"num_inference_steps={n})")
            if schedule.timesteps is not None:
                num_inference_steps, timesteps = None, list(schedule.timesteps)
            elif schedule.sigmas is not None:
                num_inference_steps, sigmas = None, list(schedule.sigmas)
            else:
                num_inference_steps = n
        super().set_timesteps(num_inference_steps, device, timesteps, sigmas, mu, final_sigma)

    # Released schedules ---------------------------------------------------------------------------------
    @classmethod
    def from_released(cls, path: str | Path, config: Mapping[str, Any] | None = None, *,
                      time_input: str | None = "auto", ignore_skip_coefficients: bool = False,
                      **kwargs: Any) -> "S3Scheduler":
        """A scheduler running the released S³ schedule at ``path`` (``.pth`` or its ``.json`` export), with the
        pipeline's scheduler ``config`` (or keyword options) for the noise schedule."""
        schedule = load_released(path, time_input, ignore_skip_coefficients).to_dict()
        if config is None:
            return cls(usf_schedule=schedule, **kwargs)
        return cls.from_config(config, usf_schedule=schedule, **kwargs)
