"""One plan, two executors: ``step()`` (the scheduler's torch kernel, ``kernels/reference.py``) and the
differentiable runner tuning fits through (``tuning/runner.py``) give the same samples for every kind of plan —
each solver, order and form, the transforms, an S³ plan and a learned-coefficients plan — so a plan tuned through
the runner samples in a pipeline as it was scored. In float64 both are exact to rounding.

Outside the runner by design (it refuses them or never sees them): SDE plans (noise; ``start`` raises, tested),
Time-Shift (its rows are chosen per sample from the sample's variance at run time) and thresholding (a hook on
x̂₀ around the row).
"""

from __future__ import annotations

import pytest
import torch

from fastsampler import DCSolverScheduler, DEISScheduler, DPMSolverPlusPlusScheduler, S3Scheduler, UniPCScheduler
from fastsampler.tuning.runner import run, start
from test_coefficients import FLOW, fitted
from test_tuning import SD, mixture

STEPS = 6
RATIOS = [1.02, 0.98, 1.01, 0.99, 1.03, 1.0]

CASES = {
    "DPM-Solver++ 1": (DPMSolverPlusPlusScheduler, dict(solver_order=1)),
    "DPM-Solver++ 2M": (DPMSolverPlusPlusScheduler, dict(solver_order=2)),
    "DPM-Solver++ 3M, no lower-order final": (DPMSolverPlusPlusScheduler, dict(solver_order=3,
                                                                               lower_order_final=False)),
    "DPM-Solver++ 2M Heun": (DPMSolverPlusPlusScheduler, dict(solver_order=2, solver_type="heun")),
    "DPM-Solver 2M (noise form)": (DPMSolverPlusPlusScheduler, dict(solver_order=2, algorithm_type="dpmsolver")),
    "DPM-Solver++ 2S": (DPMSolverPlusPlusScheduler, dict(solver_order=2, solver_method="singlestep")),
    "DPM-Solver++ 3S exact": (DPMSolverPlusPlusScheduler, dict(solver_order=3, solver_method="singlestep",
                                                               exact_third_order=True)),
    "DPM-Solver++ 2M Karras to sigma_min": (DPMSolverPlusPlusScheduler, dict(use_karras_sigmas=True,
                                                                             final_sigmas_type="sigma_min")),
    "DPM-Solver++ 2M flow": (DPMSolverPlusPlusScheduler, FLOW),
    "DEIS 1": (DEISScheduler, dict(solver_order=1)),
    "DEIS 3": (DEISScheduler, dict(solver_order=3)),
    "UniPC bh2 2": (UniPCScheduler, dict(solver_order=2)),
    "UniPC bh1 3": (UniPCScheduler, dict(solver_order=3, solver_type="bh1")),
    "UniPC noise form": (UniPCScheduler, dict(solver_order=2, predict_x0=False)),
    "UniPC corrector off at 0": (UniPCScheduler, dict(solver_order=2, disable_corrector=[0])),
    "UniPC flow": (UniPCScheduler, FLOW),
    "DC-Solver": (DCSolverScheduler, dict(solver_order=2, dc_ratios=RATIOS)),
    "heavy-ball momentum": (DPMSolverPlusPlusScheduler, dict(momentum="hb", momentum_beta=0.8)),
    "GHVB": (DPMSolverPlusPlusScheduler, dict(momentum="ghvb", momentum_beta=0.8, momentum_order=2)),
    "epsilon scaling": (UniPCScheduler, dict(epsilon_scaling=1.005)),
    "DualFast": (UniPCScheduler, dict(dualfast=True)),
    "S3 preset dpmsolver++3m": (S3Scheduler, dict(usf_preset="dpmsolver++3m")),
    "S3 preset unipc-bh2-2": (S3Scheduler, dict(usf_preset="unipc-bh2-2")),
}


def stepped(scheduler, model, noise: torch.Tensor) -> torch.Tensor:
    """A pipeline's loop: ``step()`` row by row at the scheduler's timesteps. The model gets the plan's float64
    time, as the runner gives it: a flow scheduler's ``timesteps`` are float32 (as diffusers'), which moves a flow
    model's input time by ~1e-7 relative — the model's input, not the executor under test."""
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model(x, float(scheduler.plan.timesteps[i])), t, x, return_dict=False)[0]
    return x


def assert_same_run(scheduler, model, noise: torch.Tensor) -> None:
    through_step = stepped(scheduler, model, noise)
    with torch.no_grad():
        through_runner = run(scheduler.plan, model, noise)[0]
    assert through_step.dtype == through_runner.dtype == torch.float64
    torch.testing.assert_close(through_runner, through_step, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_step_and_the_runner_run_a_plan_alike(name):
    cls, options = CASES[name]
    scheduler = cls(**({} if options.get("use_flow_sigmas") else SD), **options)
    scheduler.set_timesteps(STEPS)
    model, noise = mixture(scheduler.config, 8, seed=1)
    assert_same_run(scheduler, model, noise)


def test_a_searched_s3_plan_runs_alike():
    """A shipped S³ schedule (searched on the digits DDPM), loaded from its folder with its plans (the class
    its config names)."""
    import fastsampler

    scheduler = S3Scheduler.from_pretrained(fastsampler.assets("digits-s3"))
    n = min(scheduler.plans)
    scheduler.set_timesteps(n)
    model, noise = mixture(scheduler.config, 8, seed=2)
    assert_same_run(scheduler, model, noise)


@pytest.mark.parametrize("cls", [UniPCScheduler, DEISScheduler])
def test_a_learned_coefficients_plan_runs_alike(cls):
    """A plan from ``learn_coefficients`` (its rows learned, not the builder's) installed with ``set_plan``."""
    scheduler = cls(**SD)
    plan, _, model, noise, _ = fitted(scheduler, 5, iters=4)
    assert plan.fingerprint() != scheduler.plan.fingerprint()  # learned, not the builder's plan handed back
    scheduler.set_plan(plan)
    scheduler.set_timesteps(5)
    assert scheduler.plan is plan
    assert_same_run(scheduler, model, noise)


def test_the_runner_refuses_a_plan_that_draws_noise():
    scheduler = DPMSolverPlusPlusScheduler(**SD, algorithm_type="sde-dpmsolver++")
    scheduler.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="SDE"):
        start(scheduler.plan, torch.zeros(2, 4, dtype=torch.float64))
