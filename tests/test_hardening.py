"""The hardening issue: one test per defect found by trying the schedulers as a demanding diffusers user would.

Accelerator-only behaviour is tested on CPU by forcing the accelerator branch (``_on_accelerator``). Items 9, 10
and 13 (FID shards, torchrun devices, corrupt caches) live in ``test_fid.py`` / ``test_eval.py``; item 15 (a
full-graph compile) in ``test_compile.py``.
"""

from __future__ import annotations

import logging
import threading

import diffusers
import pytest
import torch

from fastsampler import (DEISScheduler, DPMSolverPlusPlusScheduler, NonFiniteModelOutputError, PlanScheduler,
                         UniPCScheduler)
from parity_util import index_model

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
OURS = (DPMSolverPlusPlusScheduler, UniPCScheduler, DEISScheduler)


@pytest.fixture
def sample() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def loop(s, x, timesteps=None, model=index_model):
    for i, t in enumerate(s.timesteps if timesteps is None else timesteps):
        x = s.step(model(x, i), t, x).prev_sample
    return x


# 1 ---------------------------------------------------------------------------------------------------------
def test_1_mid_schedule_start_without_set_begin_index_on_an_accelerator(monkeypatch, sample):
    """video2video pipelines pass timesteps[k:] and never call set_begin_index: the start index comes from the
    view's storage offset (no host read); a timestep that is not a view costs one host read on the first step."""
    monkeypatch.setattr(PlanScheduler, "_on_accelerator", staticmethod(lambda device: True))
    reference = UniPCScheduler()
    reference.set_timesteps(10)
    reference.set_begin_index(4)
    expected = loop(reference, sample, reference.timesteps[4:])

    s = UniPCScheduler()
    s.set_timesteps(10)
    monkeypatch.setattr(UniPCScheduler, "index_for_timestep",
                        lambda *a, **k: pytest.fail("a view of scheduler.timesteps needs no lookup"))
    torch.testing.assert_close(loop(s, sample, s.timesteps[4:]), expected, rtol=0, atol=0)
    assert s.step_index == 10
    monkeypatch.undo()
    monkeypatch.setattr(PlanScheduler, "_on_accelerator", staticmethod(lambda device: True))
    s.set_timesteps(10)
    copies = [t.clone() for t in s.timesteps[4:]]  # not views: one lookup on the first step
    torch.testing.assert_close(loop(s, sample, copies), expected, rtol=0, atol=0)


# 2 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours,theirs", [(DPMSolverPlusPlusScheduler, diffusers.DPMSolverMultistepScheduler),
                                         (UniPCScheduler, diffusers.UniPCMultistepScheduler),
                                         (DEISScheduler, diffusers.DEISMultistepScheduler)])
def test_2_saved_configs_load_in_diffusers_schedulers(ours, theirs, tmp_path, sample):
    ours(**SD).save_pretrained(tmp_path)
    loaded = theirs.from_pretrained(tmp_path)
    assert loaded.config.solver_type in ("midpoint", "bh2", "logrho")
    loaded.set_timesteps(5)
    assert torch.isfinite(loop(loaded, sample)).all()


# 3 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_3_flow_sigma_spacings_honour_shift_and_mu(spacing):
    sigmas = {}
    for shift in (1.0, 3.0):  # FlowMatch's respacing (the default, "rho", is diffusers' UniPC: no shift)
        s = UniPCScheduler(**FLOW, flow_shift=shift, flow_respacing="flowmatch", **{spacing: True})
        s.set_timesteps(8)
        sigmas[shift] = s.sigmas
        assert torch.all(s.sigmas[:-1] > s.sigmas[1:])
    assert not torch.allclose(sigmas[1.0], sigmas[3.0])
    # dynamic shifting: as diffusers' FlowMatchEulerDiscreteScheduler (shift, then respace between the ends)
    ours = UniPCScheduler(**FLOW, use_dynamic_shifting=True, **{spacing: True})
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **{spacing: True})
    for mu in (0.5, 1.1):
        ours.set_timesteps(8, mu=mu)
        theirs.set_timesteps(8, mu=mu)
        torch.testing.assert_close(ours.sigmas[1:], theirs.sigmas[1:].float(), rtol=1e-5, atol=1e-6)
        assert abs(float(ours.sigmas[0]) - float(theirs.sigmas[0])) < 2e-6  # ours: 1 − 1e-6 (α > 0)


