"""The explicit updates inside a multistep rule, for transforms that change a step's *slope* (DualFast, heavy ball).

Every multistep builder here writes an update from node s to node t as

    out = anchor + slope,     slope = p·P + Σ_a d_a·D̂_{i−a},     Σ_a d_a + p = δ

where the anchor holds the sample, noise and register terms and δ is the first-order weight: δ·D0 alone is the
Euler / DDIM / DPM-Solver-1 step, and the higher-order terms are differences whose weights sum to zero (D1, D2 of
DPM-Solver, the Lagrange weights of DEIS, UniPC's D_k). So F = slope/δ is the step's *effective slope* —
D0 + ½D1 for DPM-Solver++(2M), Σ_j b_j f_{n−j} for an Adams–Bashforth step — in the form of the ODE the solver
integrates (x0-form dx̃/dρ = x̂₀ or ε-form dx̄/dσ̄ = ε̂, Momentum paper arXiv 2307.11118, eqs. (2)–(3)).

A row of DPM-Solver multistep or DEIS is one such update (the predictor). A UniPC row is two: the corrector UniC
refines the state over the previous interval (register 0, ``corrected``; its leading prediction m0 is one step
old), then the predictor advances from the corrected state, next = a·corrected + slope. UniPC exposes the two as
``stages()``; ``split`` reads them, so a transform can rewrite each slope and ``join`` composes the row again.

Anchors and δ come from the base builder's own (unrewritten) rule: transforms before this one may add terms to a
slope (DualFast adds sample and register terms through its ε ↔ x̂₀ conversion), never to an anchor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastsampler.samplers.rules import Combo, Nodes, Rule

CORRECTED = 0  # the register that holds UniPC's corrected state (its builder's first register)


@dataclass(frozen=True)
class Update:
    """One explicit update out = anchor + slope; ``lead_age`` is the age of the prediction at its start node."""

    anchor: Combo
    slope: Combo
    delta: float
    lead_age: int

    @property
    def out(self) -> Combo:
        return self.anchor + self.slope

    def with_slope(self, slope: Combo) -> "Update":
        return dataclasses.replace(self, slope=slope)


@dataclass(frozen=True)
class Structure:
    """The plain rule's updates: the predictor's anchor and δ, the corrector's (None where a row has none), and
    ``carry`` = the predictor's weight on the corrected state (None for one-update builders)."""

    anchor: Combo
    delta: float
    corrector_anchor: Combo | None = None
    corrector_delta: float = 0.0
    carry: float | None = None


def _weight(combo: Combo) -> float:
    return combo.p + sum(combo.d)


def _anchor(combo: Combo) -> Combo:
    return Combo(x=combo.x, z=combo.z, r=combo.r)


def minus(a: Combo, b: Combo) -> Combo:
    return a + (-1.0) * b


def structure(builder, i: int, available: int, nodes: Nodes) -> Structure:
    """The update structure of the base builder's row i (``stages()`` where the builder has a corrector)."""
    if hasattr(builder, "stages"):
        corrected, predictor = builder.stages(i, available, nodes)
        if corrected is None:
            return Structure(Combo(), _weight(predictor), carry=predictor.x)
        return Structure(Combo(), _weight(predictor), _anchor(corrected), _weight(corrected), predictor.x)
    nxt = builder.rule(i, available, nodes).next
    return Structure(_anchor(nxt), _weight(nxt))


def has_corrector(builder) -> bool:
    return hasattr(builder, "stages")


def split(rule: Rule, plain: Structure) -> tuple[Update | None, Update]:
    """(corrector, predictor) updates of a (possibly rewritten) rule."""
    if plain.carry is None:
        return None, Update(plain.anchor, minus(rule.next, plain.anchor), plain.delta, 0)
    corrected = rule.registers[CORRECTED]
    anchor = plain.carry * corrected
    predictor = Update(anchor, minus(rule.next, anchor), plain.delta, 0)
    if plain.corrector_anchor is None:
        return None, predictor
    corrector = Update(plain.corrector_anchor, minus(corrected, plain.corrector_anchor), plain.corrector_delta, 1)
    return corrector, predictor


def join(rule: Rule, plain: Structure, corrector: Update | None, predictor: Update,
         registers: dict[int, Combo | None] | None = None) -> Rule:
    """The rule with these updates (the predictor re-composed after a changed corrector) and ``registers`` set."""
    updates = list(rule.registers)
    for q, combo in (registers or {}).items():
        updates[q] = combo
    if plain.carry is None:
        nxt = predictor.out
    else:
        if corrector is not None:
            updates[CORRECTED] = corrector.out
        nxt = plain.carry * updates[CORRECTED] + predictor.slope
    return dataclasses.replace(rule, next=nxt, registers=tuple(updates))


def register_combo(shape_registers: tuple[str, ...], name: str, c: float = 1.0) -> Combo:
    """c times register ``name``."""
    q = shape_registers.index(name)
    return Combo(r=tuple(c if j == q else 0.0 for j in range(len(shape_registers))))


def age_combo(age: int, c: float = 1.0) -> Combo:
    """c times the prediction stored ``age`` steps ago."""
    return Combo(d=tuple(c if a == age else 0.0 for a in range(age + 1)))
