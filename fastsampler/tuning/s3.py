"""S³: searching the USF solver schedule — per-step choices and the time points — for the user's model.

The space (``fastsampler.samplers.usf_schedule``): per step the Taylor order (up to ``max_order``, and no more
than the predictions a run from the start has), the prediction expanded (data or noise), the relaxation of the
first-derivative estimate (none, DPM-Solver-2's, UniPC bh1/bh2's), the corrector (none or the pseudo-corrector,
with its relaxation; not on the last step), per schedule the analytical first step, and the grid: the scheduler's
own, or Karras-spaced noise levels between its ends with a searched exponent ``grid_power`` (1: uniform in ρ;
larger: denser at low noise), ending at the scheduler's final level or at the smallest trained one (σ_min). The search starts from the scheduler's own solver where the space contains it
(UniPC, DPM-Solver++ 1–2M and exact 3M), so its result is never worse on the fitting noises. A candidate is scored by the mean squared error of its samples from the fitting noises
against the teacher's final states (or by a user ``scorer`` of the samples, e.g. a small-sample FID), costing N
model evaluations.

The search (Liu, Ning, Yang & Wang, ICLR 2024, arXiv 2312.07243: a predictor-based multi-stage search) runs on
optuna: a TPE sampler proposes candidates; after ``warmup`` evaluated candidates, a small learned predictor (a
random forest from scikit-learn on the one-hot encoded choices, refitted after each round on every candidate
evaluated so far) screens each round of ``round_size`` proposals and only the ``keep`` most promising cost model
evaluations — the others are recorded as pruned. The budget is model evaluations and/or wall time.

The search contains its subsets (the time-points-only space and the scheduler's own solver): before it starts,
the scheduler's time points are learned by gradient (``fastsampler.tuning.timesteps``, same validation) and their
grid joins the space as a third grid choice ("learned"); the study is seeded with the scheduler's own solver on its
own grid and on the learned one. After the discrete search the ``refine_top`` best candidates have their time
points refined by the same gradient search. The plan returned is the learned-time-point plan (the base unless
better on validation), replaced by the best on validation of the ``validate_top`` best candidates and the refined
ones only where that one beats it by more than one standard error of the per-sample differences (the best of many
candidates on a few validation noises is optimistic). By construction it is never worse on validation than the
base or than ``method="timesteps"`` from the same start. Validation: the
held-out noises when given, else the last ``validation_fraction`` of the fitting batch, held inside it (the
candidates are ranked on the rest); a search by a user ``scorer`` without held-out noises scores the whole batch
(a small-sample FID of a quarter of the batch would only add noise) and has no validation.

Modules: the space, the options and the report are ``s3_space``, the optuna study and its resumption
``s3_study``; this module scores and validates candidates and runs the search.

Resumption and workers: the study lives in an optuna journal file (``storage``), so a killed search resumes
without repeating finished evaluations (a candidate interrupted mid-evaluation is evaluated again with the same
choices), and several processes (e.g. ``torchrun`` ranks, gloo on CPU) can search one study together. Proposals
are seeded by the trial number, so a resumed search proposes exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fastsampler.plans.format import Plan
from fastsampler.samplers.rules import compile_plan
from fastsampler.samplers.usf import USF
from fastsampler.samplers.usf_schedule import USFSchedule
from fastsampler.tuning.holdout import Holdout
from fastsampler.tuning.runner import advance, start
from fastsampler.tuning.s3_space import (GridChoice, S3Report, S3Search, grid_nodes, karras_nodes, schedule_params,
                                         starting_schedule, suggest)
from fastsampler.tuning.s3_study import (done_evaluations, finish_stale, open_study, run_rounds, scorer_key,
                                         side_path, study_key)
from fastsampler.tuning.validation import Validation, per_sample_loss


class _Evaluator:
    """Scores candidates: samples from the fitting noises against the teacher (or a scorer of the samples). With
    in-batch validation the score is the loss on the fitting rows and ``last_validation`` the held rows' loss."""

    def __init__(self, scheduler, model: Callable, noise: torch.Tensor, target: torch.Tensor,
                 scorer: Callable[[torch.Tensor], float] | None, validation: Validation | None,
                 learned: Plan | None = None):
        self.scheduler, self.model, self.noise, self.target, self.scorer = scheduler, model, noise, target, scorer
        self.validation, self.learned = validation, learned
        self.evaluations = 0
        self.last_validation = math.nan
        self.last_held: torch.Tensor | None = None  # the held rows' per-sample losses of the last score

    def plan(self, schedule: USFSchedule, grid: GridChoice) -> Plan:
        s = self.scheduler
        nodes = grid_nodes(s, schedule.num_steps, grid, self.learned)
        meta = {"scheduler": "S3Scheduler", "schedule": s._fingerprint(nodes.timesteps), "tuned": "s3"}
        return compile_plan(USF(schedule), nodes, s.config.prediction_type, (), meta)

    @torch.no_grad()
    def score(self, plan: Plan) -> float:
        state = start(plan, self.noise)
        for i in range(plan.num_steps):
            state = advance(plan, state, self.model(state.x, float(plan.timesteps[i])))
        self.evaluations += plan.num_steps
        self.last_validation, self.last_held = math.nan, None
        if not torch.isfinite(state.x).all():
            self.last_validation = math.inf
            return math.inf
        if self.scorer is not None:
            return float(self.scorer(state.x))
        per_sample = per_sample_loss(state.x, self.target)
        if self.validation is None or self.validation.holdout is not None:
            return float(per_sample.mean())  # ok-sync: tuning, host side
        self.last_validation = self.validation.loss(per_sample, lambda: plan)
        self.last_held = per_sample[self.validation.held]
        return float(per_sample[self.validation.fit].mean())  # ok-sync: tuning, host side


