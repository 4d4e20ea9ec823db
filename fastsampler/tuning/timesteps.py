"""Learned time points (LD3-style; Tong et al., ICLR 2025, arXiv 2405.15506): gradient descent on a grid.

The N − 1 interior nodes of the scheduler's grid are learned in λ = log(α/σ) against the teacher's final sample,
for any scheduler (its own solver and plug-ins). The grid stays strictly decreasing in noise and inside the
schedule by construction: with u ∈ ℝᴺ,

    λ_k = λ_0 + (λ_cap − λ_0) · Σ_{j≤k} softmax(u)_j,   k = 1 … N − 1,

where λ_0 is the first node (kept), and λ_cap the last node when the grid ends at σ_min, or the smallest trained
noise level when it ends at σ = 0 (that final node is kept).

Gradients: a plan is closed-form in its nodes, so each iteration linearises the coefficient table, the output map
and the model times around the current nodes by central differences of the plan builders (2(N − 1) plan
compilations, no model calls — the "equivalent" of a differentiable builder), and autograd carries the loss
through the sampling loop, the model's input and — where the model is differentiable in its time input, as a
diffusers UNet is — its time input. Adam on u; the best grid seen (the initial one included) is kept, so tuning
never ends worse on its fitting noises; with held-out noises (``holdout``) the grid kept is the one seen with the best
held-out loss instead, so a grid that only fits the fitting noises is not returned. Checkpoints (JSON: u, Adam moments, best) after every iteration; a rerun
resumes. For discrete-time models the learned timesteps are rounded to integers at the end (the nodes' noise
levels are kept, as for Karras grids).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fastsampler import progress as progress_bars
from fastsampler.plans.format import Plan
from fastsampler.samplers.rules import Nodes, compile_plan
from fastsampler.schedules.grids import Grid
from fastsampler.tuning.holdout import Holdout
from fastsampler.models.denoisers import search_key
from fastsampler.tuning.runner import advance, run, start
from fastsampler.tuning.validation import Validation, check_fraction, per_sample_loss
from fastsampler.tuning.support import widen


MIN_GAIN = 1e-4


@dataclass(frozen=True)
class TimestepSearch:
    iters: int = 300  # at most: training stops earlier on a plateau (40 fixed iterations stopped while still falling)
    lr: float = 0.02  # 0.05 oscillates on the digits DDPM at NFE 5 (the loss surface is sharply curved)
    fd_step: float = 1e-5  # central-difference step in λ for the plan Jacobian
    patience: int = 20  # iterations without a relative gain of 1e-4 in the selection loss before stopping
    validation_fraction: float = 0.25  # held out inside the batch when no held-out noises are given

    def __post_init__(self) -> None:
        if self.iters < 1 or self.lr <= 0 or self.fd_step <= 0 or self.patience < 1:
            raise ValueError("timesteps search: `iters` ≥ 1, `lr` > 0, `fd_step` > 0 and `patience` ≥ 1")
        check_fraction("timesteps search", self.validation_fraction)


@dataclass
class TimestepReport:
    num_steps: int
    loss_initial: float = math.nan
    loss_best: float = math.nan
    loss_final_grid: float = math.nan  # after rounding timesteps (discrete models)
    losses: list[float] = field(default_factory=list)
    holdout_losses: list[float] = field(default_factory=list)  # per iteration, with held-out noises
    holdout_initial: float = math.nan
    holdout_final: float = math.nan
    timesteps_initial: list[float] = field(default_factory=list)
    timesteps_learned: list[float] = field(default_factory=list)
    rho_learned: list[float] = field(default_factory=list)
    model_evaluations: int = 0
    seconds: float = 0.0
    iterations: int = 0
    stopped: str = ""
    validation: str = ""  # where the selection loss comes from
    validation_losses: list[float] = field(default_factory=list)  # per iteration, in-batch held rows
    validation_base: float = math.nan  # the scheduler's own grid there
    validation_tuned: float = math.nan  # the returned grid there


def _lambda(rho: np.ndarray, flow: bool) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log1p(-rho) - np.log(rho) if flow else -np.log(rho)


def _rho(lam: np.ndarray, flow: bool) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(lam)) if flow else np.exp(-lam)


class GridFamily:
    """The scheduler's grids with the same ends and N − 1 free interior nodes (in λ); its plans on ``slots``
    history slots (``fastsampler.tuning.support.widen``; 0: the solver's own).

    ``free_start``: the first node is free too, at or below the first noise level (a truncated start: the run
    treats the initial noise as the sample at ρ(λ_s) — for VP models, whose noise has unit variance at every
    level, the marginal is off by the data's share at λ_s only). Then the free nodes are (λ_s, interior) with

        λ_s = λ_0 + (λ_cap − λ_0) · clamp(r·a, 0, START_SHARE),  λ_k = λ_s + (λ_cap − λ_s) · Σ_{j≤k} softmax(u)_j,

    and u = (a, logits); a = 0 is the scheduler's own first node, bit for bit; r = START_RATE scales the start's
    steps against the other nodes' under Adam. Align Your Steps' SD tables start
    at σ = 14.6; on the digits DDPM (σ_max 157) DPM-Solver++ 2M on them has 0.74× the error of the full-range
    grid at NFE 5 (``benchmarks/results/kdiffusion_bench.md``): the skipped range is nearly linear, and the step
    saved is spent where the data forms."""

    START_SHARE = 0.5  # the start moves at most half the λ range inward
    START_RATE = 1.0  # λ range per unit of a (0.1, slower under Adam: digits NFE 5 0.740× and FID 0.859 / 1.137
    # instead of 0.716× and 0.804 / 1.063)

    def __init__(self, scheduler, slots: int = 0, free_start: bool = False):
        self.scheduler = scheduler
        self.slots = slots
        self.free_start = free_start
        plan = scheduler.plan
        self.flow = plan.flow
        self.n = plan.num_steps
        if self.n < 2:
            raise ValueError("learning time points needs at least 2 steps (one interior node)")
        lam = _lambda(plan.rho, self.flow)
        self.lam0 = float(lam[0])
        self.final_rho = float(plan.rho[-1])
        self.final_zero = self.final_rho == 0.0
        floor = scheduler.training_rho_range()[0]
        self.cap = float(_lambda(np.array([floor]), self.flow)[0]) if self.final_zero else float(lam[-1])
        self.interior0 = self.free_from(plan.rho)

    @property
    def one_sided(self) -> set[int]:
        """Free entries whose plan derivative is taken forward only (the start: above it the schedule ends)."""
        return {0} if self.free_start else set()

    def free_from(self, rho: np.ndarray) -> np.ndarray:
        """The free λ's of a grid with these noise levels (clipped inside the family)."""
        lam = _lambda(np.asarray(rho, dtype=np.float64), self.flow)
        interior = lam[1:-1]
        if not self.free_start:
            return np.clip(interior, self.lam0 + 1e-6, self.cap - 1e-6)
        start = float(np.clip(lam[0], self.lam0, self.lam0 + self.START_SHARE * (self.cap - self.lam0)))
        return np.concatenate([[start], np.clip(interior, start + 1e-6, self.cap - 1e-6)])

    def u_from(self, free: np.ndarray) -> np.ndarray:
        start, interior = (free[0], free[1:]) if self.free_start else (self.lam0, free)
        edges = np.concatenate([[start], interior, [self.cap]])
        logits = np.log(np.maximum(np.diff(edges), 1e-9))
        if not self.free_start:
            return logits
        return np.concatenate([[(start - self.lam0) / (self.cap - self.lam0) / self.START_RATE], logits])

    def interior(self, u: torch.Tensor) -> torch.Tensor:
        """The free λ's at u: the interior nodes, after the start node when it is free."""
        if not self.free_start:
            steps = torch.softmax(u, 0) * (self.cap - self.lam0)
            return self.lam0 + torch.cumsum(steps, 0)[:-1]
        start = self.lam0 + (self.cap - self.lam0) * torch.clamp(u[0] * self.START_RATE, 0.0, self.START_SHARE)
        steps = torch.softmax(u[1:], 0) * (self.cap - start)
        return torch.cat([start.reshape(1), start + torch.cumsum(steps, 0)[:-1]])

    def nodes(self, free: np.ndarray, round_timesteps: bool = False) -> Nodes:
        free = np.asarray(free, dtype=np.float64)
        start, interior = (free[0], free[1:]) if self.free_start else (self.lam0, free)
        rho = np.concatenate([_rho(np.array([start]), self.flow), _rho(interior, self.flow), [self.final_rho]])
        if start == self.lam0:
            rho[0] = self.scheduler.plan.rho[0]  # the first node exactly
        timesteps = self.scheduler.model_timesteps(rho[:-1])
        if round_timesteps:
            timesteps = np.round(timesteps)
        return Nodes.from_grid(Grid(timesteps, rho, self.flow))

    def plan(self, interior: np.ndarray, round_timesteps: bool = False) -> Plan:
        nodes = self.nodes(interior, round_timesteps)
        builder, transforms = self.scheduler._build_parts(nodes)
        meta = {"scheduler": type(self.scheduler).__name__, "schedule": self.scheduler._fingerprint(nodes.timesteps),
                "tuned": "timesteps"}
        return widen(compile_plan(builder, nodes, self.scheduler.config.prediction_type, transforms, meta), self.slots)


def _tables(plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return plan.coef, plan.out_map, np.asarray(plan.timesteps, dtype=np.float64)


def linearise(family: GridFamily, interior: np.ndarray, h: float) -> tuple[Plan, list[np.ndarray], list[np.ndarray]]:
    """The plan at ``interior`` and its tables' derivatives along each free λ (central differences; forward
    ones for the family's ``one_sided`` entries)."""
    base = family.plan(interior)
    values = _tables(base)
    jac = [np.zeros(v.shape + (len(interior),)) for v in values]
    for j in range(len(interior)):
        step = np.zeros_like(interior)
        step[j] = h
        up = _tables(family.plan(interior + step))
        down, width = (values, h) if j in family.one_sided else (_tables(family.plan(interior - step)), 2 * h)
        for d, a, b in zip(jac, up, down):
            d[..., j] = (a - b) / width
    return base, list(values), jac


def sample_with_grad(plan: Plan, values, jac, d_lambda: torch.Tensor, model: Callable, noise: torch.Tensor,
                     dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The final sample with the plan's tables linearised in ``d_lambda`` (gradients reach it)."""
    coef, out_map, times = (torch.tensor(v, dtype=dtype) + torch.tensor(j, dtype=dtype) @ d_lambda
                            for v, j in zip(values, jac))
    state = start(plan, noise)
    for i in range(plan.num_steps):
        level = min(state.taken, plan.levels - 1)
        out = model(state.x, times[i])
        state = advance(plan, state, out, coef=coef[level, i], out_map=out_map[i])
    return state.x, plan.num_steps


def learn_timesteps(scheduler, model: Callable, noise: torch.Tensor, target: torch.Tensor,
                    search: TimestepSearch = TimestepSearch(), checkpoint: str | Path | None = None,
                    progress: bool = True, holdout: Holdout | None = None) -> tuple[Plan, TimestepReport]:
    """Learn the interior nodes of the scheduler's current grid (after ``set_timesteps(N)``) so its samples from
    ``noise`` approach ``target`` (the teacher's final states); returns the tuned plan and a report. With
    ``holdout``, the iterate kept is the one with the best loss on its noises."""
    began = time.perf_counter()
    family = GridFamily(scheduler)
    dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    validation = Validation(holdout, noise.shape[0], search.validation_fraction)
    report = TimestepReport(family.n, timesteps_initial=[float(t) for t in scheduler.plan.timesteps],
                            validation=validation.describe)
    path = Path(checkpoint) if checkpoint is not None else None
    key = search_key(scheduler.plan, model, noise, target, search)
    if holdout is not None:
        key += search_key(scheduler.plan, holdout.model, holdout.noise, holdout.target, search)[:8]
    u = torch.tensor(family.u_from(family.interior0), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([u], lr=search.lr)
    best_u, best_loss, best_fit, first = u.detach().clone(), math.inf, math.inf, 0
    gained = {"iteration": 0, "loss": math.inf}  # the last relative gain ≥ MIN_GAIN: the plateau counts from it
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            with torch.no_grad():
                u.copy_(torch.tensor(saved["u"], dtype=torch.float64))
            _restore_adam(optimiser, saved["adam"])
            best_u, best_loss = torch.tensor(saved["best_u"], dtype=torch.float64), saved["best_loss"]
            best_fit = saved.get("best_fit", best_loss)
            report.losses, first = saved["losses"], saved["iteration"]
            report.loss_initial = report.losses[0] if report.losses else math.nan
            report.holdout_losses = saved.get("holdout_losses", [])
            report.validation_losses = saved.get("validation_losses", [])
            gained = saved.get("gained", gained)
    bar = progress_bars.bar(range(first, search.iters + 1), desc=f"time points ({family.n} steps)",
                            enabled=progress)
    report.stopped = f"iteration limit ({search.iters})"
    for it in bar:
        if it - gained["iteration"] > search.patience:
            report.stopped = f"plateau (no relative gain of {MIN_GAIN:g} for {search.patience} iterations)"
            break
        interior = family.interior(u.detach()).numpy()
        plan, values, jac = linearise(family, interior, search.fd_step)
        optimiser.zero_grad()
        d_lambda = (family.interior(u) - torch.as_tensor(interior)).to(dtype)
        final, calls = sample_with_grad(plan, values, jac, d_lambda, model, noise, dtype)
        per_sample = per_sample_loss(final, target)
        loss = per_sample[validation.fit].mean()
        value = float(loss.detach())  # ok-sync: tuning, host side
        report.model_evaluations += calls
        report.losses.append(value)
        if it == 0:
            report.loss_initial = value
        score = validation.loss(per_sample, lambda: plan)  # select on noises the step did not fit
        (report.holdout_losses if holdout is not None else report.validation_losses).append(score)
        if score < best_loss:
            best_u, best_loss, best_fit = u.detach().clone(), score, value
        if score < gained["loss"] * (1 - MIN_GAIN):
            gained = {"iteration": it, "loss": score}
        bar.set_postfix(loss=f"{value:.4g}", best=f"{best_loss:.4g}")
        if it < search.iters:
            loss.backward()
            optimiser.step()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "u": u.detach().tolist(), "adam": _adam_json(optimiser),  # ok-sync
                                       "best_u": best_u.tolist(), "best_loss": best_loss, "best_fit": best_fit,  # ok-sync
                                       "losses": report.losses, "holdout_losses": report.holdout_losses,
                                       "validation_losses": report.validation_losses,
                                       "gained": gained, "iteration": it + 1}))
            os.replace(tmp, path)
    report.iterations = len(report.losses)
    interior = family.interior(best_u).numpy()
    discrete = scheduler.timesteps.dtype == torch.int64
    tuned = family.plan(interior, round_timesteps=discrete)
    with torch.no_grad():
        final_tuned, _ = run(tuned, model, noise)
    per_tuned = per_sample_loss(final_tuned, target)
    report.loss_final_grid = float(per_tuned[validation.fit].mean())
    report.model_evaluations += tuned.num_steps
    report.loss_best = best_fit  # the fitting loss of the grid kept
    if holdout is not None:
        report.holdout_initial = report.holdout_losses[0]
        report.holdout_final = holdout.loss(tuned)
        report.model_evaluations += holdout.evaluations
        if report.holdout_final > report.holdout_initial:  # rounding undid the held-out gain
            tuned, report.holdout_final = scheduler.plan, report.holdout_initial
            report.loss_final_grid = report.loss_initial
    else:  # the held rows of the batch decide: the learned grid, or the scheduler's own if it is not better there
        with torch.no_grad():
            final_base, _ = run(scheduler.plan, model, noise)
        per_base = per_sample_loss(final_base, target)
        report.model_evaluations += tuned.num_steps
        report.validation_base = validation.loss(per_base, lambda: scheduler.plan)
        report.validation_tuned = validation.loss(per_tuned, lambda: tuned)
        if not report.validation_tuned < report.validation_base:
            tuned, report.validation_tuned = scheduler.plan, report.validation_base
            report.loss_final_grid = float(per_base[validation.fit].mean())
    report.timesteps_learned = [float(t) for t in tuned.timesteps]
    report.rho_learned = [float(r) for r in tuned.rho]
    report.seconds = time.perf_counter() - began
    return tuned, report


def _adam_json(optimiser: torch.optim.Adam) -> dict:
    state = next(iter(optimiser.state.values()), {})
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}  # ok-sync


def _restore_adam(optimiser: torch.optim.Adam, saved: dict) -> None:
    if not saved:
        return
    state = optimiser.state_dict()
    state["state"] = {0: {k: torch.tensor(v, dtype=torch.float64 if k != "step" else torch.float32)
                          for k, v in saved.items()}}
    optimiser.load_state_dict(state)
