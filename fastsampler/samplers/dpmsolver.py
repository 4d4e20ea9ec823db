"""DPM-Solver and DPM-Solver++ plan builders: multistep (orders 1–3), diffusers' grid singlestep, ODE and SDE.

Papers: DPM-Solver (Lu et al., arXiv 2206.00927) — noise prediction; DPM-Solver++ (Lu et al., arXiv 2211.01095)
— data prediction, multistep. The exact solution of the diffusion ODE from node s to t, h = λ_t − λ_s, is
DPM-Solver's eq. (3.4) in noise form and DPM-Solver++'s data-form counterpart; expanding the prediction as a
Taylor series in λ and integrating term by term gives the exponential-integrator step (φ_k as in ``phi.py``):

  dpmsolver++      x_t = (σ_t/σ_s) x + α_t h [φ₁(−h) D0 + φ₂(−h) D1 + φ₃(−h) D2]
  dpmsolver        x_t = (α_t/α_s) x − σ_t h [φ₁(h) D0 + φ₂(h) D1 + φ₃(h) D2]
  sde-dpmsolver++  x_t = (σ_t/σ_s) e^{−ηh} x + α_t h_η [φ₁(−h_η) D0 + φ₂(−h_η) D1 + φ₃(−h_η) D2]
                   + σ_t √(1 − e^{−2ηh}) z,  h_η = (1 + η) h  (η = 1: diffusers' SDE; η = 0: the ODE; k-diffusion's
                   ``eta`` of ``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde``)
  sde-dpmsolver    x_t = (α_t/α_s) x − 2σ_t h [φ₁(h) D0 + φ₂(h) D1] + σ_t √(e^{2h} − 1) z

D0 is the prediction at s; D1 ≈ h·D′ and D2 ≈ h²·D″/2 come from divided differences over earlier nodes with
step ratios r0 = h_{−1}/h, r1 = h_{−2}/h (the papers' symbols). Multistep 2M is DPM-Solver++'s Algorithm 2; 2S
is its Algorithm 1 (here in diffusers' grid form, below). ``solver_type="midpoint"`` replaces the D1 term by
−½ α_t(e^{−h} − 1) D1 (data form) or −½ σ_t(e^h − 1) D1 (noise form); ``"heun"`` (the reference code's "taylor")
keeps hφ₂.

The third-order D2 term: DPM-Solver's reference code and diffusers weight it by hφ₃ — half the exact integral
2hφ₃ of the quadratic interpolant (checked numerically: only the doubled weight integrates a quadratic exactly).
``exact_third_order=False`` (default) keeps diffusers' weight for parity; ``True`` uses the exact one. diffusers'
SDE 3M weights D2 by α_t((1 − e^{−2h} − 2h)/(2h)² − ½), which is O(1) instead of O(h); we use the consistent
weight (half of the exact 4hφ₃(−2h) by default) and list the difference in the README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastsampler.samplers.phi import phi
from fastsampler.samplers.rules import Combo, Nodes, Rule, ages, multistep_order, strictly_increasing

ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


@dataclass(frozen=True)
class EIStep:
    """Weights of one exponential-integrator step: x_t = base·x + c0·D0 + c1·D1 + c2·D2 + noise·z, with c1 the
    midpoint or the heun (hφ₂) weight."""

    base: float
    c0: float
    c1_midpoint: float
    c1_heun: float
    c2: float
    noise: float

    def c1(self, solver_type: str) -> float:
        return self.c1_midpoint if solver_type == "midpoint" else self.c1_heun


def ei_step(algorithm_type: str, nodes: Nodes, s: int, t: int, exact_third_order: bool = False,
            eta: float = 1.0) -> EIStep:
    """The φ-weights of a step from node s to node t (float64); ``eta``: the SDE's η (sde-dpmsolver++ only)."""
    a_s, s_s, a_t, s_t = (float(v) for v in (nodes.alpha[s], nodes.sigma[s], nodes.alpha[t], nodes.sigma[t]))
    h = float(nodes.lam[t] - nodes.lam[s])
    if math.isinf(h):
        return _ei_step_to_zero(algorithm_type, a_s, s_s, a_t, exact_third_order)
    third = 2.0 if exact_third_order else 1.0
    if algorithm_type == "dpmsolver++":
        e = -math.expm1(-h)  # 1 − e^{−h}
        return EIStep(s_t / s_s, a_t * e, 0.5 * a_t * e, a_t * h * phi(2, -h), third * a_t * h * phi(3, -h), 0.0)
    if algorithm_type == "dpmsolver":
        e = s_t * math.expm1(h)
        return EIStep(a_t / a_s, -e, -0.5 * e, -s_t * h * phi(2, h), -third * s_t * h * phi(3, h), 0.0)
    if algorithm_type == "sde-dpmsolver++":
        h_eta = (1.0 + eta) * h
        e = -math.expm1(-h_eta)  # 1 − e^{−h_η}
        return EIStep(s_t / s_s * math.exp(-eta * h), a_t * e, 0.5 * a_t * e, a_t * h_eta * phi(2, -h_eta),
                      third * a_t * h_eta * phi(3, -h_eta), s_t * math.sqrt(-math.expm1(-2.0 * eta * h)))
    if algorithm_type == "sde-dpmsolver":
        e = s_t * math.expm1(h)
        return EIStep(a_t / a_s, -2.0 * e, -e, -2.0 * s_t * h * phi(2, h), math.nan, s_t * math.sqrt(math.expm1(2 * h)))
    raise ValueError(f"`algorithm_type` must be one of {ALGORITHM_TYPES}, got {algorithm_type!r}")