@pytest.mark.parametrize("spacing", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_3_a_flowmatch_config_keeps_its_own_respacing(spacing):
    """SD3-style: a FlowMatch config (static shift 3) with a sigma spacing converts to ours with that scheduler's
    grid (shift, then respace), not UniPC's ρ respacing."""
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, **{spacing: True})
    ours = UniPCScheduler.from_config(theirs.config)
    assert ours.config.flow_respacing == "flowmatch"
    theirs.set_timesteps(8)
    ours.set_timesteps(8)
    torch.testing.assert_close(ours.sigmas[1:], theirs.sigmas[1:].float(), rtol=1e-5, atol=1e-6)


# 4 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,kw", [
    (lambda: DPMSolverPlusPlusScheduler(**SD, use_karras_sigmas=True, sigma_max=700.0), dict(num_inference_steps=5)),
    (lambda: DPMSolverPlusPlusScheduler(**SD), dict(sigmas=[80.0, 30.0, 5.0, 1.0, 0.0])),
    (lambda: UniPCScheduler(trained_betas=[0.1, 0.2, 0.3, 0.4], num_train_timesteps=4), dict(num_inference_steps=4)),
    (lambda: DPMSolverPlusPlusScheduler(**FLOW, use_beta_sigmas=True), dict(num_inference_steps=500)),
    (lambda: DEISScheduler(lambda_min_clipped=-5.1), dict(num_inference_steps=50)),
])
def test_4_repeated_timesteps_still_take_every_step_once(make, kw, sample):
    s = make()
    s.set_timesteps(**kw)
    n = len(s.timesteps)
    x = loop(s, sample)
    assert s.step_index == n and torch.isfinite(x).all()


def test_4_clipping_every_timestep_is_refused():
    with pytest.raises(ValueError, match="lambda_min_clipped"):
        DEISScheduler(lambda_min_clipped=100.0).set_timesteps(5)


# 5 ---------------------------------------------------------------------------------------------------------
def test_5_edm_and_continuous_time_configs_are_refused():
    with pytest.raises(ValueError, match="sigma_data"):
        UniPCScheduler.from_config(diffusers.EDMDPMSolverMultistepScheduler().config)
    with pytest.raises(ValueError, match="timestep_type"):
        DPMSolverPlusPlusScheduler.from_config(diffusers.EulerDiscreteScheduler(timestep_type="continuous").config)
    assert not any(name.startswith("EDM") for name in UniPCScheduler._compatibles)
    # the ordinary discrete Euler config still converts
    assert DPMSolverPlusPlusScheduler.from_config(diffusers.EulerDiscreteScheduler(**SD).config)


# 6 ---------------------------------------------------------------------------------------------------------
def test_6_noise_form_unipc_on_flow_sigmas_is_refused_by_option():
    """UniPC's flow grid starts at s = 1 − 1e-6 (α = 1e-6): the noise form's coefficients reach 1e6."""
    s = UniPCScheduler(**FLOW, predict_x0=False)
    with pytest.raises(ValueError, match="predict_x0"):
        s.set_timesteps(2)
    UniPCScheduler(**FLOW).set_timesteps(2)  # the data form is fine


def test_6_an_epsilon_model_on_a_flow_grid_is_refused_naming_the_prediction_type():
    """A data-form solver is not the cause there: turning ε into x̂₀ divides by α = 1e-6 at s = 1 − 1e-6."""
    with pytest.raises(ValueError, match="prediction_type='epsilon' is turned into") as refused:
        UniPCScheduler(use_flow_sigmas=True, prediction_type="epsilon").set_timesteps(10)
    assert "data-form" not in str(refused.value)


