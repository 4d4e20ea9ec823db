"""Plug-ins: plan transforms switched on by scheduler options, one module each.

Each plug-in module exposes ``plugin(options, builder[, nodes]) -> (builder, transform or None)``: it reads its
own options (``options`` is the scheduler config, a mapping; ``nodes`` the grid, for plug-ins whose transform
depends on the number of steps), validates them with errors naming the option, and may return a transform, or —
for a method that is its own solver family — a different builder. Plug-ins are applied
in the order of ``PLUGINS``, which is the documented order of the transforms in a plan:

1. ``epsilon_scaling`` — rescales the output map (model output → prediction), so every later rule sees the
   scaled prediction;
2. ``dc`` — dynamic compensation replaces the stored prediction by a Lagrange interpolation of history;
3. ``dualfast`` — mixes the current and an earlier prediction where the rule uses the newest one;
4. ``momentum`` — heavy ball: a velocity register averages the step's final slope (after 2–3 changed it).

With every option off no plug-in returns anything, and the plan is the plain solver's, exactly.

``time_shift`` (the Time-Shift sampler) lives here but is not in ``PLUGINS``: it does not rewrite the plan. The
scheduler compiles, after the plan, its rows for every candidate time (the same builder and transforms on a grid
with one node moved) and selects among them on the device during sampling (see that module).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Mapping

from fastsampler.samplers.rules import Nodes, Transform

# Module names under fastsampler.samplers.transforms, in application order.
PLUGINS = ("epsilon_scaling", "dc", "dualfast", "momentum")


def apply_plugins(options: Mapping[str, Any], builder, nodes: Nodes) -> tuple[Any, tuple[Transform, ...]]:
    """The (possibly replaced) builder and the transforms the options switch on, in order."""
    transforms = []
    for name in PLUGINS:
        module = importlib.import_module(f"fastsampler.samplers.transforms.{name}")
        takes_nodes = len(inspect.signature(module.plugin).parameters) == 3
        builder, transform = module.plugin(options, builder, nodes) if takes_nodes else module.plugin(options, builder)
        if transform is not None:
            transforms.append(transform)
    return builder, tuple(transforms)
