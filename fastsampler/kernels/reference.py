"""The torch path of the per-step update: a few fused-by-hand elementwise ops, no host/device sync.

    D      = d_x·X + d_o·O            → history[write_slot]
    X_next = Σ_j x_j·src_j            over src = (X, S, Z, history slots…)
    S_new  = Σ_j s_j·src_j            (rows that save)

Computation is in float32 (float64 for float64 inputs); X_next is returned in X's dtype.
"""

from __future__ import annotations

import torch

from fastsampler.kernels.row import SRC_S, SRC_SLOTS, SRC_X, SRC_Z, Row


def _lincomb(terms: tuple[tuple[int, float], ...], sources: list[torch.Tensor | None]) -> torch.Tensor:
    (j0, c0), rest = terms[0], terms[1:]
    acc = torch.mul(sources[j0], c0)
    for j, c in rest:
        acc.add_(sources[j], alpha=c)
    return acc


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def write_prediction(row: Row, x: torch.Tensor, out: torch.Tensor, d: torch.Tensor) -> None:
    """d (the history slot ``row.write_slot``) = d_x·X + d_o·O."""
    if row.d_x == 0.0:
        torch.mul(out, row.d_o, out=d)
    else:
        torch.mul(x, row.d_x, out=d)
        d.add_(out, alpha=row.d_o)


def combine(row: Row, x: torch.Tensor, slots: tuple[torch.Tensor, ...], saved: torch.Tensor | None,
            noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(X_next, S_new) from the sources, with this step's prediction already in its slot."""
    sources: list[torch.Tensor | None] = [x, saved, noise, *slots]
    x_next = _lincomb(row.x_terms, sources) if row.x_terms else torch.zeros_like(x)
    if row.s_terms is None:
        return x_next, saved
    if row.s_terms == ((SRC_X, 1.0),):
        return x_next, x  # saving the input as it is (apply_row_torch passes a private copy)
    return x_next, (_lincomb(row.s_terms, sources) if row.s_terms else torch.zeros_like(x))


def apply_row_torch(row: Row, x: torch.Tensor, out: torch.Tensor, history: torch.Tensor,
                    saved: torch.Tensor | None, noise: torch.Tensor | None,
                    prediction_written: bool = False, coef: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One full update. ``prediction_written``: a hook (thresholding) already stored D in the history.
    ``coef`` (the packed row on the device) is accepted for signature parity with the Triton kernel."""
    dtype = history.dtype
    terms = row.x_terms + (row.s_terms or ())
    if saved is None and any(j == SRC_S for j, _ in terms):
        raise ValueError("the row reads the saved state S but `saved` is None")
    if noise is None and any(j == SRC_Z for j, _ in terms):
        raise ValueError("the row reads noise Z but `noise` is None")
    x32 = x if x.dtype == dtype else x.to(dtype)
    if x32 is x and row.s_terms == ((SRC_X, 1.0),):
        # S keeps this state for later steps: never alias the caller's tensor, which a pipeline may reuse.
        x32 = x.clone()
    slots = history.unbind(0)
    if not prediction_written:
        write_prediction(row, x32, out if out.dtype == dtype else out.to(dtype), slots[row.write_slot])
    x_next, s_new = combine(row, x32, slots, saved, noise)
    return (x_next if x_next.dtype == x.dtype else x_next.to(x.dtype)), s_new


__all__ = ["apply_row_torch", "write_prediction", "combine", "compute_dtype", "SRC_SLOTS"]
