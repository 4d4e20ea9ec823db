"""One plan row in the form the update kernels consume."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Source order (matches fastsampler.samplers.plan): X, S, Z, then the K history slots.
SRC_X, SRC_S, SRC_Z, SRC_SLOTS = 0, 1, 2, 3


@dataclass(frozen=True)
class Row:
    """D = d_x·X + d_o·O is written to history[write_slot]; X_next = Σ x_coef·src; S_new = Σ s_coef·src.

    ``x_terms`` / ``s_terms`` are the non-zero (source, coefficient) pairs as Python floats (the torch path
    loops over them); ``packed`` is the dense float32 row [d_x, d_o, s_write, x_coef (3+K), s_coef (3+K)]
    for the fused kernel. ``s_terms`` is None when the row does not write S.
    """

    write_slot: int
    d_x: float
    d_o: float
    x_terms: tuple[tuple[int, float], ...]
    s_terms: tuple[tuple[int, float], ...] | None
    uses_noise: bool
    packed: np.ndarray

    @classmethod
    def from_coefficients(cls, write_slot: int, d_x: float, d_o: float, x_coef: np.ndarray,
                          s_coef: np.ndarray | None) -> "Row":
        def terms(c: np.ndarray) -> tuple[tuple[int, float], ...]:
            return tuple((int(j), float(c[j])) for j in np.flatnonzero(c))

        k = len(x_coef)
        packed = np.zeros(3 + 2 * k, dtype=np.float64)
        packed[0], packed[1] = d_x, d_o
        packed[3:3 + k] = x_coef
        if s_coef is not None:
            packed[2] = 1.0
            packed[3 + k:] = s_coef
        return cls(int(write_slot), float(d_x), float(d_o), terms(x_coef),
                   None if s_coef is None else terms(s_coef), bool(x_coef[SRC_Z] != 0), packed)
