"""S³'s search space and options: what a candidate is (per-step USF choices and a grid choice), how an optuna
trial encodes it (``suggest``, ``schedule_params``) and the predictor sees it (``features``), the scheduler's own
solver as a starting candidate (``starting_schedule``), and the search's options and report. The search itself:
``fastsampler.tuning.s3``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastsampler.plans.format import Plan
from fastsampler.samplers.rules import Nodes
from fastsampler.samplers.usf_schedule import USFSchedule, USFStep
from fastsampler.schedules.grids import Grid
from fastsampler.tuning.validation import check_fraction


@dataclass(frozen=True)
class S3Search:
    """Settings of the schedule search."""

    budget_evaluations: int | None = 3000  # model evaluations (a candidate costs N)
    budget_seconds: float | None = None
    warmup: int = 24  # candidates evaluated before the predictor screens proposals
    round_size: int = 8  # proposals per screened round
    keep: int = 2  # of which the predictor lets this many be evaluated
    max_order: int = 3
    search_grid: bool = True
    grid_power_range: tuple[float, float] = (1.0, 12.0)
    seed: int = 0
    validate_top: int = 8  # this many best candidates on the fitting rows (and the seeds) are compared on validation
    validation_fraction: float = 0.25  # held out inside the batch when no held-out noises are given
    seed_timesteps: bool = True  # learn the time points first: a "learned" grid choice and a seed candidate
    refine_top: int = 1  # this many best candidates get their time points refined by gradient after the search

    def __post_init__(self) -> None:
        check_fraction("S3 search", self.validation_fraction)
        if self.refine_top < 0:
            raise ValueError(f"S3 search: `refine_top` must be ≥ 0, got {self.refine_top}")
        if self.validate_top < 1:
            raise ValueError(f"S3 search: `validate_top` must be ≥ 1, got {self.validate_top}")
        if self.budget_evaluations is None and self.budget_seconds is None:
            raise ValueError("S3 search needs a budget: `budget_evaluations` and/or `budget_seconds`")
        if not 1 <= self.keep <= self.round_size:
            raise ValueError("S3 search: 1 ≤ `keep` ≤ `round_size`")
        if not 1 <= self.max_order <= 4:
            raise ValueError("S3 search: `max_order` must be in 1..4")


@dataclass
class S3Report:
    num_steps: int
    best_score: float = math.nan
    baseline_score: float = math.nan  # the scheduler's own solver on its own grid
    best: dict[str, Any] = field(default_factory=dict)
    evaluated: int = 0
    screened_out: int = 0
    model_evaluations: int = 0  # all of them: search, time-point fits, validation
    search_evaluations: int = 0  # the search's candidates alone: what `budget_evaluations` bounds
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)  # best score after each evaluated candidate
    holdout_baseline: float = math.nan  # with held-out noises: the baseline's and the chosen candidate's loss there
    holdout_best: float = math.nan
    validation: str = ""  # where the validation loss comes from
    validation_base: float = math.nan  # the scheduler's own plan on validation (in-batch or held-out)
    validation_timesteps: float = math.nan  # the learned-time-point plan there (the time-points-only subset)
    validation_best: float = math.nan  # the returned plan there
    chosen: str = "baseline"  # baseline | learned time points | searched #<trial> | refined #<trial>
    candidates: dict[str, float] = field(default_factory=dict)  # every plan compared on validation, by name


@dataclass(frozen=True)
class GridChoice:
    """The searched grid: the scheduler's own nodes (``power`` None) or Karras-spaced ones with exponent ``power``;
    the final level the scheduler's own (``final="own"``) or the smallest trained noise level (``"sigma_min"``);
    ``learned``: the learned time points' grid (its own ends; ``power`` and ``final`` do not apply)."""

    power: float | None = None
    final: str = "own"
    learned: bool = False


def grid_nodes(scheduler, n: int, choice: GridChoice, learned: Plan | None = None) -> Nodes:
    """The nodes of ``choice`` between the scheduler's current grid's first node and its last positive one (or
    the ``learned`` plan's nodes)."""
    plan = scheduler.plan
    if choice.learned:
        if learned is None:
            raise ValueError("the learned grid choice needs the learned-time-point plan")
        return Nodes.from_grid(Grid(np.asarray(learned.timesteps, dtype=np.float64), learned.rho, learned.flow))
    rho = np.asarray(plan.rho, dtype=np.float64)
    own_final = float(rho[-1])
    final = own_final if choice.final == "own" else scheduler.training_rho_range()[0]
    if choice.power is None:
        nodes, timesteps = rho[:-1].copy(), np.asarray(plan.timesteps, dtype=np.float64)
    else:
        lo = float(rho[-2]) if own_final == 0.0 else own_final
        hi, p = float(rho[0]), choice.power
        ramp = np.linspace(0.0, 1.0, n) if own_final == 0.0 else np.linspace(0.0, 1.0, n + 1)[:-1]
        nodes = (hi ** (1 / p) + ramp * (lo ** (1 / p) - hi ** (1 / p))) ** p
        nodes[0] = hi
        timesteps = scheduler.model_timesteps(nodes)
        if scheduler.timesteps.dtype == torch.int64:
            timesteps = np.round(timesteps)
    if final > 0.0 and nodes[-1] <= final:
        final = 0.0  # the grid already reaches the smallest level: a σ_min end would repeat it
    return Nodes.from_grid(Grid(timesteps, np.append(nodes, final), plan.flow))


