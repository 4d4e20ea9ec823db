"""``fastsampler.k_diffusion``: k-diffusion-style sampler functions on our plan engine, checked against k-diffusion
itself, against diffusers' schedulers driven with the same sigmas, and on a tuned plan."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

import fastsampler
import fastsampler.k_diffusion as fk
from fastsampler.eval import bench
from kdiffusion_reference import k_sampling

SIGMAS = {"karras-8": lambda: fk.get_sigmas_karras(8, 0.03, 14.6, dtype=torch.float64),
          "ays-10": lambda: fk.get_sigmas_ays(10, dtype=torch.float64),
          "exponential-5": lambda: fk.get_sigmas_exponential(5, 0.05, 20.0, dtype=torch.float64)}


class Denoiser:
    """The exact D(x, σ) = E[x₀ | x₀ + σ ε = x] of the digits mixture, k-diffusion's model contract; counts calls."""

    def __init__(self, guidance: float | None = None, batch: int = 8):
        self.setup = bench.BenchSetup("sd", None, guidance, batch, 0)
        self.denoiser = self.setup.denoiser()
        self.calls: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],)
        self.calls.append(float(sigma[0]))
        flat = self.denoiser(x.reshape(x.shape[0], -1), 1.0, sigma.reshape(-1, 1).double())
        return flat.reshape(x.shape)

    def noise(self) -> torch.Tensor:
        return self.setup.noise().double()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(a).all()
    assert float((a - b).abs().max()) <= tol * float(b.abs().max()), float((a - b).abs().max())


@pytest.mark.parametrize("sigmas", sorted(SIGMAS))
def test_the_functions_are_k_diffusions_samplers(sigmas):
    """Euler, DPM-Solver++ 2M, 3M (k-diffusion's 3M SDE at η = 0), 2S (2S ancestral at η = 0), the 2M SDE (both
    solver types) and the 3M SDE at several η and ``s_noise``, the SDEs on the same noise, give k-diffusion's
    samples, and call the model and the callback as it does."""
    ks = k_sampling()
    model, sig = Denoiser(), SIGMAS[sigmas]()
    x = model.noise() * sig[0]
    pairs = [(fk.sample_euler, ks.sample_euler, {}, {}), (fk.sample_dpmpp_2m, ks.sample_dpmpp_2m, {}, {}),
             (fk.sample_dpmpp_3m, ks.sample_dpmpp_3m_sde, {}, {"eta": 0.0}),
             (fk.sample_dpmpp_2s, ks.sample_dpmpp_2s_ancestral, {}, {"eta": 0.0})]
    for ours, theirs, ours_options, their_options in pairs:
        runs = []
        for function, options in ((ours, ours_options), (theirs, their_options)):
            seen: list[tuple] = []
            model.calls = []
            out = function(model, x, sig, callback=lambda d: seen.append((d["i"], float(d["sigma"]), sorted(d))),
                           disable=True, **options)
            runs.append((out, seen, list(model.calls)))
        _close(runs[0][0], runs[1][0], 1e-10)
        assert runs[0][1] == runs[1][1] and runs[0][2] == pytest.approx(runs[1][2], rel=1e-12)
    z = [torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=x.dtype) for k in range(len(sig))]
    sde = [(fk.sample_dpmpp_2m_sde, ks.sample_dpmpp_2m_sde, {"solver_type": "midpoint"}),
           (fk.sample_dpmpp_2m_sde, ks.sample_dpmpp_2m_sde, {"solver_type": "heun"}),
           (fk.sample_dpmpp_2m_sde, ks.sample_dpmpp_2m_sde, {"solver_type": "heun", "eta": 0.4, "s_noise": 0.9}),
           (fk.sample_dpmpp_3m_sde, ks.sample_dpmpp_3m_sde, {}),
           (fk.sample_dpmpp_3m_sde, ks.sample_dpmpp_3m_sde, {"eta": 0.5}),
           (fk.sample_dpmpp_3m_sde, ks.sample_dpmpp_3m_sde, {"eta": 0.0})]
    for ours, theirs, options in sde:
        outs = []
        for function in (ours, theirs):
            draws = iter(z)
            outs.append(function(model, x, sig, disable=True, noise_sampler=lambda s, s_next: next(draws),
                                 **options))
        _close(outs[0], outs[1], 1e-10)


