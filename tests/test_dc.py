"""DC-Solver: dynamic compensation as a plan transform, the ratio search, CPR, files, and ``fastsampler.tune``."""

from __future__ import annotations

import json
import warnings

import diffusers
import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import DCSolverScheduler, DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.eval import gmm
from fastsampler.samplers.transforms.dc import cpr_predict, lagrange_weights
from fastsampler.tuning.cpr import fit_cpr, write_cpr_file, write_ratio_file
from fastsampler.tuning.dc import DCSearch, dc_plan, search_ratios
from fastsampler.models.denoisers import MixtureDenoiserModel
from fastsampler.tuning.teacher import TeacherSpec, teacher_trajectories
from parity_util import run_loop

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
RATIOS = [1.0, 1.0, 0.8, 1.15, 1.3, 0.9]


@pytest.fixture
def sample() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cls", [UniPCScheduler, DPMSolverPlusPlusScheduler, DEISScheduler])
def test_ratios_of_one_are_the_plain_solver(cls, sample):
    plain, ones = cls(**SD), cls(**SD, dc_ratios=[1.0] * 6)
    plain.set_timesteps(6)
    ones.set_timesteps(6)
    assert ones.plan.fingerprint() == plain.plan.fingerprint()
    torch.testing.assert_close(run_loop(ones, 6, sample), run_loop(plain, 6, sample), rtol=0, atol=0)
    assert not torch.allclose(run_loop(cls(**SD, dc_ratios=RATIOS), 6, sample), run_loop(plain, 6, sample))


class _DiffusersDC(diffusers.UniPCMultistepScheduler):
    """An independent reference: diffusers' UniPC with the official DC-Solver step order — after the corrector
    and the history shift, before the predictor, the newest stored output is replaced by the Lagrange value at
    τ = t_{i−1} + ρ_i (t_i − t_{i−1}) through the last three stored outputs (compensated ones persist)."""

    ratios: list[float] = []

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        i = self.step_index
        stored = getattr(self, "_dc_stored", [])
        newest = self.model_outputs[-1]
        if i >= 2 and self.ratios[i] != 1.0:
            ts = [float(self.timesteps[i - k]) for k in range(3)]
            tau = ts[1] + self.ratios[i] * (ts[0] - ts[1])
            weights = lagrange_weights(ts, tau)
            newest = weights[0] * newest + weights[1] * stored[-1] + weights[2] * stored[-2]
            self.model_outputs[-1] = newest
        self._dc_stored = stored + [newest]
        return super().multistep_uni_p_bh_update(model_output, *args, sample=sample, order=order, **kwargs)


