"""The plug-ins of issue 12: epsilon scaling, DualFast, heavy-ball (HB) and GHVB momentum.

Each is a scheduler option that adds a plan transform (GHVB: a builder). Checked here: "off" is the plain plan,
bit for bit; the update formulas against hand-written loops or the papers' tables; HB's order 1 and GHVB-k's order k
on the exact single-Gaussian oracle; DualFast-DDIM as a damped 2M; each plug-in in the DDPM, SD (CFG) and img2img
pipelines, without host syncs in ``step()``, and on the Triton kernel; compositions; and errors that name the
option.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from fastsampler import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.plans.format import OUT_NEXT, OUT_REGISTERS, OUT_STORE, SRC_P, src_register, src_slot
from fastsampler.samplers.ghvb import GHVB, ghvb_weights
from fastsampler.samplers.rules import Nodes, compile_plan
from fastsampler.samplers.transforms.dualfast import effective_d1_weight
from sync_util import forbid_host_reads
from parity_util import index_model, run_loop
from test_convergence import COMMON, STEPS, final_error

D, U, E = DPMSolverPlusPlusScheduler, UniPCScheduler, DEISScheduler

PLAIN = {
    "dpm++1": (D, dict(solver_order=1)),
    "dpm++2M": (D, {}),
    "dpm++3M": (D, dict(solver_order=3)),
    "dpm2-noise": (D, dict(algorithm_type="dpmsolver")),
    "unipc1": (U, dict(solver_order=1)),
    "unipc2": (U, {}),
    "unipc3-bh1": (U, dict(solver_order=3, solver_type="bh1")),
    "deis2": (E, {}),
    "deis3-tab": (E, dict(solver_order=3, solver_type="tab")),
}

#: Plug-in settings that mean "off": the plain solver's plan, exactly.
OFF = {
    "momentum unset": {},
    "hb beta=1": dict(momentum="hb", momentum_beta=1.0),
    "ghvb beta=1": dict(momentum="ghvb", momentum_order=3, momentum_beta=1),
    "epsilon_scaling=1": dict(epsilon_scaling=1.0),
    "epsilon_scaling=[0, 1]": dict(epsilon_scaling=[0.0, 1.0]),
    "dualfast=False": dict(dualfast=False),
    "dualfast scale 0": dict(dualfast=True, dualfast_scale=0.0),
}

#: Plug-ins on, over the solvers they serve (and compositions).
ON = {
    "hb-dpm++2M": (D, dict(momentum="hb", momentum_beta=0.8)),
    "hb-dpm++3M": (D, dict(solver_order=3, momentum="hb", momentum_beta=0.8)),
    "hb-unipc": (U, dict(momentum="hb", momentum_beta=0.8)),
    "hb-deis": (E, dict(momentum="hb", momentum_beta=0.9)),
    "hb-ddim": (D, dict(solver_order=1, momentum="hb", momentum_beta=0.8)),
    "ghvb": (E, dict(momentum="ghvb", momentum_order=3, momentum_beta=0.8)),
    "epsilon_scaling": (D, dict(epsilon_scaling=1.01)),
    "epsilon_scaling-linear-unipc": (U, dict(epsilon_scaling=[0.002, 1.0])),
    "dualfast-ddim": (D, dict(solver_order=1, dualfast=True)),
    "dualfast-dpm++": (D, dict(dualfast=True, dualfast_scale=0.3)),
    "dualfast-unipc-first": (U, dict(dualfast=True, dualfast_reference="first")),
    "dualfast-unipc-x0": (U, dict(dualfast=True, dualfast_space="x0")),
    "es+dualfast+hb": (D, dict(epsilon_scaling=1.005, dualfast=True, momentum="hb", momentum_beta=0.9)),
    "es+ghvb": (D, dict(epsilon_scaling=1.005, momentum="ghvb")),
}
ON_IDS = list(ON)


def plan_of(cls, steps: int = 9, **options):
    s = cls(**options)
    s.set_timesteps(steps)
    return s.plan


def tables(plan):
    return (plan.out_map, plan.coef, plan.writes, plan.write_slot, plan.timesteps, plan.rho)


# "Off" is the plain solver ------------------------------------------------------------------------------------

@pytest.mark.parametrize("off", list(OFF))
@pytest.mark.parametrize("solver", list(PLAIN))
def test_off_is_the_plain_plan_bitwise(solver, off):
    cls, options = PLAIN[solver]
    for steps in (5, 12):
        plain, other = plan_of(cls, steps, **options), plan_of(cls, steps, **options, **OFF[off])
        for a, b in zip(tables(plain), tables(other)):
            assert a.shape == b.shape and a.tobytes() == b.tobytes()
        assert (plain.registers, plain.data_form) == (other.registers, other.data_form)
        assert other.meta["transforms"] == () and other.meta["builder"] == plain.meta["builder"]


# Heavy ball ----------------------------------------------------------------------------------------------------

def _nodes(plan):
    alpha, sigma = plan.alpha, plan.sigma
    rho = sigma / alpha
    with np.errstate(divide="ignore"):
        lam = -np.log(rho)
    return alpha, sigma, rho, lam


def _prediction_loop(scheduler, steps: int, update) -> torch.Tensor:
    """The scheduler's run and a hand-written one (``update(i, x, x0) -> x_next``, float64) from the same start."""
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = run_loop(scheduler, steps, x0)
    x = x0.clone()
    plan = scheduler.plan
    for i in range(steps):
        alpha, sigma = float(plan.alpha[i]), float(plan.sigma[i])
        eps = index_model(x, i)
        x = update(i, x, (x - sigma * eps) / alpha)
    return ours, x