# 7 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [dict(), SD, dict(beta_schedule="squaredcos_cap_v2")])
def test_7_add_noise_and_velocity_equal_ddpm_at_training_timesteps(config, sample):
    ddpm = diffusers.DDPMScheduler(**config)
    noise = torch.randn_like(sample)
    t = torch.tensor([17, 433, 871])
    x0 = sample[:1].expand(3, -1, -1, -1)
    eps = noise[:1].expand(3, -1, -1, -1)
    for cls in OURS:
        s = cls(**config)
        for when in ("before", "after"):
            if when == "after":
                s.set_timesteps(7)
            torch.testing.assert_close(s.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t), rtol=0, atol=0)
            torch.testing.assert_close(s.get_velocity(x0, eps, t), ddpm.get_velocity(x0, eps, t), rtol=0, atol=0)
    # a plain Python int and a 0-d tensor
    torch.testing.assert_close(UniPCScheduler(**config).add_noise(sample, noise, 433),
                               ddpm.add_noise(sample, noise, torch.tensor([433] * 2)), rtol=0, atol=0)


def test_7_flow_add_noise_equals_flow_match(sample):
    fm = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    s = UniPCScheduler.from_config(fm.config)
    fm.set_timesteps(6)
    s.set_timesteps(6)
    noise = torch.randn_like(sample)
    for k in (0, 2, 5):
        expected = fm.scale_noise(sample, fm.timesteps[k:k + 1], noise)
        torch.testing.assert_close(s.scale_noise(sample, fm.timesteps[k:k + 1], noise), expected, rtol=1e-6, atol=1e-6)


# 8 ---------------------------------------------------------------------------------------------------------
def test_8_nan_before_an_early_stop_is_reported(monkeypatch, sample):
    """A run that stops early (SDXL denoising_end) still reports a NaN from an earlier step on an accelerator;
    what the device had not finished is reported by the next set_timesteps()."""
    monkeypatch.setattr(PlanScheduler, "_on_accelerator", staticmethod(lambda device: True))
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(10)

    def nan_at(k):
        def model(x, i):
            out = index_model(x, i)
            if i == k:
                out[0, 0, 0, 0] = float("nan")
            return out
        return model

    with pytest.raises(NonFiniteModelOutputError, match="step 1 "):
        loop(s, sample, s.timesteps[:3], nan_at(1))
    # A device that has not caught up when the run ends: no copy has landed during the run.
    from fastsampler.adapters.finite import DeferredFlag

    s.set_timesteps(10)
    with monkeypatch.context() as m:
        m.setattr(DeferredFlag, "poll", lambda self: None)
        loop(s, sample, s.timesteps[:3], nan_at(2))
    with pytest.raises(NonFiniteModelOutputError, match="step 2 "):
        s.set_timesteps(10)


def test_8_sdxl_denoising_end_reports_nan(monkeypatch):
    pytest.importorskip("transformers")
    import tiny_pipelines as tp

    monkeypatch.setattr(PlanScheduler, "_on_accelerator", staticmethod(lambda device: True))
    pipe = tp.tiny_sdxl_pipeline()
    pipe.scheduler = UniPCScheduler.from_config(pipe.scheduler.config)
    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            output[0].view(-1)[0] = float("nan")
        return output

    pipe.unet.register_forward_hook(poison)
    with pytest.raises(NonFiniteModelOutputError, match="step 1 "):
        pipe("a cat", height=16, width=16, num_inference_steps=6, guidance_scale=1.0, denoising_end=0.6,
             output_type="latent", generator=torch.Generator().manual_seed(0))


# 11 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(beta_end=1.5), "beta_end"),
    (dict(beta_start=0.02, beta_end=0.001), "beta_start"),
    (dict(flow_shift=float("nan"), **FLOW), "flow_shift"),
    (dict(karras_rho=float("nan"), use_karras_sigmas=True), "karras_rho"),
    (dict(sigma_min=-1.0, use_karras_sigmas=True), "sigma_min"),
    (dict(sigma_min=5.0, sigma_max=1.0, use_karras_sigmas=True), "sigma_min"),
    (dict(steps_offset=5000), "steps_offset"),
    (dict(num_train_timesteps=1.5), "num_train_timesteps"),
    (dict(thresholding=True, sample_max_value=0.0), "sample_max_value"),
    (dict(flow_respacing="karras", **FLOW), "flow_respacing"),
    (dict(flow_respacing="rho", use_dynamic_shifting=True, **FLOW), "ignore `mu`"),
    (dict(flow_respacing="flowmatch", sigma_max=200.0, use_karras_sigmas=True, **FLOW), "flow_respacing='rho'"),
    (dict(thresholding=True, dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio"),
])
def test_11_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverPlusPlusScheduler(**kwargs).set_timesteps(5)


