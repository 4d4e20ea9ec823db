"""fastsampler's scheduler classes by name, for the layers above that take a name (the CLI, bench and FID runs,
the k-diffusion samplers, saved scheduler folders whose ``_class_name`` is ours)."""

from __future__ import annotations

from fastsampler.adapters.presets import DCSolverScheduler, DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.adapters.s3 import S3Scheduler
from fastsampler.adapters.scheduler import PlanScheduler

SCHEDULERS: dict[str, type[PlanScheduler]] = {
    cls.__name__: cls for cls in (DPMSolverPlusPlusScheduler, DEISScheduler, UniPCScheduler, DCSolverScheduler,
                                  S3Scheduler, PlanScheduler)}


def scheduler_class(name: str) -> type[PlanScheduler] | None:
    """Our scheduler class called ``name`` (``"fastsampler."`` in front allowed); ``None`` when we have none."""
    return SCHEDULERS.get(name.removeprefix("fastsampler."))
