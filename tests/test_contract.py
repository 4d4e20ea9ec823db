"""The diffusers scheduler contract (the test patterns of diffusers' tests/schedulers that apply)."""

from __future__ import annotations

import tempfile

import diffusers
import pytest
import torch

from fastsampler import DEISScheduler, DPMSolverPlusPlusScheduler, NonFiniteModelOutputError, UniPCScheduler
from parity_util import index_model, run_loop
from sync_util import forbid_host_reads

SCHEDULERS = [
    (DPMSolverPlusPlusScheduler, {}),
    (DPMSolverPlusPlusScheduler, dict(solver_order=3)),
    (DPMSolverPlusPlusScheduler, dict(solver_method="singlestep", solver_order=3)),
    (DPMSolverPlusPlusScheduler, dict(algorithm_type="sde-dpmsolver++")),
    (DPMSolverPlusPlusScheduler, dict(algorithm_type="dpmsolver")),
    (UniPCScheduler, {}),
    (UniPCScheduler, dict(solver_type="bh1", solver_order=3)),
    (UniPCScheduler, dict(predict_x0=False)),
    (DEISScheduler, {}),
    (DEISScheduler, dict(solver_type="tab", solver_order=3)),
    (DEISScheduler, dict(solver_type="rhoab", solver_order=3)),
]
IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for c, o in SCHEDULERS]


@pytest.fixture
def sample() -> torch.Tensor:
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cls,opts", SCHEDULERS, ids=IDS)
def test_save_load_round_trip(cls, opts, sample):
    s = cls(**opts)
    with tempfile.TemporaryDirectory() as d:
        s.save_pretrained(d)
        loaded = cls.from_pretrained(d)
    a = {k: v for k, v in s.config.items() if k != "_use_default_values"}
    b = {k: v for k, v in loaded.config.items() if k != "_use_default_values"}
    assert a == b
    torch.testing.assert_close(run_loop(loaded, 6, sample), run_loop(s, 6, sample), rtol=0, atol=0)


@pytest.mark.parametrize("cls,opts", SCHEDULERS, ids=IDS)
def test_step_shape_and_return_dict(cls, opts, sample):
    s1, s2 = cls(**opts), cls(**opts)
    for s in (s1, s2):
        s.set_timesteps(10)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t0, t1 = s1.timesteps[0], s1.timesteps[1]
    out = 0.1 * sample
    a = s1.step(out, t0, sample, generator=g1).prev_sample
    b = s2.step(out, t0, sample, generator=g2, return_dict=False)[0]
    assert a.shape == sample.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert s1.step(out, t1, a, generator=g1).prev_sample.shape == sample.shape


