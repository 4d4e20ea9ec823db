"""The tuning harness shared by DC-Solver, S³ and learned time points: teacher trajectories, learned time points,
the schedule search (resumption, two workers), model adapters and the ``fastsampler tune`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import S3Scheduler, UniPCScheduler
from fastsampler.eval import bench, gmm
from fastsampler.models.denoisers import MixtureDenoiserModel, UNetDenoiser, from_pipeline
from fastsampler.tuning.s3 import S3Search, karras_nodes, search_schedule
from fastsampler.tuning.teacher import TeacherSpec, teacher_grid, teacher_trajectories
from fastsampler.tuning.timesteps import TimestepSearch, learn_timesteps

SD = bench.preset_config("sd")


def mixture(config, batch: int, seed: int, guidance: float | None = None):
    setup = bench.BenchSetup("sd", None, guidance, batch, seed)
    model = MixtureDenoiserModel(gmm.MixtureModel.from_scheduler_config(setup.denoiser(), config))
    return model, setup.noise().double()


@pytest.mark.parametrize("config", [dict(), dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
                                    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)])
def test_teacher_is_exact_at_the_students_nodes(config):
    """On Gaussian data the teacher's states at every student node equal the closed-form ODE solution."""
    s = UniPCScheduler(**config)
    s.set_timesteps(6)
    torch.manual_seed(0)
    mu, tau = 0.5 * torch.randn(1, 16, dtype=torch.float64), 0.3
    model = MixtureDenoiserModel(gmm.MixtureModel.from_scheduler_config(
        gmm.MixtureDenoiser(gmm.single_gaussian(mu, tau)), s.config))
    noise = torch.randn(8, 16, dtype=torch.float64)
    states = teacher_trajectories(s, model, noise, TeacherSpec(steps=300), progress=False)
    nodes, index = teacher_grid(s.plan, s, TeacherSpec(steps=300))
    np.testing.assert_allclose(nodes.rho[index], s.plan.rho, rtol=1e-12)  # the student's nodes exactly
    a0, s0 = (float(v) for v in model.model.alpha_sigma(s.timesteps[0]))
    for i in range(7):
        a, sg = float(s.plan.alpha[i]), float(s.plan.sigma[i])
        exact = gmm.single_gaussian_solution(noise, mu, tau, a0, s0, sg / a if a > 0 else 0.0) * a
        tol = 2e-3 if s.plan.rho[i] == 0.0 else 1e-4  # σ = 0: the exact jump from the smallest trained level
        torch.testing.assert_close(states[i], exact, rtol=0, atol=tol)


def test_teacher_cache_resumes_and_recomputes_corrupt_shards(tmp_path):
    s = UniPCScheduler(**SD)
    s.set_timesteps(5)
    model, noise = mixture(s.config, 12, 1)
    first = teacher_trajectories(s, model, noise, TeacherSpec(steps=40), tmp_path, shard_size=4, progress=False)
    shards = sorted((tmp_path / "teacher").glob("*/shard_*.safetensors"))
    assert len(shards) == 3
    calls = []

    class Counting(MixtureDenoiserModel):
        def __call__(self, x, t):
            calls.append(1)
            return super().__call__(x, t)

    again = teacher_trajectories(s, Counting(model.model), noise, TeacherSpec(steps=40), tmp_path, shard_size=4,
                                 progress=False)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not calls  # every shard came from the cache
    shards[1].write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="unusable"):
        fixed = teacher_trajectories(s, Counting(model.model), noise, TeacherSpec(steps=40), tmp_path, shard_size=4,
                                     progress=False)
    torch.testing.assert_close(fixed, first, rtol=0, atol=0)
    assert calls  # only the corrupt shard was recomputed


def test_learned_timesteps_lower_the_loss_and_keep_the_grid_valid(tmp_path):
    s = UniPCScheduler(**SD)
    s.set_timesteps(5)
    model, noise = mixture(s.config, 32, 1000)
    target = teacher_trajectories(s, model, noise, TeacherSpec(steps=60), progress=False)[-1]
    search = TimestepSearch(iters=8, lr=0.05)
    plan, report = learn_timesteps(s, model, noise, target, search, tmp_path / "ck.json", progress=False)
    assert report.validation == "in-batch (last 8 of 32 fitting noises)"
    assert report.validation_tuned < report.validation_base and report.loss_final_grid < report.loss_initial
    assert np.all(np.diff(plan.rho[:-1]) < 0) and plan.rho[-1] == 0.0 and plan.rho[0] == s.plan.rho[0]
    assert np.all(np.diff(plan.timesteps) < 0) and plan.timesteps.min() >= 0 and plan.timesteps.max() <= 999
    assert np.all(plan.timesteps == np.round(plan.timesteps))  # discrete model: integer timesteps
    # a rerun with the finished checkpoint resumes at its end: same result, no new iterations
    again, report2 = learn_timesteps(s, model, noise, target, search, tmp_path / "ck.json", progress=False)
    assert again.fingerprint() == plan.fingerprint() and report2.losses == report.losses


