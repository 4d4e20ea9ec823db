"""DPM-Solver / DPM-Solver++ plan builders: multistep (1–3), singlestep (diffusers' grid form), ODE and SDE.

Exponential-integrator step from a base node s to t, h = λ_t − λ_s (Lu et al. 2022, 2022b; diffusers):

  dpmsolver++      x_t = (σ_t/σ_s) x + α_t h [φ₁(−h) D0 + φ₂(−h) D1 + φ₃(−h) D2]
  dpmsolver        x_t = (α_t/α_s) x − σ_t h [φ₁(h) D0 + φ₂(h) D1 + φ₃(h) D2]
  sde-dpmsolver++  x_t = (σ_t/σ_s) e^{−h} x + α_t 2h [φ₁(−2h) D0 + φ₂(−2h) D1 + 2φ₃(−2h) D2] + σ_t √(1 − e^{−2h}) z
  sde-dpmsolver    x_t = (α_t/α_s) x − 2σ_t h [φ₁(h) D0 + φ₂(h) D1] + σ_t √(e^{2h} − 1) z

with D0 the prediction at s, D1 ≈ h·D′ and D2 ≈ h²·D″/2 from divided differences. "midpoint" replaces the
D1 term by −½ α_t(e^{−h} − 1) D1 (data form) or −½ σ_t(e^h − 1) D1 (noise form).

The third-order D2 term: DPM-Solver's reference code and diffusers weight it by hφ₃ — half the exact integral
2hφ₃ of the quadratic interpolant (checked numerically: only the doubled weight integrates a quadratic
exactly). ``exact_third_order=False`` (default) keeps diffusers' weight for parity; ``True`` uses the exact one.
diffusers' SDE 3M weights D2 by α_t((1 − e^{−2h} − 2h)/(2h)² − ½), which is O(1) instead of O(h); we use the
consistent weight (half of the exact 4hφ₃(−2h) by default) and list the difference in the README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastsampler.samplers.phi import phi
from fastsampler.samplers.plan import Nodes, Rule

ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


@dataclass(frozen=True)
class EIStep:
    """Coefficients of one exponential-integrator step: x_t = base·x + c0·D0 + c1·D1 + c2·D2 + noise·z."""

    base: float
    c0: float
    c1_midpoint: float
    c1_taylor: float
    c2: float
    noise: float


def ei_step(algorithm_type: str, nodes: Nodes, s: int, t: int, exact_third_order: bool = False) -> EIStep:
    """The φ-weights of a step from node s to node t (float64; a zero final σ handled in closed form)."""
    a_s, s_s, a_t, s_t = (float(v) for v in (nodes.alpha[s], nodes.sigma[s], nodes.alpha[t], nodes.sigma[t]))
    h = float(nodes.lam[t] - nodes.lam[s])
    third = 2.0 if exact_third_order else 1.0
    if algorithm_type == "dpmsolver++":
        e = -math.expm1(-h)  # 1 − e^{−h}, = 1 at σ_t = 0
        if math.isinf(h):
            return EIStep(0.0, a_t, 0.5 * a_t, a_t, third * 0.5 * a_t, 0.0)
        return EIStep(s_t / s_s, a_t * e, 0.5 * a_t * e, a_t * h * phi(2, -h), third * a_t * h * phi(3, -h), 0.0)
    if algorithm_type == "dpmsolver":
        # σ_t(e^h − 1) = α_t ρ_s − σ_t stays finite as σ_t → 0.
        e = s_t * math.expm1(h) if not math.isinf(h) else a_t * s_s / a_s
        if math.isinf(h):
            return EIStep(a_t / a_s, -e, -0.5 * e, -e, -third * 0.5 * e, 0.0)
        return EIStep(a_t / a_s, -e, -0.5 * e, -s_t * h * phi(2, h), -third * s_t * h * phi(3, h), 0.0)
    if algorithm_type == "sde-dpmsolver++":
        if math.isinf(h):
            return EIStep(0.0, a_t, 0.5 * a_t, a_t, third * a_t, 0.0)
        e2 = -math.expm1(-2.0 * h)  # 1 − e^{−2h}
        return EIStep(s_t / s_s * math.exp(-h), a_t * e2, 0.5 * a_t * e2, a_t * 2 * h * phi(2, -2 * h),
                      third * a_t * 2 * h * phi(3, -2 * h), s_t * math.sqrt(e2))
    if algorithm_type == "sde-dpmsolver":
        e = s_t * math.expm1(h) if not math.isinf(h) else a_t * s_s / a_s
        noise = s_t * math.sqrt(math.expm1(2 * h)) if not math.isinf(h) else 0.0
        c1t = -2.0 * s_t * h * phi(2, h) if not math.isinf(h) else -2.0 * e
        return EIStep(a_t / a_s, -2.0 * e, -e, c1t, math.nan, noise)
    raise ValueError(f"`algorithm_type` must be one of {ALGORITHM_TYPES}, got {algorithm_type!r}")


def _age(n: int, **terms: float) -> np.ndarray:
    """A vector over ages 0..n−1 (keyword ``a0``, ``a1``, … ) for building divided differences."""
    v = np.zeros(n)
    for k, c in terms.items():
        v[int(k[1:])] += c
    return v


def _distinct(nodes: Nodes, idx: list[int]) -> bool:
    lam = nodes.lam[idx]
    return bool(np.all(np.diff(lam) > 0) and np.all(np.isfinite(lam)))


@dataclass(frozen=True)
class DPMSolverMultistep:
    """DPM-Solver(++) multistep of order 1–3 (one model evaluation per step)."""

    order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    exact_third_order: bool = False

    @property
    def data_form(self) -> bool:
        return self.algorithm_type.endswith("++")

    @property
    def stochastic(self) -> bool:
        return self.algorithm_type.startswith("sde")

    @property
    def history(self) -> int:
        return self.order

    def step_order(self, i: int, available: int, nodes: Nodes) -> int:
        """Warm-up, diffusers' lower-order-final rules (< 15 steps), and a guard against repeated nodes."""
        n = nodes.num_steps
        p = min(self.order, available + 1)
        final_zero = nodes.rho[-1] == 0.0
        if i == n - 1 and (self.euler_at_final or (self.lower_order_final and n < 15) or final_zero):
            p = 1
        if i == n - 2 and self.lower_order_final and n < 15:
            p = min(p, 2)
        while p > 1 and not _distinct(nodes, list(range(i - p + 1, i + 2))):
            p -= 1  # duplicate timesteps (h = 0) or λ_t = ∞: divided differences would blow up
        return p

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        p = self.step_order(i, available, nodes)
        w = ei_step(self.algorithm_type, nodes, i, i + 1, self.exact_third_order)
        d = w.c0 * _age(p, a0=1.0)
        if p >= 2:
            lam = nodes.lam
            h = lam[i + 1] - lam[i]
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = _age(p, a0=1 / r0, a1=-1 / r0)
            if p == 2:
                d += (w.c1_midpoint if self.solver_type == "midpoint" else w.c1_taylor) * d1_0
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = _age(p, a1=1 / r1, a2=-1 / r1)
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                d += w.c1_taylor * d1 + w.c2 * d2
        return Rule(x=w.base, d=tuple(d), z=w.noise)


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
    """diffusers' grid-based singlestep DPM-Solver(++): a macro step of order k spans k grid intervals, its
    intermediate evaluations at the ordinary grid points, and integrates from the saved macro-step start."""

    order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    num_steps: int = 0
    final_zero: bool = True

    @property
    def data_form(self) -> bool:
        return self.algorithm_type.endswith("++")

    @property
    def stochastic(self) -> bool:
        return self.algorithm_type.startswith("sde")

    @property
    def history(self) -> int:
        return self.order

    def effective_order(self, i: int, start: int, nodes: Nodes) -> int:
        """Order of step i in a run that started at ``start``: diffusers' order list, lowered where history is
        missing (img2img) or where a macro step would span repeated nodes; a macro step always starts where S
        was saved. Runs with a full history (start ≤ i − K + 1) share one cached pass from index 0."""
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
            if p > 1 and not _distinct(nodes, list(range(j - p + 1, j + 2))):
                p = 1
            if p == 1:
                saved_at = j
            orders[j] = p
        if start == 0:
            cache[nodes.num_steps] = orders
        return orders[i]

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        p = self.effective_order(i, i - available, nodes)
        b = i - p + 1  # the macro step started at node b (its sample is the saved S)
        w = ei_step(self.algorithm_type, nodes, b, i + 1)
        if p == 1:
            return Rule(x=w.base, d=(w.c0,), z=w.noise, save=Rule(x=1.0, d=()))
        lam = nodes.lam
        h = lam[i + 1] - lam[b]
        if p == 2:
            r0 = (lam[i] - lam[b]) / h
            d = w.c0 * _age(2, a1=1.0) + (w.c1_midpoint if self.solver_type == "midpoint" else w.c1_taylor) * _age(
                2, a0=1 / r0, a1=-1 / r0)
        else:
            r0, r1 = (lam[i] - lam[b]) / h, (lam[i - 1] - lam[b]) / h
            d1_0 = _age(3, a1=1 / r1, a2=-1 / r1)
            d1_1 = _age(3, a0=1 / r0, a2=-1 / r0)
            d = w.c0 * _age(3, a2=1.0)
            if self.solver_type == "midpoint":
                d += w.c1_taylor * d1_1
            else:
                d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
                d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
                d += w.c1_taylor * d1 + w.c2 * d2
        return Rule(x=0.0, s=w.base, d=tuple(d), z=w.noise)
