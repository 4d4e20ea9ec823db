"""DEIS plan builder (Zhang & Chen 2023, arXiv 2204.13902): exponential integrator in ε-form.

With v = x/α and ρ = σ/α the probability-flow ODE is dv/dρ = ε̂, so a multistep step s0 → t reads

    x_t = α_t [ x_{s0}/α_{s0} + Σ_j C_j ε̂_j ],   C_j = ∫_{ρ_{s0}}^{ρ_t} L_j(g(ρ)) dρ,

where L_j is the Lagrange basis through the current and previous nodes in a variable g:

* ``logrho`` — g = log ρ (diffusers' "log-ρ DEIS"; closed form: ∫ P(log u) du = u·Q(log u), Q = Σ_k (−1)^k P^{(k)})
* ``rhoab``  — g = ρ (ρAB-DEIS; a plain polynomial integral)
* ``tab``    — g = t, the model's time (tAB-DEIS; ∫ L_j(t(ρ)) dρ by Gauss–Legendre on the pieces where t(ρ)
  is smooth: exact for discrete schedules, whose t(ρ) is piecewise linear)

Order 1 is DDIM for all three: C_0 = ρ_t − ρ_{s0}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fastsampler.samplers.rules import Combo, Nodes, Rule, multistep_order

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


_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)


def _gauss_nodes(a: float, b: float, knots: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and signed weights of 8-point Gauss–Legendre on each piece of [a, b] split at ``knots``."""
    lo, hi = min(a, b), max(a, b)
    inner = knots[(knots > lo) & (knots < hi)] if knots is not None else np.empty(0)
    edges = np.concatenate([[lo], np.sort(inner), [hi]])
    half, mid = np.diff(edges)[:, None] / 2, (edges[:-1] + edges[1:])[:, None] / 2
    nodes, weights = (mid + half * _GL_X).ravel(), (half * _GL_W).ravel()
    return nodes, weights if b >= a else -weights


@dataclass(frozen=True)
class DEIS:
    order: int = 2
    solver_type: str = "logrho"
    lower_order_final: bool = True
    t_of_rho: Callable[[np.ndarray], np.ndarray] | None = field(default=None, compare=False)
    knots: np.ndarray | None = field(default=None, compare=False)  # ρ where t(ρ) has kinks

    data_form = False
    registers = ()

    @property
    def history(self) -> int:
        return self.order

    @property
    def order_of_accuracy(self) -> int:
        return self.order

    def step_order(self, i: int, available: int, nodes: Nodes) -> int:
        return multistep_order(self.order, i, available, nodes, self.lower_order_final, 15)

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
        g = np.asarray(self.t_of_rho(np.asarray(rho_s)), dtype=np.float64)
        r, w = _gauss_nodes(float(rho_s[0]), float(rho_t), self.knots)
        t = np.asarray(self.t_of_rho(r), dtype=np.float64)
        return np.array([np.dot(w, np.polynomial.polynomial.polyval(t, lagrange_basis(g, j))) for j in range(p)])

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        p = self.step_order(i, available, nodes)
        rho = nodes.sigma / nodes.alpha  # VE sigma for VP and flow alike
        c = self.coefficients(rho[[i - k for k in range(p)]], float(rho[i + 1]))
        a_t = float(nodes.alpha[i + 1])
        return Rule(Combo(x=a_t / float(nodes.alpha[i]), d=tuple(a_t * c)))
