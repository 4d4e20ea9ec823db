"""Momentum (Wizadwongsa et al., "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts", ICLR 2024,
arXiv 2307.11118): heavy ball (HB) as a plan transform, generalized heavy ball (GHVB) as its own builder.

Heavy ball (Polyak HB with α = 1 − β, eqs. (12)–(14); Algorithm 1 for PLMS, the authors' DPM-Solver++ and UniPC
wrappers): a velocity register averages each update's *effective slope* F = slope/δ (``stages``: DPM-Solver++
2M F = D0 + ½D1 in x0-form; 3M F = D0 + (c1/δ)·D1 + (c2/δ)·D2; DEIS F = the AB combination of ε̂ in ε-form):

    v ← (1 − β)·v + β·F,        x_next = anchor + δ·v        (instead of anchor + δ·F)

* β ∈ (0, 1]; β = 1 is the plain solver (the plug-in then changes nothing). For any β < 1 the method is first
  order (the paper's Theorem 1).
* First use (A6 of the reference note): v := F, so a run's first step is the plain first-order step.
* Lower-order steps: every step is averaged with the slope of the order the base solver uses there (warm-up orders
  and ``lower_order_final`` steps alike), as the paper's PLMS-k + HB does with c = min(k, evaluations). (The
  authors' DPM-Solver++ wrapper averages only 2M steps because it overrides diffusers' second-order function; here
  the recursion does not depend on which diffusers function a step happens to go through.) A step with no slope
  (δ = 0: a repeated node) leaves the sample and the velocity alone.
* UniPC: the predictor and the corrector each carry a velocity (``velocity``, ``corrector_velocity``), both
  updated — the released predictor momentum is dead code (the EMA is overwritten, A11 item 2); here it is not.
  The released UniPC wrapper also averages F/σ_t rather than F; we average F as its DPM-Solver++ wrapper does.

GHVB (``fastsampler.samplers.ghvb``): ``momentum_order`` k, damping β; it replaces the scheduler's solver.

Defaults (A7 of the note): HB β = 0.8 (DPM-Solver++ with HB 0.8 in the paper's ADM Table 1 and its pixel
``DPM_Solver(momentum=0.8)``); GHVB k = 4, β = 0.8 ("GHVB 3.8", best on DiT at ≤ 10 steps). Smaller β = more
momentum: the paper recommends less β at higher guidance (SD 1.5: PLMS4+HB 0.9/0.8/0.6 at CFG 7.5/15/22.5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from fastsampler.samplers.ghvb import GHVB, MAX_ORDER
from fastsampler.samplers.rules import Combo, Nodes, PlanShape, Rule, Transform
from fastsampler.samplers.transforms import checks
from fastsampler.samplers.transforms.stages import (Update, has_corrector, join, register_combo, split,
                                                     structure)

KINDS = ("hb", "ghvb")
DEFAULT_BETA = 0.8
DEFAULT_GHVB_ORDER = 4
VELOCITY = "velocity"
CORRECTOR_VELOCITY = "corrector_velocity"


@dataclass(frozen=True)
class HeavyBall(Transform):
    """v ← (1 − β)v + β·F, x_next = anchor + δ·v, on each update of a row (predictor; UniPC's corrector too)."""

    beta: float
    base: Any = field(default=None, compare=False, repr=False)

    name = "heavy_ball"

    def shape(self, shape: PlanShape) -> PlanShape:
        # Warm-up levels (one per history slot) must tell a run's first row (v := F) from later ones, and with a
        # corrector also the row of its first corrector (one step taken) from the rows that average into it.
        if not has_corrector(self.base):
            return dataclasses.replace(shape, registers=shape.registers + (VELOCITY,), history=max(shape.history, 2))
        return dataclasses.replace(shape, registers=shape.registers + (VELOCITY, CORRECTOR_VELOCITY),
                                   history=max(shape.history, 3))

    def _written(self, corrector: bool, i: int, available: int, nodes: Nodes) -> bool:
        """Whether an earlier row of this run wrote that velocity (had that update, with a slope)."""
        for back in range(1, available + 1):
            plain = structure(self.base, i - back, available - back, nodes)
            if (plain.corrector_delta if corrector else plain.delta) != 0.0:
                return True
        return False

    def _average(self, update: Update, velocity: str, written: bool, shape: PlanShape) -> tuple[Update, Combo | None]:
        """The update with δ·v for δ·F, and the velocity's new value (None: unchanged)."""
        delta = update.delta
        if delta == 0.0:
            return update, None
        if not written:
            return update, (1.0 / delta) * update.slope
        v = register_combo(shape.registers, velocity)
        damped = update.with_slope(delta * (1.0 - self.beta) * v + self.beta * update.slope)
        return damped, (1.0 - self.beta) * v + (self.beta / delta) * update.slope

    def rewrite(self, rule: Rule, i: int, available: int, nodes: Nodes, shape: PlanShape) -> Rule:
        plain = structure(self.base, i, available, nodes)
        corrector, predictor = split(rule, plain)
        registers = {}
        predictor, registers[shape.registers.index(VELOCITY)] = self._average(
            predictor, VELOCITY, self._written(False, i, available, nodes), shape)
        if corrector is not None:
            corrector, registers[shape.registers.index(CORRECTOR_VELOCITY)] = self._average(
                corrector, CORRECTOR_VELOCITY, self._written(True, i, available, nodes), shape)
        return join(rule, plain, corrector, predictor, registers)


def _beta(options: Mapping[str, Any]) -> float:
    raw = options.get("momentum_beta")
    return DEFAULT_BETA if raw is None else checks.number("momentum_beta", raw, 0.0, 1.0, low_open=True)


def _ghvb_order(options: Mapping[str, Any]) -> int:
    k = options.get("momentum_order")
    if k is None:
        return DEFAULT_GHVB_ORDER
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_ORDER:
        raise ValueError(f"`momentum_order` (GHVB's order k) must be an integer in 1..{MAX_ORDER}, got {k!r}")
    return k


def plugin(options: Mapping[str, Any], builder: Any) -> tuple[Any, HeavyBall | None]:
    kind = options.get("momentum")
    if kind is None:
        checks.unset(options, "momentum", ("momentum_beta", "momentum_order"))
        return builder, None
    if kind not in KINDS:
        raise ValueError(f"`momentum` must be one of {KINDS} (or None: off), got {kind!r}")
    beta = _beta(options)
    if kind == "hb" and options.get("momentum_order") is not None:
        raise ValueError(f"`momentum_order` is GHVB's order k (momentum='ghvb'); heavy ball keeps the solver's own "
                         f"order (`solver_order`), got momentum_order={options['momentum_order']!r}")
    order = _ghvb_order(options) if kind == "ghvb" else None
    checks.multistep_ode("momentum", builder)
    if beta == 1.0:
        return builder, None
    if kind == "hb":
        return builder, HeavyBall(beta, builder)
    for other in ("dualfast", "dc_ratios"):
        if options.get(other):
            raise ValueError(f"momentum='ghvb' replaces the solver with its own velocity history, which `{other}` "
                             "does not rewrite; use momentum='hb' with it")
    return GHVB(order, beta, getattr(builder, "lower_order_final", True)), None
