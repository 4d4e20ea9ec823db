"""``fastsampler.tune(method="coefficients")``: learned solver coefficients and time points (S4S-Alt-style)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.plans.format import src_slot
from fastsampler.tuning.coefficients import (CoefficientFit, CoefficientSearch, Parametrisation, consistent_sources, exact_output,
                                             learn_coefficients, sample, used_rows)
from fastsampler.tuning.support import alive_sources, widen
from fastsampler.tuning.holdout import Holdout
from fastsampler.tuning.runner import advance, run, start
from fastsampler.tuning.teacher import TeacherSpec, teacher_trajectories
from fastsampler.tuning.timesteps import GridFamily
from test_tuning import SD, mixture

FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
QUICK = dict(iters=12, patience=50, lr=0.02, init="base")


def fitted(scheduler, n: int, batch: int = 16, seed: int = 3, guidance: float | None = None, **search):
    scheduler.set_timesteps(n)
    model, noise = mixture(scheduler.config, batch, seed, guidance)
    target = teacher_trajectories(scheduler, model, noise, TeacherSpec(steps=60), None, progress=False)[-1]
    plan, report = learn_coefficients(scheduler, model, noise, target, CoefficientSearch(**{**QUICK, **search}),
                                      progress=False)
    return plan, report, model, noise, target


def consistent_final(plan, prediction_type: str) -> torch.Tensor:
    """The (x₀, ε) components of the final sample of an exactly consistent run (a point mass, exact model)."""
    state = start(plan, torch.tensor([plan.alpha[0], plan.sigma[0]], dtype=torch.float64))
    for i in range(plan.num_steps):
        o = torch.tensor(exact_output(prediction_type, plan.alpha[i], plan.sigma[i]), dtype=torch.float64)
        state = advance(plan, state, o)
    return state.x


@pytest.mark.parametrize("learn_timesteps, learn_start", [(False, False), (True, False), (True, True)])
def test_iteration_zero_is_the_base_scheduler(learn_timesteps, learn_start):
    s = UniPCScheduler(**SD)
    s.set_timesteps(5)
    model, noise = mixture(s.config, 6, 1)
    param = Parametrisation(s, CoefficientSearch(learn_timesteps=learn_timesteps, learn_start=learn_start))
    theta = torch.zeros(param.support.shape, dtype=torch.float64)
    with torch.no_grad():
        ours = sample(param, param.initial_u(), theta, model, noise, torch.float64)
        base, _ = run(s.plan, model, noise)
    torch.testing.assert_close(ours, base, rtol=1e-9, atol=1e-9)
    plan, report, *_ = fitted(s, 5, iters=0)
    assert plan is s.plan and report.kept_base and report.iterations == 1


@pytest.mark.parametrize("make", [lambda: UniPCScheduler(**SD), lambda: DPMSolverPlusPlusScheduler(**SD, solver_order=3),
                                  lambda: DEISScheduler(**SD), lambda: UniPCScheduler(**FLOW),
                                  lambda: DPMSolverPlusPlusScheduler(**{**SD, "prediction_type": "v_prediction"})])
@pytest.mark.parametrize("mode", ["full", "data"])
def test_the_learned_plan_keeps_first_order_consistency(make, mode):
    """On an exactly consistent run the tuned plan ends where its base does (x_N = α_N x₀ + σ_N ε): both
    components with ``consistency="full"``, the x₀ component with ``"data"`` (the default); without the
    projection the learned corrections break it — so the check can fail."""
    s = make()
    plan, report, *_ = fitted(s, 5, validation_fraction=0.25, patience=100, consistency=mode)
    pt = s.config.prediction_type
    kept = slice(0, 2) if mode == "full" else slice(0, 1)
    expected = consistent_final(s.plan, pt)
    torch.testing.assert_close(expected, torch.tensor([plan.alpha[-1], plan.sigma[-1]], dtype=torch.float64),
                               rtol=1e-9, atol=1e-9)
    param = Parametrisation(s, CoefficientSearch(learn_timesteps=False, consistency=mode))
    theta = torch.randn(param.support.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    projected = param.materialise(param.initial_u(), 0.1 * theta)
    torch.testing.assert_close(consistent_final(projected, pt)[kept], expected[kept], rtol=1e-9, atol=1e-9)
    loose = Parametrisation(s, CoefficientSearch(learn_timesteps=False, consistency="none"))
    assert (consistent_final(loose.materialise(loose.initial_u(), 0.1 * theta), pt) - expected)[kept].abs().max() > 1e-4
    if mode == "data":  # the noise part's scale is free: a random correction moves it
        assert (consistent_final(projected, pt) - expected)[1].abs() > 1e-4
    if not report.kept_base:
        assert report.validation_tuned < report.validation_base
        torch.testing.assert_close(consistent_final(plan, pt)[kept], expected[kept], rtol=1e-8, atol=1e-8)


def test_consistency_accepts_the_old_booleans_and_names_the_allowed_values():
    assert CoefficientSearch(consistency=True).consistency == "full"
    assert CoefficientSearch(consistency=False).consistency == "none"
    with pytest.raises(ValueError, match="`consistency` must be one of"):
        CoefficientSearch(consistency="exact")
    with pytest.raises(ValueError, match="`history` must be"):
        CoefficientSearch(history=-1)
    with pytest.raises(ValueError, match="`support` must be one of"):
        CoefficientSearch(support="all")


def test_consistent_sources_follow_the_exact_run():
    """The (x₀, ε) components the projection uses: the sample is (α_i, σ_i) at every node of a consistent run."""
    s = UniPCScheduler(**SD)
    s.set_timesteps(6)
    sources = consistent_sources(s.plan, "epsilon")
    for i in range(6):
        torch.testing.assert_close(torch.as_tensor(sources[i, 0, 0]),
                                   torch.tensor([s.plan.alpha[i], s.plan.sigma[i]], dtype=torch.float64))
        torch.testing.assert_close(torch.as_tensor(sources[i, 0, 1]), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_learning_lowers_the_fitting_loss_and_validation_chooses():
    s = UniPCScheduler(**SD)
    plan, report, model, noise, target = fitted(s, 5, batch=24, iters=30)
    assert report.fit_losses[-1] < report.fit_losses[0]
    assert report.validation == "in-batch (last 6 of 24 fitting noises)"
    assert report.validation_tuned <= report.validation_base
    assert report.stopped and report.iterations == len(report.validation_losses)
    assert plan.meta.get("tuned") == "coefficients" or report.kept_base


def test_the_distance_loss_is_the_per_sample_rms_distance_in_fit_and_validation():
    """``loss="distance"``: each sample costs its RMS distance to the teacher (not its square), in the fit and in
    the validation that chooses the plan; the chosen plan is never worse than the base in those terms."""
    s = UniPCScheduler(**SD)
    plan, report, model, noise, target = fitted(s, 5, batch=24, iters=30, loss="distance")
    s.set_timesteps(5)
    with torch.no_grad():
        base_final, _ = run(s.plan, model, noise)
        tuned_final, _ = run(plan, model, noise)
    held = slice(18, 24)  # the in-batch validation: the last quarter
    rms = lambda final: (final - target).double().pow(2).flatten(1).mean(1).sqrt()[held].mean().item()
    assert report.validation == "in-batch (last 6 of 24 fitting noises)"
    assert report.validation_base == pytest.approx(rms(base_final), rel=1e-6)
    assert report.validation_tuned == pytest.approx(rms(tuned_final), rel=1e-6)
    assert report.validation_tuned < report.validation_base and report.fit_losses[-1] < report.fit_losses[0]


def test_validation_never_returns_a_plan_worse_than_the_base():
    """Held-out targets that the base plan meets exactly: any learned change is worse there, so the base returns."""
    s = UniPCScheduler(**SD)
    s.set_timesteps(4)
    model, noise = mixture(s.config, 8, 5)
    held_model, held = mixture(s.config, 8, 6)
    with torch.no_grad():
        own, _ = run(s.plan, held_model, held)
    target = teacher_trajectories(s, model, noise, TeacherSpec(steps=60), None, progress=False)[-1]
    plan, report = learn_coefficients(s, model, noise, target, CoefficientSearch(**QUICK), progress=False,
                                      holdout=Holdout(held_model, held, own))
    assert report.kept_base and plan is s.plan and report.validation_base < 1e-20
    assert report.validation == "held-out noises (8)"


@pytest.mark.parametrize("options", [dict(consistency="full"), dict(consistency="none", learn_eval_times=True, lr=0.01)])
def test_a_killed_run_resumes_to_the_same_plan(tmp_path, options):
    s = UniPCScheduler(**SD)
    s.set_timesteps(4)
    model, noise = mixture(s.config, 8, 7)
    target = teacher_trajectories(s, model, noise, TeacherSpec(steps=60), None, progress=False)[-1]
    search = CoefficientSearch(**{"iters": 8, "patience": 50, "lr": 0.05, "init": "base", **options})
    whole, _ = learn_coefficients(s, model, noise, target, search, progress=False)

    class Killed(Exception):
        pass

    calls = []

    def dying(x, t):
        calls.append(1)
        if len(calls) > 4 * 5:  # dies during the sixth iteration
            raise Killed
        return model(x, t)

    dying.cache_key = model.cache_key
    with pytest.raises(Killed):
        learn_coefficients(s, dying, noise, target, search, tmp_path / "ck.pt", progress=False)
    resumed, report = learn_coefficients(s, model, noise, target, search, tmp_path / "ck.pt", progress=False)
    assert report.iterations == 9
    assert not report.kept_base  # the resumed run knows its base's validation loss
    np.testing.assert_allclose(resumed.coef, whole.coef, rtol=1e-12, atol=1e-12)
    assert list(resumed.timesteps) == list(whole.timesteps)
    if search.learn_eval_times:  # the learned evaluation times are in the plan (and came back from the checkpoint)
        assert whole.meta["eval_times"] == "decoupled"


def test_tune_coefficients_saves_and_loads_in_a_pipeline(tmp_path):
    """The tuned plan travels in a pipeline folder and gives the same images after loading."""
    pytest.importorskip("transformers")
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    s = UniPCScheduler(**SD)
    pipe = DDPMPipeline(unet=unet, scheduler=s)
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    tuned = fastsampler.tune(s, pipe, noise, 4, method="coefficients", cache_dir=None, progress=False,
                             teacher="dpmsolver++3:20", teacher_check=False, iters=6, lr=0.01, patience=50, init="base")
    entry = tuned.tuning_report["steps"][4]
    assert not entry["kept_base"] and tuned.plans[4].meta["tuned"] == "coefficients"
    assert {"fit_losses", "validation_losses", "iterations", "stopped", "validation_base"} <= set(entry)
    pipe.scheduler = tuned
    pipe.save_pretrained(tmp_path)
    from diffusers import DiffusionPipeline

    back = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(back.scheduler) is UniPCScheduler and set(back.scheduler.plans) == {4}
    assert back.scheduler.plans[4].fingerprint() == tuned.plans[4].fingerprint()
    images = []
    for scheduler in (back.scheduler, tuned):  # the same (reloaded) UNet: only the scheduler differs
        back.scheduler = scheduler
        images.append(back(batch_size=2, num_inference_steps=4, output_type="np",
                           generator=torch.Generator().manual_seed(1)).images)
    assert (images[0] == images[1]).all()


def test_coefficients_is_tunes_default_method():
    """``fastsampler.tune`` without ``method`` learns coefficients (the best method of benchmarks/tune_bench.py);
    the CLI's ``--method`` defaults to the same."""
    from click.testing import CliRunner

    from fastsampler.cli import main
    from fastsampler.tuning import DEFAULT_METHOD

    s = UniPCScheduler(**SD)
    model, noise = mixture(s.config, 8, 3)
    tuned = fastsampler.tune(s, model, noise, 4, cache_dir=None, progress=False, teacher_check=False, iters=2,
                             init="base")
    assert DEFAULT_METHOD == "coefficients" == tuned.tuning_report["method"]
    assert "[default: coefficients]" in CliRunner().invoke(main, ["tune", "--help"]).output