@pytest.mark.parametrize("mu", [float("nan"), 800.0])
def test_11_bad_mu_is_named(mu):
    s = UniPCScheduler(**FLOW, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu"):
        s.set_timesteps(5, mu=mu)


def test_11_leading_offset_past_the_schedule_is_named():
    with pytest.raises(ValueError, match="steps_offset"):
        DPMSolverPlusPlusScheduler(timestep_spacing="leading", steps_offset=999).set_timesteps(5)


def test_11_batched_first_timestep(sample):
    s = UniPCScheduler()
    s.set_timesteps(6)
    s.step(index_model(sample, 0), s.timesteps[2].expand(2).clone(), sample)
    assert s.step_index == 3


def test_11_step_argument_errors_name_the_argument(sample):
    s = DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++")
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="variance_noise"):
        s.step(index_model(sample, 0), s.timesteps[0], sample, variance_noise=torch.randn(1, 3, 8, 8))
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(4)
    x = s.step(index_model(sample, 0), s.timesteps[0], sample).prev_sample
    with pytest.raises(ValueError, match="float64"):
        s.step(index_model(x, 1).double(), s.timesteps[1], x.double())
    s.set_timesteps(4)
    bad = sample.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteModelOutputError, match="`sample`"):
        s.step(index_model(sample, 0), s.timesteps[0], bad)
    with pytest.raises(ValueError, match="not one of this run's timesteps"):
        s.set_timesteps(4)
        s.step(index_model(sample, 0), 123, sample)


def test_11_set_plan_refuses_bad_plans():
    from fastsampler import Plan

    source = UniPCScheduler()
    source.set_timesteps(5)
    payload = source.plan.to_dict()
    bad = {**payload, "write_slot": [0, 1, 2, 7, 1]}
    with pytest.raises(ValueError, match="write_slot"):
        Plan.from_dict(bad)
    with pytest.raises(ValueError, match="flow"):
        flow = UniPCScheduler(**FLOW)
        flow.set_timesteps(5)
        UniPCScheduler().set_plan(flow.plan)


# 12 --------------------------------------------------------------------------------------------------------
def test_12_cached_plans_are_frozen_and_the_cache_is_thread_safe():
    a, b = UniPCScheduler(solver_order=3), UniPCScheduler(solver_order=3)
    a.set_timesteps(12)
    b.set_timesteps(12)
    assert a.plan is b.plan
    with pytest.raises(ValueError):
        a.plan.write_slot[0] = 5
    with pytest.raises(TypeError):
        a.plan.meta["prediction_type"] = "sample"
    with pytest.raises(ValueError):
        a.plan.rows[0][0].packed[0] = 1.0
    plans, errors = [], []

    def build(k):
        try:
            s = DEISScheduler(solver_order=3, solver_type="rhoab", beta_start=0.0001 * (1 + k % 2))
            for n in (9, 10, 11):
                s.set_timesteps(n)
                plans.append((k % 2, n, s.plan.fingerprint()))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({(k, n): f for k, n, f in plans}) == 6 and len(set(plans)) == 6


# 14 --------------------------------------------------------------------------------------------------------
def test_14_foreign_options_from_a_config_are_dropped_with_a_log_line(caplog):
    config = diffusers.DPMSolverMultistepScheduler(euler_at_final=True, lambda_min_clipped=-5.0).config
    with caplog.at_level(logging.INFO, logger="fastsampler"):
        s = UniPCScheduler.from_config(config)
    assert s.config.euler_at_final is False
    assert "euler_at_final=True" in caplog.text and "lambda_min_clipped=-5.0" in caplog.text
    with pytest.raises(ValueError, match="euler_at_final"):
        UniPCScheduler(euler_at_final=True)
    with pytest.raises(ValueError, match="euler_at_final"):
        UniPCScheduler.from_config(config, euler_at_final=True)
    ours = DPMSolverPlusPlusScheduler(solver_method="singlestep")
    assert DEISScheduler.from_config(ours.config).config.solver_method == "multistep"
