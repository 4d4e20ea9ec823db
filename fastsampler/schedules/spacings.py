"""Noise-level spacings between two levels: Karras' ρ-power ramp and Beta-quantile spacing (the grids of
``use_karras_sigmas`` / ``use_beta_sigmas``, S³'s Karras grid choice and the k-diffusion sigma functions)."""

from __future__ import annotations

import numpy as np


def karras_sigmas(rho_min: float, rho_max: float, n: int, power: float) -> np.ndarray:
    """ρ_i = (ρ_max^{1/p} + i/(n−1)·(ρ_min^{1/p} − ρ_max^{1/p}))^p (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = rho_min ** (1 / power), rho_max ** (1 / power)
    return (hi + ramp * (lo - hi)) ** power


def beta_sigmas(rho_min: float, rho_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """ρ_i = ρ_min + F⁻¹_Beta(a,b)(1 − i/(n−1))·(ρ_max − ρ_min) ("Beta sampling is all you need")."""
    import scipy.stats

    return rho_min + scipy.stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, n), a, b) * (rho_max - rho_min)
