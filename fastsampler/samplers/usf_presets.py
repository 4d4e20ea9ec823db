"""Hand-designed solvers as USF schedules: the points of the S³ space that are DPM-Solver++ and UniPC.

A preset is a schedule for a given grid: the per-step orders are the builders' own (``multistep_order``: warm-up,
lower-order final steps, λ checks), and each step's choices make the USF update equal to the solver's:

* DPM-Solver++ (arXiv 2211.01095) multistep, data form: order-2 steps estimate D1 from the previous node with the
  "dpmsolver-2" relaxation φ₁/(2φ₂) — the midpoint weight ½α_t(1 − e^{−h}) of diffusers' default
  ``solver_type="midpoint"`` (none for ``"heun"``, the plain hφ₂); order-3 steps use both previous nodes, which is
  the exact third-order update (``exact_third_order=True``; diffusers' default 3M weights D2 by hφ₃, half the
  exact 2hφ₃, and lies outside the space).
* UniPC (arXiv 2302.04867) bh1 / bh2: UniP-2's a₁ = ½ is the relaxation "unipc-bh1" (1/(2φ₂)) or "unipc-bh2"
  (φ₁/(2φ₂)); UniP-p (p ≥ 3) and UniC-p (p ≥ 2) solve the full Taylor system, which is USF's Difference estimate
  with no relaxation; UniC-1's c₁ = ½ is the same relaxation on the corrector's derivative. Every step but the last
  has a pseudo-corrector (``disable_corrector`` removes some).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

from fastsampler.samplers.rules import Nodes, multistep_order
from fastsampler.samplers.usf_schedule import USFSchedule, USFStep

#: UniPC variant → USF relaxation of the first-derivative term (B(h) = hh, or e^{hh} − 1).
UNIPC_RELAXATION = {"bh1": "unipc-bh1", "bh2": "unipc-bh2"}


def dpmsolver_schedule(order: int, nodes: Nodes, *, solver_type: str = "midpoint", data: bool = True,
                       lower_order_final: bool = True) -> USFSchedule:
    """DPM-Solver++ (``data=True``) or DPM-Solver multistep of ``order`` on ``nodes`` (final orders lowered below
    15 steps, as diffusers)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"`solver_type` must be 'midpoint' or 'heun', got {solver_type!r}")
    prediction = "data" if data else "noise"
    steps = []
    for j in range(nodes.num_steps):
        p = multistep_order(order, j, j, nodes, lower_order_final, 15)
        relax = "dpmsolver-2" if p == 2 and solver_type == "midpoint" else None
        steps.append(USFStep(p, prediction, relaxation=relax))
    return USFSchedule(tuple(steps), meta={"preset": f"dpmsolver{'++' if data else ''}-{order}m-{solver_type}"})


def unipc_schedule(order: int, nodes: Nodes, *, variant: str = "bh2", data: bool = True,
                   lower_order_final: bool = True, disable_corrector: Sequence[int] = ()) -> USFSchedule:
    """UniPC-p (UniP predictor + UniC corrector) with B(h) ``variant`` on ``nodes`` (final orders always
    lowered, as diffusers)."""
    if variant not in UNIPC_RELAXATION:
        raise ValueError(f"`variant` must be one of {tuple(UNIPC_RELAXATION)}, got {variant!r}")
    relax, prediction, n = UNIPC_RELAXATION[variant], "data" if data else "noise", nodes.num_steps
    steps = []
    for j in range(n):
        p = multistep_order(order, j, j, nodes, lower_order_final, lower_below=None)
        corrected = j < n - 1 and j not in disable_corrector
        steps.append(USFStep(p, prediction, relaxation=relax if p == 2 else None,
                             corrector="pseudo" if corrected else "none",
                             corrector_relaxation=relax if corrected and p == 1 else None))
    return USFSchedule(tuple(steps), meta={"preset": f"unipc-{variant}-{order}{'' if data else '-noise'}"})


def _presets() -> dict[str, Callable[..., USFSchedule]]:
    out: dict[str, Callable[..., USFSchedule]] = {}
    for order in (1, 2, 3):
        out[f"dpmsolver++{order}m"] = partial(dpmsolver_schedule, order)
        out[f"dpmsolver++{order}m-heun"] = partial(dpmsolver_schedule, order, solver_type="heun")
        out[f"dpmsolver{order}m"] = partial(dpmsolver_schedule, order, data=False)
        for variant in UNIPC_RELAXATION:
            out[f"unipc-{variant}-{order}"] = partial(unipc_schedule, order, variant=variant)
            out[f"unipc-{variant}-{order}-noise"] = partial(unipc_schedule, order, variant=variant, data=False)
    return out


PRESETS = _presets()


def preset_schedule(name: str, nodes: Nodes, lower_order_final: bool = True) -> USFSchedule:
    """The schedule of preset ``name`` (``PRESETS``: ``dpmsolver++2m``, ``dpmsolver++3m``, ``unipc-bh2-2``, …) on
    ``nodes``."""
    if name not in PRESETS:
        raise ValueError(f"unknown USF preset {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name](nodes, lower_order_final=lower_order_final)
