"""The derivative-free baseline: ``tune(method="timesteps", search="nelder-mead")``."""

from __future__ import annotations

import numpy as np
import pytest

import fastsampler
from fastsampler import UniPCScheduler
from fastsampler.tuning.nelder_mead import NelderMeadSearch, fit_timesteps_nelder_mead
from fastsampler.tuning.teacher import TeacherSpec, teacher_trajectories
from test_tuning import SD, mixture


def setup(n: int = 5, batch: int = 16, seed: int = 11, guidance: float | None = 7.5):
    s = UniPCScheduler(**SD)
    s.set_timesteps(n)
    model, noise = mixture(s.config, batch, seed, guidance)
    target = teacher_trajectories(s, model, noise, TeacherSpec(steps=60), None, progress=False)[-1]
    return s, model, noise, target


def test_the_baseline_lowers_the_fitting_loss_and_keeps_a_valid_grid():
    s, model, noise, target = setup()
    plan, report = fit_timesteps_nelder_mead(s, model, noise, target, NelderMeadSearch(max_evaluations=60),
                                             progress=False)
    assert report.fit_best < report.fit_initial and report.evaluations >= 60
    assert report.validation == "in-batch (last 4 of 16 fitting noises)"
    assert report.validation_tuned <= report.validation_base
    if not report.kept_base:
        assert np.all(np.diff(plan.timesteps) < 0) and plan.timesteps[0] == s.plan.timesteps[0]
        assert np.all(plan.timesteps == np.round(plan.timesteps))  # a discrete model's integer timesteps


def test_a_rerun_replays_the_search_from_its_checkpoint(tmp_path):
    s, model, noise, target = setup(n=4, batch=8)
    search = NelderMeadSearch(max_evaluations=30)
    first, _ = fit_timesteps_nelder_mead(s, model, noise, target, search, tmp_path / "nm.json", progress=False)
    calls = []

    class Counting(type(model)):
        def __call__(self, x, t):
            calls.append(1)
            return super().__call__(x, t)

    again, report = fit_timesteps_nelder_mead(s, Counting(model.model), noise, target, search, tmp_path / "nm.json",
                                              progress=False)
    assert list(again.timesteps) == list(first.timesteps)
    assert len(calls) == 2 * 4  # only the base and the result are evaluated again (validation), not the search


def test_tune_takes_the_baseline_and_refuses_foreign_options():
    s = UniPCScheduler(**SD)
    model, noise = mixture(s.config, 8, 3)
    tuned = fastsampler.tune(s, model, noise, 4, method="timesteps", search="nelder-mead", max_evaluations=10,
                             cache_dir=None, progress=False)
    entry = tuned.tuning_report["steps"][4]
    assert entry["validation_tuned"] <= entry["validation_base"] and entry["evaluations"] >= 10
    with pytest.raises(ValueError, match="nelder-mead"):
        fastsampler.tune(s, model, noise, 4, method="timesteps", max_evaluations=10, cache_dir=None, progress=False)
    with pytest.raises(ValueError, match="lr"):
        fastsampler.tune(s, model, noise, 4, method="timesteps", search="nelder-mead", lr=0.1, cache_dir=None,
                         progress=False)
    with pytest.raises(ValueError, match="search"):
        fastsampler.tune(s, model, noise, 4, method="timesteps", search="cma", cache_dir=None, progress=False)


def test_the_report_gives_the_teachers_own_error_and_warns_when_the_teacher_limits():
    import warnings

    s = UniPCScheduler(**SD)
    model, noise = mixture(s.config, 8, 3)
    options = dict(method="timesteps", search="nelder-mead", max_evaluations=8, cache_dir=None, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a 200-step teacher is far more accurate than 4 steps
        entry = fastsampler.tune(s, model, noise, 4, **options).tuning_report["steps"][4]
    assert 0 < 100 * entry["teacher_error"] < entry["student_error"]
    with pytest.warns(RuntimeWarning, match="the teacher limits it"):
        fastsampler.tune(s, model, noise, 4, teacher="dpmsolver++3:6", **options)
    entry = fastsampler.tune(s, model, noise, 4, teacher_check=False, **options).tuning_report["steps"][4]
    assert "teacher_error" not in entry
