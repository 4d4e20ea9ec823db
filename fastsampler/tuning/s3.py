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

Resumption and workers: the study lives in an optuna journal file (``storage``), so a killed search resumes
without repeating finished evaluations (a candidate interrupted mid-evaluation is evaluated again with the same
choices), and several processes (e.g. ``torchrun`` ranks, gloo on CPU) can search one study together. Proposals
are seeded by the trial number, so a resumed search proposes exactly what an uninterrupted one would have.
"""

from __future__ import annotations

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
from fastsampler.tuning.model import tensor_digest
from fastsampler.tuning.runner import advance, start


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
    validate_top: int = 8  # with held-out noises: this many best candidates (and the baseline) are scored on them

    def __post_init__(self) -> None:
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
    model_evaluations: int = 0
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)  # best score after each evaluated candidate
    holdout_baseline: float = math.nan  # with held-out noises: the baseline's and the chosen candidate's loss there
    holdout_best: float = math.nan


@dataclass(frozen=True)
class GridChoice:
    """The searched grid: the scheduler's own nodes (``power`` None) or Karras-spaced ones with exponent ``power``;
    the final level the scheduler's own (``final="own"``) or the smallest trained noise level (``"sigma_min"``)."""

    power: float | None = None
    final: str = "own"


def grid_nodes(scheduler, n: int, choice: GridChoice) -> Nodes:
    """The nodes of ``choice`` between the scheduler's current grid's first node and its last positive one."""
    plan = scheduler.plan
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


def _suggest(trial, n: int, search: S3Search) -> tuple[USFSchedule, GridChoice]:
    """The candidate a trial encodes: per step order, prediction, first-derivative relaxation, corrector and its
    relaxation; the analytical first step; the grid (the scheduler's own, or Karras with a searched exponent)."""
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
        if trial.suggest_categorical("grid", ["own", "karras"]) == "karras":
            power = trial.suggest_float("grid_power", *search.grid_power_range)
        grid = GridChoice(power, final)
    return USFSchedule(tuple(steps), afs=None if afs == "none" else afs), grid


def _params(schedule: USFSchedule, search: S3Search) -> dict[str, Any]:
    """The trial parameters of a schedule on the scheduler's own grid (to start the search from it)."""
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
        params["grid"], params["final"] = "own", "own"
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
            float(params.get("final") == "sigma_min")]
    lo, hi = search.grid_power_range
    row += [(params.get("grid_power", lo) - lo) / (hi - lo)]
    return np.asarray(row)


def _valid(schedule_or_error) -> bool:
    return isinstance(schedule_or_error, USFSchedule)


class _Evaluator:
    """Scores candidates: samples from the fitting noises against the teacher (or a scorer of the samples)."""

    def __init__(self, scheduler, model: Callable, noise: torch.Tensor, target: torch.Tensor,
                 scorer: Callable[[torch.Tensor], float] | None):
        self.scheduler, self.model, self.noise, self.target, self.scorer = scheduler, model, noise, target, scorer
        self.evaluations = 0

    def plan(self, schedule: USFSchedule, grid: GridChoice) -> Plan:
        s = self.scheduler
        nodes = grid_nodes(s, schedule.num_steps, grid)
        meta = {"scheduler": "S3Scheduler", "schedule": s._fingerprint(nodes.timesteps), "tuned": "s3"}
        return compile_plan(USF(schedule), nodes, s.config.prediction_type, (), meta)

    @torch.no_grad()
    def score(self, plan: Plan) -> float:
        state = start(plan, self.noise)
        for i in range(plan.num_steps):
            state = advance(plan, state, self.model(state.x, float(plan.timesteps[i])))
        self.evaluations += plan.num_steps
        if not torch.isfinite(state.x).all():
            return math.inf
        if self.scorer is not None:
            return float(self.scorer(state.x))
        return float((state.x.double() - self.target.double()).pow(2).mean())


def scorer_key(scorer: Callable[[torch.Tensor], float] | None) -> str | None:
    """What identifies a scorer in a study key: its ``key`` attribute if it has one (``fid_scorer`` sets it from
    the reference and the feature weights), else its qualified name; None for the teacher error."""
    if scorer is None:
        return None
    return str(getattr(scorer, "key", None) or getattr(scorer, "__qualname__", type(scorer).__qualname__))


