"""Generalized heavy ball (GHVB) of order k with damping β (Wizadwongsa et al., ICLR 2024, arXiv 2307.11118, §4.2,
eq. (19), Algorithm 2), on variable steps.

ε-form (eq. (2)): x̄ = x/α, ρ = σ/α (the paper's σ̄), dx̄/dρ = ε̂. The velocity averages the predictions, and an
Adams–Bashforth-type combination of velocities advances x̄:

    v_{n+1} = (1 − β)·v_n + β·ε̂_n,        x̄_{n+1} = x̄_n + δ_n·ê,    δ_n = ρ_{n+1} − ρ_n

Constant steps (the paper): ê = (1/β)·Σ_{j<k} c_j ∇^j v_{n+1}, c_0 = β, c_j = γ_{j−1} + β(γ_j − γ_{j−1}) (γ the
AB series 1, ½, 5/12, …): that is AB-k on ε̂_n = (v_{n+1} − (1 − β)v_n)/β, which reads k + 1 velocities, with
the k-th backward difference ∇^k v_{n+1} dropped.

Variable steps (here; reduces to the paper's weights on uniform steps, tested): write variable-step AB-k in ρ
(weights C_m = ∫ L_m dρ over the nodes ρ_n … ρ_{n−k+1}, as ρAB-DEIS) with ε̂_{n−m} = (u_m − (1 − β)u_{m+1})/β,
u_m = v_{n+1−m} taken at node ρ_{n−m} (where the ε̂ it last took in was evaluated); dropping the k-th divided
difference of u is the same as replacing the oldest velocity u_k by its degree-(k − 1) extrapolation from
u_0 … u_{k−1} (nodes ρ_n … ρ_{n−k+1}, those of the AB weights) to ρ_{n−k}.
The dropped term is O(δ^k)·δ per step, so the order stays k (tested on a Karras grid); β = 1 is AB-k exactly.

Warm-up (A6 of the reference note): v := ε̂ on a run's first step (a plain DDIM step), then orders
min(k, steps so far) with the same β (where ρ_{n−p} would lie before the grid, the window's last step is repeated
to place it). The stored prediction of each step is its velocity v_{n+1} (history slot), so a step reads k stored
velocities and forms the new one from P and the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastsampler.samplers.deis import DEIS, lagrange_basis
from fastsampler.samplers.rules import Combo, Nodes, Rule, multistep_order

MAX_ORDER = 5  # the paper's table of constant-step weights goes to order 5
_AB = DEIS(solver_type="rhoab")  # variable-step Adams–Bashforth weights in ρ


def ghvb_weights(beta: float, rho: np.ndarray, rho_next: float, rho_before: float) -> np.ndarray:
    """Weights g_m on the velocities u_m = v_{n+1−m}, m < p, for the nodes ``rho`` = (ρ_n, ρ_{n−1}, …, ρ_{n−p+1}):
    x̄_{n+1} = x̄_n + Σ_m g_m u_m. ``rho_before`` = ρ_{n−p}, where the dropped velocity u_p sits."""
    p = len(rho)
    c = _AB.coefficients(rho, rho_next)  # AB-p on ε̂ at ρ_n … ρ_{n−p+1}
    ell = np.zeros(p + 1)
    ell[:p] += c / beta
    ell[1:] -= (1.0 - beta) * c / beta  # ε̂_{n−m} = (u_m − (1 − β) u_{m+1})/β
    extrapolate = np.array([np.polynomial.polynomial.polyval(rho_before, lagrange_basis(rho, m)) for m in range(p)])
    return ell[:p] + ell[p] * extrapolate


@dataclass(frozen=True)
class GHVB:
    order: int = 4
    beta: float = 0.8
    lower_order_final: bool = True

    data_form = False
    registers = ()

    @property
    def history(self) -> int:
        return max(self.order, 2)  # the store reads the previous velocity

    @property
    def order_of_accuracy(self) -> int:
        return self.order

    def step_order(self, i: int, available: int, nodes: Nodes) -> int:
        return multistep_order(self.order, i, available, nodes, self.lower_order_final, 15)

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        p = self.step_order(i, available, nodes)
        rho = nodes.sigma / nodes.alpha
        window = rho[[i - m for m in range(p)]]
        g = ghvb_weights(self.beta, window, float(rho[i + 1]), _node_before(rho, i - p, window))
        a_t = float(nodes.alpha[i + 1])
        velocity = None if available == 0 else Combo(p=self.beta, d=(0.0, 1.0 - self.beta))
        return Rule(Combo(x=a_t / float(nodes.alpha[i]), d=tuple(a_t * g)), store=velocity)


def _node_before(rho: np.ndarray, j: int, window: np.ndarray) -> float:
    """ρ_j, the node of the dropped velocity; before the grid's first node (a run's warm-up) or on a repeated node,
    the window's last step repeated (only p ≥ 2 reads it: p = 1 extrapolates a constant)."""
    if len(window) < 2:
        return float(window[-1])
    if j >= 0 and (rho[j] - window[-1]) * (window[-1] - window[-2]) > 0:
        return float(rho[j])
    return float(2.0 * window[-1] - window[-2])