DIFFUSERS = [  # ours, our options, diffusers' class, its config (besides prediction_type="sample")
    (fk.sample_dpmpp_2m, {}, "DPMSolverMultistepScheduler", dict(solver_order=2, lower_order_final=False)),
    (fk.sample_dpmpp_3m, {}, "DPMSolverMultistepScheduler", dict(solver_order=3, solver_type="heun",
                                                                 lower_order_final=False)),
    (fk.sample_unipc, {}, "UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh1")),
    (fk.sample_unipc_bh2, {}, "UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2")),
    (fk.sample_unipc, {"solver_order": 2}, "UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh1")),
    (fk.sample_deis, {}, "DEISMultistepScheduler", dict(solver_order=3)),
    (fk.sample_deis, {"lower_order_final": False}, "DEISMultistepScheduler", dict(solver_order=3,
                                                                                  lower_order_final=False)),
]


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # diffusers' DEIS at σ = 0
@pytest.mark.parametrize("final", ["sigma_min", "zero"])
@pytest.mark.parametrize("case", range(len(DIFFUSERS)))
def test_the_functions_match_diffusers_schedulers_on_the_same_sigmas(case, final):
    """Each function against diffusers' own scheduler stepped through the same sigmas, ≤ 1e-5. Sigmas that end
    at σ_min > 0 (the last is the final level, not a node) for every solver; ending in 0 where diffusers is
    finite there (its UniPC bh1 and DEIS divide by log 0 and give NaN: ours must stay finite)."""
    ours, options, name, config = DIFFUSERS[case]
    model = Denoiser()
    for build in SIGMAS.values():
        sig = build() if final == "zero" else build()[:-1]
        x = model.noise() * sig[0]
        got = ours(model, x, sig, disable=True, **options)
        diffusers_final = "zero" if final == "zero" else "sigma_min"
        extra = {} if name == "DEISMultistepScheduler" else {"final_sigmas_type": diffusers_final}
        want = fk.sample_diffusers(model, x, sig, disable=True,
                                   scheduler=getattr(diffusers, name)(prediction_type="sample", **config, **extra))
        if final == "zero" and not torch.isfinite(want).all():
            assert torch.isfinite(got).all() and (name == "DEISMultistepScheduler" or config["solver_type"] == "bh1")
            continue
        _close(got, want, 1e-5)


def test_2s_is_diffusers_singlestep_on_the_midpoint_grid():
    """``sample_dpmpp_2s`` = diffusers' ``DPMSolverSinglestepScheduler`` (order 2) stepped along the sigmas with
    their log-midpoints inserted (its order list pairs each midpoint with the step it starts), ≤ 1e-5."""
    from fastsampler.k_diffusion.sampling import midpoint_sigmas

    model = Denoiser()
    for build in SIGMAS.values():
        sig = build()
        x = model.noise() * sig[0]
        want = fk.sample_diffusers(model, x, torch.tensor(midpoint_sigmas(sig.numpy())), disable=True,
                                   scheduler=diffusers.DPMSolverSinglestepScheduler(
                                       prediction_type="sample", solver_order=2, final_sigmas_type="zero"))
        _close(fk.sample_dpmpp_2s(model, x, sig, disable=True), want, 1e-5)


def test_flow_models_take_flow_sigmas():
    """``flow=True``: x = (1 − σ) x₀ + σ ε, sigmas from 1 to 0. Euler is the same update in both forms (k-diffusion's
    ``sample_euler`` is right for flow models); DPM-Solver++ in flow λ = log((1 − σ)/σ) converges to the
    many-step solution at second order."""
    ks = k_sampling()
    model = Denoiser()
    sig = torch.linspace(0.98, 0.0, 9, dtype=torch.float64)
    x = model.noise() * sig[0]
    flow_model = FlowDenoiser(model)
    _close(fk.sample_euler(flow_model, x, sig, disable=True, flow=True),
           ks.sample_euler(flow_model, x, sig, disable=True), 1e-10)
    reference = fk.sample_dpmpp_3m(flow_model, x, torch.linspace(0.98, 0.0, 401, dtype=torch.float64),
                                   disable=True, flow=True)
    errors = [float((fk.sample_dpmpp_2m(flow_model, x, torch.linspace(0.98, 0.0, n + 1, dtype=torch.float64),
                                        disable=True, flow=True) - reference).abs().max()) for n in (20, 40)]
    assert errors[1] < errors[0] / 3.0