def test_timesteps_method_returns_a_scheduler_with_the_learned_grid(tmp_path, monkeypatch):
    s = fastsampler.DPMSolverPlusPlusScheduler.from_config(SD)
    model, noise = mixture(s.config, 12, 1000)
    tuned = fastsampler.tune(s, model, noise, [4, 5], method="timesteps", cache_dir=None, progress=False, iters=4)
    assert set(tuned.plans) == {4, 5} and type(tuned) is fastsampler.DPMSolverPlusPlusScheduler
    for n in (4, 5):
        entry = tuned.tuning_report["steps"][n]
        tuned.set_timesteps(n)
        assert tuned.timesteps.tolist() == [int(t) for t in entry["timesteps_learned"]]
        assert entry["validation_tuned"] <= entry["validation_base"]
        assert entry["loss_final_grid"] <= entry["loss_initial"] * (1 + 1e-9)


class Dying:
    """``model`` (same cache key: the same study and checkpoints), killed at its ``at``-th call."""

    def __init__(self, model, at: int):
        self.model, self.at, self.calls = model, at, 0

    def cache_key(self) -> str:
        return self.model.cache_key()

    def __call__(self, x, t):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.model(x, t)


def test_s3_search_improves_on_its_starting_point_and_resumes_identically(tmp_path):
    s = UniPCScheduler(**SD)
    s.set_timesteps(4)
    model, noise = mixture(s.config, 16, 1000)
    target = teacher_trajectories(s, model, noise, TeacherSpec(steps=40), progress=False)[-1]
    # the study's own resumption (the seeded time-point fits resume from their checkpoints: the test below)
    search = S3Search(budget_evaluations=4 * 30, warmup=12, round_size=4, keep=2, seed_timesteps=False, refine_top=0)
    plan, report = search_schedule(s, model, noise, target, search, tmp_path / "a.log", progress=False)
    assert report.validation_best <= report.validation_base
    assert report.history == sorted(report.history, reverse=True)
    assert plan.meta["scheduler"] == "S3Scheduler" and report.screened_out > 0

    with pytest.raises(KeyboardInterrupt):  # mid-way through a candidate in a screened round
        search_schedule(s, Dying(model, 4 * 17 + 2), noise, target, search, tmp_path / "b.log", progress=False)
    resumed, report_b = search_schedule(s, model, noise, target, search, tmp_path / "b.log", progress=False)
    assert resumed.fingerprint() == plan.fingerprint()
    # the finished candidates were not evaluated again
    assert report_b.model_evaluations < report.model_evaluations - 4 * 10
    # other fitting noises in the same journal: a study of their own, never the scores of the first
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    _, other = mixture(s.config, 16, 1001)
    other_target = teacher_trajectories(s, model, other, TeacherSpec(steps=40), progress=False)[-1]
    _, report_c = search_schedule(s, model, other, other_target, search, tmp_path / "b.log", progress=False)
    assert report_c.model_evaluations >= 4 * 30  # a full search of its own budget, not a finished study resumed
    assert len(optuna.get_all_study_names(JournalStorage(JournalFileBackend(str(tmp_path / "b.log"))))) == 2
    assert report_b.history == report.history and report_b.evaluated == report.evaluated


