"""Noise-level sequences of ``fastsampler.k_diffusion`` (property tests) and Align Your Steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsampler
import fastsampler.k_diffusion as fk
from fastsampler.schedules.ays import ays_sigmas, ays_table, loglinear_interp
from kdiffusion_reference import k_sampling

RANGED = {"karras": fk.get_sigmas_karras, "exponential": fk.get_sigmas_exponential,
          "polyexponential": fk.get_sigmas_polyexponential, "beta": fk.get_sigmas_beta,
          "kl_optimal": fk.get_sigmas_kl_optimal}

steps = st.integers(min_value=1, max_value=300)
sigma_min = st.floats(min_value=1e-3, max_value=2.0)
spread = st.floats(min_value=1.5, max_value=1e4)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(RANGED)), n=steps, lo=sigma_min, ratio=spread)
def test_ranged_schedules_decrease_from_sigma_max_to_sigma_min_then_zero(name, n, lo, ratio):
    hi = lo * ratio
    sig = RANGED[name](n, lo, hi, dtype=torch.float64).numpy()
    assert sig.shape == (n + 1,) and sig[-1] == 0.0
    assert np.all(np.diff(sig) < 0)
    assert sig[0] == pytest.approx(hi, rel=1e-12)
    if n > 1:
        assert sig[-2] == pytest.approx(lo, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(min_value=2, max_value=100), lo=sigma_min, ratio=spread, rho=st.floats(0.5, 10.0))
def test_ranged_schedules_are_k_diffusions(n, lo, ratio, rho):
    """Karras, exponential and polyexponential equal k-diffusion's ``get_sigmas_*`` (both in float64)."""
    ks = k_sampling()
    hi = lo * ratio
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # k-diffusion builds its grids in the default dtype
    try:
        pairs = [(fk.get_sigmas_karras(n, lo, hi, rho, dtype=torch.float64), ks.get_sigmas_karras(n, lo, hi, rho)),
                 (fk.get_sigmas_exponential(n, lo, hi, dtype=torch.float64), ks.get_sigmas_exponential(n, lo, hi)),
                 (fk.get_sigmas_polyexponential(n, lo, hi, rho, dtype=torch.float64),
                  ks.get_sigmas_polyexponential(n, lo, hi, rho))]
    finally:
        torch.set_default_dtype(default)
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-12)


def test_kl_optimal_is_uniform_in_arctan():
    sig = fk.get_sigmas_kl_optimal(7, 0.03, 14.6, dtype=torch.float64).numpy()[:-1]
    np.testing.assert_allclose(np.diff(np.arctan(sig)), (math.atan(0.03) - math.atan(14.6)) / 6, rtol=1e-12)


# ComfyUI's AYS tables (comfy_extras/nodes_align_your_steps.py, NOISE_LEVELS), as published values
COMFYUI_AYS = {"sd1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                       0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
               "sdxl": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                        0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582]}


@pytest.mark.parametrize("model", ["sd1", "sdxl", "svd"])
def test_ays_ten_steps_is_the_published_schedule(model):
    """At 10 steps the table itself (last level 0); SD1 / SDXL levels are SD's σ at diffusers' published AYS
    timesteps — ComfyUI's ``NOISE_LEVELS`` to 2e-5 — and within 1.4 % of the paper's three-decimal sigmas
    (diffusers' ``AysSchedules``; SDXL's last published level, 0.113, is 1.4 % above σ at its own timestep 13)."""
    from diffusers.schedulers.scheduling_utils import AysSchedules

    table = np.array(ays_table(model))
    sig = fk.get_sigmas_ays(10, model, dtype=torch.float64).numpy()
    np.testing.assert_array_equal(sig[:-1], table[:-1])
    assert sig[-1] == 0.0
    published = {"sd1": "StableDiffusionSigmas", "sdxl": "StableDiffusionXLSigmas",
                 "svd": "StableDiffusionVideoSigmas"}[model]
    np.testing.assert_allclose(table[:-1], AysSchedules[published][:-1], rtol=1.5e-2)
    if model in COMFYUI_AYS:
        # ComfyUI builds SD's β table in float64, diffusers (and we) in float32 as training did: ≤ 1.3e-5 apart
        np.testing.assert_allclose(table, COMFYUI_AYS[model], rtol=2e-5)
    if model != "svd":
        from fastsampler.schedules.noise import DiscreteVP

        sd = DiscreteVP.from_config(1000, 0.00085, 0.012, "scaled_linear")
        timesteps = {"sd1": "StableDiffusionTimesteps", "sdxl": "StableDiffusionXLTimesteps"}[model]
        np.testing.assert_allclose(sd.t_from_rho(table), list(AysSchedules[timesteps]) + [0], atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(model=st.sampled_from(["sd1", "sdxl", "svd"]), multiple=st.integers(min_value=1, max_value=12))
def test_ays_interpolation_passes_through_the_published_levels(model, multiple):
    """10·m steps: every m-th level is a published one (log-linear interpolation on a uniform index grid)."""
    table = np.array(ays_table(model))
    sig = ays_sigmas(10 * multiple, model)
    np.testing.assert_allclose(sig[:-1][::multiple], table[:-1], rtol=1e-12)
    assert sig[-1] == 0.0 and np.all(np.diff(sig) < 0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=1, max_value=200), model=st.sampled_from(["sd1", "sdxl", "svd"]))