class FlowDenoiser:
    """The digits mixture as a flow model: D(x, s) for x = (1 − s) x₀ + s ε."""

    def __init__(self, model: Denoiser):
        self.model = model

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1).double()
        flat = self.model.denoiser(x.reshape(x.shape[0], -1), 1.0 - s, s)
        return flat.reshape(x.shape)


def test_extra_args_reach_the_model_and_bad_sigmas_are_named():
    model = Denoiser()
    seen = []

    def conditioned(x, sigma, cond=None):
        seen.append(cond)
        return model(x, sigma)

    sig = fk.get_sigmas_karras(4, 0.05, 10.0, dtype=torch.float64)
    x = model.noise() * sig[0]
    fk.sample_unipc(conditioned, x, sig, extra_args={"cond": "c"}, disable=True)
    assert seen == ["c"] * 4
    for bad in (torch.tensor([10.0, 10.0, 0.0]), torch.tensor([1.0, 2.0, 0.0]), torch.tensor([5.0]),
                torch.tensor([[5.0, 0.0]]), torch.tensor([5.0, float("nan"), 0.0]), torch.tensor([5.0, -1.0])):
        with pytest.raises(ValueError, match="sigmas"):
            fk.sample_dpmpp_2m(model, x, bad, disable=True)
    with pytest.raises(ValueError, match="sde_eta"):
        fk.sample_dpmpp_2m_sde(model, x, sig, disable=True, eta=-0.5)
    with pytest.raises(ValueError, match="eta"):
        fk.sample_dpmpp_2m(model, x, sig, disable=True, eta=1.0)


def test_a_tuned_plan_runs_from_its_folder_on_its_own_sigmas(tmp_path):
    """A scheduler tuned by ``fastsampler.tune`` and saved: ``get_sigmas_pretrained`` gives its plan's levels,
    ``sample_pretrained`` on them reproduces the tuned scheduler's own run (in its model's ε form and integer
    time; the mixture's σ table is float64, the scheduler's float32 as in training: 4e-7 apart), and other sigmas
    are refused. (Learned time points are continuous levels; the model gets the nearest integer timestep in a
    pipeline and in ComfyUI, which quantizes t, and the exact level in k-diffusion's default wrappers.)"""
    from test_tuning import SD, mixture

    base = fastsampler.UniPCScheduler(**SD)
    eps_model, noise = mixture(base.config, 16, 3)
    tuned = fastsampler.tune(base, eps_model, noise, 5, method="coefficients", cache_dir=None, progress=False,
                             teacher="dpmsolver++3:40", teacher_check=False, iters=6, patience=50, init="base",
                             learn_timesteps=False)
    tuned.save_pretrained(tmp_path)
    sig = fk.get_sigmas_pretrained(tmp_path, 5, dtype=torch.float64)
    tuned.set_timesteps(5)
    np.testing.assert_allclose(sig.numpy(), tuned.plan.rho, rtol=1e-12)
    assert sig[-1] == 0 and len(sig) == 6
    x = noise[:8]
    native = x.clone()
    for t in tuned.timesteps:
        native = tuned.step(eps_model(native, t), t, native).prev_sample
    model = Denoiser(batch=8)
    alpha0 = float(tuned.plan.alpha[0])
    got = fk.sample_pretrained(model, x / alpha0, sig, path=tmp_path, disable=True)
    _close(got, native, 1e-5)
    with pytest.raises(ValueError, match="get_sigmas_scheduler"):
        fk.sample_pretrained(model, x, fk.get_sigmas_karras(5, 0.03, 14.6), path=tmp_path, disable=True)
    with pytest.raises(ValueError, match="scheduler_config.json"):
        fk.get_sigmas_pretrained(tmp_path / "nothing", 5)


