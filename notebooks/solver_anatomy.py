# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Solver anatomy: each solver against the exact ODE path
#
# A diffusion sampler integrates the probability-flow ODE. With x_t = α_t x₀ + σ_t ε and λ = log(α_t/σ_t), its
# exact solution in data-prediction form is
#
# $$\frac{x_t}{\sigma_t} = \frac{x_s}{\sigma_s} + \int_{\lambda_s}^{\lambda_t} e^{\lambda}\,\hat x_0(x_\lambda, \lambda)\,d\lambda ,$$
#
# so a solver is a quadrature rule for the denoiser's prediction x̂₀ along λ. DDIM holds x̂₀ constant over a step
# (order 1); DPM-Solver++ 2M/3M extrapolate it linearly/quadratically from the last 2/3 predictions,
# x_t = (σ_t/σ_s) x_s + α_t h [φ₁(−h) D0 + φ₂(−h) D1 + φ₃(−h) D2] with h = λ_t − λ_s; UniPC adds a corrector
# that re-integrates each step once the next prediction is known; DEIS fits the polynomial to ε̂ instead.
#
# On a **Gaussian mixture** x̂₀ is known in closed form, so the ODE's true path can be computed to any accuracy.
# Here, on a 2-D mixture (so we can draw it), we look at
#
# 1. the trajectories of each solver at NFE 5 against the exact path;
# 2. error vs NFE;
# 3. classifier-free guidance, where third-order solvers overshoot — and why.

# %% tags=["parameters"]
import os

TAU = 0.1  # std of each mixture component
GUIDANCE = 4.0  # classifier-free guidance scale for part 3
N_SAMPLES = 256  # noises for the error measurements
SEED = 0
FIGURES = os.environ.get("FASTSAMPLER_NOTEBOOK_FIGURES")  # `python notebooks/run.py --figures` sets it

# %%
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.integrate import solve_ivp

from fastsampler import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.eval.gmm import GaussianMixture, MixtureDenoiser, MixtureModel
from fastsampler.eval.reference import reference_solution

# %% [markdown]
# ## The data and the exact model
#
# Six components N(μ_k, τ²I) in two classes (filled circles: class 0, open: class 1). `MixtureModel` turns the
# closed-form denoiser into a diffusers-style model, `model(x, t)` → ε̂, on the **noise schedule of the embedded
# digits DDPM** (1000 linear-β steps); every scheduler below is built from the same config, with
# `timestep_spacing="trailing"` so that every NFE starts from the same noise at t = 999.
#
# Everything runs in float64: the errors below are the solvers' discretisation errors, nothing else.

# %%
means = np.array([[-0.8, -0.6], [-0.2, 0.7], [0.7, 0.5], [0.6, -0.7], [0.0, -0.1], [-0.7, 0.3]])
labels = np.array([0, 0, 1, 1, 0, 1])
mixture = GaussianMixture(means, tau=TAU, labels=labels)
config = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
              prediction_type="epsilon", timestep_spacing="trailing")
model = MixtureModel.from_scheduler_config(MixtureDenoiser(mixture), config)

SOLVERS = {  # name → (scheduler class, options)
    "DDIM (DPM-Solver++ 1)": (DPMSolverPlusPlusScheduler, dict(solver_order=1)),
    "DPM-Solver++ 2M": (DPMSolverPlusPlusScheduler, dict(solver_order=2)),
    "DPM-Solver++ 3M": (DPMSolverPlusPlusScheduler, dict(solver_order=3)),
    "DPM-Solver++ 3M exact": (DPMSolverPlusPlusScheduler, dict(solver_order=3, exact_third_order=True)),
    "UniPC bh2-2": (UniPCScheduler, dict(solver_order=2)),
    "UniPC bh2-3": (UniPCScheduler, dict(solver_order=3)),
    "DEIS-3": (DEISScheduler, dict(solver_order=3)),
    "UniPC bh2-3, σ_min end": (UniPCScheduler, dict(solver_order=3, final_sigmas_type="sigma_min")),
}


def sample(solver: str, model, noise: torch.Tensor, nfe: int) -> torch.Tensor:
    """The plain diffusers loop; returns the states at every node, (nfe + 1, B, 2)."""
    cls, options = SOLVERS[solver]
    scheduler = cls(**config, **options)
    scheduler.set_timesteps(nfe)
    x, states = noise, [noise]
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
        states.append(x)
    return torch.stack(states)


# %% [markdown]
# **The exact path.** In y = x/α and u = log ρ (ρ = σ/α) the ODE is dy/du = y − x̂₀(y; α = 1, σ = e^u): one
# `solve_ivp` call (DOP853, rtol 1e-9) gives the path, and x = y/√(1 + ρ²) maps it back to the sampler's variable.
# Its end point agrees with the library's reference solve (`fastsampler.eval.reference`, used for every error
# below) to ~1e-7.