def test_ays_any_step_count_decreases_from_the_top_level(n, model):
    sig = ays_sigmas(n, model)
    assert sig.shape == (n + 1,) and sig[0] == pytest.approx(ays_table(model)[0], rel=1e-12) and sig[-1] == 0.0
    assert np.all(np.diff(sig) < 0)


def test_ays_five_steps_sd1():
    """The interpolation's worked example (SD1, 5 steps): 14.6146, 3.8637, 1.8842, 0.9643, 0.3977, 0."""
    np.testing.assert_allclose(ays_sigmas(5, "sd1"), [14.6146, 3.8637, 1.8842, 0.9643, 0.3977, 0.0], atol=1e-4)


def test_loglinear_interp_is_linear_in_log_sigma():
    levels = np.array([10.0, 1.0, 0.1])
    np.testing.assert_allclose(loglinear_interp(levels, 5), [10.0, math.sqrt(10), 1.0, math.sqrt(0.1), 0.1])


@pytest.mark.parametrize("config", [dict(timestep_spacing="trailing"), dict(use_karras_sigmas=True),
                                    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)])
def test_a_schedulers_sigmas_are_the_levels_it_visits(config):
    """``get_sigmas_scheduler``: diffusers' ``scheduler.sigmas`` of our scheduler (the grid incl. its final level)."""
    scheduler = fastsampler.UniPCScheduler(**config)
    sig = fk.get_sigmas_scheduler(scheduler, 7, dtype=torch.float64)
    np.testing.assert_allclose(sig.numpy(), scheduler.sigmas.double().numpy(), rtol=1e-6)
    assert len(sig) == 8


def test_bad_arguments_are_named():
    for call, name in ((lambda: fk.get_sigmas_karras(0, 0.1, 10.0), "`n`"),
                       (lambda: fk.get_sigmas_karras(5, 10.0, 0.1), "sigma_min"),
                       (lambda: fk.get_sigmas_exponential(5, 0.0, 1.0), "sigma_min"),
                       (lambda: fk.get_sigmas_karras(5, 0.1, 10.0, rho=0), "rho"),
                       (lambda: fk.get_sigmas_ays(5, "sd3"), "model"),
                       (lambda: fk.get_sigmas_ays(2.5), "`n`")):
        with pytest.raises(ValueError, match=name):
            call()


def test_ays_is_a_grid_option_of_our_schedulers():
    """``use_ays_sigmas="sd1"`` on Stable Diffusion's config: at 10 steps the published AYS timesteps, at 7 the
    interpolated levels; conflicting or flow configs are refused by name."""
    from diffusers.schedulers.scheduling_utils import AysSchedules

    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for cls in (fastsampler.UniPCScheduler, fastsampler.DPMSolverPlusPlusScheduler, fastsampler.DEISScheduler):
        scheduler = cls(**sd, use_ays_sigmas="sd1")
        scheduler.set_timesteps(10)
        assert scheduler.timesteps.tolist() == AysSchedules["StableDiffusionTimesteps"]
        np.testing.assert_allclose(scheduler.sigmas.double().numpy(), ays_sigmas(10, "sd1"), rtol=1e-6)
        scheduler.set_timesteps(7)
        np.testing.assert_allclose(scheduler.sigmas.double().numpy(), ays_sigmas(7, "sd1"), rtol=1e-6)
    for config, name in ((dict(use_ays_sigmas="sd3"), "use_ays_sigmas"),
                         (dict(use_ays_sigmas="sd1", use_karras_sigmas=True), "use_ays_sigmas"),
                         (dict(use_ays_sigmas="sdxl", use_flow_sigmas=True, prediction_type="flow_prediction"),
                          "use_ays_sigmas")):
        with pytest.raises(ValueError, match=name):
            fastsampler.UniPCScheduler(**config)


@pytest.mark.parametrize("n", [3, 10, 17])
def test_ays_tensors_build_at_any_step_count(n):
    sig = fk.get_sigmas_ays(n, "sdxl")
    assert sig.dtype == torch.float32 and sig.shape == (n + 1,) and sig.is_contiguous()
