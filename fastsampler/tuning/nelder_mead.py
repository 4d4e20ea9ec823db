"""The baseline every tuner must beat: a derivative-free fit of the interior time points (Nelder–Mead, scipy).

    tune(scheduler, model, noise, n, method="timesteps", search="nelder-mead")

The N − 1 interior nodes are parametrised as in ``fastsampler.tuning.timesteps`` (softmax increments in λ between
the kept ends, so every point of the search space is a valid, strictly ordered grid); the objective is the mean
squared error of the final sample against the teacher on the fitting noises, the simplex starts at the
scheduler's own grid, and the budget is ``max_evaluations`` objective evaluations (each one sampling run).

Validation as in ``fastsampler.tuning.coefficients``: held-out noises when given, else the last
``validation_fraction`` of the batch, held out inside it (the model sees the whole batch; only the loss is split).
The search's best fit is kept only if it is better than the scheduler's grid on validation. Every evaluation is
memoised in the checkpoint file, so a rerun replays the (deterministic) search without model calls and continues.
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
from scipy.optimize import minimize

from fastsampler.plans.format import Plan
from fastsampler.tuning.validation import Validation, check_fraction, per_sample_loss
from fastsampler.tuning.holdout import Holdout
from fastsampler.models.denoisers import search_key
from fastsampler.tuning.runner import run
from fastsampler.tuning.timesteps import GridFamily


@dataclass(frozen=True)
class NelderMeadSearch:
    max_evaluations: int = 0  # 0: 60 per free time point
    validation_fraction: float = 0.25
    initial_step: float = 0.3  # simplex size in the softmax logits u

    def __post_init__(self) -> None:
        if isinstance(self.max_evaluations, bool) or not isinstance(self.max_evaluations, int) \
                or self.max_evaluations < 0:
            raise ValueError(f"nelder-mead: `max_evaluations` must be an integer ≥ 0, got {self.max_evaluations!r}")
        check_fraction("nelder-mead", self.validation_fraction)
        if not self.initial_step > 0:
            raise ValueError(f"nelder-mead: `initial_step` must be positive, got {self.initial_step!r}")


@dataclass
class NelderMeadReport:
    num_steps: int
    validation: str = ""
    evaluations: int = 0
    fit_initial: float = math.nan
    fit_best: float = math.nan
    validation_base: float = math.nan
    validation_tuned: float = math.nan
    kept_base: bool = False
    stopped: str = ""
    timesteps_learned: list[float] = field(default_factory=list)
    model_evaluations: int = 0
    seconds: float = 0.0


def fit_timesteps_nelder_mead(scheduler, model: Callable, noise: torch.Tensor, target: torch.Tensor,
                              search: NelderMeadSearch = NelderMeadSearch(), checkpoint: str | Path | None = None,
                              progress: bool = True, holdout: Holdout | None = None
                              ) -> tuple[Plan, NelderMeadReport]:
    """Fit the interior time points of the scheduler's current grid by Nelder–Mead; returns the plan and a report."""
    began = time.perf_counter()
    family = GridFamily(scheduler)
    discrete = scheduler.timesteps.dtype == torch.int64
    validation = Validation(holdout, noise.shape[0], search.validation_fraction)
    report = NelderMeadReport(family.n, validation=validation.describe)
    path = Path(checkpoint) if checkpoint is not None else None
    key = search_key(scheduler.plan, model, noise, target, search)
    memo: dict[str, list[float]] = {}
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            memo = saved["memo"]

    def plan_of(u: np.ndarray) -> Plan:
        return family.plan(family.interior(torch.as_tensor(u, dtype=torch.float64)).numpy(), discrete)

    def losses(plan: Plan, validate: bool) -> tuple[float, float]:
        """The fitting loss and (if ``validate``) the validation loss of ``plan``."""
        with torch.no_grad():
            final, _ = run(plan, model, noise)
        per = per_sample_loss(final, target)
        report.model_evaluations += plan.num_steps
        fit = float(per[validation.fit].mean())  # ok-sync: tuning, host side
        return (fit if math.isfinite(fit) else math.inf), (validation.loss(per, lambda: plan) if validate else math.nan)

    def objective(u: np.ndarray) -> float:
        name = json.dumps([round(float(v), 12) for v in u])
        if name not in memo:
            memo[name] = [losses(plan_of(u), validate=False)[0]]
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"key": key, "memo": memo}))
                os.replace(tmp, path)
        report.evaluations += 1
        return memo[name][0]

    u0 = family.u_from(family.interior0)
    report.fit_initial, report.validation_base = losses(scheduler.plan, validate=True)
    budget = search.max_evaluations or 60 * (family.n - 1)
    simplex = np.vstack([u0] + [u0 + search.initial_step * np.eye(len(u0))[j] for j in range(len(u0))])
    result = minimize(objective, u0, method="Nelder-Mead",
                      options={"maxfev": budget, "initial_simplex": simplex, "xatol": 1e-4, "fatol": 1e-8})
    report.stopped = str(result.message)
    tuned = plan_of(result.x)
    report.fit_best, report.validation_tuned = losses(tuned, validate=True)
    if not report.validation_tuned < report.validation_base:
        tuned, report.kept_base, report.validation_tuned = scheduler.plan, True, report.validation_base
    report.timesteps_learned = [float(t) for t in tuned.timesteps]
    report.seconds = time.perf_counter() - began
    return tuned, report
