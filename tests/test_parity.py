"""Parity with diffusers: the same config, model and noise give the same samples (1e-5 relative).

Where diffusers is wrong the test shows it and checks that ours is finite (and the convergence tests check
that it converges); the README lists these differences.
"""

from __future__ import annotations

import warnings

import diffusers
import numpy as np
import pytest
import torch

from fastsampler import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.plans.format import OUT_NEXT, src_slot
from parity_util import run_loop

warnings.filterwarnings("ignore", message=".*lower_order_final.*")

CONFIGS = {
    "sd": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "ddpm": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
}
PREDICTIONS = ("epsilon", "v_prediction")
STEPS = (5, 10, 25)
TOL = 1e-5
DEIS_TOL = 5e-5


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


@pytest.fixture(scope="module")
def x_start() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def check(theirs, ours, steps, x, tol=TOL):
    a, b = run_loop(theirs, steps, x), run_loop(ours, steps, x)
    assert torch.isfinite(b).all()
    assert rel_err(b, a) < tol, f"relative error {rel_err(b, a):.2e}"
    if ours.timesteps.dtype == torch.int64:  # flow timesteps stay exact floats here (diffusers truncates)
        # diffusers truncates exponential/beta timesteps; float rounding at the ends can make it one lower.
        assert (theirs.timesteps - ours.timesteps).abs().max() <= (1 if ours.config.use_exponential_sigmas
                                                                  or ours.config.use_beta_sigmas else 0)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", STEPS)
def test_dpmsolver_multistep(config, prediction_type, steps, x_start):
    for order in (1, 2, 3):
        for solver_type in ("midpoint", "heun"):
            for algorithm in ("dpmsolver++", "sde-dpmsolver++"):
                if algorithm.startswith("sde") and order == 3:
                    continue  # diffusers' SDE 3M has an O(1) D2 weight: see test_sde_3m_differs
                d = diffusers.DPMSolverMultistepScheduler(**CONFIGS[config], prediction_type=prediction_type,
                                                          solver_order=order, solver_type=solver_type,
                                                          algorithm_type=algorithm)
                check(d, DPMSolverPlusPlusScheduler.from_config(d.config), steps, x_start)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", (5, 6, 10))
def test_dpmsolver_singlestep(config, prediction_type, steps, x_start):
    for order in (1, 2, 3):
        for solver_type in ("midpoint", "heun"):
            for final in ("zero", "sigma_min"):
                d = diffusers.DPMSolverSinglestepScheduler(**CONFIGS[config], prediction_type=prediction_type,
                                                           solver_order=order, solver_type=solver_type,
                                                           final_sigmas_type=final, lower_order_final=True)
                ours = DPMSolverPlusPlusScheduler.from_config(d.config, solver_method="singlestep")
                check(d, ours, steps, x_start)


@pytest.mark.parametrize("grid", [{}, dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
                                  dict(use_beta_sigmas=True)])
@pytest.mark.parametrize("order", (2, 3))
def test_dpmsolver_singlestep_defaults_and_final_order(grid, order, x_start):
    """Built the same way with the same arguments (no from_config), both singlestep schedulers default to
    lower_order_final=False; ending at sigma_min, a Karras / exponential / beta grid repeats its last node and
    the last macro step still takes full order, as diffusers' does (6 and 12 steps: no lowering is forced)."""
    kw = dict(**CONFIGS["ddpm"], solver_order=order, final_sigmas_type="sigma_min", **grid)
    d = diffusers.DPMSolverSinglestepScheduler(**kw)
    ours = DPMSolverPlusPlusScheduler(solver_method="singlestep", **kw)
    assert ours.config.lower_order_final is False and d.config.lower_order_final is False
    for steps in (6, 12):
        check(d, ours, steps, x_start)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", STEPS)
