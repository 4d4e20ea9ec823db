"""Plug-ins: plan transforms switched on by scheduler options, one module each.

Each plug-in module exposes ``plugin(options, builder) -> (builder, transform or None)``: it reads its own
options (``options`` is the scheduler config, a mapping), validates them with errors naming the option, and may
return a transform, or — for a method that is its own solver family — a different builder. Plug-ins are applied
in the order of ``PLUGINS``, which is the documented order of the transforms in a plan:

1. ``epsilon_scaling`` — rescales the output map (model output → prediction), so every later rule sees the
   scaled prediction;
2. ``dc`` — dynamic compensation replaces the stored prediction by a Lagrange interpolation of history;
3. ``dualfast`` — mixes the current and an earlier prediction where the rule uses the newest one;
4. ``momentum`` — heavy ball: a velocity register averages the step's final slope (after 2–3 changed it).

With every option off no plug-in returns anything, and the plan is the plain solver's, exactly.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from fastsampler.samplers.rules import Transform

PLUGINS = ()  # module names under fastsampler.samplers.transforms, in application order


def apply_plugins(options: Mapping[str, Any], builder) -> tuple[Any, tuple[Transform, ...]]:
    """The (possibly replaced) builder and the transforms the options switch on, in order."""
    transforms = []
    for name in PLUGINS:
        module = importlib.import_module(f"fastsampler.samplers.transforms.{name}")
        builder, transform = module.plugin(options, builder)
        if transform is not None:
            transforms.append(transform)
    return builder, tuple(transforms)
