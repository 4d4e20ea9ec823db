"""fastsampler: fast, training-free ODE samplers for diffusion models as drop-in diffusers schedulers."""

from fastsampler import lazy as _lazy

# DiffusionPipeline.from_pretrained(folder) finds the embedded class-conditional digits pipeline once fastsampler is
# imported; the pipeline stack itself loads only when diffusers asks for the class.
_lazy.register_pipelines_on_import()


def __getattr__(name: str):
    """The scheduler classes, the subpackages above them (``eval``, ``tuning``, ``cli``, ``shipped``) and pipeline
    classes load on first use (PEP 562): ``import fastsampler`` imports neither torch nor diffusers, and a
    scheduler costs what its own modules cost."""
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
