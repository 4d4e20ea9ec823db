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
# # Guidance artifacts at few steps, and what helps
#
# Classifier-free guidance samples with ε̃ = ε_∅ + w (ε_c − ε_∅). For w > 1 this extrapolates past the conditional
# model, and the ODE it defines bends harder than any the network was trained on. Few-step solvers, which
# extrapolate the prediction along the path (`solver_anatomy.py`, part 3), then overshoot: saturated blobs and
# speckle ("divergence artifacts"). fastsampler has four plug-ins aimed at this, all scheduler options:
#
# | option | what it does |
# |---|---|
# | `momentum="hb", momentum_beta=β` | heavy ball (arXiv 2307.11118): a velocity v ← (1 − β) v + β F averages each step's slope F; x_next = anchor + δ·v |
# | `momentum="ghvb", momentum_order=k` | generalised heavy ball: Adams–Bashforth-k on the averaged ε̂ (its own solver) |
# | `dc_cpr_file=…, dc_guidance_scale=w` | DC-Solver ratios predicted for (NFE, w) by a cascade polynomial fitted to tuned ratios |
# | `epsilon_scaling=b` | ε̂/b (arXiv 2308.15321), against exposure bias |
#
# Here: the embedded **class-conditional digits model** (`load_digits_cond_pipeline()`, label 10 = unconditional),
# two images per digit, at w = 7.5 and 15 and **NFE 5**, each configuration against a 100-step third-order solve of
# the same guided ODE from the same noise. Under a minute on 2 CPU cores.

# %% tags=["parameters"]
import os

GUIDANCE = (7.5, 15.0)
NFE = 5
TEACHER_STEPS = 100  # model evaluations of the reference solve
SEED = 0
FIGURES = os.environ.get("FASTSAMPLER_NOTEBOOK_FIGURES")  # `python notebooks/run.py --figures` sets it

# %%
import json
from pathlib import Path

import diffusers
import matplotlib.pyplot as plt
import numpy as np
import torch

import fastsampler
from fastsampler import DCSolverScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.models.digits import load_digits_cond_pipeline
from fastsampler.samplers.transforms.dc import cpr_predict
from fastsampler.models.denoisers import from_pipeline
from fastsampler.tuning.teacher import TeacherSpec, teacher_trajectories

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
pipe = load_digits_cond_pipeline()
pipe.set_progress_bar_config(disable=True)
# trailing spacing: NFE 5 starts from pure noise at t = 999 (the shipped DC CPR file was fitted for it)
config = {**pipe.scheduler.config, "timestep_spacing": "trailing"}
labels = torch.arange(20) % 10  # two images per digit
latents = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(SEED))
CPR = Path(fastsampler.assets("digits-cond-dc-cpr"))  # the shipped DC-Solver CPR file of this model

# %% [markdown]
# **The reference.** The teacher of `fastsampler.tune` (`fastsampler.tuning.teacher`): DPM-Solver++ 3M with the exact
# third-order weight, `TEACHER_STEPS` guided evaluations, on a grid that contains the NFE-5 grid's nodes — so it
# starts from the same noise at the same timestep (t = 999). Against 400 steps it differs by
# 0.001 (w = 7.5) and 0.002 (w = 15) RMSE, a small fraction of the errors below.

# %%
def reference(w: float, nfe: int = NFE) -> torch.Tensor:
    grid = UniPCScheduler.from_config(config)
    grid.set_timesteps(nfe)
    model = from_pipeline(pipe, len(labels), guidance_scale=w, class_labels=labels)  # ε_∅ + w (ε_c − ε_∅)
    with torch.no_grad():
        final = teacher_trajectories(grid, model, latents, TeacherSpec("dpmsolver++3", TEACHER_STEPS),
                                     None, progress=False)[-1]
    return final.clamp(-1, 1)  # as the pipeline returns images


references = {w: reference(w) for w in GUIDANCE}

# %% [markdown]
# ## Plain solvers and the plug-ins, same noise
#
# Every configuration is `Scheduler.from_config(config, **options)` (trailing spacing) dropped into the pipeline. RMSE
# is over the 20 images in [−1, 1]; "saturated" is the fraction of pixels at ±1 (the reference's own fraction is
# printed first — guidance at these scales saturates the true solution too).