@pytest.mark.parametrize("order,solver_type", [(2, "bh2"), (3, "bh2"), (3, "bh1")])
def test_dc_matches_an_independent_reference_on_diffusers_unipc(order, solver_type, sample):
    # diffusers' bh1 returns NaN on its last step to σ = 0 (see the README): compare bh1 ending at σ_min
    final = dict(final_sigmas_type="sigma_min") if solver_type == "bh1" else {}
    reference = _DiffusersDC(**SD, solver_order=order, solver_type=solver_type, **final)
    reference.ratios = RATIOS
    reference._dc_stored = []
    ours = DCSolverScheduler(**SD, solver_order=order, solver_type=solver_type, dc_ratios=RATIOS, **final)
    torch.testing.assert_close(run_loop(ours, 6, sample), run_loop(reference, 6, sample), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_compensation_is_exact_on_quadratic_model_outputs(k):
    """With P(t) a quadratic in the model time (sample prediction, P = O) and the history holding P at its nodes
    (steps before k uncompensated), the prediction stored by compensated step k is P(τ_k) exactly (K = 2)."""
    ratios = [1.0] * 6
    ratios[k] = RATIOS[k] if RATIOS[k] != 1.0 else 1.25
    s = DPMSolverPlusPlusScheduler(**SD, prediction_type="sample", dc_ratios=ratios)
    s.set_timesteps(6)

    def quadratic(t: float) -> torch.Tensor:
        return torch.full((1, 4), 0.3 + 1e-3 * t - 2e-6 * t * t, dtype=torch.float64)

    x = torch.zeros(1, 4, dtype=torch.float64)
    ts = s.timesteps.double()
    for i, t in enumerate(s.timesteps):
        x = s.step(quadratic(float(t)), t, x).prev_sample
        if i == k:
            tau = float(ts[k - 1] + ratios[k] * (ts[k] - ts[k - 1]))
            torch.testing.assert_close(s._history[k % s.plan.slots], quadratic(tau), rtol=1e-12, atol=1e-12)
            assert abs(tau - float(ts[k])) > 1.0  # really shifted


def _guided_model(config, batch: int = 12, scale: float = 7.5):
    den = gmm.MixtureDenoiser(gmm.digits_mixture(), torch.arange(batch) % 10, scale)
    return MixtureDenoiserModel(gmm.MixtureModel.from_scheduler_config(den, config))


@pytest.mark.parametrize("method", ["scan", "gradient"])
def test_search_lowers_its_loss_and_is_never_worse_than_plain(method):
    s = UniPCScheduler(**SD)
    s.set_timesteps(5)
    model = _guided_model(s.config)
    noise = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    teacher = teacher_trajectories(s, model, noise, TeacherSpec(steps=60), progress=False)
    report = search_ratios(s, model, noise, teacher, DCSearch(method=method, iters=8), progress=False)
    searched = [i for i, v in enumerate(report.step_loss_tuned) if v is not None]
    assert searched == [2, 3, 4]
    assert all(report.step_loss_tuned[i] <= report.step_loss_plain[i] for i in searched)
    assert report.final_loss_tuned <= report.final_loss_plain
    assert any(r != 1.0 for r in report.ratios) and report.final_loss_tuned < 0.95 * report.final_loss_plain


def test_killed_search_resumes_from_its_checkpoint(tmp_path):
    s = DPMSolverPlusPlusScheduler(**SD)
    s.set_timesteps(6)
    model = _guided_model(s.config, batch=6)
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    teacher = teacher_trajectories(s, model, noise, TeacherSpec(steps=40), progress=False)
    search = DCSearch(method="scan", iters=6)
    full = search_ratios(s, model, noise, teacher, search, progress=False)

    calls = {"n": 0}

    def dying(x, t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return model(x, t)

    with pytest.raises(KeyboardInterrupt):
        search_ratios(s, dying, noise, teacher, search, tmp_path / "ck.json", progress=False)
    saved = json.loads((tmp_path / "ck.json").read_text())
    assert 0 < saved["next_step"] < 6
    resumed = search_ratios(s, dying, noise, teacher, search, tmp_path / "ck.json", progress=False)
    assert resumed.ratios == pytest.approx(full.ratios, abs=1e-12)


def test_cpr_reproduces_its_fitting_points_and_clamps():
    rng = np.random.default_rng(0)
    truth = rng.normal(0, 0.05, (4, 3, 3))
    truth[0, 2, 2] = 1.0  # ρ ≈ 1 plus small terms
    entries = [{"num_steps": n, "guidance_scale": g, "ratios": cpr_predict(truth, n, g, clamp=(-9, 9))}
               for n in (5, 6, 8, 10, 15, 20) for g in (1.5, 4.0, 7.5, 10.0)]
    fitted = fit_cpr(entries)
    for e in entries:
        np.testing.assert_allclose(cpr_predict(fitted, e["num_steps"], e["guidance_scale"], clamp=(-9, 9)),
                                   e["ratios"], rtol=0, atol=1e-9)
    wild = cpr_predict(truth * 50, 30, 40.0)
    assert min(wild) >= 0.3 and max(wild) <= 1.7 and wild[:2] == [1.0, 1.0]


def test_ratio_and_cpr_files_round_trip_and_warn_on_mismatch(tmp_path, sample):
    ratios_path = write_ratio_file(tmp_path / "r.json", [{"num_steps": 6, "guidance_scale": None, "ratios": RATIOS}],
                                   UniPCScheduler(**SD).config)
    from_file = UniPCScheduler(**SD, dc_ratios_file=str(ratios_path))
    torch.testing.assert_close(run_loop(from_file, 6, sample), run_loop(UniPCScheduler(**SD, dc_ratios=RATIOS), 6, sample),
                               rtol=0, atol=0)
    # explicit dc_ratios win over the file
    both = UniPCScheduler(**SD, dc_ratios=[1.0] * 6, dc_ratios_file=str(ratios_path))
    torch.testing.assert_close(run_loop(both, 6, sample), run_loop(UniPCScheduler(**SD), 6, sample), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="solver_order"):
        UniPCScheduler(**SD, solver_order=3, dc_ratios_file=str(ratios_path)).set_timesteps(6)
    coefficients = np.zeros((4, 3, 3))
    coefficients[0, 2, 2] = 1.1
    cpr_path = write_cpr_file(tmp_path / "c.json", coefficients, UniPCScheduler(**SD).config, [(6, 7.5)])
    s = UniPCScheduler(**SD, dc_cpr_file=str(cpr_path), dc_guidance_scale=7.5)
    s.set_timesteps(6)
    assert s.plan.to_dict()["meta"]["transforms"][0]["ratios"] == [1.0, 1.0, 1.1, 1.1, 1.1, 1.1]
    with pytest.raises(ValueError, match="dc_guidance_scale"):
        UniPCScheduler(**SD, dc_cpr_file=str(cpr_path)).set_timesteps(6)
    # outside the (NFE, guidance) range it was fitted on, the regression extrapolates: a warning names the range
    with pytest.warns(RuntimeWarning, match="extrapolates"):
        UniPCScheduler(**SD, dc_cpr_file=str(cpr_path), dc_guidance_scale=15.0).set_timesteps(6)
    with pytest.warns(RuntimeWarning, match="NFE 6–6"):
        UniPCScheduler(**SD, dc_cpr_file=str(cpr_path), dc_guidance_scale=7.5).set_timesteps(8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dc_ratios=[1.0, 0.9]), "2 ratios"),
    (dict(dc_ratios=[1.0, 1.0, -1.0, 1, 1, 1]), "positive"),
    (dict(dc_ratios=RATIOS, solver_method="singlestep"), "singlestep"),
    (dict(dc_ratios=RATIOS, dc_order=5), "dc_order"),
])
def test_bad_dc_options_are_named(kwargs, match):
    cls = DPMSolverPlusPlusScheduler
    with pytest.raises(ValueError, match=match):
        cls(**SD, **kwargs).set_timesteps(6)


