"""DualFast (Yu, Luo, Wang, Zhao; arXiv 2506.13058): mix the newest prediction with an earlier, noisier one.

Source of the rule: the paper's method section could not be read; this follows the project note
``reference/dualfast.md`` §1.2 (a third-party log that read the PDF, unverified) with the note's choices for what
it leaves open. No equation numbers are known. The rule:

    ε̃(x_s, s) = (1 + c_s)·ε_θ(x_s, s) − c_s·ε_θ(x_τ, τ),     τ > s already evaluated (no extra NFE)

and ε̃ replaces ε_θ(x_s, s) in the base solver's *first-order term only*: in an update x_t = anchor + δ·D0 +
(differences), δ·D0 becomes δ·D̃0 and the difference terms (D1, D2, UniPC's D_k, the corrector's m_t − m0) keep
the raw predictions (``stages``). Nothing is written back to the history (transient use, §3 "Persistence").

Open choices, as options:

* ``dualfast_reference``: τ = the ``"previous"`` step (default) or the run's ``"first"`` step (a register kept
  for the whole run). The first update of a run has no earlier prediction: c = 0 there (§5 item 4).
* ``dualfast_space``: mix ``"eps"`` (the rule as stated; default) or ``"x0"``. Where the solver's form differs
  (DPM-Solver++/UniPC keep x̂₀, DEIS/DPM-Solver keep ε̂) the reference is kept in the mixing space and converted at
  the current sample (§1.4 item 4): mixing ε in a data-form solver gives x̃₀ = (1+c)·x̂₀,s − c·(x_s − σ_s ε_τ)/α_s.
* c schedule (§1.3): c_i = c_max·i/(N − 1), a linear ramp from 0 at the first update to ``dualfast_scale`` =
  c_max (default 0.15) at the last, indexed by the grid step.
* UniPC (§1.5, §5 item 7): both the predictor and the corrector use D̃ of their own start node: the corrector of
  interval [s, t] re-integrates the interval whose predictor used D̃_s, so it reuses that D̃_s (kept in a register).

With τ = the previous step and mixing in the solver's own space, DualFast only re-weights the first difference
already in the buffer (§1.4 items 1–2): ``effective_d1_weight``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from fastsampler.samplers.rules import Combo, Nodes, PlanShape, Rule, Transform
from fastsampler.samplers.transforms import checks
from fastsampler.samplers.transforms.stages import (age_combo, has_corrector, join, minus, register_combo, split,
                                                     structure)

REFERENCES = ("previous", "first")
SPACES = ("eps", "x0")
DEFAULT_SCALE = 0.15  # c at the last step: the ramp linspace(0, 0.15, steps) of the note's §1.3 [hint]
MAX_SCALE = 1.0
REFERENCE = "dualfast_reference"  # register: the reference prediction, in the mixing space
LEAD = "dualfast_lead"  # register (UniPC): the mixed prediction D̃ of the previous step, for the corrector


def effective_d1_weight(c: float, r0: float, base: float = 0.0) -> float:
    """The weight of D1 = (m_i − m_{i−1})/r0, in units of the leading weight δ, after DualFast with τ = the previous
    step mixes in the solver's own space: ``base`` + c·r0 (base: 0 for DDIM / DPM-Solver-1, ½ for DPM-Solver-2M
    midpoint; r0 = h_{i−1}/h_i). DualFast-DDIM is therefore DPM-Solver-2M with its D1 weighted c·r0 instead of ½:
    exactly 2M at c = 1/(2 r0), a damped 2M below it (note §1.4)."""
    return base + c * r0


def _convert(to_x0: bool, i: int, nodes: Nodes, prediction: Combo) -> Combo:
    """The other form of a prediction made at sample X of node i: x̂₀ = (X − σ ε̂)/α or ε̂ = (X − α x̂₀)/σ."""
    a, s = float(nodes.alpha[i]), float(nodes.sigma[i])
    top, bottom = (s, a) if to_x0 else (a, s)
    return Combo(x=1.0 / bottom) + (-top / bottom) * prediction


@dataclass(frozen=True)
class DualFast(Transform):
    """D0 → D̃0 = (1 + c_i)·D0 − c_i·D_τ in each update's leading term, c_i = c_max·i/(N − 1)."""

    scale: float
    reference: str = "previous"
    space: str = "eps"
    base: Any = field(default=None, compare=False, repr=False)

    name = "dualfast"

    def coefficient(self, i: int, num_steps: int) -> float:
        return self.scale * i / (num_steps - 1) if num_steps > 1 else 0.0

    def _converts(self, shape: PlanShape) -> bool:
        return (self.space == "x0") != shape.data_form

    def _registers(self, shape: PlanShape) -> tuple[str, ...]:
        own = (REFERENCE,) if self.reference == "first" or self._converts(shape) else ()
        return own + ((LEAD,) if has_corrector(self.base) else ())

    def shape(self, shape: PlanShape) -> PlanShape:
        # Two slots at least: the previous prediction, and warm-up levels that tell a run's first row (c = 0).
        return dataclasses.replace(shape, registers=shape.registers + self._registers(shape),
                                   history=max(shape.history, 2))

    def _reference(self, i: int, shape: PlanShape, nodes: Nodes) -> Combo:
        """D_τ in the solver's form (read on rows after the first)."""
        if REFERENCE not in shape.registers:
            return age_combo(1)
        stored = register_combo(shape.registers, REFERENCE)
        return _convert(shape.data_form, i, nodes, stored) if self._converts(shape) else stored

    def _reference_update(self, available: int, i: int, shape: PlanShape, nodes: Nodes) -> Combo | None:
        """The reference register's new value: this step's prediction in the mixing space ("previous": every row;
        "first": the run's first row only)."""
        if REFERENCE not in shape.registers or (self.reference == "first" and available > 0):
            return None
        d0 = age_combo(0)
        return _convert(not shape.data_form, i, nodes, d0) if self._converts(shape) else d0

    def rewrite(self, rule: Rule, i: int, available: int, nodes: Nodes, shape: PlanShape) -> Rule:
        plain = structure(self.base, i, available, nodes)
        corrector, predictor = split(rule, plain)
        d0 = age_combo(0)
        mixed = d0
        if available > 0:
            c = self.coefficient(i, nodes.num_steps)
            mixed = d0 + c * minus(d0, self._reference(i, shape, nodes))
        predictor = predictor.with_slope(predictor.slope + predictor.delta * minus(mixed, d0))
        registers = {}
        if REFERENCE in shape.registers:
            registers[shape.registers.index(REFERENCE)] = self._reference_update(available, i, shape, nodes)
        if LEAD in shape.registers:
            registers[shape.registers.index(LEAD)] = mixed
            if corrector is not None:  # the corrector's m0 is m_{i−1}: use the D̃_{i−1} its predictor used
                lead = register_combo(shape.registers, LEAD)
                corrector = corrector.with_slope(corrector.slope + corrector.delta * minus(lead, age_combo(1)))
        return join(rule, plain, corrector, predictor, registers)


def plugin(options: Mapping[str, Any], builder: Any) -> tuple[Any, DualFast | None]:
    if not options.get("dualfast"):
        checks.unset(options, "dualfast", ("dualfast_scale", "dualfast_space"))
        if options.get("dualfast_reference", "previous") != "previous":
            raise ValueError(f"`dualfast_reference` needs `dualfast` (got {options['dualfast_reference']!r})")
        return builder, None
    if options["dualfast"] is not True:
        raise ValueError(f"`dualfast` must be True or False, got {options['dualfast']!r}")
    reference, space = options.get("dualfast_reference", "previous"), options.get("dualfast_space") or "eps"
    if reference not in REFERENCES:
        raise ValueError(f"`dualfast_reference` must be one of {REFERENCES}, got {reference!r}")
    if space not in SPACES:
        raise ValueError(f"`dualfast_space` must be one of {SPACES} (or None: 'eps'), got {space!r}")
    raw = options.get("dualfast_scale")
    scale = DEFAULT_SCALE if raw is None else checks.number("dualfast_scale", raw, 0.0, MAX_SCALE)
    checks.multistep_ode("dualfast", builder)
    if scale == 0.0:
        return builder, None
    return builder, DualFast(scale, reference, space, builder)
