"""Which entries of a plan's rows a coefficient tuner may change, and a plan with a longer history.

A step can only combine what exists when it runs: the sample X, this step's prediction P, the registers written by
earlier steps and the history slots holding earlier predictions (the write slot holds this step's D̂ for every row
but the store row, which never reads it). ``alive_sources`` marks those per step and output row — the space S4S
and GS learn in ("more history terms"), of which the base solver's non-zero entries are a subset.

``widen`` re-indexes a plan onto a ring of more history slots (step j writes slot j mod K'): every row reads the
same predictions as before, so the plan samples identically, and the extra slots let a learned row read
predictions older than the base solver's order keeps.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fastsampler.plans.format import OUT_REGISTERS, OUT_STORE, SRC_P, SRC_X, Plan, src_register, src_slot

SUPPORTS = ("history", "base")
FUSED_SLOTS = 8  # the fused kernel's slot limit (kernels.triton_update.MAX_SLOTS): longer rings take the torch path
ZERO_SCALE = 0.1  # the size of a unit correction on a source the base row does not read (its own scale is 0)


def history_slots(history: int | None, plan: Plan) -> int:
    """The history ring of a tuned plan: ``None`` keeps every earlier prediction up to the fused kernel's limit,
    0 the base solver's own ring, an integer that many slots (at least the base's)."""
    if history is None:
        return max(plan.slots, min(plan.num_steps, FUSED_SLOTS))
    return max(plan.slots, history)


def check_history(history: int | None) -> None:
    if history is not None and (isinstance(history, bool) or not isinstance(history, int) or history < 0):
        raise ValueError(f"coefficients search: `history` must be None (every earlier prediction, up to "
                         f"{FUSED_SLOTS}) or an integer ≥ 0 (0: the base solver's own), got {history!r}")


def alive_sources(plan: Plan) -> np.ndarray:
    """(N, O, C) bool: the sources each row used from step 0 can read (the rows' non-zero entries included;
    register rows only where the step writes the register)."""
    n, r = plan.num_steps, plan.num_registers
    outputs, c = plan.coef.shape[2], plan.coef.shape[3]
    out = np.zeros((n, outputs, c), dtype=bool)
    slots_written: set[int] = set()
    registers_written: set[int] = set()
    for i in range(n):
        level = min(i, plan.levels - 1)
        write = src_slot(r, int(plan.write_slot[i]))
        alive = np.zeros(c, dtype=bool)
        alive[[SRC_X, SRC_P]] = True
        alive[[src_register(q) for q in registers_written]] = True
        alive[[src_slot(r, k) for k in slots_written]] = True
        for o in range(outputs):
            row = alive.copy()
            row[write] = o != OUT_STORE  # D̂ never reads its own slot; the other rows read D̂ there
            if o >= OUT_REGISTERS and not plan.writes[level, i, o - OUT_REGISTERS]:
                row[:] = False
            out[i, o] = row | (plan.coef[level, i, o] != 0.0)
        slots_written.add(int(plan.write_slot[i]))
        registers_written.update(q for q in range(r) if plan.writes[level, i, q])
    return out


def widen(plan: Plan, slots: int) -> Plan:
    """``plan`` on a ring of ``slots`` history slots (≥ its own K; fewer or equal: the plan itself). Each entry that
    reads slot k at step i reads the prediction of the latest step j ≡ k (mod K) it meant — step i itself for the
    write slot, except in the store row, which reads that slot's old content (step i − K)."""
    k_old, r = plan.slots, plan.num_registers
    if slots <= k_old:
        return plan
    levels, n, outputs, _ = plan.coef.shape
    first = src_slot(r, 0)
    coef = np.zeros((levels, n, outputs, first + slots))
    coef[..., :first] = plan.coef[..., :first]
    for w in range(levels):
        for i in range(n):
            for k in range(k_old):
                step = i - (i - k) % k_old  # the latest step ≤ i that wrote slot k
                for o in np.flatnonzero(plan.coef[w, i, :, first + k]):
                    j = step - k_old if (o == OUT_STORE and step == i) else step
                    coef[w, i, o, first + j % slots] += plan.coef[w, i, o, first + k]
    return replace(plan, coef=coef, write_slot=np.arange(n) % slots)


__all__ = ["alive_sources", "widen", "history_slots", "check_history", "SUPPORTS", "ZERO_SCALE"]