@pytest.mark.slow
def test_tune_save_load_in_a_real_pipeline(tmp_path):
    """tune → save_pretrained (pipeline folder) → DiffusionPipeline.from_pretrained gives the same images, and
    the tuned scheduler differs from the plain one."""
    pytest.importorskip("transformers")
    import tiny_pipelines as tp

    pipe = tp.tiny_ddpm_pipeline(UniPCScheduler())
    noise = torch.randn(4, *pipe.unet.config.sample_size if isinstance(pipe.unet.config.sample_size, tuple) else
                        (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size),
                        generator=torch.Generator().manual_seed(0))
    tuned = fastsampler.tune(UniPCScheduler.from_config(pipe.scheduler.config), pipe, noise, 5, method="dc",
                             teacher=TeacherSpec(steps=30), cache_dir=tmp_path / "cache", progress=False,
                             search="scan", iters=4)
    assert set(tuned.plans) == {5}
    pipe.scheduler = tuned
    pipe.save_pretrained(tmp_path / "pipe")
    back = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    kw = dict(batch_size=2, num_inference_steps=5, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    b = back(generator=torch.Generator().manual_seed(1), **kw).images
    np.testing.assert_array_equal(a, b)
    ratios = tuned.tuning_report["steps"][5]["ratios"]
    assert back.scheduler.plans[5].to_dict()["meta"]["transforms"][0]["ratios"] == ratios


def test_tune_reports_held_out_noise_and_refuses_bad_input():
    s = UniPCScheduler(**SD)
    model = _guided_model(s.config, batch=8)
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    held = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    tuned = fastsampler.tune(s, model, noise, 5, "dc", teacher="dpmsolver++3:40", validation_noise=held,
                             cache_dir=None, progress=False, search="scan", iters=5)
    entry = tuned.tuning_report["steps"][5]
    assert {"validation_loss_plain", "validation_loss_tuned"} <= set(entry)
    assert tuned.num_inference_steps == 5 and type(tuned) is UniPCScheduler
    with pytest.raises(ValueError, match="method"):
        fastsampler.tune(s, model, noise, 5, method="magic")
    with pytest.raises(ValueError, match="unknown options"):
        fastsampler.tune(s, model, noise, 5, cache_dir=None, progress=False, warp=3)
    with pytest.raises(ValueError, match="num_inference_steps"):
        fastsampler.tune(s, model, noise, 0)


def test_dc_plan_keeps_other_plugins_in_order():
    s = UniPCScheduler(**SD)
    s.set_timesteps(5)
    plan = dc_plan(s, [1.0, 1.0, 0.9, 1.1, 1.2], 2)
    assert [t["name"] for t in plan.to_dict()["meta"]["transforms"]] == ["dc"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DCSolverScheduler(**SD, dc_ratios=[1.0, 1.0, 0.9, 1.1, 1.2]).set_timesteps(5)


def test_a_rewritten_ratio_file_is_read_again(tmp_path, sample):
    """Plans are cached per config; a ratio file refitted at the same path must not reuse the old plan."""
    path = tmp_path / "r.json"
    runs = []
    for ratios in (RATIOS, [1.0] * 6):
        write_ratio_file(path, [{"num_steps": 6, "guidance_scale": None, "ratios": ratios}], UniPCScheduler(**SD).config)
        runs.append(run_loop(UniPCScheduler(**SD, dc_ratios_file=str(path)), 6, sample))
    torch.testing.assert_close(runs[0], run_loop(UniPCScheduler(**SD, dc_ratios=RATIOS), 6, sample), rtol=0, atol=0)
    torch.testing.assert_close(runs[1], run_loop(UniPCScheduler(**SD), 6, sample), rtol=0, atol=0)


def test_dc_validates_on_held_rows_of_the_batch_by_default():
    """Without validation_noise the ratios are fitted on three quarters of the batch and kept only if the last
    quarter (held out inside the batch) is better with them."""
    from test_tuning import SD as SD_CONFIG, mixture

    s = fastsampler.UniPCScheduler(**SD_CONFIG)
    model, noise = mixture(s.config, 16, 17, guidance=7.5)
    tuned = fastsampler.tune(s, model, noise, 4, method="dc", cache_dir=None, progress=False, teacher_check=False)
    entry = tuned.tuning_report["steps"][4]
    assert entry["validation"] == "in-batch (last 4 of 16 fitting noises)"
    assert entry["kept_plain"] == (not entry["validation_tuned"] < entry["validation_base"])  # the search fitted ratios
    s.set_timesteps(4)
    if entry["kept_plain"]:
        assert entry["ratios"] == [1.0] * 4 and tuned.plans[4].fingerprint() == s.plan.fingerprint()
    else:
        assert entry["validation_tuned"] < entry["validation_base"] and entry["ratios"] != [1.0] * 4
