"""A test-only plan transform that shows the seam: two registers, one reading the other, and nothing changed
anywhere else in the code base.

``DelayLine`` keeps the last two inputs of the run: u ← X on every row, v ← u (the *old* u) from the second row of
a run on. It leaves the sampler's own rule untouched, so sampling results must not change, and after a run
u = x_{N−1}, v = x_{N−2}: a check that register rows read the previous values of other registers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastsampler.samplers.rules import Combo, Nodes, PlanShape, Rule, Transform


@dataclass(frozen=True)
class DelayLine(Transform):
    name = "delay_line"

    def shape(self, shape: PlanShape) -> PlanShape:
        return dataclasses.replace(shape, registers=shape.registers + ("delay_u", "delay_v"))

    def rewrite(self, rule: Rule, i: int, available: int, nodes: Nodes, shape: PlanShape) -> Rule:
        u, v = shape.registers.index("delay_u"), shape.registers.index("delay_v")
        updates = list(rule.registers)
        updates[u] = Combo(x=1.0)
        if available > 0:  # nothing is in u on a run's first row
            updates[v] = Combo(r=tuple(1.0 if q == u else 0.0 for q in range(len(shape.registers))))
        return dataclasses.replace(rule, registers=tuple(updates))
