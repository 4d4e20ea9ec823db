"""Ground truth for the benchmarks: exact mixture denoisers, the reference ODE solution, its cache, the bench CLI."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fastsampler.eval import bench as bench_lib, bench_report, gmm, metrics, reference
from fastsampler.cli.bench import bench
from fastsampler.eval.gmm import GaussianMixture, MixtureDenoiser, MixtureModel
from fastsampler.eval.reference import Tolerance

MEANS = np.array([[-1.0, 0.0], [1.0, 0.5], [0.0, 1.5], [0.5, -1.0]])
WEIGHTS = np.array([0.2, 0.4, 0.3, 0.1])
LABELS = np.array([0, 1, 1, 0])


@pytest.fixture(autouse=True)
def one_thread():
    """These are many tiny tensor ops: intra-op threads only add synchronisation (10× slower on busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def mixture() -> GaussianMixture:
    return GaussianMixture(MEANS, 0.3, WEIGHTS, LABELS)


def sample_prior(mixture: GaussianMixture, n: int, generator: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(mixture.weights, n, replacement=True, generator=generator)
    return mixture.means[k] + mixture.tau * torch.randn(n, mixture.dim, dtype=torch.float64, generator=generator)


def test_denoiser_matches_importance_sampled_posterior_mean(mixture):
    """E[x₀|x] by self-normalised importance sampling from the prior, within 5 standard errors (delta method)."""
    g = torch.Generator().manual_seed(0)
    alpha, sigma = 0.8, 0.6
    x0 = sample_prior(mixture, 400_000, g)
    points = torch.tensor([[0.3, 0.2], [-0.9, 0.4], [0.8, 1.6]], dtype=torch.float64)
    exact = mixture.denoise(points, alpha, sigma)
    for x, expected in zip(points, exact):
        log_w = -((x - alpha * x0) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(log_w, 0)
        estimate = w @ x0
        std_error = ((w[:, None] ** 2) * (x0 - estimate) ** 2).sum(0).sqrt()
        assert torch.all((estimate - expected).abs() < 5 * std_error), (estimate, expected, std_error)


def test_predictions_are_consistent(mixture):
    """x = α x̂₀ + σ ε̂, v̂ = α ε̂ − σ x̂₀, flow velocity = ε̂ − x̂₀."""
    x = torch.randn(5, 2, dtype=torch.float64)
    alpha, sigma = 0.6, 0.8
    x0 = mixture.denoise(x, alpha, sigma)
    eps = gmm.prediction_from_x0("epsilon", x, x0, alpha, sigma)
    torch.testing.assert_close(alpha * x0 + sigma * eps, x)
    torch.testing.assert_close(gmm.prediction_from_x0("v_prediction", x, x0, alpha, sigma), alpha * eps - sigma * x0)
    torch.testing.assert_close(gmm.prediction_from_x0("flow_prediction", x, x0, alpha, sigma), eps - x0)
    torch.testing.assert_close(mixture.responsibilities(x, alpha, sigma).sum(1), torch.ones(5, dtype=torch.float64))


def test_cfg_at_scale_one_is_the_conditional_denoiser(mixture):
    x = torch.randn(6, 2, dtype=torch.float64)
    classes = torch.tensor([0, 1, 1, 0, 1, 0])
    conditional = MixtureDenoiser(mixture, classes)(x, 0.7, 0.5)
    torch.testing.assert_close(MixtureDenoiser(mixture, classes, 1.0)(x, 0.7, 0.5), conditional)
    torch.testing.assert_close(MixtureDenoiser(mixture, classes, 0.0)(x, 0.7, 0.5), mixture.denoise(x, 0.7, 0.5))
    # the conditional denoiser is the denoiser of the class's own sub-mixture
    sub = GaussianMixture(MEANS[LABELS == 1], 0.3, WEIGHTS[LABELS == 1])
    torch.testing.assert_close(conditional[classes == 1], sub.denoise(x[classes == 1], 0.7, 0.5))


def test_model_maps_timesteps_like_the_training_schedule():
    mixture = gmm.single_gaussian(np.zeros(2), 1.0)  # x̂₀ = α x / (α² + σ²) = α x for VP
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    model = MixtureModel.from_scheduler_config(MixtureDenoiser(mixture), config, "sample")
    alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    x = torch.ones(1, 2)
    assert model(x, torch.tensor(500))[0, 0].item() == pytest.approx(math.sqrt(alphas_cumprod[500]), rel=1e-6)
    torch.testing.assert_close(model(x, torch.tensor(500)), model(x, torch.tensor(500.0)))
    rho = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    rho_mid = 0.25 * rho[10] + 0.75 * rho[11]  # linear in t between integers
    assert model(x, 10.75)[0, 0].item() == pytest.approx(1 / math.sqrt(1 + rho_mid**2), rel=1e-6)
    flow = MixtureModel.from_scheduler_config(MixtureDenoiser(mixture), {"use_flow_sigmas": True}, "sample")
    assert flow.alpha_sigma(torch.tensor(250.0)) == (0.75, 0.25)


@pytest.mark.parametrize("alpha_start, sigma_start", [(1 / math.sqrt(1 + 80.0**2), 80.0 / math.sqrt(1 + 80.0**2)),
                                                      (0.0, 1.0), (0.9, 0.3)])
def test_reference_matches_single_gaussian_closed_form(alpha_start, sigma_start):
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(3, dtype=torch.float64, generator=g)
    tau = 0.3
    x_start = torch.randn(4, 3, dtype=torch.float64, generator=g)
    denoiser = MixtureDenoiser(gmm.single_gaussian(mu, tau))
    solved = reference.solve_pf_ode(denoiser, x_start, alpha_start, sigma_start, Tolerance(1e-10, 1e-12))
    exact = gmm.single_gaussian_solution(x_start, mu, tau, alpha_start, sigma_start)
    assert (solved.x0 - exact).abs().max() < 1e-6


def test_tolerance_check_passes_and_is_recorded(monkeypatch, tmp_path, mixture):
    monkeypatch.setenv("FASTSAMPLER_CACHE", str(tmp_path))
    x_start = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    ref = reference.reference_solution(MixtureDenoiser(mixture), x_start, 0.1, 0.99, error_scale=1e-3)
    assert ref.tolerance_check["passed"] and ref.tolerance_check["change_rmse"] < 1e-6


def test_cache_key_changes_with_every_input_and_results_are_reused(monkeypatch, tmp_path, mixture):
    monkeypatch.setenv("FASTSAMPLER_CACHE", str(tmp_path))
    x_start = torch.randn(3, 2, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([0, 1, 1])
    base = dict(denoiser=MixtureDenoiser(mixture, classes, 2.0), x_start=x_start, alpha_start=0.1, sigma_start=0.99,
                tol=Tolerance(), rho_min=None, error_scale=None)
    moved_means = MEANS.copy()
    moved_means[2, 1] += 1e-9
    variants = {
        "means": dict(denoiser=MixtureDenoiser(GaussianMixture(moved_means, 0.3, WEIGHTS, LABELS), classes, 2.0)),
        "tau": dict(denoiser=MixtureDenoiser(GaussianMixture(MEANS, 0.31, WEIGHTS, LABELS), classes, 2.0)),
        "weights": dict(denoiser=MixtureDenoiser(GaussianMixture(MEANS, 0.3, WEIGHTS[::-1], LABELS), classes, 2.0)),
        "labels": dict(denoiser=MixtureDenoiser(GaussianMixture(MEANS, 0.3, WEIGHTS, 1 - LABELS[::-1]), classes, 2.0)),
        "classes": dict(denoiser=MixtureDenoiser(mixture, torch.tensor([1, 1, 1]), 2.0)),
        "guidance": dict(denoiser=MixtureDenoiser(mixture, classes, 2.5)),
        "conditional": dict(denoiser=MixtureDenoiser(mixture, classes)),
        "unconditional": dict(denoiser=MixtureDenoiser(mixture)),
        "noise": dict(x_start=x_start + torch.tensor([[0.0, 0.0], [0.0, 1e-6], [0.0, 0.0]])),
        "noise_shape": dict(x_start=x_start.reshape(3, 1, 2)),
        "alpha_start": dict(alpha_start=0.11),
        "sigma_start": dict(sigma_start=0.98),
        "rtol": dict(tol=Tolerance(rtol=1e-9)),
        "atol": dict(tol=Tolerance(atol=1e-11)),
        "rho_min": dict(rho_min=1e-6),
        "error_scale": dict(error_scale=1e-3),
    }
    keys = {"base": reference.reference_key(**base)}
    for name, change in variants.items():
        keys[name] = reference.reference_key(**{**base, **change})
    assert len(set(keys.values())) == len(keys)
    assert reference.reference_key(**base) == keys["base"]  # deterministic

    args = {k: v for k, v in base.items() if k != "rho_min"}
    first = reference.reference_solution(**args)
    assert not first.from_cache

    def fail(*a, **k):
        raise AssertionError("the cached result should have been used")

    monkeypatch.setattr(reference, "solve_pf_ode", fail)
    again = reference.reference_solution(**args)
    assert again.from_cache and again.key == first.key
    torch.testing.assert_close(again.x0, first.x0, rtol=0, atol=0)


def test_metrics(mixture):
    x = mixture.means.clone()
    assert metrics.rmse(x, x) == 0.0
    assert metrics.component_mismatch(mixture, x, x) == 0.0
    assert metrics.component_mismatch(mixture, x, x.flip(0)) == 1.0
    assert metrics.overshoot(torch.tensor([[1.5, -2.0, 0.3, 1.0]])) == pytest.approx((0.5 + 1.0) / 4)


@pytest.mark.slow
def test_bench_cli_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSAMPLER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["--solvers", "fs/dpmpp-2m,diffusers/ddim", "--nfe", "4,6", "--batch-size", "4", "--out", str(out),
            "--no-progress"]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    assert "fs/dpmpp-2m" in result.output and "diffusers/ddim" in result.output
    data = json.loads((out / "results.json").read_text())
    assert {(r["solver"], r["nfe"]) for r in data["runs"]} == {(s, n) for s in ("fs/dpmpp-2m", "diffusers/ddim")
                                                                for n in (4, 6)}
    assert all(r["error"] is None and r["nfe_actual"] == r["nfe"] and math.isfinite(r["rmse"]) for r in data["runs"])
    assert data["references"][0]["tolerance_check"]["passed"]
    for name in ("results.csv", "table.txt", "error_vs_nfe.png"):
        assert (out / name).stat().st_size > 0
    assert bench_report.TABLE_LEGEND in result.output and bench_report.TABLE_LEGEND in (out / "table.txt").read_text()
    rerun = CliRunner().invoke(bench, args)
    assert rerun.exit_code == 0 and "cached" in rerun.output


def test_bench_plot_has_a_panel_per_family_distinct_series_and_names_failed_solvers(tmp_path, monkeypatch):
    import matplotlib.figure

    names = [f"fs/s{i}" for i in range(12)] + ["diffusers/a", "diffusers/b"]
    runs = [bench_lib.RunResult(name, "diffusers" if name.startswith("diffusers") else "fastsampler", n, n, n,
                                math.nan if name == "fs/s3" else 1.0 / (n + i), 0.0, 0.0, 0.0, 999.0)
            for i, name in enumerate(names) for n in (4, 8)]
    result = bench_lib.BenchResult(bench_lib.BenchSetup("sd", None, None, 4, 0), [4, 8], runs, [], 0.0)
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    bench_report.plot(result, tmp_path / "plot.png")
    (fig,) = figures
    left, right = fig.axes
    assert (left.get_title(), right.get_title()) == ("fastsampler", "diffusers")
    styles = [(line.get_color(), line.get_marker()) for line in left.get_lines()]
    assert len(styles) == 11 and len(set(styles)) == 11  # fs/s3 has no finite result
    assert "None" not in fig._suptitle.get_text() and "unconditional" in fig._suptitle.get_text()
    assert any("no finite result" in t.get_text() and "fs/s3" in t.get_text() for t in fig.texts)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "wrong_shape"])
def test_corrupt_reference_cache_is_recomputed(monkeypatch, tmp_path, mixture, damage):
    """An unreadable or invalid cache file is recomputed with a warning naming it, and overwritten."""
    monkeypatch.setenv("FASTSAMPLER_CACHE", str(tmp_path))
    x_start = torch.randn(3, 2, generator=torch.Generator().manual_seed(4))
    args = (MixtureDenoiser(mixture), x_start, 0.1, 0.99)
    clean = reference.reference_solution(*args)
    path = reference.cache_dir() / f"{clean.key}.npz"
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not an npz file at all")
    elif damage == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "flipped":  # a bit flip in x0's data: the zip member's CRC catches it
        at = raw.find(clean.x0.numpy().tobytes())
        assert at > 0
        path.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:])
    else:
        np.savez(path.with_suffix(".tmp.npz"), x0=np.zeros((2, 2)), meta=np.array("{}"))
        path.with_suffix(".tmp.npz").replace(path)
    with pytest.warns(RuntimeWarning, match=f"{path.name} is unusable, recomputing it"):
        again = reference.reference_solution(*args)
    assert not again.from_cache and again.key == clean.key
    torch.testing.assert_close(again.x0, clean.x0, rtol=0, atol=0)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # rewritten in place, no temporary left
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cached = reference.reference_solution(*args)
    assert cached.from_cache
    torch.testing.assert_close(cached.x0, clean.x0, rtol=0, atol=0)
