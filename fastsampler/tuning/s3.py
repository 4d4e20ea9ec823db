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

Resumption and workers: the study lives in an optuna journal file (``storage``), so a killed search resumes
without repeating finished evaluations (a candidate interrupted mid-evaluation is evaluated again with the same
choices), and several processes (e.g. ``torchrun`` ranks, gloo on CPU) can search one study together. Proposals
are seeded by the trial number, so a resumed search proposes exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fastsampler import progress as progress_bars
from fastsampler.plans.format import Plan
from fastsampler.samplers.rules import Nodes, compile_plan
from fastsampler.samplers.usf import USF
from fastsampler.samplers.usf_schedule import USFSchedule, USFStep
from fastsampler.schedules.grids import Grid
from fastsampler.tuning.holdout import Holdout
from fastsampler.models.denoisers import tensor_digest
from fastsampler.tuning.runner import advance, start
from fastsampler.tuning.validation import Validation, check_fraction, per_sample_loss


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


def _suggest(trial, n: int, search: S3Search, learned: bool = False) -> tuple[USFSchedule, GridChoice]:
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


def _params(schedule: USFSchedule, search: S3Search, grid: str = "own") -> dict[str, Any]:
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


def _features(params: dict[str, Any], n: int, search: S3Search) -> np.ndarray:
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


def _valid(schedule_or_error) -> bool:
    return isinstance(schedule_or_error, USFSchedule)


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


def scorer_key(scorer: Callable[[torch.Tensor], float] | None) -> str | None:
    """What identifies a scorer in a study key: its ``key`` attribute if it has one (``fid_scorer`` sets it from
    the reference and the feature weights), else its qualified name; None for the teacher error."""
    if scorer is None:
        return None
    return str(getattr(scorer, "key", None) or getattr(scorer, "__qualname__", type(scorer).__qualname__))