def test_s3_contains_the_learned_time_points_and_the_base(tmp_path):
    """S³ searches on the learned grid too and compares the learned-time-point plan on validation: its result is
    never worse there than ``method="timesteps"`` from the same start, nor than the scheduler's own plan; a run
    killed during its time-point fit resumes to the same plan."""
    s = UniPCScheduler(**SD)
    model, noise = mixture(s.config, 16, 1000, guidance=7.5)
    options = dict(budget_evaluations=4 * 24, warmup=8, round_size=4, keep=2)
    timesteps = fastsampler.tune(s, model, noise, 4, method="timesteps", cache_dir=None, progress=False)
    searched = fastsampler.tune(s, model, noise, 4, method="s3", cache_dir=None, progress=False,
                                checkpoint_dir=tmp_path / "a", **options)
    t, e = timesteps.tuning_report["steps"][4], searched.tuning_report["steps"][4]
    assert e["validation"] == t["validation"] == "in-batch (last 4 of 16 fitting noises)"
    assert e["validation_timesteps"] == pytest.approx(t["validation_tuned"], rel=1e-9)
    assert e["validation_best"] <= t["validation_tuned"] and e["validation_best"] <= e["validation_base"]
    assert e["validation_best"] == e["candidates"][e["chosen"]]
    assert {"baseline", "learned time points"} <= set(e["candidates"])
    assert any(name.startswith("refined #") for name in e["candidates"]) or e["chosen"] != "searched"
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "a" / "s3_study.log")))
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    assert study.trials[1].params["grid"] == "learned"  # the scheduler's own solver on the learned grid, seeded

    s.set_timesteps(4)
    target = teacher_trajectories(s, model, noise, TeacherSpec(), progress=False)[-1]
    with pytest.raises(KeyboardInterrupt):  # during the seeded time-point fit
        search_schedule(s, Dying(model, 4 * 6 + 2), noise, target, S3Search(**options), tmp_path / "b.log", progress=False)
    assert (tmp_path / "b.log.seed.json").is_file()
    resumed, _ = search_schedule(s, model, noise, target, S3Search(**options), tmp_path / "b.log", progress=False)
    assert resumed.fingerprint() == searched.plans[4].fingerprint()


def test_s3_keeps_the_time_point_plan_unless_a_candidate_is_clearly_better():
    """A searched candidate replaces the learned-time-point plan only when its validation gain exceeds one standard
    error of the per-sample differences: one lucky noise is not enough."""
    from fastsampler.tuning.s3 import _Candidate, _choose

    def cand(*losses: float) -> _Candidate:
        per_sample = torch.tensor(losses, dtype=torch.float64)
        return _Candidate(None, float(per_sample.mean()), per_sample, {})

    base = cand(1.0, 1.0, 1.0, 1.0)
    learned = cand(0.5, 0.5, 0.5, 0.5)
    lucky = cand(0.5, 0.5, 0.5, 0.1)  # lower mean, from one sample only
    clear = cand(0.3, 0.31, 0.29, 0.32)
    assert _choose({"baseline": base, "learned time points": learned, "searched #3": lucky},
                   "learned time points") == "learned time points"
    assert _choose({"baseline": base, "learned time points": learned, "searched #3": lucky, "refined #3": clear},
                   "learned time points") == "refined #3"
    worse = cand(0.6, 0.6, 0.6, 0.6)
    assert _choose({"baseline": base, "learned time points": learned, "searched #1": worse},
                   "learned time points") == "learned time points"


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fastsampler.runtime.distributed import distributed_context

    ctx = distributed_context()
    s = UniPCScheduler(**SD)
    model, noise = mixture(s.config, 8, 1000)
    tuned = fastsampler.tune(s, model, noise, 4, method="s3", cache_dir=folder, checkpoint_dir=folder,
                             progress=False, dist=ctx, budget_evaluations=4 * 24, warmup=10, round_size=4, keep=2)
    with open(os.path.join(folder, f"result_{rank}.json"), "w") as f:
        json.dump({"fingerprint": tuned.plans[4].fingerprint(), "report": tuned.tuning_report["steps"][4]}, f,
                  default=str)


