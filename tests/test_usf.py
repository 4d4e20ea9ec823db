"""USF / S³ schedules as plans: the hand-designed solvers inside the space, JSON and released-format round trips,
the update against USF's sampling loop written out, convergence orders, and ``S3Scheduler`` in a pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

import tiny_pipelines as tp
from fastsampler import DPMSolverPlusPlusScheduler, S3Scheduler, UniPCScheduler
from fastsampler.plans.format import Plan
from fastsampler.samplers.phi import phi
from fastsampler.samplers.rules import compile_plan
from fastsampler.samplers.usf import USF
from fastsampler.samplers.usf_released import load_released, schedule_from_released
from fastsampler.samplers.usf_schedule import USFSchedule, USFStep
from parity_util import run_loop
from test_samplers import gaussian_case, nodes, plan_error, run_plan

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DDPM = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)

# ------------------------------------------------------------------------------------------------------------
# Presets equal the hand-designed solvers
# ------------------------------------------------------------------------------------------------------------

HAND_DESIGNED = {
    "dpmsolver++2m": (DPMSolverPlusPlusScheduler, dict(solver_order=2)),
    "dpmsolver++3m": (DPMSolverPlusPlusScheduler, dict(solver_order=3, exact_third_order=True)),
    "dpmsolver++2m-heun": (DPMSolverPlusPlusScheduler, dict(solver_order=2, solver_type="heun")),
    "dpmsolver2m": (DPMSolverPlusPlusScheduler, dict(solver_order=2, algorithm_type="dpmsolver")),
    "unipc-bh1-2": (UniPCScheduler, dict(solver_order=2, solver_type="bh1")),
    "unipc-bh2-2": (UniPCScheduler, dict(solver_order=2, solver_type="bh2")),
    "unipc-bh1-3": (UniPCScheduler, dict(solver_order=3, solver_type="bh1")),
    "unipc-bh2-3": (UniPCScheduler, dict(solver_order=3, solver_type="bh2")),
    "unipc-bh2-2-noise": (UniPCScheduler, dict(solver_order=2, predict_x0=False)),
}
GRIDS = {"linspace": {}, "karras": dict(use_karras_sigmas=True)}


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(HAND_DESIGNED))
def test_presets_equal_hand_designed_solvers(name, prediction_type, grid):
    """Every coefficient of every warm-up level, and whole sampling loops, within 1e-10."""
    cls, options = HAND_DESIGNED[name]
    config = dict(SD, prediction_type=prediction_type, **GRIDS[grid])
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (5, 8, 20):
        theirs, ours = cls(**config, **options), S3Scheduler(**config, usf_preset=name)
        theirs.set_timesteps(steps)
        ours.set_timesteps(steps)
        a, b = theirs.plan, ours.plan
        assert (b.registers, b.slots, b.levels, b.data_form) == (a.registers, a.slots, a.levels, a.data_form)
        np.testing.assert_allclose(b.coef, a.coef, rtol=0, atol=1e-10)
        np.testing.assert_array_equal(b.writes, a.writes)
        np.testing.assert_array_equal(b.out_map, a.out_map)
        torch.testing.assert_close(run_loop(ours, steps, x), run_loop(theirs, steps, x), rtol=0, atol=1e-10)


def test_diffusers_default_3m_is_outside_the_space():
    """diffusers' 3M weights D2 by hφ₃ (half the exact integral): not a USF point; the preset is the exact one."""
    ours, theirs = S3Scheduler(**SD, usf_preset="dpmsolver++3m"), DPMSolverPlusPlusScheduler(**SD, solver_order=3)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    assert np.abs(ours.plan.coef - theirs.plan.coef).max() > 1e-4


# ------------------------------------------------------------------------------------------------------------
# USF's sampling loop written out (uni_sampler.sample), against the plan
# ------------------------------------------------------------------------------------------------------------