def test_unipc(config, prediction_type, steps, x_start):
    for order in (1, 2, 3):
        for bh in ("bh1", "bh2"):
            # diffusers' bh1 is NaN with a zero final sigma (B(h) = −∞ times 0): compare at sigma_min there.
            final = "sigma_min" if bh == "bh1" else "zero"
            d = diffusers.UniPCMultistepScheduler(**CONFIGS[config], prediction_type=prediction_type,
                                                  solver_order=order, solver_type=bh, final_sigmas_type=final)
            check(d, UniPCScheduler.from_config(d.config), steps, x_start)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", STEPS)
def test_deis_logrho(config, prediction_type, steps, x_start):
    for order in (1, 2, 3):
        d = diffusers.DEISMultistepScheduler(**CONFIGS[config], prediction_type=prediction_type, solver_order=order)
        # diffusers' DEIS always ends at σ_min and computes its weights in float32 (e^h − 1 without expm1,
        # the order-3 log-ρ closed form with cancellation), which costs it 1e-5..4e-5 relative;
        # test_deis_coefficients_vs_float64 shows our plan equals its formula evaluated in float64.
        tol = DEIS_TOL
        check(d, DEISScheduler.from_config(d.config, final_sigmas_type="sigma_min"), steps, x_start, tol)


def test_deis_coefficients_vs_float64():
    """diffusers' closed-form order-3 log-ρ coefficients, evaluated in float64, equal our plan's."""
    def ind_fn(t, b, c, d):
        lt, lb, lc, ld = np.log(t), np.log(b), np.log(c), np.log(d)
        num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
        return num / ((lb - lc) * (lb - ld))

    s = DEISScheduler(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False)
    s.set_timesteps(25)
    plan, i = s.plan, 10
    rho = plan.rho
    r_t, r0, r1, r2 = rho[i + 1], rho[i], rho[i - 1], rho[i - 2]
    coef = [ind_fn(r_t, r0, r1, r2) - ind_fn(r0, r0, r1, r2), ind_fn(r_t, r1, r2, r0) - ind_fn(r0, r1, r2, r0),
            ind_fn(r_t, r2, r0, r1) - ind_fn(r0, r2, r0, r1)]
    alpha_t = 1 / np.sqrt(1 + r_t**2)
    slots = plan.coef[2, i, OUT_NEXT, src_slot(0, 0):]
    ours = [slots[(i - a) % 3] for a in range(3)]
    np.testing.assert_allclose(ours, alpha_t * np.array(coef), rtol=1e-10)


def ddim_float64(alphas_cumprod: torch.Tensor, timesteps: list[int], x: torch.Tensor, model, prediction_type: str):
    """DDIM (= first-order DEIS) from ``timesteps`` down to t = 0 (σ_min), in float64, with diffusers' ᾱ."""
    ac, x = alphas_cumprod.double(), x.double()
    for t, t_next in zip(timesteps, timesteps[1:] + [0]):
        a_s, s_s, a_t, s_t = ac[t].sqrt(), (1 - ac[t]).sqrt(), ac[t_next].sqrt(), (1 - ac[t_next]).sqrt()
        out = model(x, torch.tensor(t))
        eps = out if prediction_type == "epsilon" else a_s * out + s_s * x
        x = (a_t / a_s) * x + (s_t - a_t * s_s / a_s) * eps
    return x


@pytest.mark.parametrize("prediction_type,measured", [("epsilon", 3.0e-4), ("v_prediction", 1.75e-3)])
def test_deis_squaredcos_difference_is_diffusers_float32(prediction_type, measured):
    """With squaredcos_cap_v2 and diffusers' own test model (x·t/(t+1)), the first step from t = 999 (α ≈ 0.006)
    cancels catastrophically, and diffusers' float32 DEIS weights put it 2.6e-4 (ε) / 1.6e-3 (v) away from the
    float64 DDIM solution while ours stays within 4.9e-5 / 2.3e-4: the README's DEIS figure for this schedule is
    the measured difference (3.0e-4 / 1.75e-3), and it is diffusers' rounding, not ours."""
    def model(x, t):
        return x * t / (t + 1)

    x = torch.arange(768).flip(-1).reshape(3, 8, 8, 4).permute(3, 0, 1, 2) / 768  # diffusers' dummy_sample_deter
    d = diffusers.DEISMultistepScheduler(beta_schedule="squaredcos_cap_v2", solver_order=1,
                                         prediction_type=prediction_type)
    ours = DEISScheduler.from_config(d.config, final_sigmas_type="sigma_min")
    def loop(s):
        s.set_timesteps(10)
        y = x
        for t in s.timesteps:
            y = s.step(model(y, t), t, y).prev_sample
        return y

    a, b = loop(d), loop(ours)
    exact = ddim_float64(d.alphas_cumprod, d.timesteps.tolist(), x, model, prediction_type)
    assert rel_err(b, a) < measured * 1.2
    assert rel_err(b.double(), exact) < rel_err(a.double(), exact) / 4