def test_heavy_ball_on_dpmsolver_2m_is_the_papers_recursion():
    """v ← (1 − β)v + β(D0 + ½D1), x ← (σ_t/σ_s)x + α_t(1 − e^{−h})·v (the authors' DPM-Solver++ wrapper), with
    v := D0 on the first step and the first-order slope D0 on the lower-order final step (10 steps < 15)."""
    beta, steps = 0.7, 10
    s = D(momentum="hb", momentum_beta=beta)
    s.set_timesteps(steps)
    alpha, sigma, rho, lam = _nodes(s.plan)
    state = {}

    def update(i, x, d0):
        slope = d0
        if 0 < i < steps - 1:
            r0 = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            slope = d0 + 0.5 * (d0 - state["d"]) / r0
        state["v"] = slope if i == 0 else (1 - beta) * state["v"] + beta * slope
        state["d"] = d0
        return sigma[i + 1] / sigma[i] * x + alpha[i + 1] * (1 - rho[i + 1] / rho[i]) * state["v"]

    ours, theirs = _prediction_loop(s, steps, update)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_heavy_ball_on_unipc_averages_predictor_and_corrector():
    """Both UniPC updates carry a velocity: the predictor's (dead code in the released wrapper) and the
    corrector's; each starts at its first use."""
    plan = plan_of(U, 8, momentum="hb", momentum_beta=0.8)
    v, vc = plan.registers.index("velocity"), plan.registers.index("corrector_velocity")
    steady = plan.coef[plan.levels - 1, 4]
    assert steady[OUT_NEXT, src_register(v)] != 0.0  # the predictor reads its velocity
    assert steady[OUT_REGISTERS + 0, src_register(vc)] != 0.0  # the corrected state reads the corrector's
    assert plan.writes[plan.levels - 1, 4, v] and plan.writes[plan.levels - 1, 4, vc]
    first_corrector = plan.coef[1, 1]  # one step taken: the corrector's first use, v_c := F_c
    assert first_corrector[OUT_REGISTERS + 0, src_register(vc)] == 0.0 and plan.writes[1, 1, vc]
    assert not plan.coef[0, 0, :, src_register(v)].any()  # nothing read on a run's first row