def karras_nodes(scheduler, n: int, power: float) -> Nodes:
    """n Karras-spaced nodes (exponent ``power``), the scheduler's own final level after them."""
    return grid_nodes(scheduler, n, GridChoice(power))


RELAXATIONS = ("none", "dpmsolver-2", "unipc-bh1", "unipc-bh2")
CORRECTOR_RELAXATIONS = ("none", "unipc-bh1", "unipc-bh2")


def suggest(trial, n: int, search: S3Search, learned: bool = False) -> tuple[USFSchedule, GridChoice]:
    """The candidate a trial encodes: per step order, prediction, first-derivative relaxation, corrector and its
    relaxation; the analytical first step; the grid (the scheduler's own, Karras with a searched exponent, or —
    with ``learned`` — the learned time points')."""
    steps = []
    for i in range(n):
        order = trial.suggest_int(f"order_{i}", 1, min(search.max_order, i + 1))
        prediction = trial.suggest_categorical(f"prediction_{i}", ["data", "noise"])
        relaxation = trial.suggest_categorical(f"relaxation_{i}", RELAXATIONS) if order > 1 else "none"
        corrector, corrector_relaxation = "none", "none"
        if i < n - 1:  # no evaluation follows the last step
            corrector = trial.suggest_categorical(f"corrector_{i}", ["none", "pseudo"])
            if corrector == "pseudo":
                corrector_relaxation = trial.suggest_categorical(f"corrector_relaxation_{i}", CORRECTOR_RELAXATIONS)
        steps.append(USFStep(order=order, prediction=prediction,
                             relaxation=None if relaxation == "none" else relaxation, corrector=corrector,
                             corrector_relaxation=None if corrector_relaxation == "none" else corrector_relaxation))
    afs = trial.suggest_categorical("afs", ["none", "zero_x0"])
    grid = GridChoice()
    if search.search_grid:
        final = trial.suggest_categorical("final", ["own", "sigma_min"])
        power = None
        kind = trial.suggest_categorical("grid", ["own", "karras", "learned"] if learned else ["own", "karras"])
        if kind == "karras":
            power = trial.suggest_float("grid_power", *search.grid_power_range)
        grid = GridChoice(power, final, kind == "learned")
    return USFSchedule(tuple(steps), afs=None if afs == "none" else afs), grid


def schedule_params(schedule: USFSchedule, search: S3Search, grid: str = "own") -> dict[str, Any]:
    """The trial parameters of a schedule on the scheduler's own grid or the learned one (to start the search
    from it)."""
    params: dict[str, Any] = {"afs": schedule.afs or "none"}
    n = schedule.num_steps
    for i, step in enumerate(schedule.steps):
        params[f"order_{i}"] = step.order
        params[f"prediction_{i}"] = step.prediction
        if step.order > 1:
            params[f"relaxation_{i}"] = step.relaxation or "none"
        if i < n - 1:
            params[f"corrector_{i}"] = step.corrector
            if step.corrector == "pseudo":
                params[f"corrector_relaxation_{i}"] = step.corrector_relaxation or "none"
    if search.search_grid:
        params["grid"], params["final"] = grid, "own"
    return params


def starting_schedule(scheduler) -> USFSchedule | None:
    """The scheduler's own solver as a USF schedule on its grid, where the space contains it."""
    from fastsampler.samplers.usf_presets import preset_schedule

    c = scheduler.config
    nodes = Nodes.from_grid(Grid(scheduler.plan.timesteps, scheduler.plan.rho, scheduler.plan.flow))
    name = None
    kind = type(scheduler).__name__
    if kind in ("UniPCScheduler", "DCSolverScheduler", "S3Scheduler") and c.predict_x0 and not c.disable_corrector:
        name = f"unipc-{scheduler.solver_kind}-{c.solver_order}"
    elif kind == "DPMSolverPlusPlusScheduler" and c.solver_method == "multistep" and scheduler.algorithm == "dpmsolver++" \
            and (c.solver_order < 3 or c.exact_third_order):
        name = f"dpmsolver++{c.solver_order}m" + ("-heun" if scheduler.solver_kind == "heun" else "")
    return None if name is None else preset_schedule(name, nodes, c.lower_order_final)


def features(params: dict[str, Any], n: int, search: S3Search) -> np.ndarray:
    """One-hot encoding of a candidate for the predictor."""
    row: list[float] = []
    for i in range(n):
        order = params.get(f"order_{i}", 1)
        row += [float(order == k) for k in range(1, search.max_order + 1)]
        row += [float(params.get(f"prediction_{i}") == "noise")]
        row += [float(params.get(f"relaxation_{i}", "none") == r) for r in RELAXATIONS[1:]]
        row += [float(params.get(f"corrector_{i}") == "pseudo")]
        row += [float(params.get(f"corrector_relaxation_{i}", "none") == r) for r in CORRECTOR_RELAXATIONS[1:]]
    row += [float(params.get("afs") == "zero_x0"), float(params.get("grid") == "karras"),
            float(params.get("grid") == "learned"), float(params.get("final") == "sigma_min")]
    lo, hi = search.grid_power_range
    row += [(params.get("grid_power", lo) - lo) / (hi - lo)]
    return np.asarray(row)
