"""The learned plan as a function of its parameters (``method="coefficients"``; the fit is ``coefficients``).

Grid parameters u (the interior nodes, ``timesteps.GridFamily``), row corrections θ and, with
``learn_eval_times``, evaluation-time offsets ξ give the plan:

    rows_i = base_i(u) + |base₀_i| ⊙ Π_i θ_i   on the support,      t'_i = t_i + b_i tanh(ξ_i)

where Π_i projects onto the corrections that keep the row exact on a point mass (the consistency the fit keeps:
``projectors``), b_i is ``EVAL_SHARE`` of the smaller gap to a neighbouring node. ``Parametrisation.materialise``
gives the plan (numpy, exact); ``sample`` runs it differentiably in u, θ and ξ through ``tuning.runner``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from fastsampler.plans.format import OUT_STORE, Plan, src_slot
from fastsampler.tuning.coefficient_search import CoefficientSearch
from fastsampler.tuning.runner import advance, prediction, row_level, start, step_sources
from fastsampler.tuning.support import ZERO_SCALE, alive_sources, history_slots, widen
from fastsampler.tuning.timesteps import GridFamily, linearise

COMPONENTS = {"data": slice(0, 1), "full": slice(0, 2)}  # the (x₀, ε) components a projection keeps exact
EVAL_SHARE = 0.5  # decoupled evaluation times move at most this share of the gap to a neighbouring node (LD3)


def exact_output(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """The (x₀, ε) components of the exact model output at x = α x₀ + σ ε for a point mass at x₀."""
    return {"epsilon": (0.0, 1.0), "sample": (1.0, 0.0), "v_prediction": (-sigma, alpha),
            "flow_prediction": (-1.0, 1.0)}[prediction_type]


def consistent_sources(plan: Plan, prediction_type: str) -> np.ndarray:
    """(N, 2, C, 2): per step, the sources its store row reads ([:, 0]) and its other rows read ([:, 1]) on an
    exactly consistent run from step 0, each as its (x₀, ε) components."""
    alpha, sigma = plan.alpha, plan.sigma
    state = start(plan, torch.tensor([alpha[0], sigma[0]], dtype=torch.float64))
    zero = torch.zeros(2, dtype=torch.float64)
    out = np.zeros((plan.num_steps, 2, plan.coef.shape[-1], 2))
    for i in range(plan.num_steps):
        o = torch.tensor(exact_output(prediction_type, alpha[i], sigma[i]), dtype=torch.float64)
        sources = [zero if s is None else s for s in step_sources(state, prediction(plan, i, state.x, o))]
        out[i, 0] = torch.stack(sources).numpy()
        after = advance(plan, state, o)
        sources[src_slot(plan.num_registers, int(plan.write_slot[i]))] = after.history[int(plan.write_slot[i])]
        out[i, 1] = torch.stack(sources).numpy()
        state = after
    return out


def projectors(plan: Plan, support: np.ndarray, prediction_type: str, mode: str = "full") -> np.ndarray:
    """(N, O, C, C): Π per used row, the projection onto corrections δ (on ``support``) with δ·S = 0 (``mode``
    "data": only S's x₀ column)."""
    sources = consistent_sources(plan, prediction_type)[..., COMPONENTS[mode]]
    n, outputs, c = support.shape
    pi = np.zeros((n, outputs, c, c))
    for i in range(n):
        for o in range(outputs):
            s = sources[i, 0 if o == OUT_STORE else 1] * support[i, o][:, None]  # (C, 1 or 2)
            pi[i, o] = np.diag(support[i, o].astype(float)) - s @ np.linalg.pinv(s, rcond=1e-12)
    return pi


def used_rows(plan: Plan) -> np.ndarray:
    """(N, O, C): the rows a run from step 0 uses (level min(i, W − 1) for step i)."""
    return np.stack([plan.coef[min(i, plan.levels - 1), i] for i in range(plan.num_steps)])


def with_rows(plan: Plan, rows: np.ndarray, meta: dict) -> Plan:
    """``plan`` whose rows used from step 0 are replaced by ``rows`` (other warm-up levels: img2img starts)."""
    coef = plan.coef.copy()
    for i in range(plan.num_steps):
        coef[min(i, plan.levels - 1), i] = rows[i]
    return replace(plan, coef=coef, meta={**dict(plan.meta), **meta})


class Parametrisation:
    """Grid parameters u (or none) and row corrections θ → the plan, as numpy (exact) or torch (differentiable)."""

    def __init__(self, scheduler, search: CoefficientSearch, start: Plan | None = None):
        self.scheduler, self.search = scheduler, search
        self.base = scheduler.plan
        self.starts_at_base = start is None
        self.given_start = self.base if start is None else start  # e.g. the Nelder–Mead grid: training starts there
        slots = history_slots(search.history, self.base)
        self.start = widen(self.given_start, slots)  # the plan θ = 0 samples like, on the tuned plan's history ring
        self.family = GridFamily(scheduler, slots, search.learn_start) \
            if search.learn_timesteps and self.base.num_steps > 1 else None
        rows0 = used_rows(self.start)
        self.support = alive_sources(self.start) if search.support == "history" else rows0 != 0.0
        self.scale = np.where(rows0 != 0.0, np.abs(rows0), ZERO_SCALE)
        self.prediction_type = scheduler.config.prediction_type
        # a shifted evaluation time changes what an exact model returns on a consistent run: free rows only
        self.decoupled = search.learn_eval_times and search.consistency == "none"

    def initial_u(self) -> torch.Tensor:
        if self.family is None:
            return torch.zeros(0, dtype=torch.float64)
        interior = self.family.interior0 if self.starts_at_base else self.family.free_from(self.start.rho)
        return torch.tensor(self.family.u_from(interior), dtype=torch.float64)

    def initial_theta(self, u: torch.Tensor) -> torch.Tensor:
        """θ at which the plan at ``u`` is the starting plan: 0, or — free rows continuing a tuned start (the
        second stage of ``consistency="auto"``) — the start's own corrections, its rows minus the base solver's
        rows on its grid."""
        zero = torch.zeros(self.support.shape, dtype=torch.float64)
        if self.starts_at_base or self.family is None or self.search.consistency != "none":
            return zero
        offset = (used_rows(self.start) - used_rows(self.plan_at(u))) / self.scale
        return torch.as_tensor(np.where(self.support, offset, 0.0))

    def plan_at(self, u: torch.Tensor, round_timesteps: bool = False) -> Plan:
        """The base solver's plan on the grid of ``u`` (the starting plan when the grid is held)."""
        if self.family is None:
            return self.start
        return self.family.plan(self.family.interior(u).numpy(), round_timesteps)

    # Decoupled evaluation times: t'_i = t_i + b_i tanh(ξ_i) -------------------------------------------------
    def eval_bounds(self, plan: Plan) -> np.ndarray:
        """(N,) b_i = EVAL_SHARE · the smaller model-time gap to the neighbouring nodes (the first node's upper
        neighbour: the largest trained time), so the evaluation times stay ordered and inside the trained range."""
        if not self.decoupled:
            return np.zeros(plan.num_steps)
        floor, ceil = self.scheduler.training_rho_range()
        t = np.asarray(plan.timesteps, dtype=np.float64)
        final = float(self.scheduler.model_timesteps(np.array([max(float(plan.rho[-1]), floor)]))[0])
        top = float(self.scheduler.model_timesteps(np.array([ceil]))[0])
        upper = np.concatenate([[max(top - t[0], 0.0)], t[:-1] - t[1:]])
        lower = np.concatenate([t[:-1] - t[1:], [max(t[-1] - final, 0.0)]])
        return EVAL_SHARE * np.minimum(upper, lower)

    def eval_shift(self, plan: Plan, xi: torch.Tensor) -> torch.Tensor:
        """b ⊙ tanh(ξ): the model-time offsets of the steps (0 at ξ = 0)."""
        return torch.as_tensor(self.eval_bounds(plan)) * torch.tanh(xi)

    def correction(self, plan: Plan, theta: torch.Tensor) -> torch.Tensor:
        """|base₀| ⊙ Π θ on the support (Π from ``plan``'s grid)."""
        delta = torch.as_tensor(self.scale) * theta * torch.as_tensor(self.support)
        if self.search.consistency == "none":
            return delta
        mode = "full" if self.search.consistency == "auto" else self.search.consistency  # auto's first fit
        if getattr(self, "_projected", (None,))[0] is not plan:  # a held grid: one projection for the whole run
            self._projected = (plan, torch.as_tensor(projectors(plan, self.support, self.prediction_type, mode)))
        return torch.einsum("nocd,nod->noc", self._projected[1], delta)

    def materialise(self, u: torch.Tensor, theta: torch.Tensor, xi: torch.Tensor | None = None,
                    round_timesteps: bool = False) -> Plan:
        plan = self.plan_at(u, round_timesteps)
        if torch.any(theta != 0):
            rows = used_rows(plan) + self.correction(plan, theta).detach().numpy()
            plan = with_rows(plan, rows, {"tuned": "coefficients"})
        if xi is None or not torch.any(xi != 0):
            return plan
        return self.with_eval_times(plan, self.plan_at(u), xi, round_timesteps)

    def with_eval_times(self, plan: Plan, continuous: Plan, xi: torch.Tensor, round_timesteps: bool) -> Plan:
        """``plan`` evaluating the model at t'_i (from ``continuous``'s unrounded times); integers where the model
        needs them, kept strictly decreasing."""
        t = np.asarray(continuous.timesteps, dtype=np.float64) + self.eval_shift(continuous, xi.detach()).numpy()
        if round_timesteps:
            t = np.round(t)
            for i in range(1, len(t)):  # two offsets may round onto one integer
                t[i] = min(t[i], t[i - 1] - 1.0)
        meta = {**dict(plan.meta), "tuned": "coefficients", "schedule": self.scheduler._fingerprint(t),
                "eval_times": "decoupled"}
        return replace(plan, timesteps=t, meta=meta)


def sample(param: Parametrisation, u: torch.Tensor, theta: torch.Tensor, model: Callable, noise: torch.Tensor,
           dtype: torch.dtype, xi: torch.Tensor | None = None) -> torch.Tensor:
    """The final sample of the plan at (u, θ, ξ), differentiable in all three (ξ None: the nodes' own times)."""
    if param.family is None:
        plan = param.start
        coef = torch.tensor(plan.coef, dtype=dtype)
        out_map = torch.tensor(plan.out_map, dtype=dtype)
        times = torch.tensor(np.array(plan.timesteps, dtype=np.float64), dtype=dtype)
    else:
        interior = param.family.interior(u.detach()).numpy()
        plan, values, jac = linearise(param.family, interior, param.search.fd_step)
        d_lambda = (param.family.interior(u) - torch.as_tensor(interior)).to(dtype)
        coef, out_map, times = (torch.tensor(v, dtype=dtype) + torch.tensor(j, dtype=dtype) @ d_lambda
                                for v, j in zip(values, jac))
    delta = param.correction(plan, theta).to(dtype)
    if xi is not None:
        times = times + param.eval_shift(plan, xi).to(dtype)
    state = start(plan, noise)
    for i in range(plan.num_steps):
        row = coef[row_level(plan, state), i] + delta[i]
        state = advance(plan, state, model(state.x, times[i]), coef=row, out_map=out_map[i])
    return state.x