# GHVB ----------------------------------------------------------------------------------------------------------

#: The paper's constant-step GHVB weights on v_{n+1}, v_n, … (reference note A4; × 1/β).
PAPER_GHVB = {
    1: lambda b: [b],
    2: lambda b: [(2 + b) / 2, -(2 - b) / 2],
    3: lambda b: [(18 + 5 * b) / 12, -(24 - 8 * b) / 12, (6 - b) / 12],
    4: lambda b: [(46 + 9 * b) / 24, -(78 - 19 * b) / 24, (42 - 5 * b) / 24, -(10 - b) / 24],
    5: lambda b: [(1650 + 251 * b) / 720, -(3420 - 646 * b) / 720, (2880 - 264 * b) / 720,
                  -(1380 - 106 * b) / 720, (270 - 19 * b) / 720],
}


@pytest.mark.parametrize("k", list(PAPER_GHVB))
def test_ghvb_variable_step_weights_reduce_to_the_papers_on_uniform_steps(k):
    rho = 10.0 - 0.7 * np.arange(k + 2)  # ρ_{n−k} … below: uniform steps δ = −0.7
    for beta in (0.2, 0.5, 0.8, 1.0):
        g = ghvb_weights(beta, rho[1:k + 1], float(rho[0]), float(rho[k + 1]))
        np.testing.assert_allclose(g / (rho[0] - rho[1]), np.array(PAPER_GHVB[k](beta)) / beta, rtol=1e-9, atol=1e-12)


def test_ghvb_with_beta_one_is_adams_bashforth():
    """GHVB(k, β = 1) is AB-k in ρ: the ρAB-DEIS plan (its stored velocities are the predictions)."""
    deis = plan_of(E, 12, solver_order=3, solver_type="rhoab", lower_order_final=False)
    with np.errstate(divide="ignore"):
        lam = np.log(deis.alpha / deis.sigma)
    nodes = Nodes(deis.timesteps, deis.rho, deis.alpha, deis.sigma, lam, deis.flow)
    ghvb = compile_plan(GHVB(3, 1.0, False), nodes, "epsilon")  # the builder alone: the option maps β = 1 to off
    np.testing.assert_allclose(ghvb.coef[:, :, OUT_NEXT], deis.coef[:, :, OUT_NEXT], rtol=1e-12, atol=1e-15)


def test_ghvb_warm_up_and_velocity():
    """First step: plain DDIM, v := ε̂ (A6); later steps store v = βε̂ + (1 − β)v."""
    plan, ddim = plan_of(E, 8, momentum="ghvb", momentum_beta=0.6), plan_of(E, 8, solver_order=1)
    np.testing.assert_allclose(plan.coef[0, 0, OUT_NEXT, :4], ddim.coef[0, 0, OUT_NEXT, :4], rtol=1e-14)
    assert plan.coef[0, 0, OUT_STORE, SRC_P] == 1.0
    store = plan.coef[2, 5, OUT_STORE]
    assert store[SRC_P] == 0.6 and store[src_slot(0, 0)] == pytest.approx(0.4) and plan.slots == 4


# Orders of convergence (the single-Gaussian oracle, Karras grid, 48/96/192 steps) -------------------------------

CONVERGENCE = {
    "hb-dpm++2M": (D, dict(solver_order=2, momentum="hb", momentum_beta=0.8), 1),
    "hb-dpm++3M": (D, dict(solver_order=3, momentum="hb", momentum_beta=0.8), 1),
    "hb-unipc2": (U, dict(solver_order=2, momentum="hb", momentum_beta=0.8, lower_order_final=False), 1),
    "hb-deis2": (E, dict(solver_order=2, momentum="hb", momentum_beta=0.8), 1),
    "ghvb1-0.8": (E, dict(momentum="ghvb", momentum_order=1, momentum_beta=0.8), 1),
    "ghvb2-0.5": (E, dict(momentum="ghvb", momentum_order=2, momentum_beta=0.5), 2),
    "ghvb3-0.5": (E, dict(momentum="ghvb", momentum_order=3, momentum_beta=0.5), 3),
    "ghvb3-0.8-dpm": (D, dict(momentum="ghvb", momentum_order=3, momentum_beta=0.8), 3),
}