# %%
CONFIGS = {
    "DPM-Solver++ 2M": (DPMSolverPlusPlusScheduler, {}),
    "DPM-Solver++ 3M": (DPMSolverPlusPlusScheduler, {"solver_order": 3}),
    "UniPC bh2-2": (UniPCScheduler, {}),
    "UniPC bh2-3": (UniPCScheduler, {"solver_order": 3}),
    "DPM-Solver++ 2M + heavy ball 0.8": (DPMSolverPlusPlusScheduler, {"momentum": "hb", "momentum_beta": 0.8}),
    "UniPC bh2-2 + heavy ball 0.8": (UniPCScheduler, {"momentum": "hb", "momentum_beta": 0.8}),
    "GHVB k=4, β=0.8": (DPMSolverPlusPlusScheduler, {"momentum": "ghvb", "momentum_order": 4, "momentum_beta": 0.8}),
    "DC-Solver (shipped CPR)": (DCSolverScheduler, {"dc_cpr_file": str(CPR)}),
    "UniPC bh2-2 + ε scaling 1.005": (UniPCScheduler, {"epsilon_scaling": 1.005}),
}


def make(name: str, w: float):
    cls, options = CONFIGS[name]
    if "dc_cpr_file" in options:
        options = {**options, "dc_guidance_scale": w}  # the CPR predicts ratios for this guidance scale
    return cls.from_config(config, **options)


def generate(scheduler, w: float, nfe: int = NFE) -> torch.Tensor:
    pipe.scheduler = scheduler
    return pipe(labels, guidance_scale=w, num_inference_steps=nfe, latents=latents).images  # (10, 1, 16, 16)


def rmse(images: torch.Tensor, w: float) -> float:
    return float((images - references[w]).pow(2).mean().sqrt())


def saturated(images: torch.Tensor) -> float:
    return float((images.abs() > 0.99).double().mean())


images = {w: {name: generate(make(name, w), w) for name in CONFIGS} for w in GUIDANCE}
print(f"{'':34s}" + "".join(f"   w = {w:<4g} RMSE  saturated" for w in GUIDANCE))
print(f"{'reference':34s}" + "".join(f"{'':16s}{saturated(references[w]):9.3f}" for w in GUIDANCE))
for name in CONFIGS:
    print(f"{name:34s}" + "".join(f"{'':9s}{rmse(images[w][name], w):.3f}{saturated(images[w][name]):9.3f}"
                                  for w in GUIDANCE))

# %% [markdown]
# What the table and the images below show (NFE 5, 20 images: a picture, not a benchmark; the figure shows the
# first 10):
#
# * **Third order hurts.** UniPC bh2-3 and DPM-Solver++ 3M are worse than their second-order versions at both
#   scales — the overshoot of `solver_anatomy.py`, on a real network.
# * **Momentum helps.** Heavy ball (β = 0.8) brings both second-order solvers closer to the reference at both
#   scales — DPM-Solver++ 2M + heavy ball is the closest ready-made option at w = 7.5 and at w = 15 — and saturates
#   less. Momentum makes a solver first order (the paper's Theorem 1): it trades accuracy on smooth paths for
#   stability on violent ones, so use it at high guidance (the paper: β 0.9 / 0.8 / 0.6 at CFG 7.5 / 15 / 22.5 on
#   Stable Diffusion). It also saturates *less than the reference*: it damps the guided path itself, not only the
#   solver's error.
# * **DC-Solver's CPR is only as good as its fitting range.** At w = 7.5, inside the range the shipped file was
#   fitted on, its ratios clearly improve on plain UniPC bh2-2; at w = 15, outside it, the extrapolated ratios make
#   the images worse than plain (the scheduler warns) — below we tune DC for w = 15 instead.
# * **ε scaling by 1.005** barely changes anything at this NFE.

# %%
def strip(ims: torch.Tensor) -> np.ndarray:
    ims = ((ims[:10, 0] + 1) / 2).numpy()  # the first image of each digit
    return np.concatenate(list(np.pad(ims, ((0, 0), (0, 0), (0, 1)), constant_values=1.0)), axis=1)[:, :-1]


