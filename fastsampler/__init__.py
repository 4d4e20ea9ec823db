"""fastsampler: fast, training-free ODE samplers for diffusion models as drop-in diffusers schedulers."""

from fastsampler.adapters.presets import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.adapters.scheduler import NonFiniteModelOutputError, PlanScheduler
from fastsampler.plans.format import Plan

__all__ = ["DPMSolverPlusPlusScheduler", "DEISScheduler", "UniPCScheduler", "PlanScheduler", "Plan",
           "NonFiniteModelOutputError"]
__version__ = "0.1.0"