@pytest.mark.slow
def test_two_workers_search_one_study(tmp_path):
    """Two processes (gloo) share the teacher through the cache and one optuna journal: both end with the same
    best plan, every candidate was evaluated once, and the budget holds for the pair."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, 29511, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "s3_study.log")))
    names = optuna.get_all_study_names(storage)
    searched = [name for name in names if name.startswith("s3-4-")]
    assert len(searched) == 1  # one study for the search's key, shared by both workers
    study = optuna.load_study(study_name=searched[0], storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 24 <= len(complete) <= 24 + 2 * 2  # the budget, overshot by at most one round's kept candidates per worker
    assert len({t.number for t in study.trials}) == len(study.trials)


def test_s3_tune_returns_an_s3_scheduler_that_saves_and_loads(tmp_path):
    s = UniPCScheduler(**SD)
    model, noise = mixture(s.config, 8, 1000)
    tuned = fastsampler.tune(s, model, noise, 4, method="s3", cache_dir=None, progress=False,
                             budget_evaluations=4 * 16, warmup=8, round_size=4, keep=2)
    assert type(tuned) is S3Scheduler and set(tuned.plans) == {4}
    tuned.save_pretrained(tmp_path)
    back = S3Scheduler.from_pretrained(tmp_path)
    back.set_timesteps(4)
    assert back.plan.fingerprint() == tuned.plans[4].fingerprint()
    # the searched plan also runs in a plain UniPCScheduler (plans are data)
    u = UniPCScheduler(**SD)
    u.set_plan(tuned.plans[4])


@pytest.mark.parametrize("method", ["dc", "timesteps", "s3"])
def test_held_out_noises_choose_the_candidate(method):
    """With ``validation_noise`` the tuned plan is the candidate best on the held-out noises: never worse there
    than the scheduler's own plan, and its held-out loss is the one the report states."""
    from fastsampler.tuning.api import validation_loss

    s = UniPCScheduler(**SD)
    model, noise = mixture(s.config, 8, 1000, guidance=7.5)
    held_model, held = mixture(s.config, 16, 2000, guidance=7.5)
    options = {"dc": dict(search="scan", iters=3), "timesteps": dict(iters=6, lr=0.05),
               "s3": dict(budget_evaluations=4 * 20, warmup=8, round_size=4, keep=2, validate_top=4)}[method]
    tuned = fastsampler.tune(s, model, noise, 4, method=method, cache_dir=None, progress=False,
                             validation_noise=held, validation_model=held_model, **options)
    entry = tuned.tuning_report["steps"][4]
    assert entry["validation_loss_tuned"] <= entry["validation_loss_plain"] * (1 + 1e-12)
    chosen = {"dc": entry.get("holdout_plain" if entry.get("kept_plain") else "holdout_tuned"),
              "timesteps": entry.get("holdout_final"), "s3": entry.get("holdout_best")}[method]
    assert chosen == pytest.approx(entry["validation_loss_tuned"], rel=1e-5)
    tuned.set_timesteps(4)  # the stated held-out loss is the tuned scheduler's own, recomputed from scratch
    recomputed = validation_loss(tuned, held_model, held, TeacherSpec(), None, False)
    assert recomputed == pytest.approx(entry["validation_loss_tuned"], rel=1e-5)
    if method == "dc":
        assert entry["holdout_plain"] == pytest.approx(entry["validation_loss_plain"], rel=1e-5)
        if entry["kept_plain"]:  # the fitted ratios did worse on the held-out noises: none are kept
            assert entry["ratios"] == [1.0] * 4
    elif method == "timesteps":
        assert len(entry["holdout_losses"]) == 7 and entry["holdout_initial"] == entry["holdout_losses"][0]
    else:
        assert entry["holdout_baseline"] == pytest.approx(entry["validation_loss_plain"], rel=1e-5)


def test_karras_nodes_keep_the_ends():
    s = UniPCScheduler(**SD)
    s.set_timesteps(6)
    for power in (1.0, 3.0, 9.0):
        nodes = karras_nodes(s, 6, power)
        assert nodes.rho[0] == s.plan.rho[0] and nodes.rho[-1] == 0.0 and nodes.rho[-2] == pytest.approx(s.plan.rho[-2])
        assert np.all(np.diff(nodes.rho[:-1]) < 0)


def test_unet_denoiser_guidance_and_pipeline_adapter():
    from fastsampler.models.digits import load_digits_cond_pipeline

    pipe = load_digits_cond_pipeline()
    labels = torch.arange(4) % 10
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        guided = UNetDenoiser(pipe.unet, labels, 3.0)(x, t)
        expected = pipe.guided_model_output(x, t, labels, 3.0)
        torch.testing.assert_close(guided, expected)
        adapter = from_pipeline(pipe, 4, class_labels=[0, 1, 2, 3], guidance_scale=3.0)
        torch.testing.assert_close(adapter(x, t), expected)
    assert adapter.cache_key() != UNetDenoiser(pipe.unet, labels, 2.0).cache_key()