# %%
ALPHA_T, SIGMA_T = (float(v) for v in model.alpha_sigma(999))  # the noise level every run starts at
RHO_T = SIGMA_T / ALPHA_T


def exact_path(denoiser, noise: torch.Tensor, rhos: np.ndarray) -> torch.Tensor:
    """x on the exact ODE path from ``noise`` at t = 999 at each ρ in ``rhos`` (decreasing), (len(rhos), B, 2)."""
    batch = noise.shape[0]

    def dy_du(u, y):
        y = torch.from_numpy(y.reshape(batch, -1))
        return (y - denoiser(y, 1.0, math.exp(u))).numpy().ravel()

    y0 = (noise.double() / ALPHA_T).numpy().ravel()
    sol = solve_ivp(dy_du, (math.log(RHO_T), math.log(rhos[-1])), y0, method="DOP853", rtol=1e-9, atol=1e-11,
                    t_eval=np.log(rhos))
    y = torch.from_numpy(sol.y.T.reshape(len(rhos), batch, -1))
    return y / torch.from_numpy(np.sqrt(1.0 + rhos**2)).reshape(-1, 1, 1)


RHOS = np.geomspace(RHO_T, 1e-3 * TAU, 400)
noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
path = exact_path(model.denoiser, noise, RHOS)
ref = reference_solution(model.denoiser, noise, ALPHA_T, SIGMA_T).x0
print(f"exact path end vs reference solve: max |Δ| = {float((path[-1] - ref).abs().max()):.1e}")

# %% [markdown]
# ## 1. Trajectories at NFE 5
#
# Lines: the exact paths of 8 noises. Dots joined by dashes: each solver's states at its nodes, from the same
# noises. The 5-step trailing grid has its nodes at ρ = σ/α = 157, 25.5, 6.1, 2.0, 0.72 and then 0. Far from the
# data x̂₀ is close to the mixture's mean and the paths are nearly straight; they bend late, when the posterior
# commits to one component (ρ of a few τ). On this grid that happens inside the **last step, 0.72 → 0**, which every
# solver takes as the first-order jump x = x̂₀(x at ρ = 0.72): the denoiser's average over the components still in
# play. So at NFE 5 all solvers make nearly the same error, and samples end *between* components. Ending at the
# smallest trained noise level instead (`final_sigmas_type="sigma_min"`, last panel) replaces that jump by a
# proper third-order step, but over the same long interval: a few percent better, no more. At this NFE the grid,
# not the solver, is the limit (which is what the schedule search in `tuning.py` is for).

# %%
def draw_mixture(ax):
    for cls, face in ((0, "C7"), (1, "none")):
        ax.scatter(*means[labels == cls].T, s=260, facecolors=face, edgecolors="C7", alpha=0.5, zorder=0)


def draw_trajectories(ax, solver, states, path, title=None, lim=2.2):
    """Exact paths (wide, pale) and the solver's states (dots joined by dashes), one colour per noise."""
    draw_mixture(ax)
    for i in range(states.shape[1]):
        (line,) = ax.plot(*path[:, i].T, lw=3, alpha=0.35)
        ax.plot(*states[:, i].T, "o--", ms=3, lw=0.8, color=line.get_color())
    ax.plot([], [], lw=3, alpha=0.35, color="0.3", label="exact path")
    ax.plot([], [], "o--", ms=3, lw=0.8, color="0.3", label="solver's states")
    ax.legend(fontsize=6, loc="lower right")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    ax.set_title(title or solver, fontsize=9)


SHOWN = ["DDIM (DPM-Solver++ 1)", "DPM-Solver++ 2M", "DPM-Solver++ 3M", "UniPC bh2-3", "UniPC bh2-3, σ_min end"]
fig, axes = plt.subplots(1, len(SHOWN), figsize=(2.9 * len(SHOWN), 3.3))
for ax, solver in zip(axes, SHOWN):
    states = sample(solver, model, noise, 5)
    err = float((states[-1] - ref).pow(2).mean().sqrt())
    draw_trajectories(ax, solver, states, path, f"{solver}\nNFE 5, RMSE {err:.3f}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Error vs NFE
#
# RMSE of the final sample against the reference solve, over 256 noises. On this data (components 0.1 wide, a
# schedule that reaches ρ = 157) the low-NFE regime is where the solvers differ by a constant factor, not by their
# textbook order: the asymptotic slopes (dotted: N⁻¹, N⁻², N⁻³) appear only at many more steps
# (`tests/test_convergence.py` checks them on a single Gaussian, where the ODE is linear).

# %%
NFES = [3, 4, 5, 6, 8, 10, 12, 15, 20, 25]
noises = torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(SEED + 1), dtype=torch.float64)