def _ei_step_to_zero(algorithm_type: str, a_s: float, s_s: float, a_t: float, exact_third_order: bool) -> EIStep:
    """The limits σ_t → 0 (λ_t = ∞) of ``ei_step``: the step lands on the prediction (data form), or on
    α_t(x − σ_s ε̂)/α_s, using σ_t(e^h − 1) → α_t σ_s/α_s (noise form). Only order 1 is ever used here."""
    third = 2.0 if exact_third_order else 1.0
    if algorithm_type == "dpmsolver++":
        return EIStep(0.0, a_t, 0.5 * a_t, a_t, third * 0.5 * a_t, 0.0)
    if algorithm_type == "sde-dpmsolver++":
        return EIStep(0.0, a_t, 0.5 * a_t, a_t, third * a_t, 0.0)
    e = a_t * s_s / a_s
    if algorithm_type == "dpmsolver":
        return EIStep(a_t / a_s, -e, -0.5 * e, -e, -third * 0.5 * e, 0.0)
    if algorithm_type == "sde-dpmsolver":
        return EIStep(a_t / a_s, -2.0 * e, -e, -2.0 * e, math.nan, 0.0)
    raise ValueError(f"`algorithm_type` must be one of {ALGORITHM_TYPES}, got {algorithm_type!r}")


@dataclass(frozen=True)
class DPMSolverMultistep:
    """DPM-Solver(++) multistep of order 1–3 (one model evaluation per step): DPM-Solver++ Algorithm 2 (2M) and
    its third-order extension (3M), with D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0 + r1)."""

    order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    exact_third_order: bool = False
    eta: float = 1.0  # sde-dpmsolver++'s η

    registers = ()

    @property
    def data_form(self) -> bool:
        return self.algorithm_type.endswith("++")

    @property
    def history(self) -> int:
        return self.order

    @property
    def order_of_accuracy(self) -> int:
        """Global order with full history: the order, except diffusers' 3M weight (half the exact D2 integral),
        which is second order."""
        return 2 if self.order == 3 and not self.exact_third_order else self.order

    def step_order(self, i: int, available: int, nodes: Nodes) -> int:
        return multistep_order(self.order, i, available, nodes, self.lower_order_final, 15, self.euler_at_final)

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        p = self.step_order(i, available, nodes)
        w = ei_step(self.algorithm_type, nodes, i, i + 1, self.exact_third_order, self.eta)
        d = w.c0 * ages(p, a0=1.0)
        if p >= 2:
            lam = nodes.lam
            h = lam[i + 1] - lam[i]
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = ages(p, a0=1 / r0, a1=-1 / r0)
            if p == 2:
                d += w.c1(self.solver_type) * d1_0
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = ages(p, a1=1 / r1, a2=-1 / r1)
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                d += w.c1_heun * d1 + w.c2 * d2
        return Rule(Combo(x=w.base, z=w.noise, d=tuple(d)))