def test_plug_ins_are_keyword_options():
    """A plug-in passes through as a keyword (here heavy-ball momentum): it changes the samples as it does in the
    scheduler, and the plain call stays the scheduler's own plan."""
    model = Denoiser()
    sig = fk.get_sigmas_karras(6, 0.03, 14.6, dtype=torch.float64)
    x = model.noise() * sig[0]
    plain = fk.sample_dpmpp_2m(model, x, sig, disable=True)
    with_momentum = fk.sample_dpmpp_2m(model, x, sig, disable=True, momentum="hb", momentum_beta=0.8)
    assert float((plain - with_momentum).abs().max()) > 1e-4
    scheduler = fk.scheduler_for(fastsampler.DPMSolverPlusPlusScheduler, False, solver_order=2,
                                 lower_order_final=False, momentum="hb", momentum_beta=0.8)
    _close(fk.sample_scheduler(model, x, sig, disable=True, scheduler=scheduler), with_momentum, 1e-12)


RATIOS = [1.0, 1.02, 0.97, 1.05, 1.0, 0.99, 1.03, 1.0]


@pytest.mark.parametrize("function, scheduler_class, config, options", [
    (fk.sample_unipc, "UniPCScheduler", dict(solver_order=3, solver_type="bh1"), {}),
    (fk.sample_dpmpp_2m, "DPMSolverPlusPlusScheduler", dict(solver_order=2, lower_order_final=False), {}),
    (fk.sample_deis, "DEISScheduler", dict(solver_order=3), {}),
    (fk.sample_dc, "DCSolverScheduler", dict(solver_order=2, dc_ratios=RATIOS), dict(dc_ratios=RATIOS)),
    # Time-Shift moves the model's time to τ by the sample's variance: the function calls the model at σ = ρ(τ),
    # so it needs the model's training schedule (the digits DDPM's, here the scheduler default)
    (fk.sample_dpmpp_2m, "DPMSolverPlusPlusScheduler", dict(solver_order=2, lower_order_final=False,
                                                            time_shift=True, time_shift_window=40),
     dict(time_shift=True, time_shift_window=40))])
def test_the_digits_network_as_a_k_diffusion_denoiser_samples_as_in_its_pipeline(function, scheduler_class, config,
                                                                                 options):
    """The embedded digits DDPM wrapped by ``DiffusersDenoiser`` (ComfyUI's quantized model time) and sampled by
    the k-diffusion function along the scheduler's own Karras sigmas gives the scheduler's pipeline samples
    (the UNet called at the same integer timesteps), ≤ 1e-5."""
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(fastsampler.assets("digits"))
    scheduler = getattr(fastsampler, scheduler_class).from_config(pipe.scheduler.config, use_karras_sigmas=True,
                                                                  **config)
    scheduler.set_timesteps(8)
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = noise.clone()
        for t in scheduler.timesteps:
            native = scheduler.step(pipe.unet(native, t).sample, t, native).prev_sample
        model = fk.DiffusersDenoiser(pipe.unet, pipe.scheduler.config, quantize=True)
        sigmas = fk.get_sigmas_scheduler(scheduler, 8)
        got = function(model, noise * sigmas[0] * math.sqrt(1 + 1 / float(sigmas[0]) ** 2), sigmas, disable=True,
                       **options)
    _close(got, native, 1e-5)