def test_a_conditioned_adapter_passed_to_tune_keeps_its_conditions():
    """``tune(model=UNetDenoiser(unet, labels, w))`` is a model callable, not a pipeline (it holds a ``unet`` too):
    its labels and guidance reach the teacher — it used to be rebuilt as an unconditioned pipeline's denoiser."""
    from fastsampler.models.digits import load_digits_cond_pipeline
    from fastsampler.tuning.api import is_pipeline

    pipe = load_digits_cond_pipeline()
    model = from_pipeline(pipe, 4, class_labels=[0, 1, 2, 3], guidance_scale=3.0)
    assert is_pipeline(pipe) and not is_pipeline(model)
    s = UniPCScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    tuned = fastsampler.tune(s, model, noise, 3, method="dc", search="scan", iters=2, teacher="dpmsolver++3:6",
                             cache_dir=None, progress=False, teacher_check=False, validation_fraction=0.5)
    entry = tuned.tuning_report["steps"][3]
    s.set_timesteps(3)
    expected = teacher_trajectories(s, model, noise, TeacherSpec("dpmsolver++3", 6), progress=False)[-1]
    from fastsampler.tuning.runner import run

    with torch.no_grad():
        plain = run(s.plan, model, noise)[0]
    fit = slice(0, 2)  # validation_fraction=0.5: the ratios are fitted on the first half
    assert entry["final_loss_plain"] == pytest.approx(
        float((plain[fit].double() - expected[fit].double()).pow(2).mean()), rel=1e-6)


@pytest.mark.slow
def test_cli_tune_writes_a_loadable_scheduler_folder(tmp_path):
    from fastsampler.models.digits import pipeline_dir

    out = tmp_path / "tuned"
    done = subprocess.run([sys.executable, "-m", "fastsampler.cli", "tune", "--pipeline", str(pipeline_dir("eps")),
                           "--method", "dc", "--steps", "4", "--num-samples", "4", "--teacher", "dpmsolver++3:30",
                           "--search", "scan", "--iters", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    loaded = UniPCScheduler.from_pretrained(out)
    assert set(loaded.plans) == {4}
    assert json.loads((out / "dc_ratios.json").read_text())["entries"][0]["num_steps"] == 4
    report = json.loads((out / "tune_report.json").read_text())
    assert report["runs"]
    # the folder holds what a pipeline loads, with save_pretrained's file modes; the checkpoints are gone
    assert not (out / ".checkpoints").exists()
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["fastsampler_plans.json"] == modes["scheduler_config.json"] == 0o666 & ~umask, modes
    assert "4 steps: ratios" in done.stdout and "MSE vs teacher" in done.stdout and "guidance" not in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("s3", ["--budget", "24"]), ("timesteps", ["--iters", "2", "--lr", "0.02"]),
                                          ("coefficients", ["--iters", "3", "--lr", "0.02"])])
