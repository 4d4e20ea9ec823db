"""Convergence order on single-Gaussian data, where the probability-flow ODE has a closed-form solution.

Each solver's RMSE against the exact solution must fall with the number of steps at its theoretical order:
the fitted log-log slope over N = 48, 96, 192 (float64, a Karras grid — on grids uniform in λ the Gaussian case superconverges — final σ = σ_min so the last step
is not a σ → 0 jump) lies within 0.3 of it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsampler import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.eval import gmm

COMMON = dict(noise_schedule="vp_linear", use_karras_sigmas=True, final_sigmas_type="sigma_min")
STEPS = (48, 96, 192)

# (scheduler, options, theoretical order)
CASES = {
    "dpm++1": (DPMSolverPlusPlusScheduler, dict(solver_order=1), 1),
    "dpm++2M-midpoint": (DPMSolverPlusPlusScheduler, dict(solver_order=2), 2),
    "dpm++2M-heun": (DPMSolverPlusPlusScheduler, dict(solver_order=2, solver_type="heun"), 2),
    # diffusers' / DPM-Solver's 3M weights D2 by hφ₃, half the exact integral: formally second order.
    "dpm++3M-diffusers": (DPMSolverPlusPlusScheduler, dict(solver_order=3), 2),
    "dpm++3M-exact": (DPMSolverPlusPlusScheduler, dict(solver_order=3, exact_third_order=True), 3),
    "dpm2-noise": (DPMSolverPlusPlusScheduler, dict(solver_order=2, algorithm_type="dpmsolver"), 2),
    "dpm++2S": (DPMSolverPlusPlusScheduler, dict(solver_order=2, solver_method="singlestep", lower_order_final=False), 2),
    "dpm++3S": (DPMSolverPlusPlusScheduler, dict(solver_order=3, solver_method="singlestep", lower_order_final=False), 3),
    "dpm++3S-heun": (DPMSolverPlusPlusScheduler,
                     dict(solver_order=3, solver_method="singlestep", solver_type="heun", lower_order_final=False), 3),
    # UniC lifts UniP-p to order p + 1 at no extra evaluation.
    "unipc1-bh2": (UniPCScheduler, dict(solver_order=1, lower_order_final=False), 2),
    "unipc2-bh2": (UniPCScheduler, dict(solver_order=2, lower_order_final=False), 3),
    "unipc2-bh1": (UniPCScheduler, dict(solver_order=2, solver_type="bh1", lower_order_final=False), 3),
    "unipc2-noise": (UniPCScheduler, dict(solver_order=2, predict_x0=False, lower_order_final=False), 3),
    "deis1": (DEISScheduler, dict(solver_order=1), 1),
    "deis2-logrho": (DEISScheduler, dict(solver_order=2), 2),
    "deis3-logrho": (DEISScheduler, dict(solver_order=3), 3),
    "deis3-tab": (DEISScheduler, dict(solver_order=3, solver_type="tab"), 3),
    "deis3-rhoab": (DEISScheduler, dict(solver_order=3, solver_type="rhoab"), 3),
}


TAU = 0.3


def final_error(scheduler, n: int, prediction_type: str = "epsilon") -> float:
    """RMSE at the grid's final level against the closed-form solution (``fastsampler.eval.gmm`` is the oracle)."""
    torch.manual_seed(0)
    mu = 0.5 * torch.randn(1, 16, dtype=torch.float64)
    x_start = torch.randn(8, 16, dtype=torch.float64)
    model = gmm.MixtureModel.from_scheduler_config(gmm.MixtureDenoiser(gmm.single_gaussian(mu, TAU)),
                                                   scheduler.config, prediction_type)
    scheduler.set_timesteps(n)
    a0, s0 = (float(v) for v in model.alpha_sigma(scheduler.timesteps[0]))
    x = x_start.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    rho_end = float(scheduler.sigmas[-1])
    exact = gmm.single_gaussian_solution(x_start, mu, TAU, a0, s0, rho_end) / np.sqrt(1.0 + rho_end**2)
    return float((x - exact).pow(2).mean().sqrt())


@pytest.mark.parametrize("name", list(CASES))
def test_order_of_convergence(name: str) -> None:
    cls, options, order = CASES[name]
    scheduler = cls(**COMMON, **options)
    errors = [final_error(scheduler, n) for n in STEPS]
    slope = -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
    assert abs(slope - order) <= 0.3, f"{name}: slope {slope:.2f}, expected {order} (errors {errors})"


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_converge_alike(prediction_type: str) -> None:
    """The same solver on ε-, v- and x₀-parameterised models gives the same trajectory (exact model)."""
    ref = final_error(DPMSolverPlusPlusScheduler(**COMMON, solver_order=2), 48, "epsilon")
    s = DPMSolverPlusPlusScheduler(**COMMON, solver_order=2, prediction_type=prediction_type)
    assert final_error(s, 48, prediction_type) == pytest.approx(ref, rel=1e-6)
