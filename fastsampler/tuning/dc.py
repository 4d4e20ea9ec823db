"""DC-Solver's ratio search: one compensation ratio per step, greedily, against a teacher trajectory.

For step i = K, K+1, … (K = ``dc_order``; earlier steps lack the history to interpolate), with the steps before
it fixed at their chosen ratios, choose ρ_i to minimise

    L_i(ρ) = ‖x^c_{i+1}(ρ) − x^teacher_{i+1}‖² / numel

where x^c_{i+1} is UniPC's corrected state at node i+1: the stored prediction of step i is compensated with ρ,
the predictor runs, the model is evaluated at the predicted x̃_{i+1} and the corrector runs (reference note §2.3;
the official code's loss). Without a corrector (DPM-Solver++, DEIS) the loss is on x_{i+1} and costs no model
evaluation. On the last step the loss is on the final sample.

Two searches: ``"gradient"`` — AdamW on ρ through the model input, as the official code (lr 0.1, 20 iterations),
with ρ = c + w·tanh(u) bounded to ``bounds`` and weight decay 0 by default (the official 0.01 pulls ρ toward 0,
pitfall 7); and ``"scan"`` — a derivative-free bounded 1-D search (scipy's Brent) that needs no backward pass, so
it works with fp16 or compiled models. Both keep the best ratio evaluated, ρ = 1 included, so no step ends worse
than the plain solver on its own loss; and if the tuned ratios end worse on the final sample than all-ones, the
best prefix of them (ratios after it reset to 1, possibly none) is returned. ``objective="final"`` instead scores
each step's ratio by the final sample (the remaining steps run plain), at N − i − 1 more model evaluations each.

The search checkpoints after every step (JSON); a rerun with the same inputs resumes from the last finished step,
replaying the steps before it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from scipy.optimize import minimize_scalar

from fastsampler import progress as progress_bars
from fastsampler.plans.format import Plan
from fastsampler.samplers.rules import Nodes, compile_plan
from fastsampler.schedules.grids import Grid
from fastsampler.samplers.transforms import PLUGINS, apply_plugins
from fastsampler.samplers.transforms.dc import DynamicCompensation, compensation_nodes, lagrange_weights, shifted_time
from fastsampler.tuning.runner import RunState, advance, prediction, register, start, timestep

SEARCHES = ("gradient", "scan")
OBJECTIVES = ("next", "final")


@dataclass(frozen=True)
class DCSearch:
    """Settings of the ratio search (see the module docstring)."""

    method: str = "gradient"
    iters: int = 20  # AdamW iterations per step ("gradient"); function evaluations per step ("scan")
    lr: float = 0.1
    weight_decay: float = 0.0
    bounds: tuple[float, float] = (0.3, 1.7)
    order: int = 2
    objective: str = "next"  # "next": the official loss at node i + 1; "final": the final sample's

    def __post_init__(self) -> None:
        if self.method not in SEARCHES:
            raise ValueError(f"DC `search` must be one of {SEARCHES}, got {self.method!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"DC `objective` must be one of {OBJECTIVES}, got {self.objective!r}")
        lo, hi = self.bounds
        if not (0.0 < lo < 1.0 < hi):
            raise ValueError(f"DC `bounds` must satisfy 0 < lo < 1 < hi (ratio 1 = no compensation), got {self.bounds}")
        if self.iters < 1 or self.lr <= 0:
            raise ValueError("DC `iters` must be ≥ 1 and `lr` > 0")


@dataclass
class DCReport:
    """What a ratio search did, for the tuned scheduler's report."""

    num_steps: int
    ratios: list[float]
    step_loss_plain: list[float | None] = field(default_factory=list)
    step_loss_tuned: list[float | None] = field(default_factory=list)
    final_loss_plain: float = math.nan
    final_loss_tuned: float = math.nan
    fell_back_to_plain: bool = False
    model_evaluations: int = 0
    seconds: float = 0.0