def _usf_relaxation(kind, coefficient, h, hh):
    """USF's ``relax_derivative`` in its own closed forms."""
    if kind is None:
        return 1.0
    if kind == "linear":
        return 1.0 + coefficient * h
    if kind in ("dpmsolver-2", "unipc-bh2"):
        return 0.5 * hh * math.expm1(hh) / (math.expm1(hh) - hh)
    if kind == "unipc-bh1":
        return 0.5 * hh * hh / (math.expm1(hh) - hh)
    return 1.0 + (0.5 if kind == "0.5exp" else -0.5) * math.expm1(hh)


def reference_usf(schedule: USFSchedule, nd, model, x: torch.Tensor, start: int = 0, times=None) -> torch.Tensor:
    """Both ε̂ and x̂₀ buffered at every evaluated node (x̂₀ = (x̃ − σ ε̂)/α at the sample x̃ the model saw); a
    pseudo-corrector recomputes the step from its start with the new evaluation; the next step starts from the
    corrected state. A run from node ``start`` > 0 makes, where a step's choices need more history than it has,
    the choices of the schedule's step ``i − start``; ``times``: the model times to call the model with."""
    a, s, lam = nd.alpha, nd.sigma, nd.lam
    times = nd.timesteps if times is None else times
    eps, x0 = {}, {}

    def evaluate(j, xj):
        e = xj if (j == 0 and schedule.afs == "zero_x0") else model(xj, times[j])
        eps[j], x0[j] = e, (xj - float(s[j]) * e) / float(a[j])

    def update(xs, i, order, derivatives, prediction):
        data = prediction == "data"
        f = x0 if data else eps
        h = float(lam[i + 1] - lam[i])
        hh = -h if data else h
        out = (float(s[i + 1] / s[i]) if data else float(a[i + 1] / a[i])) * xs
        for k in range(order):
            weight = (float(a[i + 1]) if data else -float(s[i + 1])) * h ** (k + 1) * phi(k + 1, hh)
            if k == 0:
                out = out + weight * f[i]
                continue
            d = derivatives[k - 1]
            dl = np.array([float(lam[i + p] - lam[i]) for p in d.points])
            system = np.array([dl**m / math.factorial(m) for m in range(1, len(dl) + 1)])
            w = np.linalg.solve(system, np.eye(len(dl))[k - 1])
            est = sum(float(wj) * (f[i + p] - f[i]) for wj, p in zip(w, d.points))
            out = out + weight * _usf_relaxation(d.relaxation, d.coefficient, h, hh) * est
        return out

    evaluate(start, x)
    n = nd.num_steps
    for i in range(start, n):
        step = schedule.steps[i] if schedule.steps[i].lookback <= i - start else schedule.steps[i - start]
        new = update(x, i, step.order, step.predictor(), step.prediction)
        if i < n - 1:
            evaluate(i + 1, new)
        if step.correction() is not None:
            new = update(x, i, step.order + 1, step.correction(), step.prediction)
        x = new
    return x


MIXED = USFSchedule((
    USFStep(1, "noise", corrector="pseudo", corrector_relaxation="unipc-bh1"),
    USFStep(2, "data", relaxation="linear", coefficient=0.3, corrector="pseudo"),
    USFStep(3, "noise", estimate=1, corrector="pseudo"),
    USFStep(2, "noise", relaxation="dpmsolver-2"),
    USFStep(4, "data", estimate=2, corrector="pseudo", corrector_relaxation="linear", corrector_coefficient=-0.2),
    USFStep(3, "noise", corrector="pseudo"),
    USFStep(2, "data", relaxation="0.5exp", corrector="pseudo"),
    USFStep(1, "noise"),
), afs="zero_x0")


def _only(prediction: str) -> USFSchedule:
    return USFSchedule(tuple(USFStep(**{**s.to_dict(), "prediction": prediction}) for s in MIXED.steps), afs="zero_x0")


