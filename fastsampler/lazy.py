"""Names that load on first use (PEP 562), so ``import fastsampler`` costs what a scheduler costs.

Two places take such names:

- ``fastsampler`` itself: its scheduler classes, its subpackages above them (``models``, ``runtime``, ``eval``,
  ``tuning``, ``cli``, ``shipped``) and the pipeline class resolve through the package's module ``__getattr__``,
  which :func:`resolve` implements — so ``import fastsampler`` (and the CLI's ``--help``) imports neither torch
  nor diffusers.
- ``diffusers``: its generic ``DiffusionPipeline.from_pretrained(folder)`` looks ``model_index.json``'s
  ``_class_name`` up with ``getattr(diffusers, name)``. :func:`register_pipelines` teaches the ``diffusers`` module
  object our pipeline names without importing them: the module's class gets a ``__getattr__`` that imports the
  pipeline's module the first time diffusers (or anyone) asks for it, then caches the class as a plain attribute.
  :func:`register_pipelines_on_import` does this when diffusers is imported, now or later.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

#: attribute of ``fastsampler`` → module it lives in (a module itself when the attribute is the module's last part)
LAZY_ATTRIBUTES: dict[str, str] = {
    **{name: "fastsampler.adapters.presets" for name in
       ("DPMSolverPlusPlusScheduler", "DEISScheduler", "UniPCScheduler", "DCSolverScheduler")},
    "S3Scheduler": "fastsampler.adapters.s3",
    "PlanScheduler": "fastsampler.adapters.scheduler",
    "NonFiniteModelOutputError": "fastsampler.adapters.scheduler",
    "Plan": "fastsampler.plans.format",
    "models": "fastsampler.models",
    "runtime": "fastsampler.runtime",
    "eval": "fastsampler.eval",
    "tuning": "fastsampler.tuning",
    "k_diffusion": "fastsampler.k_diffusion",
    "cli": "fastsampler.cli",
    "shipped": "fastsampler.shipped",
    "DigitsConditionalPipeline": "fastsampler.models.digits_pipeline",
}

#: pipeline classes ``diffusers`` resolves by name → module that defines them
PIPELINES: dict[str, str] = {"DigitsConditionalPipeline": "fastsampler.models.digits_pipeline"}


def load(name: str, module_name: str) -> Any:
    """``name`` from ``module_name``: the module itself when its last dotted part is ``name``, else its attribute."""
    module = importlib.import_module(module_name)
    return module if module_name.rsplit(".", 1)[-1] == name else getattr(module, name)


def resolve(package: str, name: str, table: dict[str, str]) -> Any:
    """A package's module ``__getattr__``: load ``name`` from ``table``, cache it on the package."""
    if name not in table:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = load(name, table[name])
    setattr(sys.modules[package], name, value)
    return value


def _with_lazy_names(module: ModuleType, names: dict[str, str]) -> type[ModuleType]:
    """A subclass of ``type(module)`` whose ``__getattr__`` also answers ``names`` (its base's answers the rest)."""
    base = type(module)

    class LazyNames(base):  # type: ignore[misc, valid-type]
        _fastsampler_lazy_names = names

        def __getattr__(self, name: str) -> Any:
            if name in names:
                value = load(name, names[name])
                setattr(self, name, value)
                return value
            fallback = getattr(base, "__getattr__", None)
            if fallback is None:
                raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
            return fallback(self, name)

    LazyNames.__name__ = LazyNames.__qualname__ = f"{base.__name__}WithFastsamplerPipelines"
    return LazyNames


def register_pipelines(module: ModuleType | None = None) -> None:
    """Make :data:`PIPELINES` resolvable as attributes of ``diffusers`` (default) without importing them now.

    Idempotent; names the module already has are left alone.
    """
    if module is None:
        import diffusers as module  # the package only: its submodules stay unloaded (a lazy module)
    missing = {n: m for n, m in PIPELINES.items() if n not in vars(module)}
    if not missing or getattr(type(module), "_fastsampler_lazy_names", None) is not None:
        return
    module.__class__ = _with_lazy_names(module, missing)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``name`` with the other finders and runs ``then(module)`` once it has been executed (a post-import
    hook: the module's own loader does the work)."""

    def __init__(self, name: str, then) -> None:
        self.name, self.then, self.loader, self.busy = name, then, None, False

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != self.name or self.busy:
            return None
        self.busy = True  # the other finders' answer, not this one's again
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.busy = False
        if spec is None or spec.loader is None:
            return spec
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        if self in sys.meta_path:  # stays until an import, not a mere find_spec (availability checks), ran
            sys.meta_path.remove(self)
        self.then(sys.modules.get(self.name, module))  # diffusers replaces itself by a lazy module while executing


def register_pipelines_on_import() -> None:
    """:func:`register_pipelines` on ``diffusers`` now if it is imported, else right after it is."""
    if "diffusers" in sys.modules:
        register_pipelines(sys.modules["diffusers"])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("diffusers", register_pipelines))
