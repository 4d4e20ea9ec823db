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
# # Quickstart: swap the scheduler of a diffusers pipeline
#
# fastsampler's schedulers are drop-in diffusers schedulers: one line,
# `pipe.scheduler = UniPCScheduler.from_config(pipe.scheduler.config)`, and the pipeline samples with UniPC.
# This notebook does that on the **embedded digits DDPM** (a diffusers `DDPMPipeline`, 16×16 digits,
# ε-prediction, 1000 linear-β steps; it ships with the package, so everything here runs offline on a CPU),
# and shows what changes at 5 and 10 model evaluations (NFE):
#
# 1. images from **the same noise** for diffusers' schedulers and ours, side by side;
# 2. their distance to a 50-step solve of the same ODE from the same noise (the sample a solver *should* reach);
# 3. a widget to try any solver, order, NFE and option.
#
# Runs top to bottom in well under a minute on 2 CPU cores.

# %% tags=["parameters"]
import os

NFES = (5, 10)  # the step budgets compared
BATCH = 8  # images per row (one noise each; the same noises in every row)
SEED = 0
FIGURES = os.environ.get("FASTSAMPLER_NOTEBOOK_FIGURES")  # `python notebooks/run.py --figures` sets it

# %%
import functools
from pathlib import Path

import diffusers
import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from fastsampler import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.models.digits import load_digits_pipeline

diffusers.utils.logging.set_verbosity_error()  # no config notices from from_config
diffusers.utils.logging.disable_progress_bar()  # no tqdm widget while loading
pipe = load_digits_pipeline()
pipe.set_progress_bar_config(disable=True)
config = pipe.scheduler.config  # the DDPMScheduler config the model was trained with
print(f"UNet2DModel, {sum(p.numel() for p in pipe.unet.parameters()):,} parameters; scheduler "
      f"{config['_class_name']}: {config['beta_schedule']} betas, prediction_type={config['prediction_type']!r}")

# %% [markdown]
# ## One line per scheduler
#
# Every scheduler is built `from_config(pipe.scheduler.config, …)`, so it inherits the model's betas and
# prediction type. We also pass `timestep_spacing="trailing"` (the embedded pipeline ships with it; a checkpoint of
# your own may not): every step count then starts at t = 999, pure noise, so the rows below differ only by the
# solver (with `"leading"` spacing, 5 steps start at t = 800 for DDIM and t = 830 for the multistep schedulers,
# diffusers' and ours alike).
#
# `generate` is the plain pipeline call; the noise comes from the seeded `generator`, so every scheduler
# starts from the same `BATCH` noises.

# %%
def generate(scheduler, nfe: int, seed: int = SEED) -> np.ndarray:
    """(BATCH, 16, 16) images in [0, 1] from the pipeline with ``scheduler`` at ``nfe`` steps."""
    pipe.scheduler = scheduler
    out = pipe(batch_size=BATCH, num_inference_steps=nfe, generator=torch.Generator().manual_seed(seed),
               output_type="np")
    return out.images[..., 0]


def trailing(cls, **options):
    return cls.from_config(config, timestep_spacing="trailing", **options)


SCHEDULERS = {
    "diffusers DDIM": lambda: trailing(DDIMScheduler),
    "diffusers DPM-Solver++ 2M": lambda: trailing(DPMSolverMultistepScheduler),
    "fastsampler DPM-Solver++ 2M": lambda: trailing(DPMSolverPlusPlusScheduler),
    "fastsampler DEIS-3": lambda: trailing(DEISScheduler, solver_order=3),
    "fastsampler UniPC bh2-2": lambda: trailing(UniPCScheduler),
    "fastsampler UniPC bh1-3": lambda: trailing(UniPCScheduler, solver_order=3, solver_type="bh1"),
}

# %% [markdown]
# The reference: the same noises through a 50-step third-order solve (DPM-Solver++ 3M with the exact third-order
# weight). At 50 steps the ODE is solved to well below the differences we look at, so the RMSE of a row against it
# is that solver's error at that NFE (pixel values in [0, 1]).

# %%
reference = generate(trailing(DPMSolverPlusPlusScheduler, solver_order=3, exact_third_order=True), 50)


def rmse(images: np.ndarray) -> float:
    return float(np.sqrt(np.mean((images - reference) ** 2)))


rows = {name: {nfe: generate(make(), nfe) for nfe in NFES} for name, make in SCHEDULERS.items()}
print(f"{'scheduler':30s}" + "".join(f"  RMSE @ NFE {n:<3d}" for n in NFES))
for name, by_nfe in rows.items():
    print(f"{name:30s}" + "".join(f"  {rmse(by_nfe[n]):<13.4f}" for n in NFES))

# %% [markdown]
# Each row: the same 8 noises; left NFE 5, right NFE 10, the 50-step reference at the bottom.
# What to look for: DDIM (first order) at NFE 5 leaves noise in the hard samples (the second digit) and is about
# twice as far from the reference as the multistep solvers; at NFE 10 every multistep solver is close to it.
# diffusers' DPM-Solver++ 2M and ours run the same math: identical images and errors. Which of the multistep
# solvers is best depends on the model and the NFE (on this network's FID, UniPC bh1-3 wins at NFE 5–10, see the
# README); eight images are a picture, not a benchmark.

# %%
def strip(images: np.ndarray) -> np.ndarray:
    """B images side by side, with a one-pixel gap."""
    padded = np.pad(images, ((0, 0), (0, 0), (0, 1)), constant_values=1.0)
    return np.concatenate(list(padded), axis=1)[:, :-1]


fig, axes = plt.subplots(len(rows) + 1, len(NFES), figsize=(5.2 * len(NFES), 0.95 * (len(rows) + 1)),
                         squeeze=False)