def test_the_readme_section_runs_and_names_only_what_exists():
    """The README's k-diffusion example runs as written; the ComfyUI lines (ComfyUI is not installable here)
    compile and call only functions of ``fastsampler.k_diffusion`` that exist and that the tests above run."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Use it from k-diffusion / ComfyUI", 1)[1].split("\n## ", 1)[0]
    example, comfy = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:2]
    exec(compile(example, "README example", "exec"), {})
    compile(comfy, "README ComfyUI lines", "exec")
    used = set(re.findall(r"\bK\.(\w+)", comfy + example))
    assert used and all(hasattr(fk, name) for name in used), used
    assert {"sample_unipc", "sample_pretrained", "get_sigmas_pretrained"} <= used


def test_sde_eta_spans_the_ode_and_diffusers_sde():
    """``sde_eta``: η = 1 is diffusers' SDE plan; η = 0 the ODE's (no noise); other values refuse other solvers."""
    n = 6
    plans = {}
    for name, config in (("ode", dict(algorithm_type="dpmsolver++")),
                         ("eta0", dict(algorithm_type="sde-dpmsolver++", sde_eta=0.0)),
                         ("eta1", dict(algorithm_type="sde-dpmsolver++", sde_eta=1.0)),
                         ("default", dict(algorithm_type="sde-dpmsolver++"))):
        scheduler = fastsampler.DPMSolverPlusPlusScheduler(solver_order=2, **config)
        scheduler.set_timesteps(n)
        plans[name] = scheduler.plan
    np.testing.assert_allclose(plans["eta0"].coef, plans["ode"].coef, atol=1e-12)
    assert not plans["eta0"].uses_noise and plans["eta1"].uses_noise
    np.testing.assert_array_equal(plans["eta1"].coef, plans["default"].coef)
    for config in (dict(algorithm_type="dpmsolver++", sde_eta=0.5), dict(algorithm_type="sde-dpmsolver++",
                                                                         sde_eta=-1.0),
                   dict(algorithm_type="sde-dpmsolver++", solver_method="singlestep", sde_eta=0.5)):
        with pytest.raises(ValueError, match="sde_eta"):
            fastsampler.DPMSolverPlusPlusScheduler(**config)


def test_final_sigma_is_the_level_the_last_step_lands_on():
    """``set_timesteps(sigmas=…, final_sigma=…)``: the sigmas are the nodes, ``final_sigma`` the level after the last
    step (k-diffusion's last sigma), not a node; misuse is refused by name."""
    scheduler = fastsampler.UniPCScheduler()
    scheduler.set_timesteps(sigmas=[10.0, 3.0, 1.0], final_sigma=0.2)
    np.testing.assert_allclose(scheduler.plan.rho, [10.0, 3.0, 1.0, 0.2])
    assert scheduler.num_inference_steps == 3
    for call in (lambda: scheduler.set_timesteps(5, final_sigma=0.1),
                 lambda: scheduler.set_timesteps(sigmas=[10.0, 3.0], final_sigma=3.0),
                 lambda: scheduler.set_timesteps(sigmas=[10.0, 3.0], final_sigma=-1.0)):
        with pytest.raises(ValueError, match="final_sigma"):
            call()
    flow = fastsampler.UniPCScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)
    flow.set_timesteps(sigmas=[0.9, 0.5], final_sigma=0.1)
    np.testing.assert_allclose(flow.plan.rho, [0.9, 0.5, 0.1])


@pytest.mark.parametrize("case", [0, 1, 2, 3])
def test_the_functions_match_diffusers_schedulers_on_the_digits_network(case):
    """As on the mixture, on the embedded digits DDPM (``DiffusersDenoiser``, float32): each function against
    diffusers' scheduler with the same solver stepped along the same Karras sigmas, ≤ 1e-5."""
    from diffusers import DDPMPipeline

    ours, options, name, config = [DIFFUSERS[0], DIFFUSERS[1], DIFFUSERS[3], DIFFUSERS[5]][case]
    pipe = DDPMPipeline.from_pretrained(fastsampler.assets("digits"))
    model = fk.DiffusersDenoiser(pipe.unet, pipe.scheduler.config)
    deis = name == "DEISMultistepScheduler"
    sig = fk.get_sigmas_karras(8, 0.05, 80.0)[:-1] if deis else fk.get_sigmas_karras(8, 0.05, 80.0)  # DEIS: NaN at 0
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * sig[0]
    with torch.no_grad():
        got = ours(model, x, sig, disable=True, **options)
        want = fk.sample_diffusers(model, x, sig, disable=True, scheduler=getattr(diffusers, name)(
            prediction_type="sample", **config, **({} if deis else {"final_sigmas_type": "zero"})))
    _close(got, want, 1e-5)