def search_schedule(scheduler, model: Callable, noise: torch.Tensor, target: torch.Tensor,
                    search: S3Search = S3Search(), storage: str | Path | None = None,
                    scorer: Callable[[torch.Tensor], float] | None = None, study_name: str | None = None,
                    progress: bool = True, holdout: Holdout | None = None,
                    barrier: Callable[[], None] | None = None) -> tuple[Plan, S3Report]:
    """Search a USF schedule for the scheduler's current number of steps; returns its plan and a report.

    The plan is the best on validation (``holdout``'s noises, else the batch's held rows) among the scheduler's own
    plan, the learned-time-point plan, the ``validate_top`` best candidates on the fitting rows and the refined
    ones (module docstring). Several workers sharing one study pass ``barrier`` (all meet there once their budget
    is spent, so each reads the finished study and returns the same plan). With ``storage``, the time-point fits
    checkpoint next to it."""
    import optuna
    from optuna.trial import TrialState

    began = time.perf_counter()
    n = scheduler.num_inference_steps
    validation = None if scorer is not None and holdout is None else \
        Validation(holdout, noise.shape[0], search.validation_fraction)
    report = S3Report(n, validation=validation.describe if validation is not None else "none (scored by `scorer`)")
    baseline = scheduler.plan
    spent_outside = [0]  # model evaluations of the time-point fits
    learned = None
    if search.seed_timesteps and n >= 2 and validation is not None:
        learned = _fit_time_points(scheduler, model, noise, target, search, holdout, side_path(storage, "seed"),
                                   progress, spent_outside)
    evaluator = _Evaluator(scheduler, model, noise, target, scorer, validation, learned)
    report.baseline_score = evaluator.score(baseline)
    candidates: dict[str, _Candidate] = {}

    def compare(name: str, plan: Plan, described: dict) -> None:
        candidates[name] = _Candidate(plan, *_validate(evaluator, plan, holdout), described)
        report.candidates[name] = candidates[name].loss

    if validation is not None:
        compare("baseline", baseline, {"baseline": True})
        report.validation_base = report.candidates["baseline"]
    if learned is not None:
        compare("learned time points", learned, {"learned_time_points": True})
        report.validation_timesteps = report.candidates["learned time points"]
    study = open_study(storage, study_name or
                   f"s3-{n}-{study_key(baseline, model, noise, target, search, scorer, learned)}")
    session = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"

    def ask():
        """A new trial whose proposals depend only on the study so far and its number (resumable; distinct
        between workers): the sampler is reseeded with the trial number before anything is suggested."""
        trial = study.ask()
        trial.set_user_attr("worker", session)
        study.sampler = optuna.samplers.TPESampler(seed=search.seed * 1_000_003 + trial.number, n_startup_trials=10)
        return trial

    def evaluate(trial) -> float:
        try:
            schedule, grid = suggest(trial, n, search, learned is not None)
            value = evaluator.score(evaluator.plan(schedule, grid))
        except ValueError:  # a combination the space refuses (e.g. too little history)
            value, evaluator.last_validation = math.inf, math.nan
        if not math.isnan(evaluator.last_validation):
            trial.set_user_attr("validation", evaluator.last_validation if math.isfinite(evaluator.last_validation)
                                else 1e30)
        study.tell(trial, value if math.isfinite(value) else 1e30)
        return value

    def spent() -> bool:
        over_evals = search.budget_evaluations is not None and \
            done_evaluations(study, n) >= search.budget_evaluations
        over_time = search.budget_seconds is not None and time.perf_counter() - began >= search.budget_seconds
        return over_evals or over_time

    if not study.trials:  # start from the scheduler's own solver where the space has it, on both grids
        start_schedule = starting_schedule(scheduler)
        if start_schedule is not None and start_schedule.num_steps == n:
            study.enqueue_trial(schedule_params(start_schedule, search))
            if learned is not None and search.search_grid:
                study.enqueue_trial(schedule_params(start_schedule, search, grid="learned"))
    finish_stale(study, session, search, evaluate)
    run_rounds(study, search, n, learned is not None, ask, evaluate, spent, report, progress)
    if barrier is not None:
        barrier()  # every worker's candidates are told: all read the same finished study
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = [t for t in sorted(complete, key=lambda t: (t.value, t.number)) if t.value < 1e30]

    def candidate(t) -> tuple[Plan, dict]:
        schedule, grid = suggest(optuna.trial.FixedTrial(t.params), n, search, learned is not None)
        return evaluator.plan(schedule, grid), {"schedule": schedule.to_dict(), "grid_power": grid.power,
                                                "final": grid.final, "learned_grid": grid.learned}

    plan, report.best_score, report.best = baseline, report.baseline_score, {"baseline": True}
    if validation is None:  # scored by the user's scorer on the whole batch: the best score wins
        if ranked and ranked[0].value < report.baseline_score:
            (plan, report.best), report.best_score = candidate(ranked[0]), ranked[0].value
    else:
        distinct: list[tuple[Any, Plan, dict]] = []  # the best candidates, one per plan (TPE repeats itself)
        seen = {baseline.fingerprint()} | ({learned.fingerprint()} if learned is not None else set())
        for t in ranked:
            if len(distinct) == search.validate_top:
                break
            cand_plan, described = candidate(t)
            if cand_plan.fingerprint() not in seen:
                seen.add(cand_plan.fingerprint())
                distinct.append((t, cand_plan, described))
        for t, cand_plan, described in distinct:
            compare(f"searched #{t.number}", cand_plan, described)
        for t, cand_plan, described in distinct[:search.refine_top] if n >= 2 else []:
            refined = _fit_time_points(_holding(scheduler, cand_plan, described), model, noise, target, search,
                                       holdout, side_path(storage, f"refine-{t.number}"), progress, spent_outside)
            if refined.fingerprint() != cand_plan.fingerprint():
                refined = dataclasses.replace(refined, meta={**refined.meta, "tuned": "s3"})
                compare(f"refined #{t.number}", refined, {**described, "refined_time_points": True})
        name = _choose(candidates, "learned time points" if learned is not None else "baseline")
        plan, loss, report.best = candidates[name].plan, candidates[name].loss, candidates[name].described
        report.chosen = name
        report.validation_best = loss
        if plan is not baseline:
            report.best_score = evaluator.score(plan)
        if holdout is not None:
            report.holdout_baseline, report.holdout_best = report.validation_base, loss
            evaluator.evaluations += holdout.evaluations
    report.evaluated = len(complete)
    running = math.inf
    for t in sorted(complete, key=lambda t: t.number):
        running = min(running, t.value)
        report.history.append(running)
    report.model_evaluations = evaluator.evaluations + spent_outside[0]
    report.seconds = time.perf_counter() - began
    return plan, report