for i, (name, by_nfe) in enumerate(rows.items()):
    for j, nfe in enumerate(NFES):
        axes[i, j].imshow(strip(by_nfe[nfe]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[i, j].set_title(f"{name}, NFE {nfe}: RMSE {rmse(by_nfe[nfe]):.3f}", fontsize=8, loc="left")
for j in range(len(NFES)):
    axes[-1, j].imshow(strip(reference), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[-1, j].set_title("reference: DPM-Solver++ 3M, 50 steps", fontsize=8, loc="left")
for ax in axes.flat:
    ax.set_axis_off()
fig.tight_layout()
if FIGURES:
    fig.savefig(Path(FIGURES) / "quickstart.png", dpi=72, bbox_inches="tight")
plt.show()

# %% [markdown]
# **Not every diffusers scheduler runs in every diffusers pipeline.** `DDPMPipeline` passes `generator=` to
# `scheduler.step()`; diffusers' `UniPCMultistepScheduler` and `DEISMultistepScheduler` do not accept it
# (diffusers 0.42). Ours take the whole `step()` signature of the pipelines, so they drop in anywhere:

# %%
try:
    generate(trailing(UniPCMultistepScheduler), 5)
    print("diffusers' UniPCMultistepScheduler ran in DDPMPipeline")
except TypeError as err:
    print(f"diffusers' UniPCMultistepScheduler in DDPMPipeline: TypeError: {err}")
print(f"fastsampler's UniPCScheduler in DDPMPipeline: {generate(trailing(UniPCScheduler), 5).shape[0]} images")

# %% [markdown]
# ## Try any configuration
#
# `show(solver, order, nfe, option)` samples the same noises with one configuration and draws it above the
# diffusers default (`DPMSolverMultistepScheduler`, order 2) at the same NFE, each with its RMSE against the
# reference. It is a plain function: the cell below calls it directly (so the executed notebook shows a result
# without a browser), and `ipywidgets.interact_manual` wires it to controls and a *Run* button in Jupyter.
#
# The call below shows a pitfall worth knowing: **Karras sigmas at NFE 5.** The Karras grid (good for Stable
# Diffusion at 20+ steps) puts this model's 5 evaluations at t = 999, 843, 593, 142, 0 — the last one at the
# smallest noise level, where it changes almost nothing — and lands several times further from the reference
# than the default grid. diffusers' `DPMSolverMultistepScheduler(use_karras_sigmas=True)` gives the same images:
# it is the grid, not the solver. Try NFE 10 or 15 with the widget.
#
# Options (keyword arguments of our schedulers; see the README's option table):
# * `use_karras_sigmas=True`: Karras' noise levels (denser at low noise);
# * `final_sigmas_type="sigma_min"`: end at the smallest trained noise level instead of jumping to σ = 0;
# * `momentum="hb", momentum_beta=0.8`: heavy-ball momentum (arXiv 2307.11118), for high guidance;
# * `epsilon_scaling=1.005`: divide ε̂ by 1.005 against exposure bias (arXiv 2308.15321).

# %%
SOLVERS = {"DPM-Solver++": (DPMSolverPlusPlusScheduler, {}), "UniPC bh2": (UniPCScheduler, {}),
           "UniPC bh1": (UniPCScheduler, {"solver_type": "bh1"}), "DEIS": (DEISScheduler, {})}
OPTIONS = {"none": {}, "Karras sigmas": {"use_karras_sigmas": True},
           "end at sigma_min": {"final_sigmas_type": "sigma_min"},
           "heavy-ball momentum 0.8": {"momentum": "hb", "momentum_beta": 0.8},
           "epsilon scaling 1.005": {"epsilon_scaling": 1.005}}


@functools.lru_cache(maxsize=None)
def baseline(nfe: int) -> np.ndarray:
    return generate(trailing(DPMSolverMultistepScheduler), nfe)


def show(solver: str = "UniPC bh2", order: int = 2, nfe: int = 5, option: str = "Karras sigmas") -> dict[str, float]:
    """Sample BATCH images with one configuration and with diffusers' default; plot both; return their RMSEs."""
    cls, kwargs = SOLVERS[solver]
    label = f"{solver}-{order}, {option}, NFE {nfe}"
    images = {label: generate(trailing(cls, solver_order=order, **kwargs, **OPTIONS[option]), nfe),
              f"diffusers DPMSolverMultistep 2M, NFE {nfe}": baseline(nfe)}
    fig, axes = plt.subplots(2, 1, figsize=(6, 1.9))
    for ax, (name, im) in zip(axes, images.items()):
        ax.imshow(strip(im), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}: RMSE {rmse(im):.3f}", fontsize=8, loc="left")
        ax.set_axis_off()
    fig.tight_layout()
    plt.show()
    return {name: rmse(im) for name, im in images.items()}


show("UniPC bh2", 2, 5, "Karras sigmas")

# %%
import ipywidgets as widgets

widgets.interact_manual(show, solver=widgets.Dropdown(options=list(SOLVERS), value="UniPC bh2"),
                        order=widgets.IntSlider(value=2, min=1, max=3), nfe=widgets.IntSlider(value=5, min=3, max=25),
                        option=widgets.Dropdown(options=list(OPTIONS), value="Karras sigmas"));

# %% [markdown]
# ## Next
#
# * `solver_anatomy.py`: what each solver does along the ODE, on a 2-D mixture where the exact path is known.
# * `tuning.py`: fit DC-Solver ratios and a solver schedule to this model in seconds, save them with the scheduler.
# * `guidance_artifacts.py`: the class-conditional model at high guidance, and what momentum, DC and ε scaling do.