def _slope(cls, options, steps=STEPS) -> tuple[float, list[float]]:
    scheduler = cls(**COMMON, **options)
    errors = [final_error(scheduler, n) for n in steps]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0], errors


@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_order_of_convergence(name):
    cls, options, order = CONVERGENCE[name]
    slope, errors = _slope(cls, options)
    assert abs(slope - order) <= 0.3, f"{name}: slope {slope:.2f}, expected {order} (errors {errors})"


def test_ghvb4_order_four():
    """GHVB-4 needs finer grids to show its order (AB-4 itself measures 3.7 on 48–192 steps)."""
    slope, errors = _slope(E, dict(momentum="ghvb", momentum_order=4, momentum_beta=0.8), (96, 192, 384))
    assert abs(slope - 4) <= 0.3, f"slope {slope:.2f} (errors {errors})"


# Epsilon scaling -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("cls,options", [(D, {}), (D, dict(algorithm_type="dpmsolver")), (U, {}), (E, {})])
def test_epsilon_scaling_divides_the_noise_prediction(cls, options, prediction_type):
    """P from the scaled map equals the solver's form of ε̂/λ_i, λ_i = k·(N − 1 − i) + b (ADM-ES's chain index)."""
    k, b, n = 0.004, 1.002, 7
    plain = plan_of(cls, n, prediction_type=prediction_type, **options)
    scaled = plan_of(cls, n, prediction_type=prediction_type, epsilon_scaling=[k, b], **options)
    x, out = 0.7, -1.3
    for i in range(n):
        lam = k * (n - 1 - i) + b
        a, s = plain.alpha[i], plain.sigma[i]
        p = plain.out_map[i] @ [x, out]
        eps = p if not plain.data_form else (x - a * p) / s
        want = eps / lam if not plain.data_form else (x - s * eps / lam) / a
        assert scaled.out_map[i] @ [x, out] == pytest.approx(want, rel=1e-12)
    np.testing.assert_array_equal(scaled.coef, plain.coef)


def test_epsilon_scaling_with_thresholding_and_flow():
    x = 3.0 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for kw in (dict(thresholding=True), dict(use_flow_sigmas=True, prediction_type="flow_prediction")):
        a, b = run_loop(D(**kw), 6, x), run_loop(D(**kw, epsilon_scaling=1.02), 6, x)
        assert torch.isfinite(b).all() and not torch.equal(a, b)


# DualFast ------------------------------------------------------------------------------------------------------