def study_key(plan: Plan, model, noise: torch.Tensor, target: torch.Tensor, search: S3Search,
              scorer: Callable[[torch.Tensor], float] | None = None, learned: Plan | None = None) -> str:
    """What a study's scores depend on (the budget aside: a rerun with a larger one continues the study), so a
    journal shared by several searches never resumes one from another's scores (the scorer included: a search
    by FID must not continue one scored by the teacher error)."""
    model_key = model.cache_key() if hasattr(model, "cache_key") else repr(model)
    # what does not change a candidate's score stays out (a rerun with a larger budget continues the study)
    settings = {k: v for k, v in asdict(search).items()
                if k not in ("budget_evaluations", "budget_seconds", "refine_top", "seed_timesteps")}
    fields = {"plan": plan.fingerprint(), "model": model_key, "noise": tensor_digest(noise),
              "target": tensor_digest(target), "search": settings}
    if scorer is not None:  # absent for the teacher error, so earlier studies keep their names
        fields["scorer"] = scorer_key(scorer)
    if learned is not None:  # the "learned" grid choice's nodes
        fields["learned"] = learned.fingerprint()
    payload = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _study(storage: str | Path | None, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = None
    if storage is not None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        backend = JournalStorage(JournalFileBackend(str(storage)))
    return optuna.create_study(study_name=name, storage=backend, direction="minimize", load_if_exists=True)


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
        learned = _fit_time_points(scheduler, model, noise, target, search, holdout, _side_path(storage, "seed"),
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
    study = _study(storage, study_name or
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
            schedule, grid = _suggest(trial, n, search, learned is not None)
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
            _done_evaluations(study, n) >= search.budget_evaluations
        over_time = search.budget_seconds is not None and time.perf_counter() - began >= search.budget_seconds
        return over_evals or over_time

    if not study.trials:  # start from the scheduler's own solver where the space has it, on both grids
        start_schedule = starting_schedule(scheduler)
        if start_schedule is not None and start_schedule.num_steps == n:
            study.enqueue_trial(_params(start_schedule, search))
            if learned is not None and search.search_grid:
                study.enqueue_trial(_params(start_schedule, search, grid="learned"))
    _finish_stale(study, session, search, evaluate)
    _run_rounds(study, search, n, learned is not None, ask, evaluate, spent, report, progress)
    if barrier is not None:
        barrier()  # every worker's candidates are told: all read the same finished study
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = [t for t in sorted(complete, key=lambda t: (t.value, t.number)) if t.value < 1e30]

    def candidate(t) -> tuple[Plan, dict]:
        schedule, grid = _suggest(optuna.trial.FixedTrial(t.params), n, search, learned is not None)
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
                                       holdout, _side_path(storage, f"refine-{t.number}"), progress, spent_outside)
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


def _run_rounds(study, search: S3Search, n: int, learned_grid: bool, ask, evaluate, spent, report: S3Report,
                progress: bool) -> None:
    """The predictor-screened search until the budget is spent: warm-up candidates, then rounds of
    ``round_size`` proposals of which the forest lets ``keep`` be evaluated."""
    from optuna.trial import TrialState
    from sklearn.ensemble import RandomForestRegressor

    # the bar counts in the budget's own unit: model calls (a candidate costs n), or seconds
    by_calls = search.budget_evaluations is not None
    total = search.budget_evaluations if by_calls else search.budget_seconds
    bar = progress_bars.bar(desc=f"S3 ({n} steps)", enabled=progress, total=total,
                            unit="model calls" if by_calls else "s")
    began = time.perf_counter()
    while not spent():
        complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
        if len(complete) < search.warmup:
            evaluate(ask())
        else:
            forest = RandomForestRegressor(n_estimators=64, random_state=search.seed)
            x = np.stack([_features(t.params, n, search) for t in complete])
            y = np.log(np.clip([t.value for t in complete], 1e-12, 1e30))
            forest.fit(x, y)
            proposals = []
            for _ in range(search.round_size):
                trial = ask()
                try:
                    _suggest(trial, n, search, learned_grid)
                except ValueError:
                    study.tell(trial, state=TrialState.PRUNED)
                    continue
                proposals.append(trial)
            if proposals:
                predicted = forest.predict(np.stack([_features(t.params, n, search) for t in proposals]))
                order = list(np.argsort(predicted, kind="stable"))
                # the screened-out are recorded first, so a run killed during the evaluations leaves only the
                # kept candidates unfinished (and a resume evaluates exactly those)
                for k in order[search.keep:]:
                    study.tell(proposals[k], state=TrialState.PRUNED)
                    report.screened_out += 1
                for k in order[:search.keep]:
                    evaluate(proposals[k])
        if study.best_trial is not None:
            bar.set_postfix(best=f"{study.best_value:.4g}", baseline=f"{report.baseline_score:.4g}")
        done = _done_evaluations(study, n) if by_calls else round(time.perf_counter() - began, 1)
        bar.update(min(done, total) - bar.n)
    report.search_evaluations = _done_evaluations(study, n)
    bar.close()


def _finish_stale(study, session: str, search: S3Search, evaluate) -> None:
    """A candidate interrupted mid-evaluation by a killed run is evaluated again, same choices (one whose
    choices were not all drawn is marked failed)."""
    import optuna
    from optuna.trial import TrialState

    last_param = "grid" if search.search_grid else "afs"  # suggested last (grid_power only follows "karras")
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _abandoned(stale.user_attrs.get("worker", ""), session):
            continue  # another worker is evaluating it
        complete_params = last_param in stale.params and (stale.params.get("grid") != "karras"
                                                          or "grid_power" in stale.params)
        if complete_params:
            evaluate(optuna.trial.Trial(study, stale._trial_id))
        else:
            study.tell(stale.number, state=TrialState.FAIL)


def _side_path(storage: str | Path | None, name: str) -> Path | None:
    """Where a time-point fit of this search checkpoints: next to the study's journal."""
    return None if storage is None else Path(f"{storage}.{name}.json")


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


def _abandoned(worker: str, session: str) -> bool:
    """Whether a running trial's worker is gone: an earlier session of this process, or a dead process on this
    machine (trials of other machines' workers are left alone)."""
    host, _, rest = worker.partition(":")
    pid, _, run = rest.partition(":")
    my_host, _, my_rest = session.partition(":")
    my_pid, _, my_run = my_rest.partition(":")
    if not worker or host != my_host:
        return False
    if pid == my_pid:
        return run != my_run
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return True
    except PermissionError:
        return False
    return False


def _done_evaluations(study, n: int) -> int:
    """Model evaluations of every completed candidate of the study (this process's, earlier runs', other
    workers')."""
    from optuna.trial import TrialState

    return n * len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


__all__ = ["S3Search", "S3Report", "search_schedule", "karras_nodes", "asdict"]