def study_key(plan: Plan, model, noise: torch.Tensor, target: torch.Tensor, search: S3Search,
              scorer: Callable[[torch.Tensor], float] | None = None) -> str:
    """What a study's scores depend on (the budget aside: a rerun with a larger one continues the study), so a
    journal shared by several searches never resumes one from another's scores (the scorer included: a search
    by FID must not continue one scored by the teacher error)."""
    model_key = model.cache_key() if hasattr(model, "cache_key") else repr(model)
    settings = {k: v for k, v in asdict(search).items() if k not in ("budget_evaluations", "budget_seconds")}
    fields = {"plan": plan.fingerprint(), "model": model_key, "noise": tensor_digest(noise),
              "target": tensor_digest(target), "search": settings}
    if scorer is not None:  # absent for the teacher error, so earlier studies keep their names
        fields["scorer"] = scorer_key(scorer)
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

    With ``holdout``, the ``validate_top`` best candidates on the fitting noises and the scheduler's own plan are
    scored on the held-out noises and the best there is returned. Several workers sharing one study pass
    ``barrier`` (all meet there once their budget is spent, so each reads the finished study and returns the same
    plan)."""
    import optuna
    from optuna.trial import TrialState
    from sklearn.ensemble import RandomForestRegressor

    began = time.perf_counter()
    n = scheduler.num_inference_steps
    evaluator = _Evaluator(scheduler, model, noise, target, scorer)
    report = S3Report(n)
    baseline = scheduler.plan
    report.baseline_score = evaluator.score(baseline)
    study = _study(storage, study_name or f"s3-{n}-{study_key(baseline, model, noise, target, search, scorer)}")

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
            schedule, grid = _suggest(trial, n, search)
            value = evaluator.score(evaluator.plan(schedule, grid))
        except ValueError:  # a combination the space refuses (e.g. too little history)
            value = math.inf
        study.tell(trial, value if math.isfinite(value) else 1e30)
        return value

    def spent() -> bool:
        over_evals = search.budget_evaluations is not None and \
            _done_evaluations(study, n) >= search.budget_evaluations
        over_time = search.budget_seconds is not None and time.perf_counter() - began >= search.budget_seconds
        return over_evals or over_time

    if not study.trials:  # start from the scheduler's own solver where the space has it
        start_schedule = starting_schedule(scheduler)
        if start_schedule is not None and start_schedule.num_steps == n:
            study.enqueue_trial(_params(start_schedule, search))
    # a candidate interrupted mid-evaluation by a killed run: evaluate it again, same choices
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
    bar = progress_bars.bar(desc=f"S3 ({n} steps)", enabled=progress, unit="cand")
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
                    _suggest(trial, n, search)
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
        bar.update()
    bar.close()
    if barrier is not None:
        barrier()  # every worker's candidates are told: all read the same finished study
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = sorted(complete, key=lambda t: (t.value, t.number))

    def candidate(t) -> tuple[Plan, dict]:
        schedule, grid = _suggest(optuna.trial.FixedTrial(t.params), n, search)
        return evaluator.plan(schedule, grid), {"schedule": schedule.to_dict(), "grid_power": grid.power,
                                                "final": grid.final}

    plan, report.best_score, report.best = baseline, report.baseline_score, {"baseline": True}
    if holdout is None:
        if ranked and ranked[0].value < report.baseline_score:
            (plan, report.best), report.best_score = candidate(ranked[0]), ranked[0].value
    else:
        report.holdout_baseline = report.holdout_best = holdout.loss(baseline)
        for t in ranked[:search.validate_top]:
            if not math.isfinite(t.value) or t.value >= 1e30:
                continue
            cand_plan, cand = candidate(t)
            loss = holdout.loss(cand_plan)
            if loss < report.holdout_best:
                plan, report.best, report.best_score, report.holdout_best = cand_plan, cand, t.value, loss
        evaluator.evaluations += holdout.evaluations
    report.evaluated = len(complete)
    running = math.inf
    for t in sorted(complete, key=lambda t: t.number):
        running = min(running, t.value)
        report.history.append(running)
    report.model_evaluations = evaluator.evaluations + n  # + the baseline
    report.seconds = time.perf_counter() - began
    return plan, report


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
