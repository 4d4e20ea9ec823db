"""Running a plan step by step as plain torch functions (differentiable, state kept by the caller).

Tuning needs what a scheduler hides: the state between steps (to search one step's parameters while the steps
before it stay fixed), and gradients through a step. A ``RunState`` is the sample, the history slots and the
registers; ``advance`` applies one plan row out of place from the row's coefficient matrix (``Plan.coef``), so
autograd flows through the sample, the model output, the history and — when a caller replaces it — the stored
prediction:

    P = c_x·X + c_o·O,   D̂ = store·src (or a caller's value),   X_next = next·src',   R'_r = reg_r·src'

where src' is src with the write slot holding D̂. Solvers that draw noise (SDE) are not tunable here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from fastsampler.plans.format import OUT_NEXT, OUT_REGISTERS, OUT_STORE, SRC_X, Plan, src_register, src_slot

Model = Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RunState:
    """The sampler's state before step ``step``: sample, history slots (K tensors), registers (R tensors)."""

    x: torch.Tensor
    history: tuple[torch.Tensor, ...]
    registers: tuple[torch.Tensor, ...]
    step: int = 0
    taken: int = 0

    def detach(self) -> "RunState":
        return replace(self, x=self.x.detach(), history=tuple(h.detach() for h in self.history),
                       registers=tuple(r.detach() for r in self.registers))


def start(plan: Plan, x: torch.Tensor, begin: int = 0) -> RunState:
    """A run of ``plan`` from ``x`` at step ``begin`` (zeros in every slot and register)."""
    if plan.uses_noise:
        raise ValueError("this plan draws noise (an SDE solver); tuning needs a deterministic (ODE) solver")
    zeros = torch.zeros_like(x)
    return RunState(x, (zeros,) * plan.slots, (zeros,) * plan.num_registers, begin, 0)


def timestep(plan: Plan, i: int) -> float:
    return float(plan.timesteps[i])


def prediction(plan: Plan, i: int, x: torch.Tensor, model_output: torch.Tensor,
               out_map: torch.Tensor | None = None) -> torch.Tensor:
    """P = c_x·X + c_o·O at step i (``out_map``: the row (c_x, c_o) as a tensor, for gradients)."""
    if out_map is not None:
        return out_map[0] * x + out_map[1] * model_output
    c_x, c_o = (float(v) for v in plan.out_map[i])
    return c_o * model_output if c_x == 0.0 else c_x * x + c_o * model_output


def _combine(row, sources: list[torch.Tensor | None]) -> torch.Tensor:
    """Σ_j row_j·src_j over the non-zero entries (a numpy row) or every used source (a tensor row)."""
    acc = None
    dense = isinstance(row, torch.Tensor)
    for j in range(len(row)):
        if sources[j] is None or (not dense and row[j] == 0.0):
            continue
        term = (row[j] if dense else float(row[j])) * sources[j]
        acc = term if acc is None else acc + term
    return acc if acc is not None else torch.zeros_like(sources[SRC_X])


def advance(plan: Plan, state: RunState, model_output: torch.Tensor, store: torch.Tensor | None = None,
            p: torch.Tensor | None = None, coef: torch.Tensor | None = None,
            out_map: torch.Tensor | None = None) -> RunState:
    """One step: ``model_output`` is the model's output at ``plan.timesteps[state.step]`` for ``state.x``;
    ``store`` replaces the stored prediction D̂ (DC ratio search); ``p`` a precomputed P; ``coef`` / ``out_map``
    replace the row's coefficients by tensors of the same layout (learned time points: gradients reach them)."""
    i = state.step
    level = row_level(plan, state)
    coef = plan.coef[level, i] if coef is None else coef
    r = plan.num_registers
    p = prediction(plan, i, state.x, model_output, out_map) if p is None else p
    slot = int(plan.write_slot[i])
    sources = step_sources(state, p)
    d_hat = _combine(coef[OUT_STORE], sources) if store is None else store
    sources[src_slot(r, slot)] = d_hat
    x_next = _combine(coef[OUT_NEXT], sources)
    registers = tuple(_combine(coef[OUT_REGISTERS + q], sources) if plan.writes[level, i, q] else state.registers[q]
                      for q in range(r))
    history = tuple(d_hat if j == slot else h for j, h in enumerate(state.history))
    return RunState(x_next, history, registers, i + 1, state.taken + 1)


def row_level(plan: Plan, state: RunState) -> int:
    """The warm-up level of the row the next step uses (the steps taken so far, capped)."""
    return min(state.taken, plan.levels - 1)


def step_sources(state: RunState, p: torch.Tensor) -> list[torch.Tensor | None]:
    """The sources a row combines, in the plan's layout: X, P, Z (None: ODE plans), registers, history slots
    (the write slot still holding its old value; ``advance`` puts D̂ there before the next-sample row)."""
    return [state.x, p, None, *state.registers, *state.history]


def run(plan: Plan, model: Model, x: torch.Tensor, begin: int = 0, end: int | None = None,
        record: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sample from ``x`` through steps [begin, end): (final sample, the samples at each node visited if
    ``record``: x_begin, …, x_end)."""
    state = start(plan, x, begin)
    states = [x] if record else []
    for i in range(begin, plan.num_steps if end is None else end):
        state = advance(plan, state, model(state.x, timestep(plan, i)))
        if record:
            states.append(state.x)
    return state.x, states


def register(plan: Plan, state: RunState, name: str) -> torch.Tensor:
    """A register's current value by name (e.g. UniPC's ``corrected``)."""
    return state.registers[plan.registers.index(name)]


__all__ = ["RunState", "start", "advance", "run", "prediction", "timestep", "register", "src_register", "row_level",
           "step_sources"]
