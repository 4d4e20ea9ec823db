"""UniPC plan builder: UniP-p predictor and UniC-p corrector (Zhao et al. 2023, arXiv 2302.04867; diffusers).

Data form (``predict_x0``), step s0 → t, h = λ_t − λ_{s0}, hh = −h (noise form: hh = h, σ ↔ α):

  x̄      = (σ_t/σ_{s0}) x − α_t (e^{hh} − 1) m0
  UniP-p  x_t = x̄ − α_t B(h) Σ_{k<p} a_k D_k,             D_k = (m_k − m0)/r_k,  r_k = (λ_{s_k} − λ_{s0})/h
  UniC-p  x^c = x̄ − α_t B(h) [Σ_{k<p} c_k D_k + c_p (m_t − m0)]

with R a = b (R_{jk} = r_k^{j−1}; the predictor uses the leading (p−1)-block, the corrector all p rows, r_p = 1)
and b_j = j!·hh·φ_{j+1}(hh)/B(h); B(h) = hh (bh1) or e^{hh} − 1 (bh2). As in the reference code and diffusers,
UniP-2 uses a₁ = ½ and UniC-1 uses c₁ = ½.

In a diffusers step i the corrector first refines x_i from x_{i−1} with the new evaluation m_i (made at the
predicted x̃_i), then the predictor advances the corrected state. Both are linear, so a row is the predictor
composed after the corrector, and the corrected state is saved (S) for the next row's corrector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastsampler.samplers.phi import phi
from fastsampler.samplers.plan import Nodes, Rule, compose_after

SOLVER_TYPES = ("bh1", "bh2")


@dataclass(frozen=True)
class UniPC:
    order: int = 2
    solver_type: str = "bh2"
    predict_x0: bool = True
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()

    @property
    def data_form(self) -> bool:
        return self.predict_x0

    @property
    def history(self) -> int:
        return self.order + 1  # the corrector reads this step's prediction and `order` earlier ones

    stochastic = False

    def predictor_order(self, i: int, available: int, nodes: Nodes) -> int:
        p = min(self.order, nodes.num_steps - i) if self.lower_order_final else self.order
        p = min(p, available + 1)
        # λ_t = ∞ (final σ = 0) or repeated nodes: r_k = 0 would divide by zero; diffusers returns NaN there.
        while p > 1 and not _increasing(nodes.lam[i - p + 1:i + 2]):
            p -= 1
        return p

    def _weights(self, h: float, rks: list[float], corrector: bool) -> tuple[float, float, np.ndarray]:
        """(e^{hh} − 1, B(h), coefficients a or c) for the given r_k."""
        hh = -h if self.predict_x0 else h
        h_phi_1 = math.expm1(hh)
        b_h = hh if self.solver_type == "bh1" else h_phi_1
        p = len(rks) + 1
        b = np.array([math.factorial(j) * hh * phi(j + 1, hh) / b_h for j in range(1, p + 1)])
        r = np.array(rks + [1.0])
        big_r = np.vstack([r**j for j in range(p)])
        if corrector:
            coef = np.array([0.5]) if p == 1 else np.linalg.solve(big_r, b)
        else:
            coef = np.array([0.5]) if p == 2 else (np.linalg.solve(big_r[:-1, :-1], b[:-1]) if p > 2 else np.zeros(0))
        return h_phi_1, b_h, coef

    def _update(self, nodes: Nodes, s0: int, t: int, age0: int, p: int, corrector: bool) -> Rule:
        """Rule for UniP (corrector=False) or UniC from node s0 to t; m0 has age ``age0``, m_k age ``age0 + k``."""
        lam, a, s = nodes.lam, nodes.alpha, nodes.sigma
        h = float(lam[t] - lam[s0])
        if h == 0.0:  # repeated timestep (e.g. 1000 steps on a 1000-step schedule): the step is the identity
            return Rule(x=1.0, d=())
        if math.isinf(h):
            h_phi_1, b_h, coef = -1.0 if self.predict_x0 else math.inf, 0.0, np.zeros(0)
        n_prev = p - 1
        rks = [float((lam[s0 - k] - lam[s0]) / h) for k in range(1, n_prev + 1)] if not math.isinf(h) else []
        if not math.isinf(h):
            h_phi_1, b_h, coef = self._weights(h, rks, corrector)
        size = age0 + p + 1
        d = np.zeros(size)
        if self.predict_x0:
            x_coef, scale = float(s[t] / s[s0]), float(a[t])
        else:
            x_coef, scale = float(a[t] / a[s0]), float(s[t])
        if math.isinf(h) and not self.predict_x0:
            d[age0] = -float(a[t] * s[s0] / a[s0] - s[t])  # σ_t(e^h − 1) in its finite form
        else:
            d[age0] = -scale * h_phi_1
        for k in range(1, n_prev + 1):
            if k - 1 < len(coef):
                w = -scale * b_h * coef[k - 1] / rks[k - 1]
                d[age0 + k] += w
                d[age0] -= w
        if corrector:
            w = -scale * b_h * coef[-1]
            d[0] += w  # m_t, this step's prediction
            d[age0] -= w
        return Rule(x=x_coef, d=tuple(d))

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        p = self.predictor_order(i, available, nodes)
        predictor = self._update(nodes, i, i + 1, 0, p, corrector=False)
        if available == 0 or (i - 1) in self.disable_corrector:
            return Rule(x=predictor.x, d=predictor.d, save=Rule(x=1.0, d=()))
        # Corrector of the previous predictor's order: x_{i−1} (saved) → x_i, m0 = m_{i−1} (age 1).
        q = self.predictor_order(i - 1, available - 1, nodes)
        corr = self._update(nodes, i - 1, i, 1, q, corrector=True)
        corrected = Rule(x=0.0, s=corr.x, d=corr.d)
        return Rule(**{**compose_after(predictor, corrected).__dict__, "save": corrected})


def _increasing(lam: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(lam)) and np.all(np.diff(lam) > 0))