@pytest.mark.parametrize("cls,opts", SCHEDULERS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_loop_keeps_dtype(cls, opts, dtype, sample):
    s = cls(**opts, thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.5) \
        if not cls is DEISScheduler or opts.get("solver_type", "logrho") == "logrho" else cls(**opts)
    s.set_timesteps(10)
    x = sample.to(dtype)
    for i, t in enumerate(s.timesteps):
        x = s.step(index_model(x.float(), i).to(dtype), t, x).prev_sample
        assert x.dtype == dtype
    assert torch.isfinite(x.float()).all()


@pytest.mark.slow
@pytest.mark.parametrize("cls,opts", SCHEDULERS, ids=IDS)
def test_every_step_count_is_finite(cls, opts):
    x = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    model = lambda y, i: 0.5 * y  # noqa: E731
    counts = (1, 2, 3, 4, 5, 7, 10, 15, 16, 50, 999, 1000)
    if opts.get("solver_type") == "tab":
        counts = counts[:-2]  # tAB's quadrature makes 1000-step plans slow; its math is the same as ρAB's
    for n in counts:
        out = run_loop(cls(**opts), n, x, model=model)
        assert torch.isfinite(out).all(), n


def test_compatibles_round_trip():
    ours = UniPCScheduler(solver_order=3, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for other in (diffusers.DPMSolverMultistepScheduler, diffusers.EulerDiscreteScheduler,
                  diffusers.DDIMScheduler, DEISScheduler, DPMSolverPlusPlusScheduler):
        back = UniPCScheduler.from_config(other.from_config(ours.config).config)
        a = {k: v for k, v in ours.config.items() if not k.startswith("_")}
        b = {k: v for k, v in back.config.items() if not k.startswith("_")}
        assert a == b, other.__name__


def test_from_diffusers_configs_carry_settings():
    for cfg_cls in (diffusers.DDPMScheduler, diffusers.PNDMScheduler, diffusers.EulerDiscreteScheduler,
                    diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler,
                    diffusers.DEISMultistepScheduler):
        theirs = cfg_cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type="v_prediction", timestep_spacing="trailing")
        for ours_cls in (DPMSolverPlusPlusScheduler, UniPCScheduler, DEISScheduler):
            ours = ours_cls.from_config(theirs.config)
            assert ours.config.beta_schedule == "scaled_linear"
            assert ours.config.prediction_type == "v_prediction"
            assert ours.config.timestep_spacing == "trailing"
    # DEIS → UniPC: the target's own default solver_type wins, as in diffusers.
    assert UniPCScheduler.from_config(DEISScheduler().config).solver_kind == "bh2"
    assert DPMSolverPlusPlusScheduler.from_config(UniPCScheduler(solver_type="bh1").config).solver_kind == "midpoint"


def test_flow_match_euler_config_switch():
    fm = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = UniPCScheduler.from_config(fm.config, use_flow_sigmas=True, prediction_type="flow_prediction",
                                      flow_shift=3.0)
    ours.set_timesteps(8)
    assert ours.timesteps.dtype == torch.float32 and ours.sigmas[-1] == 0


def test_add_noise_and_begin_index(sample):
    """add_noise uses the noise level of the timestep it is given (on the grid: the grid's node), whatever the
    begin index; step() then starts at the begin index."""
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(50)
    noise = torch.randn_like(sample)
    t = s.timesteps[5][None]
    noisy = s.add_noise(sample, noise, t)
    alpha = 1 / (1 + s.sigmas[5] ** 2).sqrt()
    torch.testing.assert_close(noisy, alpha * sample + alpha * s.sigmas[5] * noise)
    assert noisy.device == sample.device
    s.set_begin_index(10)
    torch.testing.assert_close(s.add_noise(sample, noise, t), noisy)
    s.step(0.1 * sample, s.timesteps[10], noisy)
    assert s.step_index == 11
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(99)


def test_img2img_start_matches_full_schedule_history_reset(sample):
    """Starting at index k (img2img) uses first-order warm-up there, like diffusers."""
    ours, theirs = UniPCScheduler(), diffusers.UniPCMultistepScheduler()
    outs = []
    for s in (ours, theirs):
        s.set_timesteps(10)
        s.set_begin_index(4)
        x = sample
        for i, t in enumerate(s.timesteps[4:]):
            x = s.step(index_model(x, i), t, x).prev_sample
        outs.append(x)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu", "accelerator-branch"])
def test_step_makes_no_host_sync(monkeypatch, sample, accelerator):
    """step() may not read a tensor on the host: no .item(), .tolist(), .nonzero(), float(), int() or bool() of a
    tensor (each is a device sync on an accelerator). On the CPU the immediate finiteness check reads one sum, so
    the CPU run allows float() of a 0-d tensor only; the accelerator branch (forced here) allows nothing."""
    schedulers = [cls(**opts) for cls, opts in SCHEDULERS] + [
        DPMSolverPlusPlusScheduler(thresholding=True, sample_max_value=2.0)]
    for s in schedulers:
        s.set_timesteps(8)
    forbid_host_reads(monkeypatch, accelerator)
    for s in schedulers:
        x = sample
        for i, t in enumerate(s.timesteps):
            x = s.step(index_model(x, i), t, x, generator=torch.Generator().manual_seed(0)).prev_sample


def test_step_errors(sample):
    s = UniPCScheduler()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(sample, 999, sample)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="shape"):
        s.step(sample[:2], s.timesteps[0], sample)
    with pytest.raises(ValueError, match="eta"):
        s.step(sample, s.timesteps[0], sample, eta=0.5)
    bad = sample.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteModelOutputError, match=r"step 0 \(timestep 999\)"):
        s.step(bad, s.timesteps[0], sample)
    s.set_timesteps(2)
    x = sample
    for t in s.timesteps:
        x = s.step(0.1 * x, t, x).prev_sample
    with pytest.raises(IndexError, match="set_timesteps"):
        s.step(x, s.timesteps[-1], x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver_order=4), "solver_order"),
    (dict(solver_type="nope"), "solver_type"),
    (dict(algorithm_type="nope"), "algorithm_type"),
    (dict(prediction_type="nope"), "prediction_type"),
    (dict(beta_schedule="nope"), "beta_schedule"),
    (dict(timestep_spacing="nope"), "timestep_spacing"),
    (dict(final_sigmas_type="nope"), "final_sigmas_type"),
    (dict(use_karras_sigmas=True, use_exponential_sigmas=True), "only one"),
    (dict(prediction_type="flow_prediction"), "use_flow_sigmas"),
    (dict(disable_corrector=[0]), "disable_corrector"),
    (dict(kernel="cuda"), "kernel"),
])
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverPlusPlusScheduler(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"),
    (dict(num_inference_steps=0), "positive integer"),
    (dict(num_inference_steps=2000), "num_train_timesteps"),
    (dict(num_inference_steps=10, timesteps=[999, 500]), "exactly one"),
    (dict(timesteps=[500, 999]), "strictly decreasing"),
    (dict(timesteps=[1500, 10]), r"\[0, 999\]"),
    (dict(timesteps=[900.5, 10]), "integers"),
    (dict(sigmas=[1.0, 2.0]), "strictly decreasing"),
    (dict(sigmas=[float("nan"), 0.1]), "finite"),
    (dict(num_inference_steps=5, mu=0.5), "use_dynamic_shifting"),
])
def test_bad_set_timesteps_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DEISScheduler().set_timesteps(**kwargs)