def test_cli_tune_searches_and_learns(tmp_path, method, extra):
    from fastsampler.models.digits import pipeline_dir

    out = tmp_path / "tuned"
    done = subprocess.run([sys.executable, "-m", "fastsampler.cli", "tune", "--pipeline", str(pipeline_dir("eps")),
                           "--method", method, "--steps", "4", "--num-samples", "4", "--validation-samples", "4",
                           "--teacher", "dpmsolver++3:30", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                           "--no-progress", *extra], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    cls = S3Scheduler if method == "s3" else UniPCScheduler
    loaded = cls.from_pretrained(out)
    assert set(loaded.plans) == {4}
    entry = json.loads((out / "tune_report.json").read_text())["runs"]["None"]["steps"]["4"]
    assert entry["validation_loss_tuned"] <= entry["validation_loss_plain"] * (1 + 1e-12)
    assert "held-out" in done.stdout
    if method == "s3":  # reported in the unit of --budget: the search's own model calls
        assert 24 <= entry["search_evaluations"] <= entry["model_evaluations"]
        assert f"in {entry['search_evaluations']} model calls of the search's budget" in done.stdout


def test_s3_progress_bar_counts_in_the_budgets_unit(monkeypatch, tmp_path):
    from fastsampler import progress as progress_bars

    bars = []
    original = progress_bars.bar
    monkeypatch.setattr(progress_bars, "bar", lambda *a, **k: bars.append(original(*a, **k)) or bars[-1])
    s = UniPCScheduler(**SD)
    s.set_timesteps(4)
    model, noise = mixture(s.config, 8, 0)
    target = teacher_trajectories(s, model, noise, TeacherSpec(steps=40), progress=False)[-1]
    search_schedule(s, model, noise, target, S3Search(budget_evaluations=40, warmup=4, seed_timesteps=False,
                                                      refine_top=0), tmp_path / "s3.log", progress=True)
    (s3_bar,) = [b for b in bars if str(getattr(b, "desc", "")).startswith("S3")]
    assert s3_bar.total == 40 and s3_bar.unit == "model calls" and s3_bar.n == 40


def test_cli_tune_refuses_options_of_another_method():
    from click.testing import CliRunner

    from fastsampler.cli import main
    from fastsampler.models.digits import pipeline_dir

    result = CliRunner().invoke(main, ["tune", "--pipeline", str(pipeline_dir("eps")), "--method", "dc", "--steps",
                                       "4", "--budget", "100", "--out", "/nonexistent/never"])
    assert result.exit_code != 0 and "--budget" in result.output and "--method dc" in result.output


def test_one_name_per_embedded_model_in_every_entry_point():
    """``digits`` / ``digits-v`` / ``digits-cond`` name the same folder in ``fastsampler.assets``, ``tune
    --pipeline`` and ``fid --pipeline``; the old names are aliases; a misspelt one gets a suggestion."""
    import click

    from fastsampler import shipped
    from fastsampler.eval.fid import embedded_pipeline_dir
    from fastsampler.cli.tune import _load_pipeline

    for name, alias in [("digits", "digits-ddpm"), ("digits-v", "digits-ddpm-v"), ("digits-cond", None)]:
        folder = Path(fastsampler.assets(name))
        assert (folder / "model_index.json").is_file()
        assert shipped.pipeline_folder(name) == folder == embedded_pipeline_dir(name)
        if alias:
            assert Path(fastsampler.assets(alias)) == shipped.pipeline_folder(alias) == folder
    pipe = _load_pipeline("digits", "cpu")
    assert Path(pipe.config._name_or_path) == Path(fastsampler.assets("digits"))
    with pytest.raises(click.BadParameter, match="did you mean 'digits-cond'"):
        _load_pipeline("digits-cnd", "cpu")
    with pytest.raises(ValueError, match="did you mean 'digits-s3'"):
        fastsampler.assets("digits-s33")


def test_shipped_assets_by_name():
    import fastsampler.shipped as shipped

    assert fastsampler.assets("digits").endswith("digits_ddpm")
    ratios = json.loads(open(fastsampler.assets("digits-dc-ratios")).read())
    assert ratios["format"] == "fastsampler-dc-ratios/1" and {e["num_steps"] for e in ratios["entries"]} == {4, 5, 6, 8, 10}
    with pytest.raises(ValueError, match="unknown asset"):
        fastsampler.assets("digits-magic")
    assert set(shipped.ASSETS) >= {"digits-s3", "digits-cond-dc-cpr"}
    # the shipped DC ratios run as scheduler options on the model they were fitted for
    from fastsampler.models.digits import load_digits_pipeline

    pipe = load_digits_pipeline()
    s = UniPCScheduler.from_config(pipe.scheduler.config, dc_ratios_file=fastsampler.assets("digits-dc-ratios"),
                                   timestep_spacing="trailing")  # the configuration they were fitted for
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # … so no mismatch warning
        s.set_timesteps(5)
    assert s.plan.to_dict()["meta"]["transforms"][0]["name"] == "dc"
    # on another configuration they still run, with a warning naming the difference
    other = UniPCScheduler.from_config(s.config, timestep_spacing="leading")
    with pytest.warns(UserWarning, match="timestep_spacing: 'trailing' there, 'leading' here"):
        other.set_timesteps(5)


def test_bench_and_fid_take_a_tuned_scheduler_folder(tmp_path):
    from fastsampler.eval.fid import resolve_scheduler, scheduler_fingerprint

    s = UniPCScheduler(**SD)
    other = UniPCScheduler(**SD, solver_order=3, use_karras_sigmas=True)
    other.set_timesteps(5)
    s.set_plan(other.plan)
    s.save_pretrained(tmp_path)
    spec = bench.custom_spec(str(tmp_path))
    built = spec.build(SD)
    built.set_timesteps(5)
    assert built.plan.fingerprint() == other.plan.fingerprint()
    loaded = resolve_scheduler(str(tmp_path), dict(SD))
    assert set(loaded.plans) == {5} and '"_plans"' in scheduler_fingerprint(loaded)
    assert resolve_scheduler(str(tmp_path), dict(SD), {"solver_order": 2}).plans.keys() == {5}  # its own value
    with pytest.raises(ValueError, match="solver_order=3 differ from the scheduler folder"):
        resolve_scheduler(str(tmp_path), dict(SD), {"solver_order": 3})


def test_a_scored_search_is_held_out_by_its_own_scorer():
    """With a ``scorer`` (e.g. a small-sample FID) S³ ranks candidates by it, and the held-out selection scores the
    held-out samples with it too, not with the teacher error the search never optimised."""
    from fastsampler.tuning.runner import run

    def scorer(x: torch.Tensor) -> float:  # prefers samples near 0.3, a criterion unrelated to the teacher
        return float((x.double() - 0.3).pow(2).mean())

    s = UniPCScheduler(**SD)
    model, noise = mixture(s.config, 8, 1000)
    held_model, held = mixture(s.config, 16, 2000)
    tuned = fastsampler.tune(s, model, noise, 4, method="s3", cache_dir=None, progress=False, scorer=scorer,
                             validation_noise=held, validation_model=held_model,
                             budget_evaluations=4 * 16, warmup=8, round_size=4, keep=2, validate_top=4)
    entry = tuned.tuning_report["steps"][4]
    s.set_timesteps(4)
    with torch.no_grad():
        chosen, baseline = run(tuned.plans[4], held_model, held)[0], run(s.plan, held_model, held)[0]
    assert entry["holdout_best"] == pytest.approx(scorer(chosen), rel=1e-9)
    assert entry["holdout_baseline"] == pytest.approx(scorer(baseline), rel=1e-9)
    assert entry["holdout_best"] <= entry["holdout_baseline"]
    assert entry["baseline_score"] == pytest.approx(scorer(run(s.plan, model, noise)[0]), rel=1e-9)


def test_every_shipped_asset_exists_and_tuned_folders_load():
    """Every name in ``fastsampler.shipped.ASSETS`` is in the package; the S³ folders load with their plans, each
    plan fitting the embedded model it was searched for (``set_plan`` checks the schedule)."""
    import fastsampler.shipped as shipped
    from fastsampler.models.digits import load_digits_cond_pipeline, load_digits_pipeline

    configs = {"digits": load_digits_pipeline().scheduler.config,
               "digits-cond": load_digits_cond_pipeline().scheduler.config}
    for name in shipped.ASSETS:
        path = fastsampler.assets(name)
        assert os.path.exists(path), name
        if "-s3" in name:
            tuned = S3Scheduler.from_pretrained(path)
            assert tuned.plans and set(tuned.plans) <= {4, 5, 6, 8, 10}, name
            probe = S3Scheduler.from_config(configs["digits-cond" if "cond" in name else "digits"],
                                            timestep_spacing="trailing")
            for n, plan in tuned.plans.items():
                probe.set_plan(plan)
                probe.set_timesteps(n)
                assert probe.plan.fingerprint() == plan.fingerprint(), (name, n)


@pytest.mark.slow
def test_cli_s3_scored_by_fid(tmp_path):
    """``--fid-reference``: S³ candidates and the held-out choice are scored by the FID of their samples; the
    report's held-out score is the FID of the tuned plan's samples from the held-out noises."""
    from click.testing import CliRunner

    from fastsampler.cli import main
    from fastsampler.models.digits import load_digits_pipeline, pipeline_dir
    from fastsampler.eval.fid import fid_scorer
    from fastsampler.tuning.runner import run

    out, cache = tmp_path / "tuned", tmp_path / "cache"
    result = CliRunner().invoke(main, ["tune", "--pipeline", str(pipeline_dir("eps")), "--method", "s3", "--steps",
                                       "4", "--num-samples", "64", "--validation-samples", "64", "--budget", "40",
                                       "--teacher", "dpmsolver++3:30", "--fid-reference", "digits-train",
                                       "--cache-dir", str(cache), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "tune_report.json").read_text())["runs"]["None"]["steps"]["4"]
    assert entry["holdout_best"] <= entry["holdout_baseline"]
    pipe = load_digits_pipeline()
    held = torch.randn((64, 1, 16, 16), generator=torch.Generator().manual_seed(1))  # --seed 0 + 1
    tuned = S3Scheduler.from_pretrained(out)
    with torch.no_grad():
        samples = run(tuned.plans[4], fastsampler.models.denoisers.from_pipeline(pipe, 64), held)[0]
    scorer = fid_scorer(pipe, "digits-train", cache_dir=cache / "ref_stats")
    assert entry["holdout_best"] == pytest.approx(scorer(samples), rel=1e-4)
    assert entry["baseline_score"] > 0.05  # an FID, not the teacher error (≈ 1e-2 here)


def test_cli_fid_scoring_is_for_s3_only():
    from click.testing import CliRunner

    from fastsampler.cli import main
    from fastsampler.models.digits import pipeline_dir

    result = CliRunner().invoke(main, ["tune", "--pipeline", str(pipeline_dir("eps")), "--method", "dc", "--steps",
                                       "4", "--fid-reference", "digits-train", "--out", "/nonexistent/never"])
    assert result.exit_code != 0 and "--fid-reference" in result.output and "--method s3" in result.output


def test_a_study_scored_otherwise_never_resumes_another():
    """The study name follows the scorer: a search by FID must not continue a study scored by the teacher error
    (same plan, model, noises and settings), nor one scored by another reference."""
    from fastsampler.tuning.s3 import study_key

    s = UniPCScheduler(**SD)
    s.set_timesteps(4)
    model, noise = mixture(s.config, 4, 1000)
    target = torch.zeros_like(noise)

    def by_mean(x: torch.Tensor) -> float:
        return float(x.mean())

    def by_norm(x: torch.Tensor) -> float:
        return float(x.norm())

    keys = {study_key(s.plan, model, noise, target, S3Search()),
            study_key(s.plan, model, noise, target, S3Search(), by_mean),
            study_key(s.plan, model, noise, target, S3Search(), by_norm)}
    assert len(keys) == 3
    by_norm.key = "fid on digits-test"
    assert study_key(s.plan, model, noise, target, S3Search(), by_norm) not in keys


def test_a_model_whose_labels_follow_the_batch_position_gets_the_right_teacher():
    """The trap: a plain ``model(x, t)`` that conditions sample j on label j (by position) must not be run on slices
    of the batch. Without ``subset`` the teacher runs on the whole batch and equals the subset-aware teacher; a model
    that declares ``per_sample_conditions = False`` is sliced; splitting such a model across processes is refused."""
    from fastsampler.runtime.distributed import DistContext

    s = UniPCScheduler(**SD)
    s.set_timesteps(4)
    declared, noise = mixture(s.config, 40, 9, guidance=4.0)  # MixtureDenoiserModel: subset slices the labels
    shapes = []

    def by_position(x, t):
        shapes.append(x.shape[0])
        return declared.subset(0, x.shape[0])(x, t)  # labels 0, 1, 2, … of whatever batch it is given

    expected = teacher_trajectories(s, declared, noise, TeacherSpec(steps=30), None, progress=False)
    got = teacher_trajectories(s, by_position, noise, TeacherSpec(steps=30), None, progress=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert set(shapes) == {40}
    shapes.clear()
    by_position.per_sample_conditions = False  # the caller says it has none: sliced into shards of 16
    sliced = teacher_trajectories(s, by_position, noise, TeacherSpec(steps=30), None, progress=False)
    assert set(shapes) == {16, 8} and not torch.allclose(sliced, expected)  # (it lied: the slices are wrong)
    del by_position.per_sample_conditions
    with pytest.raises(ValueError, match="subset"):
        teacher_trajectories(s, by_position, noise, TeacherSpec(steps=30), None, ctx=DistContext(0, 2),
                             progress=False)


def test_learned_timesteps_run_until_their_loss_stops_falling():
    """No fixed 40 iterations: the search stops on a plateau of its selection loss (the batch's held rows), and
    continuous-time models keep the learned time points exactly (no rounding)."""
    s = UniPCScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    s.set_timesteps(5)
    model, noise = mixture(s.config, 32, 4)
    target = teacher_trajectories(s, model, noise, TeacherSpec(steps=60), None, progress=False)[-1]
    plan, report = learn_timesteps(s, model, noise, target, TimestepSearch(iters=300, patience=10, lr=0.05),
                                   progress=False)
    assert report.stopped.startswith("plateau") and report.iterations < 301
    tail = report.validation_losses[-11:]
    assert min(tail) > min(report.validation_losses[:-10]) * (1 - 1e-4)  # the last `patience` iterations: no gain
    assert report.validation_tuned < report.validation_base
    np.testing.assert_allclose(plan.timesteps, plan.rho[:-1] * 1000, rtol=1e-12)  # s·T, not rounded
    assert not np.allclose(plan.timesteps, np.round(plan.timesteps))
