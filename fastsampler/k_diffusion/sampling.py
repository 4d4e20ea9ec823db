"""Our solvers as k-diffusion sampler functions (also what ComfyUI's ``KSAMPLER`` and A1111 call).

The contract (k-diffusion ``sampling.py``): ``sample_*(model, x, sigmas, extra_args=None, callback=None,
disable=None, **options)``. ``model(x, sigma * ones(batch), **extra_args)`` returns the denoised sample D(x, σ)
of a VE-parametrised model, x = x₀ + σ ε; ``x`` starts at noise already scaled by ``sigmas[0]``; ``sigmas``
decreases, usually to 0; ``callback`` gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per step;
``disable`` turns the progress bar off. Flow-matching models (ComfyUI's CONST sampling: x = (1 − σ) x₀ + σ ε,
``sigmas`` from 1 down) take ``flow=True``.

Every function runs one of our schedulers' plans through ``scheduler.step`` (the same engine as in a diffusers
pipeline, the fused kernel on GPU): the scheduler gets ``sigmas`` as its grid and ``prediction_type="sample"``,
and works on x_VP = α x with α = 1/√(1 + σ²) (flow: α = 1 − σ, x as given). The exponential-integrator updates are
invariant under this scaling — DPM-Solver++(2M) in VP form, x'_VP = (σ'_VP/σ_VP) x_VP + α'(1 − e^{−h}) D, is
x' = (σ'/σ) x + (1 − e^{−h}) D in k-diffusion's form — so the results are k-diffusion's, to rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fastsampler import progress
from fastsampler.samplers.convert import output_from_x0

KModel = Callable[..., torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_sigmas(sigmas: torch.Tensor, flow: bool) -> np.ndarray:
    """``sigmas`` as float64 numpy: 1-D, at least two entries, finite, strictly decreasing, ≥ 0 (flow: ≤ 1)."""
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas)
    values = sigmas.detach().to("cpu", torch.float64).numpy()
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"`sigmas` must be a 1-D tensor of at least 2 noise levels (N steps: N + 1), got shape "
                         f"{tuple(values.shape)}")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or (flow and values[0] > 1):
        raise ValueError(f"`sigmas` must be finite and ≥ 0{' and ≤ 1 (flow)' if flow else ''}, got "
                         f"{values.tolist()}")
    if np.any(np.diff(values) >= 0):
        raise ValueError(f"`sigmas` must be strictly decreasing (a repeated σ is a step of size 0), got "
                         f"{values.tolist()}")
    return values


def scheduler_for(scheduler_class: type, flow: bool, **options: Any):
    """A fresh scheduler of ``scheduler_class`` for a denoiser D (``prediction_type="sample"``; the sampler converts
    D exactly where the scheduler reads another type); ``options`` are its config (solver order, variant, plug-ins,
    the model's training betas for Time-Shift)."""
    # D → the scheduler's prediction type is exact (``output_from_x0``). Time-Shift runs take the ε (flow: velocity)
    # form, which gives our pipeline's ε-model Time-Shift samples (5e-6 on the digits DDPM, Karras sigmas); in the
    # "sample" form they differ by 4e-3 there, though the three forms agree to 1e-15 on an exact mixture on
    # integer timesteps — not explained yet
    prediction = ("flow_prediction" if flow else "epsilon") if options.get("time_shift") else "sample"
    config = {"prediction_type": prediction, **options}
    if flow:
        config.update(use_flow_sigmas=True, flow_shift=1.0)  # ComfyUI hands over shifted sigmas
    return scheduler_class(**config)


def sample_scheduler(model: KModel, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                     callback: Callable[[dict], Any] | None = None, disable: bool | None = None, *,
                     scheduler, flow: bool | None = None, s_noise: float = 1.0,
                     noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Sample with a configured scheduler of ours (a tuned one from ``from_pretrained`` included) along
    ``sigmas``. A scheduler with a tuned plan for len(sigmas) − 1 steps runs that plan; its own σ sequence
    (``fastsampler.k_diffusion.get_sigmas_scheduler``) must then be ``sigmas``. SDE variants draw their noise
    from ``noise_sampler(σ_i, σ_{i+1})`` (default: ``torch.randn_like``), scaled by ``s_noise``."""
    flow = bool(scheduler.config.use_flow_sigmas) if flow is None else flow
    if flow != bool(scheduler.config.use_flow_sigmas):
        raise ValueError(f"`flow={flow}` does not match the scheduler's use_flow_sigmas="
                         f"{scheduler.config.use_flow_sigmas}")
    levels = check_sigmas(sigmas, flow)
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.tensor(levels, dtype=x.dtype, device=x.device)
    steps = len(levels) - 1
    if steps in scheduler.plans:
        scheduler.set_timesteps(steps)
        planned = scheduler.plan.rho
        if not np.allclose(planned, levels, rtol=1e-5, atol=1e-7):
            raise ValueError(f"the scheduler's tuned plan for {steps} steps runs on the sigmas {planned.tolist()}, "
                             f"got {levels.tolist()}: pass get_sigmas_scheduler(scheduler, {steps})")
    else:
        scheduler.set_timesteps(sigmas=levels[:-1].tolist(), final_sigma=float(levels[-1]))
    scheduler.set_begin_index(0)
    plan = scheduler.plan
    alpha, sigma = plan.alpha, plan.sigma
    scale = np.ones_like(alpha) if flow else alpha  # x_VP = α x (VE); a flow model's x is the scheduler's own
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = (lambda sigma, sigma_next: torch.randn_like(x)) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    # Time-Shift's input mode rewrites scheduler.timesteps[i] before step i; only then is a timestep read back
    # (one host read a step), so other runs never synchronise with the device
    shifting = bool(scheduler.config.time_shift) and scheduler.config.time_shift_mode == "input"
    nominal = scheduler.timesteps.clone() if shifting else None
    state = x * float(scale[0])
    for i in progress.bar(range(steps), enabled=not disable):
        a_i, s_i, sigma_i = float(alpha[i]), float(sigma[i]), sigmas[i]
        if shifting and bool(scheduler.timesteps[i] != nominal[i]):  # ok-sync: node moved to τ, σ = ρ(τ)
            a_i, s_i = (float(v[0]) for v in scheduler._alpha_sigma_at(np.array([float(scheduler.timesteps[i])])))
            sigma_i = torch.as_tensor(s_i / a_i if not flow else s_i, dtype=sigmas.dtype, device=sigmas.device)
        x_i = state / (1.0 if flow else a_i)
        denoised = model(x_i, sigma_i * s_in, **extra_args)
        if callback is not None:
            callback({"x": x_i, "i": i, "sigma": sigma_i, "sigma_hat": sigma_i, "denoised": denoised})
        # the output the scheduler's prediction type would give (a tuned plan keeps its model's type)
        a, b = output_from_x0(scheduler.config.prediction_type, a_i, s_i)
        output = denoised if (a, b) == (0.0, 1.0) else a * state + b * denoised
        row = plan.rows[min(i, plan.levels - 1)][i]
        noise = s_noise * noise_sampler(sigmas[i], sigmas[i + 1]) if row.uses_noise else None
        state = scheduler.step(output, scheduler.timesteps[i], state, variance_noise=noise).prev_sample
    return state / float(scale[-1])


def _sampler(scheduler_class_name: str, doc: str, **preset: Any) -> Callable[..., torch.Tensor]:
    """A k-diffusion sampler function on ``scheduler_class_name`` with ``preset`` config (overridable)."""

    def sample(model: KModel, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Callable[[dict], Any] | None = None, disable: bool | None = None, *, flow: bool = False,
               s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None, eta: float | None = None,
               **options: Any) -> torch.Tensor:
        from fastsampler.adapters.registry import SCHEDULERS

        stochastic = str(preset.get("algorithm_type", "")).startswith("sde")
        if eta is not None and stochastic:
            options = {**options, "sde_eta": eta}
        elif eta not in (None, 0, 0.0):
            raise ValueError(f"`eta` must be 0 for this ODE sampler, got {eta!r} (the SDE samplers take η ≥ 0: "
                             "sample_dpmpp_2m_sde, sample_dpmpp_3m_sde)")

        scheduler = scheduler_for(SCHEDULERS[scheduler_class_name], flow, **{**preset, **options})
        return sample_scheduler(model, x, sigmas, extra_args, callback, disable, scheduler=scheduler, flow=flow,
                                s_noise=s_noise, noise_sampler=noise_sampler)

    sample.__doc__ = doc + ("\n\n    Keyword options are the scheduler's config (e.g. ``solver_order``, plug-ins such as "
                            "``momentum``); ``flow=True`` for flow-matching models.")
    return sample


sample_euler = _sampler(
    "DPMSolverPlusPlusScheduler", "DDIM / Euler (k-diffusion ``sample_euler`` without churn): "
    "x' = (σ'/σ) x + (1 − σ'/σ) D.", solver_order=1)
sample_dpmpp_2m = _sampler(
    "DPMSolverPlusPlusScheduler", "DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095; k-diffusion "
    "``sample_dpmpp_2m``): x' = (σ'/σ) x + (1 − e^{−h}) ((1 + 1/2r) D_i − (1/2r) D_{i−1}), first order on the "
    "first step and on a final step to σ = 0.", solver_order=2, lower_order_final=False)
sample_dpmpp_3m = _sampler(
    "DPMSolverPlusPlusScheduler", "DPM-Solver++(3M), the η = 0 form of k-diffusion's ``sample_dpmpp_3m_sde``: "
    "third order from the third step, its second step the \"heun\" second-order form "
    "(+ (1 − (1 − e^{−h})/h)(D_i − D_{i−1})/r), a final step to σ = 0 gives D.",
    solver_order=3, solver_type="heun", lower_order_final=False)
sample_dpmpp_2m_sde = _sampler(
    "DPMSolverPlusPlusScheduler", "DPM-Solver++(2M) SDE (k-diffusion ``sample_dpmpp_2m_sde``; ``eta`` η, default 1; "
    "``solver_type`` midpoint or heun): x' = (σ'/σ) e^{−ηh} x + (1 − e^{−(1+η)h}) D + second-order term + "
    "σ' √(1 − e^{−2ηh}) z, z from ``noise_sampler`` (default i.i.d. ``randn_like``; k-diffusion defaults to a "
    "Brownian tree: pass its ``BrownianTreeNoiseSampler`` for its samples).", solver_order=2, lower_order_final=False,
    algorithm_type="sde-dpmsolver++")
sample_dpmpp_3m_sde = _sampler(
    "DPMSolverPlusPlusScheduler", "DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``; ``eta``, default 1): the "
    "2M SDE's linear and noise terms plus the third-order correction φ₂ D1 − φ₃ D2 (φ₃ = φ₂/h − ½; the sign "
    "k-diffusion has, not diffusers' order-3 SDE), its second step the heun form; noise as ``sample_dpmpp_2m_sde``.",
    solver_order=3, solver_type="heun", lower_order_final=False, algorithm_type="sde-dpmsolver++")
sample_unipc = _sampler(
    "UniPCScheduler", "UniPC (Zhao et al. 2023, arXiv 2302.04867), predictor-corrector, data prediction; "
    "defaults as ComfyUI's ``uni_pc``: B(h) variant bh1, order 3.", solver_order=3, solver_type="bh1")
sample_unipc_bh2 = _sampler(
    "UniPCScheduler", "UniPC with B(h) = e^{−h} − 1 (bh2), order 3, as ComfyUI's ``uni_pc_bh2``.",
    solver_order=3, solver_type="bh2")
sample_deis = _sampler(
    "DEISScheduler", "DEIS (Zhang & Chen 2023, arXiv 2204.13902), multistep, order 3; ``solver_type`` "
    "\"logrho\" (diffusers' variant, default) or \"rhoab\" — both in σ alone.", solver_order=3)
sample_dc = _sampler(
    "DCSolverScheduler", "DC-Solver (Zhao et al. 2024, arXiv 2409.03755): UniPC with dynamic compensation; pass "
    "``dc_ratios`` (one per step) or ``dc_ratios_file``.", solver_order=2)


def sample_diffusers(model: KModel, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                     callback: Callable[[dict], Any] | None = None, disable: bool | None = None, *,
                     scheduler) -> torch.Tensor:
    """One of diffusers' own VP schedulers that read their σ table ``scheduler.sigmas`` at each step
    (``DPMSolverMultistepScheduler``, ``DPMSolverSinglestepScheduler``, ``UniPCMultistepScheduler``,
    ``DEISMultistepScheduler``) with
    ``prediction_type="sample"``, stepped along ``sigmas`` (the last one the final level): the reference our
    functions are checked against, and diffusers' solvers for k-diffusion users."""
    if scheduler.config.prediction_type != "sample":
        raise ValueError(f"the diffusers scheduler must read the model output as the denoised sample "
                         f"(prediction_type='sample'), got {scheduler.config.prediction_type!r}")
    levels = check_sigmas(sigmas, False)
    sigmas = torch.as_tensor(levels, dtype=x.dtype, device=x.device)
    scheduler.set_timesteps(len(levels) - 1)
    scheduler.sigmas = torch.as_tensor(levels)  # float64 on the CPU, as diffusers keeps its table
    alpha = 1.0 / np.sqrt(1.0 + levels ** 2)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    state = x * float(alpha[0])
    for i in progress.bar(range(len(levels) - 1), enabled=not disable):
        x_i = state / float(alpha[i])
        denoised = model(x_i, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x_i, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        state = scheduler.step(denoised, scheduler.timesteps[i], state).prev_sample
    return state / float(alpha[-1])


def midpoint_sigmas(levels: np.ndarray) -> np.ndarray:
    """``levels`` with the log-midpoint √(σ_i σ_{i+1}) inserted into every step but a final one to σ = 0."""
    grid = []
    for i in range(len(levels) - 1):
        grid.append(levels[i])
        if levels[i + 1] > 0:
            grid.append(float(np.sqrt(levels[i] * levels[i + 1])))
    return np.array(grid + [levels[-1]])


def sample_dpmpp_2s(model: KModel, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callable[[dict], Any] | None = None, disable: bool | None = None, *,
                    flow: bool = False, **options: Any) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1 with r = ½), the η = 0 form of k-diffusion's
    ``sample_dpmpp_2s_ancestral``: per step, u = (σ_s/σ_i) x + (1 − e^{−h/2}) D_i at σ_s = √(σ_i σ_{i+1}), then
    x' = (σ_{i+1}/σ_i) x + (1 − e^{−h}) D(u, σ_s) — two model calls a step, one on a final step to σ = 0 (x' = D).
    Our singlestep order-2 scheduler on ``sigmas`` with the midpoints inserted; ``callback`` once a step."""
    from fastsampler.adapters.presets import DPMSolverPlusPlusScheduler

    levels = check_sigmas(sigmas, flow)
    grid = midpoint_sigmas(levels)
    starts = {j: i for i, j in enumerate(np.flatnonzero(np.isin(grid[:-1], levels)))}  # grid node → step index

    def per_step(info: dict) -> None:
        if callback is not None and info["i"] in starts:
            callback({**info, "i": starts[info["i"]]})

    scheduler = scheduler_for(DPMSolverPlusPlusScheduler, flow, **{
        "solver_order": 2, "solver_method": "singlestep", "lower_order_final": False, **options})
    return sample_scheduler(model, x, torch.tensor(grid, dtype=x.dtype, device=x.device), extra_args, per_step,
                            disable, scheduler=scheduler, flow=flow)


def sample_pretrained(model: KModel, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                      callback: Callable[[dict], Any] | None = None, disable: bool | None = None, *,
                      path: str | Path, subfolder: str | None = None, flow: bool | None = None,
                      s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Sample with the scheduler saved in ``path`` (a scheduler folder or a pipeline folder with ``subfolder``),
    e.g. one tuned by ``fastsampler.tune``; ``sigmas`` = ``get_sigmas_pretrained(path, steps)`` for a tuned plan."""
    from fastsampler.k_diffusion.sigmas import load_scheduler

    scheduler = load_scheduler(path, subfolder)
    return sample_scheduler(model, x, sigmas, extra_args, callback, disable, scheduler=scheduler, flow=flow,
                            s_noise=s_noise, noise_sampler=noise_sampler)
