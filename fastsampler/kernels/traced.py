"""The update in one uniform form for traced code: a whole ``step()`` is one graph under ``torch.compile``.

The eager torch path specialises each row (Python floats, only the non-zero terms), so a compiled ``step()``
would be a different graph at every step. Here the row is a tensor ``Plan.dense[w, i]`` indexed by the step, and
every output is the same dense combination of every source (write slot substituted, unchanged registers as
identity rows), so one graph serves all steps; the compiler fuses it into one pass over the sources:

    P = c_x·X + c_o·O,   [D̂, X_next, R'_0, …] = M · [X, P, Z, R_0, …, H_0, …]

Sources a row does not use get weight 0; they hold finite values (zeros until written; a non-finite stored
prediction is reported by the finiteness check), so 0·source adds nothing.
"""

from __future__ import annotations

import torch

from fastsampler.kernels.reference import State


def apply_dense(coef: torch.Tensor, slot: int | torch.SymInt, x: torch.Tensor, out: torch.Tensor,
                history: torch.Tensor, state: State | torch.Tensor | None, noise: torch.Tensor | None,
                prediction_written: bool = False) -> tuple[torch.Tensor, State | torch.Tensor | None]:
    """One update from a dense row ``coef`` (length 2 + (2+R)·C, in the history's dtype); returns (X_next, new
    state), the state in the form it came in: a tuple of register tensors (torch path), a register buffer
    (Triton path) or None (no registers)."""
    dtype = history.dtype
    x32 = x.to(dtype)
    p = history[slot] if prediction_written else coef[0] * x32 + coef[1] * out.to(dtype)
    buffer = isinstance(state, torch.Tensor)
    registers = list(state.unbind(0)) if buffer else [r if r is not None else torch.zeros_like(x32)
                                                       for r in (state or ())]
    sources = [x32, p, noise if noise is not None else torch.zeros_like(x32), *registers, *history.unbind(0)]
    m = coef[2:].view(2 + len(registers), len(sources))
    outputs = []
    for row in range(2 + len(registers)):
        acc = m[row, 0] * sources[0]
        for j in range(1, len(sources)):
            acc = acc + m[row, j] * sources[j]
        outputs.append(acc)
    history[slot] = outputs[0]
    if buffer:
        return outputs[1].to(x.dtype), torch.stack(outputs[2:])
    return outputs[1].to(x.dtype), (tuple(outputs[2:]) if state is not None else None)
