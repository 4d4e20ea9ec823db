"""Option checks shared by the plug-ins: every error names the option and what it accepts."""

from __future__ import annotations

import math
from typing import Any

from fastsampler.samplers.deis import DEIS
from fastsampler.samplers.dpmsolver import DPMSolverMultistep
from fastsampler.samplers.unipc import UniPC

MULTISTEP = (DPMSolverMultistep, DEIS, UniPC)


def number(option: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a float in [low, high] (or (low, high] with ``low_open``), else a ValueError naming ``option``."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low < value if low_open else low <= value) or value > high:
        raise ValueError(f"`{option}` must be a number in {interval}, got {value!r}")
    return float(value)


def unset(options: Any, switch: str, dependents: tuple[str, ...]) -> None:
    """Options that only mean something with ``switch`` on must stay None while it is off."""
    for name in dependents:
        if options.get(name) is not None:
            raise ValueError(f"`{name}` needs `{switch}` (got {name}={options[name]!r} with {switch}="
                             f"{options.get(switch)!r})")


def multistep_ode(option: str, builder: Any) -> None:
    """Slope-rewriting plug-ins act on the ODE multistep builders (DPM-Solver multistep, DEIS, UniPC)."""
    if not isinstance(builder, MULTISTEP):
        raise ValueError(f"`{option}` works with the multistep solvers (DPM-Solver++ multistep, DEIS, UniPC), not "
                         f"{type(builder).__name__}; use solver_method='multistep'")
    algorithm = getattr(builder, "algorithm_type", "")
    if algorithm.startswith("sde"):
        raise ValueError(f"`{option}` is defined for the probability-flow ODE; algorithm_type={algorithm!r} adds "
                         "noise: use 'dpmsolver++' or 'dpmsolver'")