@pytest.mark.parametrize("steps", (5, 10, 25))
def test_flow_matching(steps, x_start):
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    for order in (1, 2, 3):
        d = diffusers.DPMSolverMultistepScheduler(**flow, solver_order=order)
        check(d, DPMSolverPlusPlusScheduler.from_config(d.config), steps, x_start)
        d = diffusers.UniPCMultistepScheduler(**flow, solver_order=order)
        check(d, UniPCScheduler.from_config(d.config), steps, x_start)
        d = diffusers.DEISMultistepScheduler(**flow, solver_order=order)
        check(d, DEISScheduler.from_config(d.config, final_sigmas_type="sigma_min"), steps, x_start, DEIS_TOL)


def test_flow_dynamic_shift_matches(x_start):
    cfg = dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    d = diffusers.UniPCMultistepScheduler(**cfg)
    ours = UniPCScheduler.from_config(d.config)
    a = run_loop(d, None, x_start, set_kwargs=dict(num_inference_steps=8, mu=0.8))
    b = run_loop(ours, None, x_start, set_kwargs=dict(num_inference_steps=8, mu=0.8))
    assert rel_err(b, a) < TOL
    np.testing.assert_allclose(ours.sigmas.numpy(), d.sigmas.numpy(), rtol=1e-6)


@pytest.mark.parametrize("kw", [dict(sigma_min=0.01, sigma_max=200.0), dict(prediction_type="flow_prediction"),
                                dict(final_sigmas_type="sigma_min", solver_order=3),
                                dict(prediction_type="flow_prediction", solver_type="bh1", final_sigmas_type="sigma_min")])
def test_flow_karras_matches_unipc(kw, x_start):
    """Flow matching + Karras sigmas as diffusers' UniPC defines them (its test suite fixes the values): Karras in
    ρ = s/(1−s) between sigma_min and sigma_max (default: the betas' ρ range), then s = ρ/(1+ρ)."""
    d = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, use_karras_sigmas=True, **kw)
    ours = UniPCScheduler.from_config(d.config)
    for n in (5, 12):
        d.set_timesteps(n)
        ours.set_timesteps(n)
        np.testing.assert_allclose(ours.sigmas.numpy(), d.sigmas.numpy(), rtol=1e-6)
        # flow timesteps stay exact floats here; diffusers truncates them to integers
        assert torch.equal(ours.timesteps.floor().long(), d.timesteps)
    check(d, ours, 10, x_start)


@pytest.mark.parametrize("grid", [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
                                  dict(use_lu_lambdas=True), dict(timestep_spacing="leading", steps_offset=1),
                                  dict(timestep_spacing="trailing"), dict(use_beta_sigmas=True)])
def test_grids_match(grid, x_start):
    EDGE_TRUNCATED = [dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True)]
    d = diffusers.DPMSolverMultistepScheduler(**CONFIGS["sd"], **grid)
    ours = DPMSolverPlusPlusScheduler.from_config(d.config)
    for n in (7, 20):
        d.set_timesteps(n)
        ours.set_timesteps(n)
        assert (d.timesteps - ours.timesteps).abs().max() <= (1 if grid in EDGE_TRUNCATED else 0)
        np.testing.assert_allclose(ours.sigmas.numpy(), d.sigmas.numpy(), rtol=2e-6)
    check(d, ours, 10, x_start)