@dataclass
class _Candidate:
    plan: Plan
    loss: float  # on validation
    per_sample: torch.Tensor | None  # each validation sample's loss (None for a scorer's)
    described: dict


def _validate(evaluator: _Evaluator, plan: Plan, holdout: Holdout | None) -> tuple[float, torch.Tensor | None]:
    """``plan``'s validation loss and per-sample losses: on the held-out noises, else on the batch's held rows."""
    if holdout is not None:
        if holdout.scorer is not None:
            return holdout.loss(plan), None
        per_sample = holdout.per_sample(plan)
        return float(per_sample.mean()), per_sample  # ok-sync: tuning, host side
    evaluator.score(plan)
    return evaluator.last_validation, evaluator.last_held


def _choose(candidates: dict[str, _Candidate], incumbent: str) -> str:
    """The incumbent (the learned-time-point plan, which is the base unless better on validation), or the searched
    / refined candidate with the lowest validation loss if it beats the incumbent there by more than one standard
    error of their per-sample differences. Many discrete candidates compared on a few validation noises: the best
    of them is optimistic, and under strong guidance a rare noise that one candidate sends to another mode
    dominates the mean; a gain within the noise of the comparison keeps the simpler plan."""
    others = [k for k in candidates if k not in ("baseline", "learned time points")]
    if not others:
        return incumbent
    best, held = min(others, key=lambda k: candidates[k].loss), candidates[incumbent]
    challenger = candidates[best]
    if not challenger.loss < held.loss:
        return incumbent
    if challenger.per_sample is None or held.per_sample is None:
        return best
    gain = held.per_sample - challenger.per_sample
    if not torch.isfinite(gain).all() or gain.numel() < 2:
        return best
    standard_error = float(gain.std() / math.sqrt(gain.numel()))  # ok-sync: tuning, host side
    return best if float(gain.mean()) > standard_error else incumbent  # ok-sync: tuning, host side