def test_dualfast_on_ddim_is_a_damped_2m():
    """τ = the previous step, mixing ε in the noise-form DDIM: the step is DPM-Solver-2M with D1 weighted
    ``effective_d1_weight`` = c·r0 instead of ½ (note §1.4 item 1): the plan's weight on m_{i−1} is −δ·c·r0/r0, and
    at c = 1/(2 r0) the row is 2M's row."""
    n = 12
    noise_form = dict(algorithm_type="dpmsolver", lower_order_final=False)
    two_m = plan_of(D, n, solver_order=2, **noise_form)
    ddim = plan_of(D, n, solver_order=1, dualfast=True, **noise_form)
    _, _, _, lam = _nodes(two_m)
    last = two_m.levels - 1
    for i in range(1, n - 1):
        r0 = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
        c = 0.15 * i / (n - 1)
        row = ddim.coef[last, i, OUT_NEXT]
        delta = row[src_slot(0, i % 2)] + row[src_slot(0, (i - 1) % 2)]
        assert row[src_slot(0, (i - 1) % 2)] == pytest.approx(-delta * effective_d1_weight(c, r0) / r0, rel=1e-12)
    i = n - 2
    r0 = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
    as_2m = plan_of(D, n, solver_order=1, dualfast=True, dualfast_scale=(n - 1) / (2 * r0 * i), **noise_form)
    assert effective_d1_weight(1 / (2 * r0), r0) == pytest.approx(0.5)
    np.testing.assert_allclose(as_2m.coef[last, i, OUT_NEXT], two_m.coef[last, i, OUT_NEXT], rtol=1e-12, atol=1e-14)
    # on 2M the first-difference weight becomes ½ + c·r0 (item 2)
    mixed = plan_of(D, n, solver_order=2, dualfast=True, **noise_form)
    row, plain_row = mixed.coef[last, 5, OUT_NEXT], two_m.coef[last, 5, OUT_NEXT]
    r0 = (lam[5] - lam[4]) / (lam[6] - lam[5])
    delta = row[src_slot(0, 1)] + row[src_slot(0, 0)]
    assert row[src_slot(0, 0)] == pytest.approx(-delta * effective_d1_weight(0.15 * 5 / 11, r0, 0.5) / r0, rel=1e-12)
    assert abs(row[src_slot(0, 0)]) > abs(plain_row[src_slot(0, 0)])  # a larger first-difference weight


@pytest.mark.parametrize("reference", ["previous", "first"])
def test_dualfast_mixes_eps_in_a_data_form_solver(reference):
    """DPM-Solver++ order 1 (data form) with ε mixed: x̃₀ = (x − σ ε̃)/α, ε̃ = (1 + c)ε̂ − c ε̂_τ, then the DDIM
    step x_next = α_t x̃₀ + (σ_t/σ_s)(x − α_s x̃₀), by hand."""
    steps, scale = 8, 0.4
    s = D(solver_order=1, dualfast=True, dualfast_scale=scale, dualfast_reference=reference)
    s.set_timesteps(steps)
    alpha, sigma, _, _ = _nodes(s.plan)
    seen = []

    def update(i, x, x0):
        eps = (x - alpha[i] * x0) / sigma[i]
        seen.append(eps)
        if i > 0:
            c = scale * i / (steps - 1)
            eps = (1 + c) * eps - c * (seen[-2] if reference == "previous" else seen[0])
            x0 = (x - sigma[i] * eps) / alpha[i]
        return alpha[i + 1] * x0 + sigma[i + 1] / sigma[i] * (x - alpha[i] * x0)

    ours, theirs = _prediction_loop(s, steps, update)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    x0_space = plan_of(D, steps, solver_order=1, dualfast=True, dualfast_scale=scale, dualfast_space="x0")
    assert x0_space.fingerprint() != s.plan.fingerprint()


def test_dualfast_on_unipc_corrector_reuses_the_mixed_prediction():
    """The corrector of [t_{i−1}, t_i] reads D̃_{i−1}, written by row i − 1 into ``dualfast_lead``."""
    plan = plan_of(U, 8, dualfast=True, dualfast_space="x0")
    lead = plan.registers.index("dualfast_lead")
    assert plan.writes[:, :, lead].all()
    assert plan.coef[plan.levels - 1, 4, OUT_REGISTERS + 0, src_register(lead)] != 0.0


# Pipelines -----------------------------------------------------------------------------------------------------