def error_vs_nfe(model) -> dict[str, list[float]]:
    ref = reference_solution(model.denoiser, noises, ALPHA_T, SIGMA_T).x0
    return {s: [float((sample(s, model, noises, n)[-1] - ref).pow(2).mean().sqrt()) for n in NFES] for s in SOLVERS}


def plot_errors(ax, errors, title):
    for i, (solver, errs) in enumerate(errors.items()):
        ax.loglog(NFES, errs, "o-" if i < 4 else "s--", ms=3.5, label=solver)
    top = max(e[0] for e in errors.values())
    for order in (1, 2, 3):
        ax.loglog(NFES, [top * (NFES[0] / n) ** order for n in NFES], ":", color="0.6", lw=0.8)
    ax.set(xlabel="NFE", ylabel="RMSE vs exact ODE solution", title=title, ylim=(1e-3, 1.0))
    ax.set_xticks(NFES, [str(n) for n in NFES], minor=False)
    ax.grid(alpha=0.3, which="both")


errors = error_vs_nfe(model)
fig, ax = plt.subplots(figsize=(6, 4))
plot_errors(ax, errors, "unguided")
ax.legend(fontsize=7)
plt.show()
print(f"{'solver':24s}" + "".join(f"{n:>7d}" for n in NFES))
for solver, errs in errors.items():
    print(f"{solver:24s}" + "".join(f"{e:7.3f}" for e in errs))

# %% [markdown]
# ## 3. Guidance: where third-order solvers overshoot
#
# Classifier-free guidance at scale w replaces the prediction by x̂₀_u + w (x̂₀_c − x̂₀_u) (`MixtureDenoiser` with
# `guidance_scale`: exact CFG, each noise conditioned on class i mod 2). For w > 1 this *extrapolates* away from
# the unconditional prediction, and it does so most where the posterior switches between components — the late
# bend of the path. x̂₀ then turns sharply over a short range of λ.
#
# A third-order multistep step fits a parabola through the last three predictions and integrates it over the next
# step. Across a sharp turn the parabola overshoots; a linear fit (2M) overshoots less. Below 15 steps the
# schedulers' `lower_order_final` (diffusers' default, which we follow) drops the last steps to lower order and
# hides this; from 15 steps on, DPM-Solver++ 3M and DEIS-3 run third order to the end, and their error jumps *up*
# (2–4× the second-order solvers' at NFE 15–25). UniPC lowers the order of its final step at every NFE, and its
# corrector refits each step with the new prediction: UniPC-3 stays with the second-order solvers.

# %%
classes = torch.arange(N_SAMPLES) % 2
guided = MixtureModel.from_scheduler_config(MixtureDenoiser(mixture, classes, GUIDANCE), config)
guided_errors = error_vs_nfe(guided)
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
plot_errors(axes[0], errors, "unguided")
plot_errors(axes[1], guided_errors, f"guidance w = {GUIDANCE:g}")
axes[1].legend(fontsize=7)
fig.tight_layout()
plt.show()
print(f"{'solver (guided)':24s}" + "".join(f"{n:>7d}" for n in NFES))
for solver, errs in guided_errors.items():
    print(f"{solver:24s}" + "".join(f"{e:7.3f}" for e in errs))

# %% [markdown]
# The overshoot, drawn: the 6 noises that DPM-Solver++ 3M (exact weight) gets most wrong at NFE 20, with their
# exact guided paths. 2M and UniPC-3 follow the bend; 3M is on the path until the last steps and is then thrown
# off it.

# %%
NFE_OVERSHOOT = 20
worst_solver = "DPM-Solver++ 3M exact"
guided_ref = reference_solution(guided.denoiser, noises, ALPHA_T, SIGMA_T).x0
miss = (sample(worst_solver, guided, noises, NFE_OVERSHOOT)[-1] - guided_ref).norm(dim=1)
worst = miss.topk(6).indices
few = MixtureModel.from_scheduler_config(MixtureDenoiser(mixture, classes[worst], GUIDANCE), config)
few_path = exact_path(few.denoiser, noises[worst], RHOS)
fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.6))
for ax, solver in zip(axes, ["DPM-Solver++ 2M", worst_solver, "UniPC bh2-3"]):
    states = sample(solver, few, noises[worst], NFE_OVERSHOOT)
    err = float((states[-1] - guided_ref[worst]).pow(2).mean().sqrt())
    draw_trajectories(ax, solver, states, few_path, f"{solver}, w = {GUIDANCE:g}\nNFE {NFE_OVERSHOOT}, "
                      f"RMSE on these 6: {err:.2f}", lim=2.4)
fig.tight_layout()
if FIGURES:
    fig.savefig(Path(FIGURES) / "solver_anatomy.png", dpi=72, bbox_inches="tight")
plt.show()

