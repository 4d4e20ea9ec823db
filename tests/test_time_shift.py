"""Time-Shift sampler (``time_shift=True``; fastsampler.samplers.transforms.time_shift, arXiv 2305.15583).

The exact oracle here is data concentrated at x₀ = 0: the exact noise prediction is ε̂ = x/σ_t at whatever time t
the model is given, every solver maps x_t to (σ_next/σ_t)·x_t, and a start with per-sample variance exactly σ_0²
keeps var(x_i) = σ_i² = 1 − ᾱ_i at every node — so the unshifted time must be picked. A start whose variance is off
by a factor k is off by k at every node without the shift; with it, the first shifted step moves to the time whose
σ² matches and the mismatch disappears, which checks that the model got the shifted time *and* that the row treated
the sample as sitting there.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch._dynamo

from fastsampler import DEISScheduler, DPMSolverPlusPlusScheduler, PlanScheduler, UniPCScheduler
from fastsampler.kernels.time_shift import sample_variance
from fastsampler.samplers.transforms import time_shift
from sync_util import forbid_host_reads
from parity_util import index_model, run_loop
from test_compile import model as compile_model
from test_compile import test_steady_state_step_is_one_graph as steady_state_is_one_graph

# Solvers that resume from a saved state warn (tested in test_solvers_that_resume_from_a_saved_state_warn).
pytestmark = pytest.mark.filterwarnings("ignore:time_shift. this solver integrates again:UserWarning")

DDPM = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing")
SOLVERS = [
    (DPMSolverPlusPlusScheduler, {}),
    (DPMSolverPlusPlusScheduler, dict(solver_order=3)),
    (DPMSolverPlusPlusScheduler, dict(solver_method="singlestep", solver_order=3)),
    (DPMSolverPlusPlusScheduler, dict(algorithm_type="sde-dpmsolver++")),
    (UniPCScheduler, dict(solver_order=3, solver_type="bh1")),
    (DEISScheduler, {}),
    (DEISScheduler, dict(solver_type="tab", solver_order=3)),
]
IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for c, o in SOLVERS]
ODE_SOLVERS = [p for p in SOLVERS if "sde" not in p[1].get("algorithm_type", "")]  # the variance oracle is exact
ODE_IDS = [i for i, p in zip(IDS, SOLVERS) if p in ODE_SOLVERS]


def point_mass_model(scheduler: PlanScheduler):
    """ε̂ = x/σ_t, exact for x₀ = 0, at the model time it is given (one value or one per sample)."""
    alphas_cumprod = scheduler.alphas_cumprod.double()

    def model(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).long()
        sigma = (1 - alphas_cumprod[t]).sqrt().reshape(-1, *[1] * (x.ndim - 1))
        return (x / sigma).to(x.dtype)

    return model


def with_variance(variances, shape=(3, 8, 8), seed: int = 0) -> torch.Tensor:
    """float64 samples whose unbiased variance over their entries is exactly ``variances[b]``."""
    e = torch.randn(len(variances), *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    flat = e.reshape(len(variances), -1)
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)
    return (flat * torch.as_tensor(variances, dtype=torch.float64).sqrt()[:, None]).reshape(e.shape)


def sample(scheduler, model, x, per_sample: bool = False, seen: list | None = None, stop: int | None = None
           ) -> torch.Tensor:
    """A pipeline's loop (``for t in timesteps``), or a loop that gives the model one time per sample; ``stop``:
    only that many steps (as SDXL's ``denoising_end``)."""
    for t in scheduler.timesteps[:stop]:
        if per_sample:
            t = scheduler.per_sample_timesteps(x.shape[0])
        if seen is not None:
            seen.append(t.clone())
        x = scheduler.step(model(x, t), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    return x


def nominal_timesteps(scheduler: PlanScheduler, *args, **kwargs) -> torch.Tensor:
    fresh = type(scheduler).from_config(scheduler.config, time_shift=False, time_shift_window=None,
                                        time_shift_cutoff=None, time_shift_mode="input", time_shift_data_variance=0.0)
    fresh.set_timesteps(*args, **kwargs)
    return fresh.timesteps


# Options ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(time_shift=1), "`time_shift` must be True or False"),
    (dict(time_shift=True, time_shift_window=-2), "`time_shift_window`"),
    (dict(time_shift=True, time_shift_window=2.5), "`time_shift_window`"),
    (dict(time_shift=True, time_shift_cutoff=float("nan")), "`time_shift_cutoff`"),
    (dict(time_shift=True, time_shift_mode="shift"), "`time_shift_mode`"),
    (dict(time_shift=True, time_shift_data_variance=-0.1), "`time_shift_data_variance`"),
    (dict(time_shift=True, time_shift_data_variance=1.0), "`time_shift_data_variance=1`"),
    (dict(time_shift_window=20), "`time_shift_window` is set but `time_shift=False`"),
    (dict(time_shift_mode="target"), "`time_shift_mode` is set but `time_shift=False`"),
    (dict(time_shift=True, thresholding=True), "`thresholding"),
])
def test_options_are_checked_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverPlusPlusScheduler(**kwargs)