@pytest.mark.parametrize("schedule", [MIXED, _only("noise"), _only("data")], ids=["mixed", "noise", "data"])
def test_plan_equals_usf_sampling_loop(schedule):
    nd = nodes(schedule.num_steps)
    _, x, model = gaussian_case()
    plan = compile_plan(USF(schedule), nd, "epsilon")
    assert plan.data_form == (schedule.predictions != {"noise"})
    assert ("sample_1" in plan.registers) == (len(schedule.predictions) == 2)
    torch.testing.assert_close(run_plan(plan, model, x), reference_usf(schedule, nd, model, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("start", [1, 3])
def test_img2img_start_replays_the_schedules_warm_up(start):
    """A run from step ``start`` (``set_begin_index``, as img2img) through S3Scheduler equals USF's loop from that
    node with the schedule's own warm-up choices."""
    scheduler = S3Scheduler(noise_schedule="vp_linear", use_karras_sigmas=True, final_sigmas_type="sigma_min",
                            usf_schedule=MIXED.to_dict())
    scheduler.set_timesteps(MIXED.num_steps)
    nd = nodes(MIXED.num_steps)
    np.testing.assert_allclose(scheduler.plan.rho, nd.rho, rtol=1e-12)
    _, x, model = gaussian_case()
    scheduler.set_begin_index(start)
    out = x
    for t in scheduler.timesteps[start:]:
        out = scheduler.step(model(out, t), t, out).prev_sample
    ref = reference_usf(MIXED, nd, model, x, start, times=scheduler.timesteps)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------------------
# Convergence on the exact Gaussian
# ------------------------------------------------------------------------------------------------------------

def steady(make_step):
    """A schedule of N copies of ``make_step(j)``, with the plain lower orders as warm-up and no final corrector."""
    def build(n: int) -> USF:
        steps = []
        for j in range(n):
            step = make_step(j)
            if step.lookback > j:
                step = USFStep(j + 1, step.prediction, corrector=step.corrector)
            if j == n - 1:
                step = USFStep(**{**step.to_dict(), "corrector": "none", "corrector_relaxation": None,
                                  "corrector_coefficient": 0.0})
            steps.append(step)
        return USF(USFSchedule(tuple(steps)))
    return build


CONVERGENCE = {
    "data-3": steady(lambda j: USFStep(3, "data")),
    "noise-2-pseudo": steady(lambda j: USFStep(2, "noise", corrector="pseudo")),
    "alternating-2-pseudo": steady(lambda j: USFStep(2, ("data", "noise")[j % 2], corrector="pseudo")),
    "data-3-estimate-1": steady(lambda j: USFStep(3, "data", estimate=1)),
    "data-2-linear": steady(lambda j: USFStep(2, "data", relaxation="linear", coefficient=1.0)),
}
DECLARED = {"data-3": 3, "noise-2-pseudo": 3, "alternating-2-pseudo": 3, "data-3-estimate-1": 2, "data-2-linear": 2}


@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_usf_converges_at_its_declared_order(name):
    build = CONVERGENCE[name]
    order = build(48).order_of_accuracy
    assert order == DECLARED[name]
    steps = (48, 96, 192)
    errors = [plan_error(build, n) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) <= 0.3, f"{name}: slope {slope:.2f}, declared order {order} (errors {errors})"


# ------------------------------------------------------------------------------------------------------------
# Schedules as data: JSON round trips and refusals
# ------------------------------------------------------------------------------------------------------------

def test_schedule_json_round_trips():
    schedule = USFSchedule(MIXED.steps, afs="zero_x0", timesteps=tuple(range(799, -1, -100)), meta={"note": "x"})
    back = USFSchedule.from_json(schedule.to_json())
    assert back == schedule and back.to_dict() == schedule.to_dict()
    assert json.loads(schedule.to_json())["format"] == "fastsampler-usf/1"
    assert USFStep(2, "noise").to_dict() == {"order": 2, "prediction": "noise"}  # defaults are left out
    plan = compile_plan(USF(schedule), nodes(8), "epsilon")
    assert plan.to_dict()["meta"]["options"]["schedule"] == schedule.to_dict()  # plans record their schedule
    assert Plan.from_json(plan.to_json()).fingerprint() == plan.fingerprint()


def _valid() -> dict:
    return USFSchedule((USFStep(1, "data", corrector="pseudo"), USFStep(2, "noise"), USFStep(1, "data"))).to_dict()


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(format="usf/0"), "`format`"),
    (lambda d: d["steps"][1].update(order=5), r"steps\[1\]: `order`"),
    (lambda d: d["steps"][1].update(prediction="v3"), r"steps\[1\]: `prediction`"),
    (lambda d: d["steps"][1].update(estimate=2), r"steps\[1\]: `estimate`"),
    (lambda d: d["steps"][1].update(relaxation="cubic"), r"steps\[1\]: `relaxation`"),
    (lambda d: d["steps"][1].update(coefficient=0.1), r"steps\[1\]: `coefficient`"),
    (lambda d: d["steps"][0].update(relaxation="linear"), r"steps\[0\]: `relaxation`.*first-order"),
    (lambda d: d["steps"][1].update(corrector_relaxation="unipc-bh1"), r"steps\[1\]: `corrector_relaxation`"),
    (lambda d: d["steps"][1].update(corrector="implicit"), r"steps\[1\]: `corrector`"),
    (lambda d: d["steps"][1].update(order=3), r"steps\[1\].*read 2 earlier predictions"),
    (lambda d: d["steps"][2].update(corrector="pseudo"), r"steps\[2\]: the final step cannot have a corrector"),
    (lambda d: d["steps"][1].update(taylor=2), r"steps\[1\]: unknown key"),
    (lambda d: d.update(afs="average_x0"), "`afs`"),
    (lambda d: d.update(timesteps=[999, 500]), "`timesteps` has 2 entries for 3 steps"),
    (lambda d: d.update(steps=[]), "`steps` must not be empty"),
])
def test_bad_schedules_are_refused_by_name(edit, match):
    d = _valid()
    edit(d)
    with pytest.raises(ValueError, match=match):
        USFSchedule.from_dict(d)


