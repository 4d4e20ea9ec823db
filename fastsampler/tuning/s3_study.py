"""S³'s optuna study: its key (what its scores depend on), the journal it lives in, the predictor-screened rounds
until the budget is spent, and the bookkeeping that lets a killed search resume and several workers share one
study (stale candidates evaluated again, dead workers recognised). The search itself: ``fastsampler.tuning.s3``."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fastsampler import progress as progress_bars
from fastsampler.models.denoisers import tensor_digest
from fastsampler.plans.format import Plan
from fastsampler.tuning.s3_space import S3Report, S3Search, features, suggest


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


def open_study(storage: str | Path | None, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = None
    if storage is not None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        backend = JournalStorage(JournalFileBackend(str(storage)))
    return optuna.create_study(study_name=name, storage=backend, direction="minimize", load_if_exists=True)


def run_rounds(study, search: S3Search, n: int, learned_grid: bool, ask, evaluate, spent, report: S3Report,
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
            x = np.stack([features(t.params, n, search) for t in complete])
            y = np.log(np.clip([t.value for t in complete], 1e-12, 1e30))
            forest.fit(x, y)
            proposals = []
            for _ in range(search.round_size):
                trial = ask()
                try:
                    suggest(trial, n, search, learned_grid)
                except ValueError:
                    study.tell(trial, state=TrialState.PRUNED)
                    continue
                proposals.append(trial)
            if proposals:
                predicted = forest.predict(np.stack([features(t.params, n, search) for t in proposals]))
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
        done = done_evaluations(study, n) if by_calls else round(time.perf_counter() - began, 1)
        bar.update(min(done, total) - bar.n)
    report.search_evaluations = done_evaluations(study, n)
    bar.close()


def finish_stale(study, session: str, search: S3Search, evaluate) -> None:
    """A candidate interrupted mid-evaluation by a killed run is evaluated again, same choices (one whose
    choices were not all drawn is marked failed)."""
    import optuna
    from optuna.trial import TrialState

    last_param = "grid" if search.search_grid else "afs"  # suggested last (grid_power only follows "karras")
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not abandoned(stale.user_attrs.get("worker", ""), session):
            continue  # another worker is evaluating it
        complete_params = last_param in stale.params and (stale.params.get("grid") != "karras"
                                                          or "grid_power" in stale.params)
        if complete_params:
            evaluate(optuna.trial.Trial(study, stale._trial_id))
        else:
            study.tell(stale.number, state=TrialState.FAIL)


def side_path(storage: str | Path | None, name: str) -> Path | None:
    """Where a time-point fit of this search checkpoints: next to the study's journal."""
    return None if storage is None else Path(f"{storage}.{name}.json")


def abandoned(worker: str, session: str) -> bool:
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


def done_evaluations(study, n: int) -> int:
    """Model evaluations of every completed candidate of the study (this process's, earlier runs', other
    workers')."""
    from optuna.trial import TrialState

    return n * len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