PIPELINE_CASES = ["hb-dpm++2M", "hb-unipc", "ghvb", "epsilon_scaling", "dualfast-dpm++", "dualfast-unipc-first",
                  "es+dualfast+hb"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _with(pipe, name):
    cls, options = ON[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)
    return pipe


def _plain(pipe, name):
    pipe.scheduler = ON[name][0].from_config(pipe.scheduler.config)
    return pipe


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_ddpm_pipeline(name):
    pipe = _with(tp.tiny_ddpm_pipeline(), name)
    out = pipe(num_inference_steps=6, generator=_gen(), output_type="np").images
    assert out.shape == (1, 8, 8, 3) and np.isfinite(out).all()
    np.testing.assert_array_equal(out, pipe(num_inference_steps=6, generator=_gen(), output_type="np").images)


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_sd_pipeline_cfg(name):
    pytest.importorskip("transformers")
    pipe = _with(tp.tiny_sd_pipeline(), name)
    kw = dict(height=16, width=16, num_inference_steps=6, guidance_scale=7.5, output_type="latent")
    lat = pipe("a photo of a cat", generator=_gen(), **kw).images
    assert torch.isfinite(lat).all()
    torch.testing.assert_close(lat, pipe("a photo of a cat", generator=_gen(), **kw).images, rtol=0, atol=0)
    plain = _plain(tp.tiny_sd_pipeline(), name)("a photo of a cat", generator=_gen(), **kw).images
    assert not torch.equal(lat, plain)  # the plug-in acts on the guided output


@pytest.mark.parametrize("strength", [0.5, 1.0])
@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_sd_img2img_pipeline(name, strength):
    """img2img starts mid-grid: warm-up rows there (velocity, references) must be the run's first."""
    pytest.importorskip("transformers")
    pipe = _with(tp.tiny_sd_img2img_pipeline(), name)
    image = torch.rand(1, 3, 16, 16, generator=_gen(123))
    kw = dict(image=image, strength=strength, num_inference_steps=6, guidance_scale=7.5, output_type="np")
    out = pipe("a photo of a cat", generator=_gen(), **kw).images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
    np.testing.assert_array_equal(out, pipe("a photo of a cat", generator=_gen(), **kw).images)


# step(): no host sync; the Triton kernel agrees ----------------------------------------------------------------

@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu", "accelerator-branch"])
def test_step_makes_no_host_sync(monkeypatch, accelerator):
    """As ``test_contract.test_step_makes_no_host_sync``, with every plug-in on."""
    schedulers = [cls(**options) for cls, options in ON.values()] + [
        D(momentum="hb", thresholding=True, sample_max_value=2.0, epsilon_scaling=1.01)]
    for s in schedulers:
        s.set_timesteps(8)
    forbid_host_reads(monkeypatch, accelerator)
    sample = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for s in schedulers:
        x = sample
        for i, t in enumerate(s.timesteps):
            x = s.step(index_model(x, i), t, x, generator=torch.Generator().manual_seed(0)).prev_sample


@pytest.mark.parametrize("name", ON_IDS)
def test_triton_kernel_agrees_on_plugin_rows(name):
    pytest.importorskip("triton")
    from fastsampler.kernels.triton_update import MAX_REGISTERS
    from test_kernels import compare, make_inputs

    cls, options = ON[name]
    plan = plan_of(cls, 7, **options)
    if plan.num_registers > MAX_REGISTERS:
        pytest.skip(f"{plan.num_registers} registers: the torch path serves this plan")
    for w in range(plan.levels):
        for i in range(w, plan.num_steps):
            row = plan.rows[w][i]
            compare(row, *make_inputs((2, 3, 5), torch.float32, row, seed=i))


def test_more_registers_than_the_kernel_takes_the_torch_path():
    """UniPC + DualFast (reference and lead registers) + heavy ball (two velocities): five registers."""
    pytest.importorskip("triton")
    from fastsampler.kernels.dispatch import resolve_kernel
    from fastsampler.kernels.triton_update import MAX_REGISTERS

    plan = plan_of(U, 6, dualfast=True, momentum="hb")
    assert plan.num_registers == 5 > MAX_REGISTERS
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_kernel("triton", device, torch.float32, plan.slots, plan.num_registers) == "torch"
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(run_loop(U(dualfast=True, momentum="hb", kernel="triton"), 6, x.to(device))).all()


# Composition and errors ----------------------------------------------------------------------------------------

def test_plugins_compose_in_their_documented_order():
    plan = plan_of(D, 8, epsilon_scaling=1.01, dualfast=True, momentum="hb", momentum_beta=0.9)
    assert [t["name"] for t in plan.meta["transforms"]] == ["epsilon_scaling", "dualfast", "heavy_ball"]
    assert plan.registers == ("dualfast_reference", "velocity")
    only_es = plan_of(D, 8, epsilon_scaling=1.01)
    np.testing.assert_array_equal(plan.out_map, only_es.out_map)
    ghvb = plan_of(D, 8, epsilon_scaling=1.01, momentum="ghvb")
    assert ghvb.meta["builder"] == "GHVB" and not ghvb.data_form
    assert [t["name"] for t in ghvb.meta["transforms"]] == ["epsilon_scaling"]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(run_loop(D(epsilon_scaling=1.01, dualfast=True, momentum="hb"), 8, x)).all()


@pytest.mark.parametrize("cls,kwargs,match", [
    (D, dict(momentum="nesterov"), r"`momentum` must be one of \('hb', 'ghvb'\)"),
    (D, dict(momentum="hb", momentum_beta=0.0), r"`momentum_beta` must be a number in \(0, 1\]"),
    (D, dict(momentum="hb", momentum_beta=1.5), r"`momentum_beta` must be a number in \(0, 1\]"),
    (D, dict(momentum="hb", momentum_beta=True), "`momentum_beta`"),
    (D, dict(momentum_beta=0.8), "`momentum_beta` needs `momentum`"),
    (D, dict(momentum_order=3), "`momentum_order` needs `momentum`"),
    (D, dict(momentum="hb", momentum_order=3), "`momentum_order` is GHVB's order"),
    (E, dict(momentum="ghvb", momentum_order=0), r"`momentum_order` .* integer in 1\.\.5"),
    (E, dict(momentum="ghvb", momentum_order=2.5), r"`momentum_order` .* integer in 1\.\.5"),
    (E, dict(momentum="ghvb", dualfast=True), "momentum='ghvb' .* `dualfast`"),
    (D, dict(momentum="hb", solver_method="singlestep"), "`momentum` works with the multistep solvers"),
    (D, dict(momentum="hb", algorithm_type="sde-dpmsolver++"), "`momentum` is defined for the probability-flow ODE"),
    (D, dict(epsilon_scaling=2.0), r"`epsilon_scaling` must be a number in \[0.5, 1.5\]"),
    (D, dict(epsilon_scaling=[0.1, 1.0, 2.0]), r"`epsilon_scaling` must be b or \[k, b\]"),
    (D, dict(epsilon_scaling=[0.1, 1.0]), r"`epsilon_scaling` = \[k=0.1, b=1\] gives λ"),
    (D, dict(epsilon_scaling="1.01"), "`epsilon_scaling`"),
    (D, dict(dualfast=True, dualfast_scale=-0.1), r"`dualfast_scale` must be a number in \[0, 1\]"),
    (D, dict(dualfast=True, dualfast_reference="last"), "`dualfast_reference` must be one of"),
    (D, dict(dualfast=True, dualfast_space="v"), "`dualfast_space` must be one of"),
    (D, dict(dualfast_scale=0.1), "`dualfast_scale` needs `dualfast`"),
    (D, dict(dualfast_reference="first"), "`dualfast_reference` needs `dualfast`"),
    (D, dict(dualfast="yes"), "`dualfast` must be True or False"),
    (D, dict(dualfast=True, algorithm_type="sde-dpmsolver++"), "`dualfast` is defined for the probability-flow"),
    (D, dict(dualfast=True, solver_method="singlestep"), "`dualfast` works with the multistep solvers"),
])
def test_bad_values_are_named(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs).set_timesteps(10)