def _mse(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference, over ``rows`` of the batch only when given (the fitting part of an in-batch split)."""
    if rows is not None:
        a, b = a[rows], b[rows]
    return (a.to(torch.float64) - b.to(torch.float64)).pow(2).mean()


def dc_plan(scheduler, ratios: list[float], order: int) -> Plan:
    """The scheduler's plan for its current grid with DC at ``ratios`` (also all ones: then the plan only has the
    extra history slots), the other plug-ins of its config in their documented order."""
    student = scheduler.plan
    nodes = _plan_nodes(student)
    options = {**scheduler.config, "dc_ratios": None, "dc_ratios_file": None, "dc_cpr_file": None}
    builder, transforms = apply_plugins(options, scheduler._build_solver(nodes), nodes)
    before_dc = sum(1 for t in transforms if t.name in PLUGINS[:PLUGINS.index("dc")])
    transforms = (*transforms[:before_dc], DynamicCompensation(tuple(ratios), order), *transforms[before_dc:])
    meta = dict(student.meta)
    return compile_plan(builder, nodes, scheduler.config.prediction_type, transforms,
                        {k: meta[k] for k in ("scheduler", "schedule", "mu") if k in meta})


class _StepProblem:
    """L_i(ρ) for one step, from the state before it and its model output."""

    def __init__(self, plan: Plan, state: RunState, model_output: torch.Tensor, model: Callable,
                 target: torch.Tensor, order: int, final_target: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None):
        self.plan, self.state, self.model, self.target, self.order = plan, state, model, target, order
        self.rows = rows
        self.final_target = final_target
        i = state.step
        self.i = i
        self.p = prediction(plan, i, state.x, model_output)
        self.model_output = model_output
        k = plan.slots
        self.nodes_t = compensation_nodes(_plan_nodes(plan), i, order)
        self.history = [self.p] + [state.history[(i - j) % k] for j in range(1, order + 1)]
        self.corrector = "corrected" in plan.registers and i + 1 < plan.num_steps
        self.evaluations = 0

    def store(self, ratio) -> torch.Tensor:
        tau = shifted_time(_plan_nodes(self.plan), self.i, ratio)
        weights = lagrange_weights(self.nodes_t, tau)
        return sum(w * m for w, m in zip(weights, self.history))

    def advance(self, ratio) -> RunState:
        return advance(self.plan, self.state, self.model_output, store=self.store(ratio), p=self.p)

    def loss(self, ratio) -> torch.Tensor:
        after = self.advance(ratio)
        if self.final_target is not None:  # run the remaining steps (plain) and compare the final sample
            state = after
            for j in range(self.i + 1, self.plan.num_steps):
                self.evaluations += 1
                state = advance(self.plan, state, self.model(state.x, timestep(self.plan, j)))
            return _mse(state.x, self.final_target, self.rows)
        if not self.corrector:
            return _mse(after.x, self.target, self.rows)
        self.evaluations += 1
        nxt = advance(self.plan, after, self.model(after.x, timestep(self.plan, self.i + 1)))
        return _mse(register(self.plan, nxt, "corrected"), self.target, self.rows)


def _plan_nodes(plan: Plan) -> Nodes:
    return Nodes.from_grid(Grid(plan.timesteps, plan.rho, plan.flow))


def _search_gradient(problem: _StepProblem, search: DCSearch) -> tuple[float, float, float]:
    lo, hi = search.bounds
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    u = torch.tensor(math.atanh((1.0 - centre) / half), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.AdamW([u], lr=search.lr, weight_decay=search.weight_decay)
    best_ratio, best_loss, plain = 1.0, math.inf, math.nan
    for it in range(search.iters + 1):
        optimiser.zero_grad()
        ratio = centre + half * torch.tanh(u)
        with torch.enable_grad():
            loss = problem.loss(ratio)
        value = float(loss.detach())  # ok-sync: tuning, host side
        if it == 0:
            plain = value
        if value < best_loss:
            best_ratio, best_loss = float(ratio.detach()), value
        if it < search.iters:
            loss.backward()
            optimiser.step()
    return best_ratio, best_loss, plain


@torch.no_grad()
def _search_scan(problem: _StepProblem, search: DCSearch) -> tuple[float, float, float]:
    plain = float(problem.loss(1.0))
    tried = {1.0: plain}

    def f(r: float) -> float:
        tried[float(r)] = float(problem.loss(float(r)))
        return tried[float(r)]

    minimize_scalar(f, bounds=search.bounds, method="bounded", options={"maxiter": search.iters, "xatol": 1e-3})
    best = min(tried, key=tried.get)
    return best, tried[best], plain


def _checkpoint_key(plan: Plan, model, noise: torch.Tensor, teacher: torch.Tensor, search: DCSearch) -> str:
    from fastsampler.models.denoisers import tensor_digest

    model_key = model.cache_key() if hasattr(model, "cache_key") else repr(model)
    payload = json.dumps({"plan": plan.fingerprint(), "model": model_key, "noise": tensor_digest(noise),
                          "teacher": tensor_digest(teacher), "search": asdict(search)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _load_checkpoint(path: Path | None, key: str) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return obj if obj.get("key") == key else None


def _save_checkpoint(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def final_loss(scheduler, ratios: list[float], order: int, model: Callable, noise: torch.Tensor,
                teacher: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[float, int]:
    plan = dc_plan(scheduler, ratios, order)
    state = start(plan, noise)
    with torch.no_grad():
        for i in range(plan.num_steps):
            state = advance(plan, state, model(state.x, timestep(plan, i)))
    return float(_mse(state.x, teacher[-1], rows)), plan.num_steps


def search_ratios(scheduler, model: Callable, noise: torch.Tensor, teacher: torch.Tensor,
                  search: DCSearch = DCSearch(), checkpoint: str | Path | None = None,
                  progress: bool = True, rows: torch.Tensor | None = None) -> DCReport:
    """Greedy per-step ratio search for the scheduler's current grid (``set_timesteps(N)`` done); the losses count
    only ``rows`` of the batch when given (the model still sees the whole batch)."""
    began = time.perf_counter()
    n = scheduler.num_inference_steps
    ratios = [1.0] * n
    plan = dc_plan(scheduler, ratios, search.order)
    report = DCReport(n, ratios, [None] * n, [None] * n)
    path = Path(checkpoint) if checkpoint is not None else None
    key = _checkpoint_key(plan, model, noise, teacher, search) + ("" if rows is None else f"-fit{len(rows)}")
    resumed = _load_checkpoint(path, key)
    done = 0
    if resumed is not None:
        ratios[:] = resumed["ratios"]
        report.step_loss_plain[:] = resumed["step_loss_plain"]
        report.step_loss_tuned[:] = resumed["step_loss_tuned"]
        done = resumed["next_step"]
    state = start(plan, noise)
    evaluations = 0
    bar = progress_bars.bar(range(n), desc=f"DC ratios ({n} steps)", enabled=progress, unit="step")
    for i in bar:
        with torch.no_grad():
            out = model(state.x, timestep(plan, i))
        evaluations += 1
        searchable = state.taken >= search.order and compensation_nodes(_plan_nodes(plan), i, search.order)
        if i >= done and searchable:
            final = teacher[-1] if search.objective == "final" else None
            problem = _StepProblem(plan, state, out, model, teacher[i + 1], search.order, final, rows)
            method = _search_gradient if search.method == "gradient" else _search_scan
            ratios[i], report.step_loss_tuned[i], report.step_loss_plain[i] = method(problem, search)
            evaluations += problem.evaluations
            bar.set_postfix(ratio=f"{ratios[i]:.3f}", loss=f"{report.step_loss_tuned[i]:.3g}")
            _save_checkpoint(path, {"key": key, "ratios": ratios, "next_step": i + 1,
                                    "step_loss_plain": report.step_loss_plain,
                                    "step_loss_tuned": report.step_loss_tuned})
        with torch.no_grad():
            if ratios[i] != 1.0 and searchable:
                state = _StepProblem(plan, state, out, model, teacher[i + 1], search.order).advance(ratios[i])
            else:
                state = advance(plan, state, out)
        state = state.detach()
    report.final_loss_tuned = float(_mse(state.x, teacher[-1], rows))
    report.final_loss_plain, calls = final_loss(scheduler, [1.0] * n, search.order, model, noise, teacher, rows)
    evaluations += calls
    if report.final_loss_tuned > report.final_loss_plain:
        # the greedy per-step losses did not add up on the final sample: keep the best prefix of the ratios
        best_k, best = 0, report.final_loss_plain
        for k in sorted({i + 1 for i, r in enumerate(ratios) if r != 1.0})[:-1]:
            loss, calls = final_loss(scheduler, ratios[:k] + [1.0] * (n - k), search.order, model, noise, teacher,
                                      rows)
            evaluations += calls
            if loss < best:
                best_k, best = k, loss
        ratios[best_k:] = [1.0] * (n - best_k)
        report.final_loss_tuned = best
        report.fell_back_to_plain = best_k == 0
    report.ratios = list(ratios)
    report.model_evaluations = evaluations
    report.seconds = time.perf_counter() - began
    return report