# ------------------------------------------------------------------------------------------------------------
# The released S³ format
# ------------------------------------------------------------------------------------------------------------

def _difference(points, relaxation=None, **extra):
    return {"estimate": f"Difference_{len(points)}", "active_points": list(points), "relaxation": relaxation, **extra}


def released_decision() -> dict:
    """A tiny decision in the structure of thu-nics/USF ``solver_schedules/*.pth`` (synthetic values)."""
    none = {"type": "no_corrector", "start_point": None, "taylor_order": None, "derivative_type": None}
    return {
        "timesteps": torch.tensor([1.0, 0.7, 0.45, 0.2, 0.0014]),
        "orders": [1, 2, 3, 2],
        "prediction_types": ["data_prediction", "noise_prediction", "data_prediction", "noise_prediction"],
        "start_points": [-1, -1, -1, -1],
        "derivative_types": [
            [],
            [_difference([-2], "linear", relaxation_coefficient=0.02)],
            [_difference([-2], "linear", relaxation_coefficient=-0.01), _difference([-3, -2])],
            [_difference([-2])],
        ],
        "corrector_types": [
            {"type": "pseudo", "start_point": -2, "taylor_order": 2, "derivative_type": [_difference([-1])]},
            none,
            {"type": "pseudo", "start_point": -2, "taylor_order": 4,
             "derivative_type": [_difference([-3, -1], relaxation_coefficient=-0.01), _difference([-4, -3, -1]),
                                 _difference([-4, -3, -1])]},
            none,
        ],
        "afs": "zero_x0",
        "skip_coefficients": torch.ones(4),
    }