def test_custom_timesteps_and_sigmas_are_honoured(sample):
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(timesteps=[999, 700, 400, 100])
    assert s.timesteps.tolist() == [999, 700, 400, 100]
    d = diffusers.DPMSolverMultistepScheduler()
    d.set_timesteps(timesteps=[999, 700, 400, 100])
    torch.testing.assert_close(s.sigmas, d.sigmas)
    s.set_timesteps(sigmas=[14.0, 3.0, 0.5, 0.0])
    torch.testing.assert_close(s.sigmas, torch.tensor([14.0, 3.0, 0.5, 0.0]))
    f = UniPCScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)
    f.set_timesteps(sigmas=[0.9, 0.6, 0.3])
    torch.testing.assert_close(f.sigmas, torch.tensor([0.9, 0.6, 0.3, 0.0]))


def test_plan_json_round_trip(sample):
    from fastsampler import Plan

    s = UniPCScheduler(solver_order=3)
    s.set_timesteps(7)
    plan = Plan.from_json(s.plan.to_json())
    a = run_loop(s, 7, sample)
    t = UniPCScheduler(solver_order=3)
    t.set_plan(plan)
    x = sample
    for i, ts in enumerate(t.timesteps):
        x = t.step(index_model(x, i), ts, x).prev_sample
    torch.testing.assert_close(x, a, rtol=0, atol=0)


def test_trained_betas_round_trip():
    s = DEISScheduler(trained_betas=[0.1, 0.3], num_train_timesteps=2)
    with tempfile.TemporaryDirectory() as d:
        s.save_pretrained(d)
        t = DEISScheduler.from_pretrained(d)
    torch.testing.assert_close(t.betas, s.betas)


def test_flow_match_config_switches_to_flow():
    fm = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    s = UniPCScheduler.from_config(fm.config)
    assert (s.config.use_flow_sigmas, s.config.prediction_type, s.config.flow_shift) == (True, "flow_prediction", 3.0)
    assert DPMSolverPlusPlusScheduler.from_config(fm.config, flow_shift=2.0).config.flow_shift == 2.0
    with pytest.raises(ValueError, match="shift_terminal"):
        DEISScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift_terminal=0.1).config)


def test_learned_variance_channels_are_dropped(sample):
    """IF-style models output [prediction, variance]; the scheduler uses the first half, like diffusers."""
    ours = DPMSolverPlusPlusScheduler(variance_type="learned_range")
    theirs = diffusers.DPMSolverMultistepScheduler(variance_type="learned_range")
    outs = []
    for s in (ours, theirs):
        s.set_timesteps(5)
        x = sample
        for i, t in enumerate(s.timesteps):
            x = s.step(torch.cat([index_model(x, i), torch.ones_like(x)], dim=1), t, x).prev_sample
        outs.append(x)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    # A DDPM config's fixed variance carries over harmlessly.
    assert DPMSolverPlusPlusScheduler.from_config(diffusers.DDPMScheduler(variance_type="fixed_large").config)


