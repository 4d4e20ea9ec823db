"""Device side of the Time-Shift sampler (``fastsampler.samplers.transforms.time_shift``): the per-sample variance,
the window argmin, the candidate-row gather and the update with the gathered row(s) — tensor ops only, nothing read
on the host, so a step stays free of device syncs and traces under ``torch.compile``.

    v_b = var(x_b)  (unbiased, over the entries of sample b)        c_b = argmin_c |v_b − V_{r,c}|
    batch time (a pipeline passes one timestep for the batch): c = argmin_c |mean_b v_b − V_{r,c}|

The update with a gathered row is the dense form of ``fastsampler.kernels.traced`` (every source, one row per
sample or one for the batch), computed as one contraction; the fused Triton kernel takes a gathered packed row.

The statistic runs in float64 (float32 on MPS, which has none): near t = T the targets of adjacent training steps
differ by ~1e-6 relative, below float32 reduction error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastsampler.kernels.reference import State


def statistic_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def sample_variance(x: torch.Tensor) -> torch.Tensor:
    """(B,): each sample's unbiased variance over its entries (the released code's ``torch.var(x.view(B, −1), −1)``)."""
    return x.detach().reshape(x.shape[0], -1).to(statistic_dtype(x.device)).var(dim=1)


def nearest(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(len(values),) long: the index of the target nearest each value (the first on a tie)."""
    return (values[:, None] - targets[None, :]).abs().argmin(dim=1)


@dataclass(frozen=True)
class DeviceCandidates:
    """``CandidateRows`` on one device: rows as (W·N, C, L) tables (a flat step index keeps the step symbolic under
    ``torch.compile``), candidate times in the dtype of ``scheduler.timesteps``, statistic targets."""

    dense: torch.Tensor  # (W·N, C, L), the history's dtype
    packed: torch.Tensor | None  # (W·N, C, L′) float32, for the fused kernel
    times: torch.Tensor  # (N, C)
    lowest: torch.Tensor  # (N,) statistic dtype: times[:, 0]
    variance: torch.Tensor  # (N, C) statistic dtype

    @classmethod
    def upload(cls, dense: np.ndarray, packed: np.ndarray | None, times: np.ndarray, variance: np.ndarray,
               device: torch.device, dtype: torch.dtype, time_dtype: torch.dtype) -> "DeviceCandidates":
        stat = statistic_dtype(device)
        w, n, c, _ = dense.shape
        return cls(torch.from_numpy(dense.reshape(w * n, c, -1)).to(device=device, dtype=dtype),
                   None if packed is None else torch.from_numpy(packed.reshape(w * n, c, -1)).to(device),
                   torch.from_numpy(times).to(device=device, dtype=time_dtype),
                   torch.from_numpy(times[:, 0].copy()).to(device=device, dtype=stat),
                   torch.from_numpy(variance).to(device=device, dtype=stat))

    def index_of(self, timestep: torch.Tensor, r: int) -> torch.Tensor:
        """(numel,) long: the candidate of row r whose time each entry of ``timestep`` is (clamped to the window)."""
        t = timestep.reshape(-1).to(device=self.lowest.device, dtype=self.lowest.dtype)
        return torch.round(t - self.lowest[r]).long().clamp(0, self.times.shape[1] - 1)

    def nearest(self, values: torch.Tensor, r: int) -> torch.Tensor:
        """The candidates of row r whose statistic targets are nearest ``values``."""
        return nearest(values, self.variance[r])

    def times_of(self, candidates: torch.Tensor, r: int) -> torch.Tensor:
        return self.times[r].index_select(0, candidates)


def apply_dense_rows(coef: torch.Tensor, slot: int | torch.SymInt, x: torch.Tensor, out: torch.Tensor,
                     history: torch.Tensor, state: State | torch.Tensor | None, noise: torch.Tensor | None,
                     prediction_written: bool = False) -> tuple[torch.Tensor, State | torch.Tensor | None]:
    """``fastsampler.kernels.traced.apply_dense`` for one dense row (``coef``: (L,)) or one per sample ((B, L)), as
    one contraction over the stacked sources (fewer eager ops than a term-by-term sum): the outputs
    [D̂, X_next, R'…] of sample b are M_b · [X, P, Z, R…, H…]_b."""
    dtype, b = history.dtype, x.shape[0]
    xf = x.to(dtype)
    per = coef.reshape(-1, coef.shape[-1], *([1] * (x.ndim - 1)))  # (1 or B, L, 1, …)
    p = history[slot] if prediction_written else per[:, 0] * xf + per[:, 1] * out.to(dtype)
    as_buffer = isinstance(state, torch.Tensor)
    regs = list(state.unbind(0)) if as_buffer else [torch.zeros_like(xf) if s is None else s for s in (state or ())]
    stacked = torch.stack([xf, p, torch.zeros_like(xf) if noise is None else noise.to(dtype), *regs,
                           *history.unbind(0)], dim=1).reshape(b, -1, xf[0].numel())  # (B, S, n)
    mats = coef[..., 2:].reshape(*coef.shape[:-1], 2 + len(regs), stacked.shape[1])  # ([B,] outputs, S)
    outputs = torch.matmul(mats, stacked).reshape(b, 2 + len(regs), *x.shape[1:]).unbind(1)
    history[slot] = outputs[0]
    new_state = torch.stack(outputs[2:]) if as_buffer else (tuple(outputs[2:]) if state is not None else None)
    return outputs[1].to(x.dtype), new_state
