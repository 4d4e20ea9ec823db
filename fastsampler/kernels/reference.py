"""The torch path of the per-step update: a few elementwise ops per row, no host/device sync.

    P      = c_x·X + c_o·O                          → history[write_slot]   (unless a hook already wrote it)
    D̂      = Σ_j s_j·src_j                          → history[write_slot]   (rows whose store mixes; else D̂ = P)
    X_next = Σ_j a_j·src_j                          over src = (X, P, Z, registers…, history slots…)
    R'_r   = Σ_j u_{r,j}·src_j                      (rows that write register r)

The state is a tuple of register tensors (None until first written); a row returns a new tuple. Computation is
in the history's dtype (float32, or float64 for float64 samples); X_next comes back in X's dtype.
"""

from __future__ import annotations

import torch

from fastsampler.plans.format import SRC_X, RowView, Terms

State = tuple[torch.Tensor | None, ...]


def init_state(registers: int, like: torch.Tensor) -> State:
    """No register holds anything before the first row writes it."""
    return (None,) * registers


def _lincomb(terms: Terms, sources: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    if not terms:
        return torch.zeros_like(like)
    (j0, c0), rest = terms[0], terms[1:]
    acc = torch.mul(sources[j0], c0)
    for j, c in rest:
        acc.add_(sources[j], alpha=c)
    return acc


def write_prediction(row: RowView, x: torch.Tensor, out: torch.Tensor, p: torch.Tensor) -> None:
    """p = c_x·X + c_o·O, in place."""
    if row.c_x == 0.0:
        torch.mul(out, row.c_o, out=p)
    else:
        torch.mul(x, row.c_x, out=p)
        p.add_(out, alpha=row.c_o)


def check_sources(row: RowView, state: State, noise: torch.Tensor | None) -> None:
    if noise is None and row.uses_noise:
        raise ValueError("the row reads noise Z but `noise` is None")
    for q in range(row.registers):
        if (row.torch_registers >> q) & 1 and state[q] is None:
            raise ValueError(f"the row reads register {q}, which no earlier row of this run wrote")


def apply_row_torch(row: RowView, x: torch.Tensor, out: torch.Tensor, history: torch.Tensor, state: State,
                    noise: torch.Tensor | None, prediction_written: bool = False) -> tuple[torch.Tensor, State]:
    """One full update; returns (X_next, new state). ``prediction_written``: a hook (thresholding) already stored
    P in the write slot."""
    dtype = history.dtype
    if row.torch_registers or row.uses_noise:
        check_sources(row, state, noise)
    x32 = x if x.dtype == dtype else x.to(dtype)
    slots = history.unbind(0)
    slot = slots[row.write_slot]
    if row.mixes_store:
        p = slot.clone() if prediction_written else torch.empty_like(slot)
    else:
        p = slot
    if not prediction_written:
        write_prediction(row, x32, out if out.dtype == dtype else out.to(dtype), p)
    sources: list[torch.Tensor | None] = [x32, p, noise, *state, *slots]
    if row.mixes_store:
        slot.copy_(_lincomb(row.store_terms, sources, x32))
    x_next = _lincomb(row.next_terms, sources, x32)
    if row.writes_registers:
        new = list(state)
        for q, terms in enumerate(row.register_terms):
            if terms is None:
                continue
            if terms == ((SRC_X, 1.0),):
                # The register keeps this state for later steps: never alias the caller's tensor.
                new[q] = x32.clone() if x32 is x else x32
            else:
                new[q] = _lincomb(terms, sources, x32)
        state = tuple(new)
    return (x_next if x_next.dtype == x.dtype else x_next.to(x.dtype)), state


__all__ = ["apply_row_torch", "init_state", "write_prediction"]
