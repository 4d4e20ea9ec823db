"""Plan builders and transforms on their own: plans built and applied without the diffusers adapter.

The oracle is ``fastsampler.eval.gmm`` (exact denoisers and the closed-form solution for Gaussian data); each
builder declares its order of accuracy (``order_of_accuracy``) and the tests read it from there.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from delay_line_transform import DelayLine
from fastsampler.eval import gmm
from fastsampler.kernels.reference import apply_row_torch, init_state
from fastsampler.plans.format import Plan
from fastsampler.samplers.deis import DEIS
from fastsampler.samplers.dpmsolver import DPMSolverMultistep, DPMSolverSinglestep
from fastsampler.samplers.rules import Combo, Nodes, Rule, compile_plan, multistep_order
from fastsampler.samplers.unipc import UniPC
from fastsampler.schedules.grids import GridSpec, vp_grid
from fastsampler.schedules.noise import ContinuousVP

SCHEDULE = ContinuousVP("linear")
TAU = 0.3


def nodes(n: int, **spec) -> Nodes:
    spec = {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", **spec}
    return Nodes.from_grid(vp_grid(SCHEDULE, GridSpec(**spec), n))


def run_plan(plan: Plan, model, x: torch.Tensor) -> torch.Tensor:
    """The sampling loop with nothing but the plan and the torch kernel."""
    history = torch.zeros((plan.slots, *x.shape), dtype=torch.float64)
    state = init_state(plan.num_registers, x)
    for i, t in enumerate(plan.timesteps):
        row = plan.rows[min(i, plan.levels - 1)][i]
        x, state = apply_row_torch(row, x, model(x, float(t)), history, state, None)
    return x


def gaussian_case(prediction_type: str = "epsilon"):
    torch.manual_seed(0)
    mu = 0.5 * torch.randn(1, 16, dtype=torch.float64)
    x = torch.randn(8, 16, dtype=torch.float64)
    model = gmm.MixtureModel(gmm.MixtureDenoiser(gmm.single_gaussian(mu, TAU)), gmm.ContinuousVPTime(SCHEDULE),
                             prediction_type)
    return mu, x, model


def plan_error(builder, n: int, prediction_type: str = "epsilon") -> float:
    nd = nodes(n)
    plan = compile_plan(builder(n) if callable(builder) and not hasattr(builder, "rule") else builder, nd,
                        prediction_type)
    mu, x, model = gaussian_case(prediction_type)
    out = run_plan(plan, model, x)
    a0, s0 = float(nd.alpha[0]), float(nd.sigma[0])
    exact = gmm.single_gaussian_solution(x, mu, TAU, a0, s0, float(nd.rho[-1])) * float(nd.alpha[-1])
    return float((out - exact).pow(2).mean().sqrt())


def _t_of_rho(r):
    return SCHEDULE.t_from_rho(r) * 1000.0


BUILDERS = {
    "dpm++1": DPMSolverMultistep(order=1),
    "dpm++2M": DPMSolverMultistep(order=2),
    "dpm++2M-heun": DPMSolverMultistep(order=2, solver_type="heun"),
    "dpm++3M": DPMSolverMultistep(order=3),
    "dpm++3M-exact": DPMSolverMultistep(order=3, exact_third_order=True),
    "dpm2-noise": DPMSolverMultistep(order=2, algorithm_type="dpmsolver"),
    "dpm++3S": lambda n: DPMSolverSinglestep(order=3, lower_order_final=False, num_steps=n, final_zero=False),
    "unipc2-bh2": UniPC(order=2, lower_order_final=False),
    "unipc2-bh1": UniPC(order=2, solver_type="bh1", lower_order_final=False),
    "unipc1-noise": UniPC(order=1, predict_x0=False, lower_order_final=False),
    "deis3-logrho": DEIS(order=3),
    "deis3-tab": DEIS(order=3, solver_type="tab", t_of_rho=_t_of_rho),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builders_converge_at_their_declared_order(name):
    builder = BUILDERS[name]
    order = (builder(48) if callable(builder) and not hasattr(builder, "rule") else builder).order_of_accuracy
    steps = (48, 96, 192)
    errors = [plan_error(builder, n) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) <= 0.3, f"{name}: slope {slope:.2f}, declared order {order} (errors {errors})"


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_output_map_makes_prediction_types_equivalent(prediction_type):
    """The output map converts every parameterisation to the solver's form: same trajectory (exact model)."""
    builder = UniPC(order=2)
    assert plan_error(builder, 20, prediction_type) == pytest.approx(plan_error(builder, 20), rel=1e-9)


