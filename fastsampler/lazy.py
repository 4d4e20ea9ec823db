"""Names that load on first use (PEP 562), so ``import fastsampler`` costs what a scheduler costs.

Two places take such names:

- ``fastsampler`` itself: its subpackages above the schedulers (``eval``, ``tuning``, ``cli``, ``shipped``) and the
  pipeline class resolve through the package's module ``__getattr__``, which :func:`resolve` implements.
- ``diffusers``: its generic ``DiffusionPipeline.from_pretrained(folder)`` looks ``model_index.json``'s
  ``_class_name`` up with ``getattr(diffusers, name)``. :func:`register_pipelines` teaches the ``diffusers`` module
  object our pipeline names without importing them: the module's class gets a ``__getattr__`` that imports the
  pipeline's module the first time diffusers (or anyone) asks for it, then caches the class as a plain attribute.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

#: attribute of ``fastsampler`` → module it lives in (a module itself when the attribute is the module's last part)
LAZY_ATTRIBUTES: dict[str, str] = {
    "eval": "fastsampler.eval",
    "tuning": "fastsampler.tuning",
    "cli": "fastsampler.cli",
    "shipped": "fastsampler.shipped",
    "DigitsConditionalPipeline": "fastsampler.eval.cond_pipeline",
}

#: pipeline classes ``diffusers`` resolves by name → module that defines them
PIPELINES: dict[str, str] = {"DigitsConditionalPipeline": "fastsampler.eval.cond_pipeline"}


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