def image_grid(rows_by_w: dict[float, dict[str, torch.Tensor]]):
    names = list(next(iter(rows_by_w.values())))
    fig, axes = plt.subplots(len(names) + 1, len(rows_by_w), figsize=(5.6 * len(rows_by_w), 0.9 * (len(names) + 1)),
                             squeeze=False)
    for j, (w, rows) in enumerate(rows_by_w.items()):
        axes[0, j].imshow(strip(references[w]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0, j].set_title(f"reference ({TEACHER_STEPS}-step DPM-Solver++ 3M), w = {w:g}", fontsize=8, loc="left")
        for i, name in enumerate(names, start=1):
            axes[i, j].imshow(strip(rows[name]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[i, j].set_title(f"{name}, NFE {NFE}, w = {w:g}: RMSE {rmse(rows[name], w):.3f}", fontsize=8,
                                 loc="left")
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


fig = image_grid(images)
if FIGURES:
    fig.savefig(Path(FIGURES) / "guidance_artifacts.png", dpi=72, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## DC outside its fitting range: tune it for the scale you sample at
#
# The CPR file predicts one ratio per step from (NFE, w) with a polynomial fitted on the tuned ratios of its
# `fitted_on` grid. Evaluated outside that grid it extrapolates a quadratic in w (clamped to [0.3, 1.7]), and the
# scheduler warns (`RuntimeWarning`: the file's range and the requested setting). Fitting ratios for w = 15 directly costs a teacher solve and a few dozen model evaluations: here on 10
# other noises (one per digit), judged on the 20 images above.

# %%
cpr = json.loads(CPR.read_text())
fitted_w = sorted({w for _, w in cpr["fitted_on"]})
print(f"CPR fitted on NFE {sorted({n for n, _ in cpr['fitted_on']})} × w {fitted_w}")
for w in GUIDANCE:
    ratios = cpr_predict(np.array(cpr["coefficients"]), NFE, w, tuple(cpr["clamp"]))
    print(f"  ratios it predicts at NFE {NFE}, w = {w:g}:", np.round(ratios, 3))

# %%
W_HIGH = max(GUIDANCE)
fit_noise = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(SEED + 1))
tuned = fastsampler.tune(DCSolverScheduler.from_config(config), pipe, fit_noise, NFE, method="dc", search="scan",
                         guidance_scale=W_HIGH, class_labels=list(range(10)), teacher="dpmsolver++3:100",
                         progress=False)
print("ratios tuned for w = 15:", np.round(tuned.tuning_report["steps"][NFE]["ratios"], 3))
dc_rows = {"UniPC bh2-2 (plain)": images[W_HIGH]["UniPC bh2-2"],
           "DC-Solver, shipped CPR (extrapolated)": images[W_HIGH]["DC-Solver (shipped CPR)"],
           "DC-Solver, tuned at w = 15": generate(tuned, W_HIGH)}
for name, ims in dc_rows.items():
    print(f"{name:40s} RMSE {rmse(ims, W_HIGH):.3f}")
image_grid({W_HIGH: dc_rows})
plt.show()

# %% [markdown]
# ## Try it
#
# `compare(config, w, nfe)` samples the 20 images with one configuration next to plain UniPC bh2-2 and the
# reference at that (w, NFE), draws the first 10, and returns both RMSEs. Called directly below; in Jupyter the
# widget re-runs it.

# %%
import ipywidgets as widgets


def compare(name: str = "UniPC bh2-2 + heavy ball 0.8", w: float = 15.0, nfe: int = 5) -> dict[str, float]:
    ref = reference(w, nfe)
    rows = {name: generate(make(name, w), w, nfe), "UniPC bh2-2": generate(make("UniPC bh2-2", w), w, nfe),
            f"reference ({TEACHER_STEPS} steps)": ref}
    fig, axes = plt.subplots(3, 1, figsize=(6, 2.6))
    for ax, (label, ims) in zip(axes, rows.items()):
        ax.imshow(strip(ims), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        err = float((ims - ref).pow(2).mean().sqrt())
        ax.set_title(f"{label}, w = {w:g}, NFE {nfe}: RMSE {err:.3f}", fontsize=8, loc="left")
        ax.set_axis_off()
    fig.tight_layout()
    plt.show()
    return {label: float((ims - ref).pow(2).mean().sqrt()) for label, ims in list(rows.items())[:2]}


compare("GHVB k=4, β=0.8", 15.0, 5)

# %%
widgets.interact_manual(compare, name=widgets.Dropdown(options=list(CONFIGS), value="UniPC bh2-2 + heavy ball 0.8"),
                        w=widgets.FloatSlider(value=15.0, min=1.0, max=20.0, step=0.5),
                        nfe=widgets.IntSlider(value=5, min=4, max=15));
