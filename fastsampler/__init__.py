"""fastsampler: fast, training-free ODE samplers for diffusion models as drop-in diffusers schedulers."""

from fastsampler.adapters.presets import DCSolverScheduler, DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.adapters.s3 import S3Scheduler
from fastsampler.adapters.scheduler import NonFiniteModelOutputError, PlanScheduler
from fastsampler.plans.format import Plan
from fastsampler import lazy as _lazy

# DiffusionPipeline.from_pretrained(folder) finds the embedded class-conditional digits pipeline once fastsampler is
# imported; the pipeline stack itself loads only when diffusers asks for the class.
_lazy.register_pipelines()


def __getattr__(name: str):
    """Subpackages above the schedulers (``eval``, ``tuning``, ``cli``, ``shipped``) and pipeline classes load on
    first use (PEP 562), so ``import fastsampler`` costs what a scheduler costs."""
    return _lazy.resolve(__name__, name, _lazy.LAZY_ATTRIBUTES)


def assets(name: str):
    """The path of a shipped asset by name (``fastsampler.shipped.ASSETS``: models, tuned schedulers, DC files)."""
    from fastsampler.shipped import asset

    return str(asset(name))


def tune(scheduler, model, noise, num_inference_steps, method: str | None = None, **options):
    """Fit ``scheduler`` to ``model`` (``fastsampler.tuning.api.tune``; imported on first use). ``method`` defaults
    to ``fastsampler.tuning.DEFAULT_METHOD`` (``"coefficients"``)."""
    from fastsampler.tuning.api import tune as _tune

    return _tune(scheduler, model, noise, num_inference_steps, method, **options)


__all__ = ["DPMSolverPlusPlusScheduler", "DEISScheduler", "UniPCScheduler", "DCSolverScheduler", "PlanScheduler",
           "Plan", "NonFiniteModelOutputError", "tune", "assets", "S3Scheduler",
           "DigitsConditionalPipeline"]
__version__ = "0.1.0"
