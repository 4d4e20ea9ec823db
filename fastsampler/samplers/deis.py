"""DEIS plan builder (Zhang & Chen 2023, arXiv 2204.13902): exponential integrator in ε-form.

With v = x/α and ρ = σ/α the probability-flow ODE is dv/dρ = ε̂, so a multistep step s0 → t reads

    x_t = α_t [ x_{s0}/α_{s0} + Σ_j C_j ε̂_j ],   C_j = ∫_{ρ_{s0}}^{ρ_t} L_j(g(ρ)) dρ,

where L_j is the Lagrange basis through the current and previous nodes in a variable g:

* ``logrho`` — g = log ρ (diffusers' "log-ρ DEIS"; closed form: ∫ P(log u) du = u·Q(log u), Q = Σ_k (−1)^k P^{(k)})
* ``rhoab``  — g = ρ (ρAB-DEIS; a plain polynomial integral)
* ``tab``    — g = t, the model's time (tAB-DEIS; ∫ L_j(t(ρ)) dρ by adaptive quadrature)

Order 1 is DDIM for all three: C_0 = ρ_t − ρ_{s0}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.integrate import quad

from fastsampler.samplers.plan import Nodes, Rule

SOLVER_TYPES = ("logrho", "rhoab", "tab")


def lagrange_basis(nodes: np.ndarray, j: int) -> np.ndarray:
    """Coefficients (ascending powers) of L_j(g) = Π_{k≠j} (g − g_k)/(g_j − g_k)."""
    coef = np.array([1.0])
    for k, g_k in enumerate(nodes):
        if k != j:
            coef = np.convolve(coef, [-g_k, 1.0]) / (nodes[j] - g_k)
    return coef


def _log_antiderivative(p: np.ndarray, u: float) -> float:
    """F(u) = u·Q(log u) with Q + Q′ = P (P, Q ascending coefficients), an antiderivative of P(log u); F(0) = 0."""
    if u == 0.0:
        return 0.0
    q = np.zeros_like(p)
    term, sign = p.copy(), 1.0
    while len(term):
        q[:len(term)] += sign * term
        term, sign = term[1:] * np.arange(1, len(term)), -sign  # derivative
    return u * float(np.polynomial.polynomial.polyval(math.log(u), q))


def _poly_antiderivative(p: np.ndarray, u: float) -> float:
    return float(np.polynomial.polynomial.polyval(u, np.concatenate([[0.0], p / np.arange(1, len(p) + 1)])))


@dataclass(frozen=True)
class DEIS:
    order: int = 2
    solver_type: str = "logrho"
    lower_order_final: bool = True
    t_of_rho: Callable[[float], float] | None = field(default=None, compare=False)

    data_form = False
    stochastic = False

    @property
    def history(self) -> int:
        return self.order

    def step_order(self, i: int, available: int, nodes: Nodes) -> int:
        n = nodes.num_steps
        p = min(self.order, available + 1)
        if i == n - 1 and ((self.lower_order_final and n < 15) or nodes.rho[-1] == 0.0):
            p = 1
        if i == n - 2 and self.lower_order_final and n < 15:
            p = min(p, 2)
        rho = nodes.sigma / nodes.alpha
        while p > 1 and np.any(np.diff(rho[i - p + 1:i + 1]) >= 0):
            p -= 1  # repeated nodes: the Lagrange basis is undefined
        return p

    def coefficients(self, rho_s: np.ndarray, rho_t: float) -> np.ndarray:
        """C_j for nodes ρ_s[0] (current), ρ_s[1], … (earlier), integrating from ρ_s[0] to ρ_t."""
        p = len(rho_s)
        if p == 1:
            return np.array([rho_t - rho_s[0]])
        if self.solver_type == "logrho":
            g = np.log(rho_s)
            return np.array([_log_antiderivative(lagrange_basis(g, j), rho_t)
                             - _log_antiderivative(lagrange_basis(g, j), rho_s[0]) for j in range(p)])
        if self.solver_type == "rhoab":
            return np.array([_poly_antiderivative(lagrange_basis(rho_s, j), rho_t)
                             - _poly_antiderivative(lagrange_basis(rho_s, j), rho_s[0]) for j in range(p)])
        if self.t_of_rho is None:
            raise ValueError("tAB-DEIS needs the schedule's t(ρ)")
        g = np.array([self.t_of_rho(r) for r in rho_s])
        out = []
        for j in range(p):
            basis = lagrange_basis(g, j)
            value, _ = quad(lambda r: np.polynomial.polynomial.polyval(self.t_of_rho(r), basis), rho_s[0], rho_t,
                            epsabs=1e-13, epsrel=1e-12, limit=200)
            out.append(value)
        return np.array(out)

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        p = self.step_order(i, available, nodes)
        rho = nodes.sigma / nodes.alpha  # VE sigma for VP and flow alike
        c = self.coefficients(rho[[i - k for k in range(p)]], float(rho[i + 1]))
        a_t = float(nodes.alpha[i + 1])
        return Rule(x=a_t / float(nodes.alpha[i]), d=tuple(a_t * c))