EXPECTED_RELEASED = USFSchedule((
    USFStep(1, "data", corrector="pseudo"),
    USFStep(2, "noise", relaxation="linear", coefficient=0.02),
    USFStep(3, "data", estimate=1, relaxation="linear", coefficient=-0.01, corrector="pseudo"),
    USFStep(2, "noise"),
), afs="zero_x0", timesteps=(999.0, 699.0, 449.0, 199.0))


def test_released_schedule_loads(tmp_path):
    """``.pth`` through torch.load(weights_only=True) (a [decision, numpy FID] list), and its JSON export."""
    pth = tmp_path / "nfe3.pth"
    torch.save([released_decision(), np.float64(12.5)], pth)
    schedule = load_released(pth)
    assert schedule == EXPECTED_RELEASED and schedule.meta["search_fid"] == 12.5
    exported = tmp_path / "nfe3.json"
    decision = released_decision()
    exported.write_text(json.dumps({**decision, "timesteps": decision["timesteps"].tolist(),
                                    "skip_coefficients": decision["skip_coefficients"].tolist()}))
    assert load_released(exported) == EXPECTED_RELEASED
    assert load_released(pth, time_input="continuous").timesteps == pytest.approx((1000, 700, 450, 200), abs=1e-4)
    assert load_released(pth, time_input=None).timesteps is None

    scheduler = S3Scheduler.from_released(pth, dict(DDPM))
    scheduler.set_timesteps()
    assert scheduler.timesteps.tolist() == [999, 699, 449, 199]
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(run_loop(scheduler, None, x, set_kwargs={})).all()


class _Payload:
    pass


def test_released_files_never_unpickle_code(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({**released_decision(), "extra": _Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights.only"):
        load_released(path)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["prediction_types"].__setitem__(1, "dpmsolver_v3_prediction"), r"prediction_types\[1\]"),
    (lambda d: d["start_points"].__setitem__(2, -2), r"start_points\[2\]"),
    (lambda d: d["derivative_types"][1][0].update(active_points=[-3]), r"derivative_types\[1\]\[0\]\.active_points"),
    (lambda d: d["derivative_types"][2][1].update(estimate="Difference_1", active_points=[-3]),
     r"derivative_types\[2\]\[1\]"),
    (lambda d: d["derivative_types"][1][0].update(relaxation="quadratic"), r"derivative_types\[1\]\[0\]\.relaxation"),
    (lambda d: d["derivative_types"][1][0].update(estimate="Spline_1"), r"derivative_types\[1\]\[0\]\.estimate"),
    (lambda d: d["corrector_types"][0].update(type="implicit"), r"corrector_types\[0\]\.type"),
    (lambda d: d["corrector_types"][0].update(taylor_order=3), r"corrector_types\[0\]"),
    (lambda d: d["corrector_types"][2]["derivative_type"][1].update(active_points=[-5, -3, -1]),
     r"corrector_types\[2\]\.derivative_type"),
    (lambda d: d["corrector_types"].__setitem__(3, d["corrector_types"][0]), r"corrector_types\[3\]"),
    (lambda d: d.update(afs="average_x0"), "afs"),
    (lambda d: d.update(skip_coefficients=torch.tensor([1.0, 0.98, 1.0, 1.0])), "skip_coefficients"),
])
def test_released_choices_outside_the_space_are_refused(edit, match):
    decision = released_decision()
    edit(decision)
    with pytest.raises(ValueError, match=match):
        schedule_from_released(decision)


def test_skip_coefficients_can_be_dropped_explicitly():
    decision = {**released_decision(), "skip_coefficients": torch.tensor([0.9, 1.0])}
    assert schedule_from_released(decision, ignore_skip_coefficients=True) == EXPECTED_RELEASED


# ------------------------------------------------------------------------------------------------------------
# S3Scheduler
# ------------------------------------------------------------------------------------------------------------