def test_bad_options_are_named():
    s = UniPCScheduler(**SD)
    model, noise = mixture(s.config, 4, 1)
    for options, name in ((dict(loss="l1"), "loss"), (dict(loss="rms"), "loss"), (dict(init="s3"), "init"), (dict(validation_fraction=1.0), "validation_fraction"),
                          (dict(patience=0), "patience"), (dict(iters=-1), "iters"), (dict(probe=0), "probe"),
                          (dict(learn_start=1), "learn_start")):
        with pytest.raises(ValueError, match=name):
            fastsampler.tune(s, model, noise, 4, method="coefficients", cache_dir=None, progress=False, **options)


def test_training_starts_from_the_baseline_and_is_never_worse_than_it_on_validation(tmp_path):
    """``init="nelder-mead"``: the search contains the baseline's result (its starting point) and returns the best
    on validation of the scheduler's plan, the baseline's plan and the learned one; a rerun resumes both stages."""
    s = UniPCScheduler(**SD)
    search = dict(iters=15, patience=50, lr=0.02, init="nelder-mead", init_evaluations=40, consistency="full")
    plan, report, model, noise, target = fitted(s, 5, batch=16, guidance=7.5, **search)
    start = report.start
    assert start["evaluations"] >= 40 and start["validation_base"] == pytest.approx(report.validation_base)
    assert report.validation_start == start["validation_tuned"] <= report.validation_base
    assert report.validation_tuned <= min(report.validation_base, start["validation_tuned"]) * (1 + 1e-9)
    if report.kept_start:
        assert list(plan.timesteps) == start["timesteps_learned"]
    again, _ = learn_coefficients(s, model, noise, target, CoefficientSearch(**search), tmp_path / "c.pt",
                                  progress=False)
    np.testing.assert_allclose(again.coef, plan.coef, rtol=1e-10, atol=1e-12)


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    import json
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fastsampler.runtime.distributed import distributed_context

    ctx = distributed_context()
    plan, report, *_ = fitted_in(ctx)
    with open(os.path.join(folder, f"result_{rank}.json"), "w") as f:
        json.dump({"coef": plan.coef.tolist(), "timesteps": list(map(float, plan.timesteps)),
                   "fit": report.fit_losses, "validation": report.validation_losses}, f)