@pytest.mark.parametrize("kw", [dict(solver_type="bh1", solver_order=3), dict(predict_x0=False)])
def test_unipc_zero_final_diffusers_nan(kw, x_start):
    """diffusers' UniPC bh1, and its noise form, return NaN when the last sigma is zero; ours is finite and
    equals diffusers up to the last step."""
    d = diffusers.UniPCMultistepScheduler(**kw)
    ours = UniPCScheduler.from_config(d.config)
    assert torch.isnan(run_loop(d, 10, x_start)).any()
    assert torch.isfinite(run_loop(ours, 10, x_start)).all()


def test_sde_3m_differs_from_diffusers(x_start):
    """diffusers' SDE-DPM-Solver++ 3M weights D2 by ≈ −α_t for small h (it should vanish like h);
    ours uses the consistent weight. Same noise: both finite, ours closer to the 2M SDE result."""
    kw = dict(algorithm_type="sde-dpmsolver++")
    d3 = run_loop(diffusers.DPMSolverMultistepScheduler(solver_order=3, **kw), 25, x_start)
    o3 = run_loop(DPMSolverPlusPlusScheduler(solver_order=3, **kw), 25, x_start)
    o2 = run_loop(DPMSolverPlusPlusScheduler(solver_order=2, **kw), 25, x_start)
    assert torch.isfinite(o3).all()
    assert rel_err(o3, o2) < rel_err(d3, o2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_thresholding(prediction_type, x_start):
    x = 3.0 * x_start  # large enough that x̂₀ gets clipped
    # diffusers accepts a bound below 1 (clip to ±bound, rescale to ±1) and the 0 quantile; its own test suite
    # runs sample_max_value 0.5 and dynamic_thresholding_ratio 0
    for ratio, max_value in ((0.995, 1.0), (0.87, 2.0), (0.995, 0.5), (0.0, 1.0), (0.0, 0.5)):
        kw = dict(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value,
                  prediction_type=prediction_type)
        for order in (1, 2, 3):
            d = diffusers.DPMSolverMultistepScheduler(solver_order=order, **kw)
            check(d, DPMSolverPlusPlusScheduler.from_config(d.config), 10, x)
            d = diffusers.UniPCMultistepScheduler(solver_order=order, **kw)
            check(d, UniPCScheduler.from_config(d.config), 10, x)
            d = diffusers.DEISMultistepScheduler(solver_order=order, **kw)
            check(d, DEISScheduler.from_config(d.config, final_sigmas_type="sigma_min"), 10, x, DEIS_TOL)


def test_zero_snr_and_lambda_clipping(x_start):
    d = diffusers.DPMSolverMultistepScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                              timestep_spacing="trailing")
    check(d, DPMSolverPlusPlusScheduler.from_config(d.config), 10, x_start)
    d = diffusers.UniPCMultistepScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                          timestep_spacing="trailing")
    check(d, UniPCScheduler.from_config(d.config), 10, x_start)
    d = diffusers.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)
    check(d, DPMSolverPlusPlusScheduler.from_config(d.config), 10, x_start)


def test_unipc_disable_corrector_and_noise_form(x_start):
    # diffusers' noise-form UniPC is NaN with a zero final sigma (σ_t(e^h − 1) = 0·∞); ours is finite there.
    for kw in (dict(disable_corrector=[0, 1]), dict(predict_x0=False, final_sigmas_type="sigma_min"),
               dict(solver_order=3, disable_corrector=[2])):
        d = diffusers.UniPCMultistepScheduler(**kw)
        check(d, UniPCScheduler.from_config(d.config), 10, x_start)


def test_noise_form_dpmsolver(x_start):
    for order in (1, 2, 3):
        for solver_type in ("midpoint", "heun"):
            d = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver", solver_order=order,
                                                      solver_type=solver_type, final_sigmas_type="sigma_min")
            check(d, DPMSolverPlusPlusScheduler.from_config(d.config), 10, x_start)