FIVE = USFSchedule((
    USFStep(1, "data", corrector="pseudo", corrector_relaxation="unipc-bh2"),
    USFStep(2, "noise", relaxation="linear", coefficient=0.1, corrector="pseudo"),
    USFStep(3, "data", estimate=1),
    USFStep(2, "data", corrector="pseudo"),
    USFStep(1, "noise"),
), afs="zero_x0")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ddpm_loop(pipe, scheduler, steps: int, seed: int) -> np.ndarray:
    """What DDPMPipeline does, written out."""
    generator = _gen(seed)
    cfg = pipe.unet.config
    x = randn_tensor((1, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator,
                     device=torch.device("cpu"), dtype=pipe.unet.dtype)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.unet(x, t).sample, t, x, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_s3_scheduler_in_a_ddpm_pipeline():
    pipe = tp.tiny_ddpm_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = S3Scheduler.from_config(pipe.scheduler.config, usf_schedule=FIVE)
    assert pipe.scheduler.config.usf_schedule == FIVE.to_dict()  # stored as JSON-able data
    out = pipe(num_inference_steps=5, generator=_gen(0), output_type="np").images
    assert out.shape == (1, 8, 8, 3) and np.isfinite(out).all()
    np.testing.assert_array_equal(out, pipe(num_inference_steps=5, generator=_gen(0), output_type="np").images)
    ref = _ddpm_loop(pipe, S3Scheduler.from_config(pipe.scheduler.config), 5, 0)
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="`usf_schedule` has 5 steps.*num_inference_steps=6"):
        pipe(num_inference_steps=6, generator=_gen(0), output_type="np")


def test_s3_default_preset_is_unipc_in_a_pipeline():
    pipe = tp.tiny_ddpm_pipeline()
    ours = _ddpm_loop(pipe, S3Scheduler.from_config(pipe.scheduler.config), 6, 0)
    theirs = _ddpm_loop(pipe, UniPCScheduler.from_config(pipe.scheduler.config), 6, 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize("options", [
    dict(usf_preset="dpmsolver++3m"),
    dict(usf_schedule=FIVE.to_dict()),
    dict(usf_schedule=USFSchedule(FIVE.steps, timesteps=(980.0, 700.0, 420.0, 200.0, 50.0)).to_dict()),
], ids=["preset", "schedule", "schedule-with-timesteps"])
def test_s3_config_round_trips(options, tmp_path):
    scheduler = S3Scheduler(**DDPM, **options)
    scheduler.set_timesteps(5)
    scheduler.save_pretrained(tmp_path / "s3")
    loaded = S3Scheduler.from_pretrained(tmp_path / "s3")
    for other in (loaded, S3Scheduler.from_config(scheduler.config), S3Scheduler.from_config(loaded.config)):
        assert _public(other.config) == _public(scheduler.config)
        other.set_timesteps(5)
        assert other.plan.fingerprint() == scheduler.plan.fingerprint()
    if "timesteps" in options.get("usf_schedule", {}):
        assert scheduler.timesteps.tolist() == [980, 700, 420, 200, 50]
    pipe = tp.tiny_ddpm_pipeline()
    pipe.scheduler = scheduler
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe").scheduler
    assert type(reloaded) is S3Scheduler and _public(reloaded.config) == _public(scheduler.config)


@pytest.mark.parametrize("options,match", [
    (dict(usf_preset="unipc-bh2-2", usf_schedule=FIVE.to_dict()), "`usf_schedule` or `usf_preset`, not both"),
    (dict(usf_preset="ddim-9"), "`usf_preset` must be one of"),
    (dict(usf_schedule={**FIVE.to_dict(), "afs": "average_x0"}), "`usf_schedule` is invalid.*`afs`"),
])
def test_s3_options_are_refused_by_name(options, match):
    with pytest.raises(ValueError, match=match):
        S3Scheduler(**DDPM, **options)