def test_defaults_and_saved_config():
    options = time_shift.options_from_config(DPMSolverPlusPlusScheduler(time_shift=True).config)
    assert options == time_shift.TimeShiftOptions(window=30, cutoff=300, mode="input", data_variance=0.0)
    s = UniPCScheduler(time_shift=True, time_shift_mode="target", time_shift_window=10)
    loaded = UniPCScheduler.from_config(s.config)
    assert (loaded.config.time_shift, loaded.config.time_shift_window, loaded.config.time_shift_mode) == \
        (True, 10, "target")


# Off is the plain solver -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,opts", SOLVERS, ids=IDS)
def test_off_reproduces_the_plain_solver_exactly(cls, opts):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = run_loop(cls(**DDPM, **opts), 8, x)
    for off in (dict(time_shift=False), dict(time_shift=True, time_shift_window=0),
                dict(time_shift=True, time_shift_window=1), dict(time_shift=True, time_shift_cutoff=999)):
        torch.testing.assert_close(run_loop(cls(**DDPM, **opts, **off), 8, x), plain, rtol=0, atol=0)


# The candidate table ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", time_shift.MODES)
@pytest.mark.parametrize("cls,opts", SOLVERS, ids=IDS)
def test_candidate_rows_are_the_rows_of_a_grid_with_the_node_moved(cls, opts, mode):
    """Candidate c of row r equals row r of the plain plan compiled on the grid whose moved node has time τ_c."""
    s = cls(**DDPM, **opts, time_shift=True, time_shift_window=20, time_shift_cutoff=0, time_shift_mode=mode)
    s.set_timesteps(9)
    rows, grid = s._time_shift, s.timesteps.tolist()
    plain = cls(**DDPM, **opts)
    checked = 0
    for r in np.flatnonzero(rows.shiftable):
        for c in np.flatnonzero(rows.valid[r])[::4]:
            moved = list(grid)
            moved[r + (mode == "target")] = int(rows.times[r, c])
            plain.set_timesteps(timesteps=moved)
            np.testing.assert_allclose(rows.plans[c].coef[:, r], plain.plan.coef[:, r], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(rows.plans[c].out_map[r], plain.plan.out_map[r], rtol=1e-12)
            checked += 1
    assert checked > 10


def test_window_stays_between_neighbours_and_above_the_cutoff():
    """Candidates lie strictly between the neighbouring grid times (a window wider than the stride is clipped), only
    on nodes above the cutoff, never on the first node."""
    s = DPMSolverPlusPlusScheduler(**DDPM, time_shift=True, time_shift_window=30, time_shift_cutoff=300)
    s.set_timesteps(100)  # stride 10 < ⌊w/2⌋ = 15
    rows, grid = s._time_shift, s.timesteps.numpy()
    for r in range(100):
        times = rows.times[r][rows.valid[r]]
        if r == 0 or grid[r] <= 300:
            assert not rows.shiftable[r] and times.tolist() == [grid[r]]
        else:
            assert (times.min(), times.max()) == (grid[r + 1] + 1, grid[r - 1] - 1)


# Selection -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data_variance", [0.0, 0.3])
@pytest.mark.parametrize("mode", time_shift.MODES)
def test_selection_picks_the_time_whose_variance_matches(data_variance, mode):
    """var(x) = α_τ² v₀ + σ_τ² exactly → τ, for every candidate of every row, per sample and for the batch."""
    s = UniPCScheduler(**DDPM, time_shift=True, time_shift_cutoff=0, time_shift_mode=mode,
                       time_shift_data_variance=data_variance)
    s.set_timesteps(10)
    rows = s._time_shift
    table = s._time_shift_on(torch.device("cpu"), torch.float64, False)

    def choose(x: torch.Tensor, r: int, batch: bool = False) -> list[int]:  # as step() does it
        v = sample_variance(x)
        return table.nearest(v.mean().reshape(1) if batch else v, r).tolist()

    for r in np.flatnonzero(rows.shiftable):
        cs = np.flatnonzero(rows.valid[r])
        assert choose(with_variance(rows.variance[r, cs], seed=int(r)), int(r)) == cs.tolist()
        for c in cs[::5]:
            assert choose(with_variance([rows.variance[r, c]] * 3), int(r), batch=True) == [c]
        # the schedule's own variance at the nominal time is the centre
        alpha_bar = s.alphas_cumprod.double()[int(rows.times[r, rows.center])]
        x = with_variance([data_variance * alpha_bar + 1 - alpha_bar] * 2)
        assert choose(x, int(r)) == [rows.center] * 2


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch-time", "per-sample"])
@pytest.mark.parametrize("cls,opts", ODE_SOLVERS, ids=ODE_IDS)
def test_schedule_variance_keeps_the_nominal_times(cls, opts, per_sample):
    """On data whose sample variance is the schedule's at every node, the unshifted time is picked."""
    s = cls(**DDPM, **opts, time_shift=True, time_shift_cutoff=0)
    s.set_timesteps(10)
    x = with_variance([1 - float(s.alphas_cumprod[999])] * 3)
    seen = []
    out = sample(s, point_mass_model(s), x, per_sample, seen)
    nominal = nominal_timesteps(s, 10)
    assert torch.equal(torch.stack([t.reshape(-1)[0] for t in seen]), nominal)
    assert torch.equal(s.timesteps, nominal)
    plain = cls(**DDPM, **opts)
    plain.set_timesteps(10)
    torch.testing.assert_close(out, sample(plain, point_mass_model(plain), x), rtol=1e-10, atol=1e-12)


ONE_STATE = [(DPMSolverPlusPlusScheduler, {}), (DPMSolverPlusPlusScheduler, dict(solver_order=3)),
             (DPMSolverPlusPlusScheduler, dict(algorithm_type="dpmsolver")), (DEISScheduler, {})]


@pytest.mark.parametrize("cls,opts", ONE_STATE, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_shifted_time_reaches_the_model_and_the_row(cls, opts):
    """A start whose variance is k·σ² stays k·σ² without the shift; with it, the model is called at the time whose
    σ² matches and the row moves the sample from there, which removes the mismatch (point-mass data)."""
    grid = [600, 500, 400, 300, 200, 100]
    k = torch.tensor([1.004, 1.006, 1.009], dtype=torch.float64)
    sigma2 = 1 - DPMSolverPlusPlusScheduler().alphas_cumprod.double()[grid]

    def ratios(x: torch.Tensor) -> torch.Tensor:  # var(x) / σ² at the last model node, per sample
        return x.reshape(3, -1).var(1) / float(sigma2[-1])

    x = with_variance(k * float(sigma2[0]))
    plain = cls(**DDPM, **opts)
    plain.set_timesteps(timesteps=grid)
    torch.testing.assert_close(ratios(sample(plain, point_mass_model(plain), x, stop=5)), k)
    s = cls(**DDPM, **opts, time_shift=True, time_shift_cutoff=0)
    for per_sample in (True, False):
        s.set_timesteps(timesteps=grid)
        seen = []
        out = sample(s, point_mass_model(s), x, per_sample, seen, stop=5)
        if per_sample:  # each sample at its own time: each mismatch gone
            assert all(t.shape == (3,) for t in seen) and len(set(seen[1].tolist())) == 3
            assert torch.all(seen[1] > 500) and torch.all(seen[1] <= 515)
            torch.testing.assert_close(ratios(out), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-3)
        else:  # one time for the batch, from the mean variance: the mean mismatch gone
            assert 500 < int(seen[1]) <= 515 and torch.equal(s.timesteps[1], seen[1])
            assert abs(float(ratios(out).mean()) - 1) < 5e-4


@pytest.mark.parametrize("cls,opts", [(UniPCScheduler, {}), (DPMSolverPlusPlusScheduler, dict(solver_method="singlestep"))])
def test_solvers_that_resume_from_a_saved_state_warn(cls, opts):
    with pytest.warns(UserWarning, match="saved state"):
        cls(**opts, time_shift=True).set_timesteps(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UniPCScheduler(time_shift=True, disable_corrector=list(range(8))).set_timesteps(8)
        DPMSolverPlusPlusScheduler(time_shift=True).set_timesteps(8)


def test_target_mode_keeps_model_times_and_lands_on_the_upper_edge():
    """Code-faithful mode: the model gets the nominal times; var(x_i) ≥ σ²(t_i) picks the window's upper edge around
    t_{i+1} (the reference note's observation), so the step lands there, and the next step starts from the nominal
    node again: var(x_2) = σ²(410), var(x_3) = σ²(210)·σ²(410)/σ²(400)."""
    grid = [800, 600, 400, 200]
    s = DPMSolverPlusPlusScheduler(**DDPM, time_shift=True, time_shift_mode="target", time_shift_cutoff=0,
                                   time_shift_window=20)
    s.set_timesteps(timesteps=grid)
    sigma2 = 1 - s.alphas_cumprod.double()
    model = point_mass_model(s)
    x = with_variance([float(sigma2[800])] * 2)
    variances = []
    for t in s.timesteps:
        x = s.step(model(x, t), t, x).prev_sample
        variances.append(float(x.reshape(2, -1).var(1)[0]))
    assert s.timesteps.tolist() == grid
    assert variances[0] == pytest.approx(float(sigma2[600]), rel=1e-12)  # no shift on the run's first step
    assert variances[1] == pytest.approx(float(sigma2[410]), rel=1e-12)
    assert variances[2] == pytest.approx(float(sigma2[210] * sigma2[410] / sigma2[400]), rel=1e-12)


def test_per_sample_times_match_single_sample_runs():
    """One time per sample gives each sample the trajectory it has when sampled alone (batch of one)."""
    model = lambda x, t: 0.4 * torch.tanh(x) + 1e-3 * torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) * x  # noqa: E731
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s = UniPCScheduler(**DDPM, time_shift=True)
    s.set_timesteps(8)
    batch = sample(s, model, x, per_sample=True)
    alone = []
    for b in range(3):
        s.set_timesteps(8)
        alone.append(sample(s, model, x[b:b + 1]))
    torch.testing.assert_close(batch, torch.cat(alone), rtol=1e-12, atol=1e-12)


def test_state_is_reset_per_run():
    s = DPMSolverPlusPlusScheduler(**DDPM, time_shift=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    first = run_loop(s, 6, x)
    times = s.timesteps.clone()
    assert not torch.equal(times, nominal_timesteps(s, 6))  # this model's samples drift: shifts happen
    assert torch.equal(run_loop(s, 6, x), first) and torch.equal(s.timesteps, times)
    s.set_timesteps(6)
    assert torch.equal(s.timesteps, nominal_timesteps(s, 6)) and s._shift_variance is None


def test_installed_plan_is_refused():
    s = DPMSolverPlusPlusScheduler(**DDPM)
    s.set_timesteps(6)
    plan = s.plan
    other = DPMSolverPlusPlusScheduler(**DDPM, solver_order=1, time_shift=True)
    with pytest.raises(ValueError, match="time_shift"):
        other.set_plan(plan)


def test_flow_model_shifts_in_model_time():
    s = UniPCScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, time_shift=True,
                       time_shift_cutoff=0)
    s.set_timesteps(6)
    nominal = s.timesteps.clone()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(s.timesteps):
        x = s.step(0.3 * x + index_model(x, i), t, x).prev_sample
    assert torch.isfinite(x).all() and s.timesteps.dtype == torch.float32
    moved = (s.timesteps - nominal).abs()
    assert moved.max() > 0 and moved.max() <= 15 + 1e-3


# The step contract -----------------------------------------------------------------------------------------

TS_SCHEDULERS = [
    dict(cls=DPMSolverPlusPlusScheduler),
    dict(cls=DPMSolverPlusPlusScheduler, solver_order=3, time_shift_mode="target"),
    dict(cls=UniPCScheduler, solver_order=3),
    dict(cls=DEISScheduler, time_shift_mode="target"),
    dict(cls=DPMSolverPlusPlusScheduler, algorithm_type="sde-dpmsolver++"),
]


def _build(spec: dict, **extra) -> PlanScheduler:
    spec = dict(spec)
    return spec.pop("cls")(**DDPM, **spec, time_shift=True, time_shift_cutoff=0, **extra)


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu", "accelerator-branch"])
def test_step_makes_no_host_sync(monkeypatch, accelerator):
    """As tests/test_contract.py: with the shift on, step() reads nothing on the host (batch and per-sample times)."""
    runs = [(_build(spec), per_sample) for spec in TS_SCHEDULERS for per_sample in (False, True)]
    for s, _ in runs:
        s.set_timesteps(8)
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    forbid_host_reads(monkeypatch, accelerator)
    for s, per_sample in runs:
        x = x0
        for i, t in enumerate(s.timesteps):
            t = s.per_sample_timesteps(4) if per_sample else t
            x = s.step(index_model(x, i), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    monkeypatch.undo()
    assert any(not torch.equal(s.timesteps, nominal_timesteps(s, 8)) for s, _ in runs)


@pytest.mark.parametrize("spec", TS_SCHEDULERS[:4], ids=lambda s: f"{s['cls'].__name__}-{s.get('time_shift_mode', 'input')}")
def test_triton_matches_torch(spec):
    pytest.importorskip("triton")
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    outs, times = [], []
    for kernel in ("torch", "triton"):
        s = _build(spec, kernel=kernel)
        s.set_timesteps(6)
        x = x0
        for i, t in enumerate(s.timesteps):
            x = s.step(index_model(x, i), t, x).prev_sample
        assert (s._device_table is not None) == (kernel == "triton")
        outs.append(x)
        times.append(s.timesteps.clone())
    assert torch.equal(times[0], times[1])
    assert spec.get("time_shift_mode") == "target" or not torch.equal(times[0], nominal_timesteps(s, 6))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [pytest.param(s, marks=[pytest.mark.slow] if k >= 2 else [])
                                  for k, s in enumerate(TS_SCHEDULERS[:4])],
                         ids=lambda s: f"{s['cls'].__name__}-{s.get('time_shift_mode', 'input')}")
def test_step_still_traces_as_one_graph(spec):
    """torch.compile(fullgraph=True): candidate gather, variance, argmin and the in-place write of the next time all
    trace, with tests/test_compile.py's check (eager agreement, one graph for the steady state plus one per warm-up
    level, graphs reused by a second run) on a run whose times do shift."""
    spec = dict(spec)
    cls, opts = spec.pop("cls"), dict(**DDPM, **spec, time_shift=True, time_shift_cutoff=0)
    eager = cls(**opts)
    eager.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8)
    for i, t in enumerate(eager.timesteps):
        x = eager.step(compile_model(x, i), t, x).prev_sample
    assert opts.get("time_shift_mode") == "target" or not torch.equal(eager.timesteps, nominal_timesteps(eager, 10))
    torch._dynamo.reset()
    try:
        steady_state_is_one_graph(cls, opts)
    finally:
        torch._dynamo.reset()


# Real pipelines (tests/tiny_pipelines.py) ------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add overhead on shared cores (as tests/test_pipelines.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_shifted(pipe, steps: int, *args, first: int = 0, **kwargs):
    """``pipe(*args, **kwargs)`` with DPM-Solver++ and ``time_shift=True``, recording the UNet's timestep argument at
    each call (a forward pre-hook); checks that the UNet got the scheduler's times — one per call, shared by the CFG
    batch — and that they moved within the window on rows that can shift. ``first``: the run's begin index."""
    pytest.importorskip("transformers")
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config, time_shift=True,
                                                            time_shift_cutoff=100)
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).clone())

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = pipe(*args, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        handle.remove()
    got = torch.stack([t.reshape(-1)[0] for t in seen])
    assert all(bool((t == t.reshape(-1)[0]).all()) for t in seen) and got.dtype == torch.int64
    assert torch.equal(got, pipe.scheduler.timesteps[first:])
    offsets = got - nominal_timesteps(pipe.scheduler, steps)[first:]
    assert offsets[0] == 0 and offsets.abs().max() <= 15 and (offsets != 0).any()
    assert all(pipe.scheduler._time_shift.shiftable[first + k] for k in np.flatnonzero(offsets.numpy()))
    return out


def test_ddpm_pipeline_gives_the_unet_the_shifted_time(one_thread):
    import tiny_pipelines as tp

    pipe = tp.tiny_ddpm_pipeline()
    out = run_shifted(pipe, 8, output_type="np")
    again = pipe(num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, again)  # state reset per run


def test_sd_pipeline_with_cfg_gives_the_unet_the_shifted_time(one_thread):
    import tiny_pipelines as tp

    latents = run_shifted(tp.tiny_sd_pipeline(), 8, "a photo of a cat", height=16, width=16, guidance_scale=7.5,
                          output_type="latent")
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_pipeline_gives_the_unet_the_shifted_time(strength, one_thread):
    import tiny_pipelines as tp

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(123))
    out = run_shifted(tp.tiny_sd_img2img_pipeline(), 10, "a photo of a cat", image=image, strength=strength,
                      guidance_scale=7.5, output_type="np", first=10 - int(10 * strength))
    assert np.isfinite(out).all()