def _holding(scheduler, plan: Plan, described: dict):
    """An ``S3Scheduler`` running the candidate's schedule, currently on the candidate's grid (what the time-point
    search moves)."""
    from fastsampler.adapters.s3 import S3Scheduler

    probe = S3Scheduler.from_config(scheduler.config, usf_schedule=described["schedule"], usf_preset=None)
    probe.set_plan(plan)
    probe.set_timesteps(plan.num_steps)
    return probe


def _fit_time_points(scheduler, model: Callable, noise: torch.Tensor, target: torch.Tensor, search: S3Search,
                     holdout: Holdout | None, checkpoint: Path | None, progress: bool, spent: list[int]) -> Plan:
    """The scheduler's current solver with its time points learned by gradient (same validation as the search;
    the current grid is kept unless the learned one is better there)."""
    from fastsampler.tuning.timesteps import TimestepSearch, learn_timesteps

    settings = TimestepSearch(validation_fraction=search.validation_fraction)
    plan, fitted = learn_timesteps(scheduler, model, noise, target, settings, checkpoint, progress, holdout)
    spent[0] += fitted.model_evaluations
    return plan


# the search space and options (s3_space) and the study (s3_study) live in their own modules; these names stay here
__all__ = ["S3Search", "S3Report", "search_schedule", "GridChoice", "grid_nodes", "karras_nodes", "scorer_key",
           "study_key", "starting_schedule"]