def singlestep_orders(n: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """diffusers' ``get_order_list``: macro steps [1, 2, (3)] repeated, shortened at the end."""
    block = list(range(1, order + 1))
    if lower_order_final:
        full, rest = divmod(n, order)
        if rest == 0 and order > 1:
            orders = block * (full - 1) + list(range(1, order)) + [1]
        else:
            orders = block * full + list(range(1, rest + 1))
    else:
        orders = block * (n // order)
    if final_zero and orders:
        orders[-1] = 1
    return orders[:n]


@dataclass
class DPMSolverSinglestep:
    """diffusers' grid-based singlestep DPM-Solver(++) (DPM-Solver Algorithms 1–2, DPM-Solver++ Algorithm 1, with
    the intermediate evaluations at the ordinary grid points): a macro step of order k spans k grid intervals and
    integrates from its start, kept in the register ``macro_start``."""

    order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    num_steps: int = 0
    final_zero: bool = True

    registers = ("macro_start",)

    @property
    def data_form(self) -> bool:
        return self.algorithm_type.endswith("++")

    @property
    def history(self) -> int:
        return self.order

    @property
    def order_of_accuracy(self) -> int:
        return self.order

    def effective_order(self, i: int, start: int, nodes: Nodes) -> int:
        """Order of step i in a run that started at ``start``: diffusers' order list, lowered where history is
        missing (img2img) or where a macro step would span repeated nodes; a macro step always starts where the
        register was written. Runs with a full history (start ≤ i − K + 1) share one cached pass from index 0."""
        if start <= i - self.order + 1:
            start = 0
        cache = self.__dict__.setdefault("_orders", {})
        if start == 0 and nodes.num_steps in cache:
            return cache[nodes.num_steps][i]
        lof = self.lower_order_final or nodes.num_steps % self.order != 0 or self.final_zero
        listed = singlestep_orders(nodes.num_steps, self.order, lof, self.final_zero)
        stop = nodes.num_steps if start == 0 else i + 1
        orders, saved_at = [0] * nodes.num_steps, start
        for j in range(start, stop):
            p = min(listed[j], j - saved_at + 1)
            # A macro step needs distinct nodes where it evaluates the model (r0, r1 ≠ 0, r0 ≠ r1); its end may
            # repeat its last node (Karras / exponential / beta grids ending at sigma_min), where diffusers too
            # takes the full-order step (r = 1 there).
            if p > 1 and not (strictly_increasing(nodes.lam[j - p + 1:j + 1]) and nodes.lam[j + 1] >= nodes.lam[j]):
                p = 1
            if p == 1:
                saved_at = j
            orders[j] = p
        if start == 0:
            cache[nodes.num_steps] = orders
        return orders[i]

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        p = self.effective_order(i, i - available, nodes)
        b = i - p + 1  # the macro step started at node b (its sample is in the register)
        w = ei_step(self.algorithm_type, nodes, b, i + 1)
        if p == 1:
            return Rule(Combo(x=w.base, z=w.noise, d=(w.c0,)), registers=(Combo(x=1.0),))
        lam = nodes.lam
        h = lam[i + 1] - lam[b]
        if p == 2:
            r0 = (lam[i] - lam[b]) / h
            d = w.c0 * ages(2, a1=1.0) + w.c1(self.solver_type) * ages(2, a0=1 / r0, a1=-1 / r0)
        else:
            r0, r1 = (lam[i] - lam[b]) / h, (lam[i - 1] - lam[b]) / h
            d1_0 = ages(3, a1=1 / r1, a2=-1 / r1)
            d1_1 = ages(3, a0=1 / r0, a2=-1 / r0)
            d = w.c0 * ages(3, a2=1.0)
            if self.solver_type == "midpoint":
                d += w.c1_heun * d1_1
            else:
                d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
                d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
                d += w.c1_heun * d1 + w.c2 * d2
        return Rule(Combo(r=(w.base,), z=w.noise, d=tuple(d)), registers=(None,))