def test_set_timesteps_reuses_cached_plan():
    a, b = UniPCScheduler(solver_order=3), UniPCScheduler(solver_order=3)
    a.set_timesteps(12)
    b.set_timesteps(12)
    assert a.plan is b.plan
    b.set_timesteps(13)
    assert a.plan is not b.plan


def test_device_mismatch_is_named(sample):
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="meta"):
        s.step(torch.empty_like(sample, device="meta"), s.timesteps[0], sample)


def test_forced_triton_without_cuda_is_named(sample, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTSAMPLER_KERNEL", "triton")
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(4)
    with pytest.raises(RuntimeError, match="CUDA"):
        s.step(sample, s.timesteps[0], sample)
    monkeypatch.setenv("FASTSAMPLER_KERNEL", "fast")
    with pytest.raises(ValueError, match="FASTSAMPLER_KERNEL"):
        DPMSolverPlusPlusScheduler()


@pytest.mark.parametrize("opts", [
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", timestep_spacing="leading"),
    dict(noise_schedule="vp_cosine", timestep_spacing="leading"),
])
def test_spacing_without_meaning_is_refused(opts):
    with pytest.raises(ValueError, match="timestep_spacing"):
        UniPCScheduler(**opts).set_timesteps(5)


@pytest.mark.parametrize("opts", [
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", timestep_spacing="time_quadratic"),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", timestep_spacing="uniform_lambda"),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_karras_sigmas=True),
    dict(noise_schedule="vp_cosine"), dict(noise_schedule="vp_linear", timestep_spacing="time_quadratic"),
    dict(timestep_spacing="uniform_lambda"), dict(timestep_spacing="time_quadratic"),
    dict(use_karras_sigmas=True, karras_rho=3.0),
])
def test_grid_options_give_distinct_valid_schedules(opts):
    """Each grid option changes the schedule (none is silently ignored) and stays strictly decreasing."""
    base = {k: v for k, v in opts.items() if k in ("use_flow_sigmas", "prediction_type", "noise_schedule")}
    a, b = UniPCScheduler(**opts), UniPCScheduler(**base)
    a.set_timesteps(6)
    b.set_timesteps(6)
    assert torch.all(a.sigmas[:-1] > a.sigmas[1:])
    if opts != base:
        assert not torch.allclose(a.sigmas, b.sigmas)


def test_saved_state_does_not_alias_the_callers_sample(sample):
    """A pipeline may modify its latents in place after step(); the scheduler's saved state must not change."""
    outs = []
    for mutate in (False, True):
        s = UniPCScheduler(solver_order=2)
        s.set_timesteps(5)
        x = sample.clone()
        for i, t in enumerate(s.timesteps):
            y = s.step(index_model(x, i), t, x).prev_sample
            if mutate:
                x.mul_(0.0)  # the caller reuses its buffer
            x = y
        outs.append(x)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_deferred_finiteness_check_names_the_first_bad_step(monkeypatch, sample):
    """On an accelerator the NaN test is kept on the device and read asynchronously on later steps; it names the
    first bad step. Exercised on CPU by forcing the accelerator path (copies complete at once there, so the step
    after the bad one raises)."""
    monkeypatch.setattr(DPMSolverPlusPlusScheduler, "_on_accelerator", staticmethod(lambda device: True))
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(5)
    x = sample
    raised_at = None
    with pytest.raises(NonFiniteModelOutputError, match="step 1 "):
        for i, t in enumerate(s.timesteps):
            out = index_model(x, i)
            if i in (1, 3):
                out[0, 0, 0, 0] = float("inf")
            raised_at = i
            x = s.step(out, t, x).prev_sample
    assert raised_at == 1  # the copy of step 1's flag landed at once on CPU
    # A new run starts clean.
    s.set_timesteps(3)
    x = sample
    for i, t in enumerate(s.timesteps):
        x = s.step(index_model(x, i), t, x).prev_sample