def fitted_in(ctx):
    s = UniPCScheduler(**SD)
    s.set_timesteps(4)
    model, noise = mixture(s.config, 10, 21, guidance=4.0)  # per-sample labels: sliced by subset on each rank
    target = teacher_trajectories(s, model, noise, TeacherSpec(steps=40), None, progress=False)[-1]
    return learn_coefficients(s, model, noise, target, CoefficientSearch(iters=6, patience=50, lr=0.05, init="base"),
                              progress=False, ctx=ctx)


@pytest.mark.slow
def test_two_processes_learn_the_plan_one_process_learns(tmp_path):
    """torchrun: each process fits its slice of the noises, gradients and losses are summed over the processes."""
    import json

    import torch.multiprocessing as mp

    from fastsampler.runtime.distributed import DistContext

    mp.spawn(_worker, args=(2, 29517, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]
    plan, report = fitted_in(DistContext())
    assert len(set(report.fit_losses)) == len(report.fit_losses)  # steps were taken: each loss after one depends on
    # the summed gradient, so equal sequences below mean equal steps
    for r in results:
        np.testing.assert_allclose(r["fit"], report.fit_losses, rtol=1e-9)
        np.testing.assert_allclose(r["validation"], report.validation_losses, rtol=1e-9)
        np.testing.assert_allclose(np.array(r["coef"]), plan.coef, rtol=1e-8, atol=1e-10)
        assert r["timesteps"] == list(map(float, plan.timesteps))


@pytest.mark.parametrize("make", [lambda: UniPCScheduler(**SD), lambda: DPMSolverPlusPlusScheduler(**SD, solver_order=3),
                                  lambda: DEISScheduler(**SD)])
def test_a_plan_on_a_longer_history_samples_like_its_own(make):
    """``widen`` only re-indexes the history ring: the same samples from step 0 and from a later start (img2img),
    through the scheduler too; and the sources a tuner may correct include every entry the base reads."""
    s = make()
    s.set_timesteps(7)
    model, noise = mixture(s.config, 4, 2)
    wide = widen(s.plan, 7)
    assert wide.slots == 7 and widen(s.plan, s.plan.slots) is s.plan
    for begin in (0, 2):
        torch.testing.assert_close(run(wide, model, noise, begin=begin)[0], run(s.plan, model, noise, begin=begin)[0],
                                   rtol=1e-12, atol=1e-12)
    assert np.all(alive_sources(s.plan)[used_rows(s.plan) != 0.0])
    own = final_sample(s, model, noise)
    s.set_plan(wide)
    torch.testing.assert_close(final_sample(s, model, noise), own, rtol=1e-6, atol=1e-6)


def test_the_tuned_plan_reads_every_earlier_prediction():
    """``history=None`` (default): the tuned plan keeps all N predictions and a learned row reads beyond the base
    solver's order; ``support="base"`` corrects only the base's non-zero entries."""
    s = UniPCScheduler(**SD)
    plan, report, *_ = fitted(s, 5, iters=6, batch=8)
    assert not report.kept_base and plan.slots == 5 > s.plan.slots
    last = used_rows(plan)[-1, 1]  # the final step's next-sample row
    assert np.count_nonzero(last[src_slot(plan.num_registers, 0):]) > np.count_nonzero(
        used_rows(s.plan)[-1, 1][src_slot(s.plan.num_registers, 0):])
    narrow = Parametrisation(s, CoefficientSearch(support="base", history=0))
    assert narrow.start.slots == s.plan.slots and np.array_equal(narrow.support, used_rows(s.plan) != 0.0)


def final_sample(scheduler, model, noise) -> torch.Tensor:
    scheduler.set_timesteps(scheduler.plan.num_steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def test_the_default_history_fits_the_fused_kernel():
    """A tuned plan's default history ring stays within the slots the fused kernel handles (no silent torch path)."""
    pytest.importorskip("triton")
    from fastsampler.kernels.triton_update import MAX_SLOTS
    from fastsampler.tuning.support import FUSED_SLOTS, history_slots

    s = UniPCScheduler(**SD)
    s.set_timesteps(12)
    assert FUSED_SLOTS == MAX_SLOTS and history_slots(None, s.plan) == MAX_SLOTS


@pytest.mark.parametrize("seed, winner", [(3, "free rows from the scheduler's plan"),
                                          (4, "free rows continuing the consistent fit")])
def test_auto_consistency_races_the_consistent_fit_and_the_free_fit(tmp_path, seed, winner):
    """``consistency="auto"``: the "full" fit and free rows from the base run ``probe`` iterations each; the better
    on validation then trains on. A free winner is the same plan as a "none" run alone. A consistent winner trains
    to the end of a "full" run alone, and free rows continue it (their iteration 0 is the "full" fit's best
    parameters), so the result is never worse than it on validation. A rerun resumes from the checkpoints to the
    same plan. (The two seeds of the mixture send the race each way.)"""
    s = UniPCScheduler(**SD)
    s.set_timesteps(5)
    model, noise = mixture(s.config, 16, seed)
    target = teacher_trajectories(s, model, noise, TeacherSpec(steps=60), None, progress=False)[-1]
    search = CoefficientSearch(**{**QUICK, "iters": 10, "probe": 4})
    full, full_report = learn_coefficients(s, model, noise, target, replace(search, consistency="full"),
                                           progress=False)
    free, free_report = learn_coefficients(s, model, noise, target, replace(search, consistency="none"),
                                           progress=False)
    plan, report = learn_coefficients(s, model, noise, target, search, tmp_path / "ck.pt", progress=False)
    assert report.stage == winner
    race = report.race["validation_best"]
    probe_best = {"consistent (full)": min(full_report.validation_losses[:4]),
                  "free rows from the scheduler's plan": min(free_report.validation_losses[:4])}
    assert race == pytest.approx(probe_best, rel=1e-12)
    assert report.alternative["iterations"] == len(report.alternative["validation_losses"]) == 4  # the loser
    assert report.alternative["stopped"] == "lost the race"
    if winner.startswith("free rows from"):
        assert race["free rows from the scheduler's plan"] <= race["consistent (full)"]
        assert report.validation_tuned == pytest.approx(free_report.validation_tuned, rel=1e-12)
        np.testing.assert_allclose(plan.coef, free.coef, rtol=1e-12, atol=1e-15)
    else:
        assert race["consistent (full)"] < race["free rows from the scheduler's plan"]
        assert report.start["stage"] == "consistent (full)"
        assert report.start["validation_tuned"] == pytest.approx(full_report.validation_tuned, rel=1e-12)
        # iteration 0 is the "full" fit's best parameters (the in-loop loss: model times not yet rounded)
        best_full = full_report.validation_losses[full_report.best_iteration]
        assert report.validation_losses[0] == pytest.approx(best_full, rel=1e-9)
        assert report.validation_tuned <= full_report.validation_tuned
    assert report.validation_tuned <= report.validation_base
    again, _ = learn_coefficients(s, model, noise, target, search, tmp_path / "ck.pt", progress=False)
    np.testing.assert_array_equal(again.coef, plan.coef)


def test_a_fit_trained_in_parts_is_the_fit_trained_at_once():
    """The race stops a fit after its probe and trains it on later: nothing is lost or repeated."""
    s = UniPCScheduler(**SD)
    s.set_timesteps(4)
    model, noise = mixture(s.config, 16, 3)
    target = teacher_trajectories(s, model, noise, TeacherSpec(steps=60), None, progress=False)[-1]
    search = CoefficientSearch(**{**QUICK, "consistency": "none"})
    whole, whole_report = CoefficientFit(s, model, noise, target, search, progress=False).train().finish()
    fit = CoefficientFit(s, model, noise, target, search, progress=False).train(3).train(3).train(7)
    assert len(fit.report.fit_losses) == 7 and not fit.done
    parts, parts_report = fit.train().finish()
    assert parts_report.fit_losses == whole_report.fit_losses
    np.testing.assert_array_equal(parts.coef, whole.coef)


@pytest.mark.parametrize("config", [SD, FLOW])
def test_a_free_start_moves_the_first_node_inward_and_keeps_the_grid_ordered(config):
    """``learn_start``: a = 0 is the scheduler's grid bit for bit; a > 0 starts lower, the grid stays strictly
    decreasing with its last node kept; a is capped at START_SHARE of the λ range; u ↔ free λ's round-trip."""
    s = UniPCScheduler(**config)
    s.set_timesteps(5)
    family = GridFamily(s, 0, free_start=True)
    u0 = torch.tensor(family.u_from(family.interior0))
    same = family.plan(family.interior(u0).numpy())
    assert u0[0] == 0 and same.timesteps[0] == s.plan.timesteps[0] and same.rho[0] == s.plan.rho[0]
    np.testing.assert_allclose(same.timesteps, s.plan.timesteps, rtol=1e-12)
    for a in (0.05, 0.3, 0.9):  # shares of the λ range
        u = u0.clone()
        u[0] = a / family.START_RATE
        plan = family.plan(family.interior(u).numpy())
        lam = -np.log(plan.rho[:-1]) if not plan.flow else np.log1p(-plan.rho[:-1]) - np.log(plan.rho[:-1])
        share = (lam[0] - family.lam0) / (family.cap - family.lam0)
        assert share == pytest.approx(min(a, family.START_SHARE))
        assert plan.rho[0] < s.plan.rho[0] and np.all(np.diff(plan.rho) < 0) and plan.rho[-1] == s.plan.rho[-1]
        assert plan.timesteps[0] < s.plan.timesteps[0]
        np.testing.assert_allclose(family.interior(torch.tensor(family.u_from(family.interior(u).numpy()))).numpy(),
                                   family.interior(u).numpy(), rtol=0, atol=1e-9)


def test_the_gradient_reaches_the_start_node():
    """d loss / d a from the linearised plan (one-sided in a) equals a finite difference of exact runs."""
    s = UniPCScheduler(**SD)
    s.set_timesteps(5)
    model, noise = mixture(s.config, 8, 2)
    target, _ = run(s.plan, model, noise)  # any fixed target: the derivative is what is checked
    target = target + 0.05
    param = Parametrisation(s, CoefficientSearch(learn_start=True))
    u = param.initial_u()
    a = 0.1 / param.family.START_RATE  # 10 % of the λ range inward
    u[0] = a
    theta = torch.zeros(param.support.shape, dtype=torch.float64)
    u.requires_grad_(True)
    (sample(param, u, theta, model, noise, torch.float64) - target).pow(2).mean().backward()

    def loss(a: float) -> float:
        v = u.detach().clone()
        v[0] = a
        with torch.no_grad():
            return float((run(param.materialise(v, theta), model, noise)[0] - target).pow(2).mean())

    eps = 1e-4
    assert float(u.grad[0]) == pytest.approx((loss(a + eps) - loss(a - eps)) / (2 * eps), rel=1e-3)


def reloaded_from_a_pipeline_folder(s, n: int, tmp_path):
    """``s`` (with a plan for ``n`` steps) saved in a tiny DDPM pipeline's folder and loaded back; asserts the
    loaded scheduler has the same plan and gives the same images."""
    from diffusers import DDPMPipeline, DiffusionPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = DDPMPipeline(unet=unet, scheduler=s)
    pipe.save_pretrained(tmp_path)
    back = DiffusionPipeline.from_pretrained(tmp_path)
    loaded = back.scheduler
    assert loaded.plans[n].fingerprint() == s.plans[n].fingerprint()
    images = []
    for scheduler in (loaded, s):
        back.scheduler = scheduler
        images.append(back(batch_size=2, num_inference_steps=n, output_type="np",
                           generator=torch.Generator().manual_seed(1)).images)
    assert (images[0] == images[1]).all() and np.isfinite(images[0]).all()
    loaded.set_timesteps(n)
    return loaded


def test_a_truncated_start_plan_saves_and_loads_in_a_pipeline(tmp_path):
    """A plan that starts below the schedule's first level (what ``learn_start`` learns) runs in a diffusers
    pipeline from its folder with the same images."""
    s = UniPCScheduler(**SD)
    s.set_timesteps(4)
    family = GridFamily(s, 0, free_start=True)
    u = torch.tensor(family.u_from(family.interior0))
    u[0] = 0.2 / family.START_RATE
    s.set_plan(family.plan(family.interior(u).numpy(), round_timesteps=True))
    assert int(reloaded_from_a_pipeline_folder(s, 4, tmp_path).timesteps[0]) < 999


@pytest.mark.parametrize("config", [SD, FLOW])
def test_the_gradient_reaches_the_decoupled_evaluation_times(config):
    """d loss / d ξ (free rows call the model at t_i + b_i tanh ξ_i) equals a finite difference of exact runs of
    the materialised plan; the consistent fits keep the nodes' own times."""
    s = UniPCScheduler(**config)
    s.set_timesteps(5)
    model, noise = mixture(s.config, 8, 2)
    target = run(s.plan, model, noise)[0] + 0.05  # any fixed target: the derivative is what is checked
    param = Parametrisation(s, CoefficientSearch(consistency="none", learn_eval_times=True))
    assert param.decoupled
    assert not Parametrisation(s, CoefficientSearch(consistency="full", learn_eval_times=True)).decoupled
    assert not Parametrisation(s, CoefficientSearch(consistency="none")).decoupled  # the default: the nodes' times
    u, theta = param.initial_u(), torch.zeros(param.support.shape, dtype=torch.float64)
    xi = torch.linspace(-0.3, 0.4, 5, dtype=torch.float64).requires_grad_(True)
    (sample(param, u, theta, model, noise, torch.float64, xi) - target).pow(2).mean().backward()

    def loss(j: int, step: float) -> float:
        v = xi.detach().clone()
        v[j] += step
        with torch.no_grad():
            return float((run(param.materialise(u, theta, v), model, noise)[0] - target).pow(2).mean())

    eps = 1e-5
    moved = [j for j in range(5) if param.eval_bounds(s.plan)[j] > 0]
    assert len(moved) >= 4  # the first node at the largest trained time cannot move up, so it holds
    for j in moved:
        assert float(xi.grad[j]) == pytest.approx((loss(j, eps) - loss(j, -eps)) / (2 * eps), rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("round_timesteps", [False, True])
def test_decoupled_evaluation_times_stay_ordered_and_in_the_trained_range(round_timesteps):
    """Whatever ξ, the evaluation times decrease strictly and stay inside [final level, largest trained time];
    rounded ones are distinct integers, and ξ = 0 is the grid's own times."""
    s = UniPCScheduler(**SD)
    s.set_timesteps(8)
    param = Parametrisation(s, CoefficientSearch(consistency="none", learn_start=True, learn_eval_times=True))
    u = param.initial_u()
    u[0] = 0.1 / param.family.START_RATE  # a truncated start: the first node can move up as well
    theta = torch.zeros(param.support.shape, dtype=torch.float64)
    grid = param.materialise(u, theta, torch.zeros(8, dtype=torch.float64), round_timesteps)
    assert grid.timesteps.tolist() == param.plan_at(u, round_timesteps).timesteps.tolist()
    top = float(s.model_timesteps(np.array([s.training_rho_range()[1]]))[0])
    for seed in range(20):
        xi = 10 * torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        t = param.materialise(u, theta, xi, round_timesteps).timesteps
        assert np.all(np.diff(t) < 0) and t[0] <= top and t[-1] >= 0
        if round_timesteps:
            assert np.array_equal(t, np.round(t))


def test_a_plan_with_decoupled_evaluation_times_saves_and_loads_in_a_pipeline(tmp_path):
    """The pipeline calls the model at the learned times (not the grid's), and the plan's folder reproduces its
    images."""
    s = UniPCScheduler(**SD)
    s.set_timesteps(4)
    param = Parametrisation(s, CoefficientSearch(consistency="none", learn_eval_times=True))
    xi = torch.tensor([0.0, 0.8, -0.8, 0.5], dtype=torch.float64)
    plan = param.materialise(param.initial_u(), torch.zeros(param.support.shape, dtype=torch.float64), xi, True)
    assert plan.meta["eval_times"] == "decoupled" and not np.array_equal(plan.timesteps, s.plan.timesteps)
    s.set_plan(plan)
    loaded = reloaded_from_a_pipeline_folder(s, 4, tmp_path)
    assert loaded.timesteps.tolist() == plan.timesteps.astype(int).tolist()
