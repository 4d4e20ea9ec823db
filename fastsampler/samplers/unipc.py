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
composed after the corrector; the corrected state is kept in the register ``corrected`` for the next row's
corrector. The corrector uses this step's raw prediction P; the predictor uses the stored one (age 0), which a
transform such as DC-Solver's compensation may replace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastsampler.samplers.phi import phi
from fastsampler.samplers.rules import Combo, Nodes, Rule, multistep_order

SOLVER_TYPES = ("bh1", "bh2")


@dataclass(frozen=True)
class UniPC:
    order: int = 2
    solver_type: str = "bh2"
    predict_x0: bool = True
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()

    registers = ("corrected",)

    @property
    def data_form(self) -> bool:
        return self.predict_x0

    @property
    def history(self) -> int:
        return self.order + 1  # the corrector reads this step's prediction and `order` earlier ones

    @property
    def order_of_accuracy(self) -> int:
        """UniC lifts UniP-p to order p + 1 at no extra evaluation."""
        return self.order + 1

    def predictor_order(self, i: int, available: int, nodes: Nodes) -> int:
        # diffusers lowers UniPC's final orders whatever the number of steps.
        return multistep_order(self.order, i, available, nodes, self.lower_order_final, lower_below=None)

    def _weights(self, hh: float, rks: list[float], corrector: bool) -> tuple[float, np.ndarray]:
        """(B(h), coefficients a or c) for the given r_k."""
        b_h = hh if self.solver_type == "bh1" else math.expm1(hh)
        p = len(rks) + 1
        b = np.array([math.factorial(j) * hh * phi(j + 1, hh) / b_h for j in range(1, p + 1)])
        r = np.array(rks + [1.0])
        big_r = np.vstack([r**j for j in range(p)])
        if corrector:
            return b_h, np.array([0.5]) if p == 1 else np.linalg.solve(big_r, b)
        return b_h, np.array([0.5]) if p == 2 else (np.linalg.solve(big_r[:-1, :-1], b[:-1]) if p > 2 else np.zeros(0))

    def _update(self, nodes: Nodes, s0: int, t: int, age0: int, p: int, corrector: bool) -> Combo:
        """UniP (corrector=False) or UniC from node s0 to t; m0 has age ``age0``, m_k age ``age0 + k``, and the
        corrector's m_t is this step's raw prediction P."""
        lam, a, s = nodes.lam, nodes.alpha, nodes.sigma
        h = float(lam[t] - lam[s0])
        if h == 0.0:  # repeated timestep (e.g. 1000 steps on a 1000-step schedule): the step is the identity
            return Combo(x=1.0)
        if math.isinf(h):
            return self._jump_to_zero(nodes, s0, t, age0)
        hh = -h if self.predict_x0 else h
        x_coef, scale = (float(s[t] / s[s0]), float(a[t])) if self.predict_x0 else (float(a[t] / a[s0]), float(s[t]))
        rks = [float((lam[s0 - k] - lam[s0]) / h) for k in range(1, p)]
        b_h, coef = self._weights(hh, rks, corrector)
        d = np.zeros(age0 + p)
        d[age0] = -scale * math.expm1(hh)
        for k in range(1, min(p, len(coef) + 1)):
            w = -scale * b_h * coef[k - 1] / rks[k - 1]
            d[age0 + k] += w
            d[age0] -= w
        if not corrector:
            return Combo(x=x_coef, d=tuple(d))
        w = -scale * b_h * coef[-1]
        d[age0] -= w
        return Combo(x=x_coef, p=w, d=tuple(d))

    def _jump_to_zero(self, nodes: Nodes, s0: int, t: int, age0: int) -> Combo:
        """The first-order step to σ_t = 0 (λ_t = ∞), where B(h) = −∞ makes diffusers return NaN: the finite limits
        x_t = α_t m0 (data form) and x_t = (α_t/α_s) x − α_t(σ_s/α_s) m0 (noise form, σ_t(e^h − 1) → α_t σ_s/α_s)."""
        a_s, s_s, a_t = float(nodes.alpha[s0]), float(nodes.sigma[s0]), float(nodes.alpha[t])
        d = np.zeros(age0 + 1)
        if self.predict_x0:
            d[age0] = a_t
            return Combo(d=tuple(d))
        d[age0] = -a_t * s_s / a_s
        return Combo(x=a_t / a_s, d=tuple(d))

    def stages(self, i: int, available: int, nodes: Nodes) -> tuple[Combo | None, Combo]:
        """The two updates of row i: the corrected state x_i^c (reads the register = x_{i−1}^c; None where the
        corrector is off) and the predictor x_{i+1} = a·x_i^c + Σ d_a D̂_{i−a}, whose X term stands for x_i^c.
        ``rule`` composes them; transforms that act on each update's slope (``transforms.stages``) read them."""
        p = self.predictor_order(i, available, nodes)
        predictor = self._update(nodes, i, i + 1, 0, p, corrector=False)
        if available == 0 or (i - 1) in self.disable_corrector:
            return None, predictor
        # Corrector of the previous predictor's order: x_{i−1} (the register) → x_i, m0 = m_{i−1} (age 1).
        q = self.predictor_order(i - 1, available - 1, nodes)
        corr = self._update(nodes, i - 1, i, 1, q, corrector=True)
        return Combo(r=(corr.x,), p=corr.p, d=corr.d), predictor

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        corrected, predictor = self.stages(i, available, nodes)
        if corrected is None:
            return Rule(predictor, registers=(Combo(x=1.0),))
        return Rule(predictor.replace_x(corrected), registers=(corrected,))