# %% [markdown]
# **Why, in one picture.** Take the worst noise, follow its exact path, and evaluate the guided x̂₀ on it at the
# NFE-20 grid's nodes (dots; one coordinate, against λ). Solid line: x̂₀ along the whole path. At the step where
# 3M leaves the path (shaded), it integrates the parabola through the last three dots (dashed), 2M the line
# through the last two (dash-dotted) — drawn here with *exact* predictions at the nodes, so this is the
# extrapolation error alone. x̂₀ has just overshot and come back (guidance pushes it past the class mean, then the
# posterior settles); the parabola continues that turn and runs far past the value x̂₀ actually settles at.

# %%
i = int(worst[0])
one = MixtureDenoiser(mixture, classes[i : i + 1], GUIDANCE)
scheduler = DPMSolverPlusPlusScheduler(**config, solver_order=3)
scheduler.set_timesteps(NFE_OVERSHOOT)
node_rho = np.concatenate([[RHO_T], scheduler.sigmas.double().numpy()[1:-1]])  # positive nodes (ρ = σ/α)
dense_rho = RHOS[RHOS >= node_rho[-1] / 3]


def x0_on_path(rhos: np.ndarray) -> torch.Tensor:
    """The guided x̂₀ at the exact path's points y = x/α at each ρ, (len(rhos), 2)."""
    y = exact_path(one, noises[i : i + 1], rhos)[:, 0] * torch.from_numpy(np.sqrt(1.0 + rhos**2))[:, None]
    return MixtureDenoiser(mixture, classes[i].repeat(len(rhos)), GUIDANCE)(y, 1.0, torch.from_numpy(rhos))


node_x0, dense_x0 = x0_on_path(node_rho), x0_on_path(dense_rho)
lam_nodes, lam_dense = -np.log(node_rho), -np.log(dense_rho)
# the step that lands on the last positive node: from node k = −2, using nodes −2, −3, −4
k = len(node_rho) - 2
coord = int((node_x0[k] - node_x0[k - 1]).abs().argmax())
lam_step = np.linspace(lam_nodes[k], lam_nodes[k + 1], 30)
quad = np.polyfit(lam_nodes[k - 2 : k + 1], node_x0[k - 2 : k + 1, coord].numpy(), 2)
line = np.polyfit(lam_nodes[k - 1 : k + 1], node_x0[k - 1 : k + 1, coord].numpy(), 1)
fig, ax = plt.subplots(figsize=(6.5, 3.6))
ax.plot(lam_dense, dense_x0[:, coord], color="0.3", lw=1.5, label="x̂₀ on the exact path")
ax.plot(lam_nodes, node_x0[:, coord], "o", color="0.3", ms=4, label=f"at the NFE-{NFE_OVERSHOOT} nodes")
ax.plot(lam_step, np.polyval(quad, lam_step), "--", color="C3", lw=2, label="3M: parabola through 3 nodes")
ax.plot(lam_step, np.polyval(line, lam_step), "-.", color="C0", lw=2, label="2M: line through 2 nodes")
ax.axvspan(lam_nodes[k], lam_nodes[k + 1], color="C3", alpha=0.07)
ax.set(xlabel="λ = log(α/σ)", ylabel=f"x̂₀, coordinate {coord}", xlim=(lam_nodes[k - 6], lam_dense[-1]),
       title=f"guided x̂₀ (w = {GUIDANCE:g}) along one exact path; shaded: the step")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## Try it
#
# `trajectories(solver, nfe, guidance)` draws 8 exact paths and the solver's states (the same 8 noises as in
# part 1), and returns the RMSE. A plain function: called directly below, and wired to controls in Jupyter.

# %%
import ipywidgets as widgets


def trajectories(solver: str = "DPM-Solver++ 3M", nfe: int = 15, guidance: float = 4.0) -> float:
    cls = torch.arange(noise.shape[0]) % 2
    m = MixtureModel.from_scheduler_config(MixtureDenoiser(mixture, cls, guidance), config)
    states = sample(solver, m, noise, nfe)
    err = float((states[-1] - reference_solution(m.denoiser, noise, ALPHA_T, SIGMA_T).x0).pow(2).mean().sqrt())
    fig, ax = plt.subplots(figsize=(4, 4))
    draw_trajectories(ax, solver, states, exact_path(m.denoiser, noise, RHOS),
                      f"{solver}, NFE {nfe}, w = {guidance:g}: RMSE {err:.3f}")
    plt.show()
    return err


trajectories("DPM-Solver++ 3M", 15, 4.0)

# %%
widgets.interact_manual(trajectories, solver=widgets.Dropdown(options=list(SOLVERS), value="DPM-Solver++ 3M"),
                        nfe=widgets.IntSlider(value=15, min=2, max=30),
                        guidance=widgets.FloatSlider(value=4.0, min=1.0, max=8.0, step=0.5));