def test_multistep_order_policy():
    nd = nodes(10, final_sigmas_type="zero")
    assert [multistep_order(3, i, i, nd, True, 15) for i in range(10)] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert [multistep_order(3, i, i, nd, False, 15) for i in range(10)][-1] == 1  # λ = ∞ at σ = 0
    nd = nodes(20)
    assert [multistep_order(3, i, i, nd, True, 15) for i in range(20)][-2:] == [3, 3]  # ≥ 15 steps: no lowering
    assert [multistep_order(3, i, i, nd, True, None) for i in range(20)][-2:] == [2, 1]  # UniPC: always
    assert multistep_order(3, 5, 0, nd, True, 15) == 1  # img2img start: no history


def test_plan_tables_are_read_only_and_json_round_trips():
    plan = compile_plan(UniPC(order=3), nodes(7), "epsilon")
    for name in ("coef", "out_map", "writes", "write_slot", "timesteps", "rho"):
        with pytest.raises(ValueError):
            getattr(plan, name)[0] = 1
    with pytest.raises(TypeError):
        plan.meta["prediction_type"] = "sample"
    back = Plan.from_json(plan.to_json())
    assert back.fingerprint() == plan.fingerprint()
    assert dict(back.meta)["builder"] == "UniPC" and back.meta["options"]["order"] == 3
    mu, x, model = gaussian_case()
    torch.testing.assert_close(run_plan(back, model, x), run_plan(plan, model, x), rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(write_slot=np.array([1, 0, 1, 0, 1, 0, 1])), "write_slot"),
    (dict(coef=np.full((4, 7, 3, 8), np.nan)), "finite"),
    (dict(out_map=np.zeros((6, 2))), "out_map"),
])
def test_malformed_plans_are_refused(bad, match):
    plan = compile_plan(UniPC(order=3), nodes(7), "epsilon")
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    with pytest.raises(ValueError, match=match):
        Plan(**{**fields, **bad})


def test_transform_seam_two_registers():
    """A transform in its own test-only file adds two registers (one reading the other) without touching the
    sampler: results are unchanged and the registers hold the last two inputs."""
    nd = nodes(8)
    plain = compile_plan(UniPC(order=2), nd, "epsilon")
    delayed = compile_plan(UniPC(order=2), nd, "epsilon", [DelayLine()])
    assert delayed.registers == ("corrected", "delay_u", "delay_v")
    assert delayed.to_dict()["meta"]["transforms"] == [{"name": "delay_line"}]
    mu, x0, model = gaussian_case()
    inputs = []

    def recording(x, t):
        inputs.append(x.clone())
        return model(x, t)

    history = torch.zeros((delayed.slots, *x0.shape), dtype=torch.float64)
    state = init_state(delayed.num_registers, x0)
    x = x0
    for i, t in enumerate(delayed.timesteps):
        row = delayed.rows[min(i, delayed.levels - 1)][i]
        x, state = apply_row_torch(row, x, recording(x, float(t)), history, state, None)
    torch.testing.assert_close(x, run_plan(plain, model, x0), rtol=0, atol=0)
    torch.testing.assert_close(state[1], inputs[-1], rtol=0, atol=0)
    torch.testing.assert_close(state[2], inputs[-2], rtol=0, atol=0)


@dataclasses.dataclass(frozen=True)
class RuleBuilder:
    """A builder from a bare rule function (data form, two history slots, no registers)."""

    rule: object
    data_form = True
    history = 2
    registers = ()
    order_of_accuracy = 1


def test_rules_that_read_too_far_are_refused():
    reads_ahead = RuleBuilder(lambda i, available, nodes: Rule(Combo(x=1.0, d=(0.5, 0.5))))  # age 1 at a start
    with pytest.raises(AssertionError, match="steps back"):
        compile_plan(reads_ahead, nodes(4), "epsilon")


def test_store_mix_is_persistent_history():
    """A store that mixes history replaces what later steps read, while this step's raw P stays available."""
    def half_store(i, available, nodes):
        store = Combo(p=0.5, d=(0.0, 0.5)) if available else None
        return Rule(Combo(x=0.0, d=(1.0,)), store=store)  # X_next = D̂_i

    plan = compile_plan(RuleBuilder(half_store), nodes(4), "sample")
    outs = [torch.full((3,), v, dtype=torch.float64) for v in (1.0, 2.0, 4.0, 8.0)]
    history = torch.zeros((plan.slots, 3), dtype=torch.float64)
    x, xs = torch.zeros(3, dtype=torch.float64), []
    for i in range(4):
        x, _ = apply_row_torch(plan.rows[min(i, 1)][i], x, outs[i], history, (), None)
        xs.append(float(x[0]))
    assert xs == [1.0, 1.5, 2.75, 5.375]  # D̂_i = (P_i + D̂_{i−1})/2
