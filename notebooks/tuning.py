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
# # Tuning a sampler to your model, in seconds
#
# Fixed solver choices do not transfer between models: on the exact digits mixture ending UniPC at σ_min wins
# 10–30 %, on the trained digits network it loses (README, FID section). So fastsampler fits the sampler to *your*
# model and *your* step budget. `fastsampler.tune(scheduler, pipe, noise, num_inference_steps, method=…)` compares
# the scheduler's samples from a few fitting noises with a teacher (a 100-step third-order solve of the same ODE
# from the same noises), and returns a scheduler that runs the fitted plan:
#
# * `method="dc"` — **DC-Solver** (arXiv 2409.03755): each step stores, instead of the newest prediction m_i, the
#   Lagrange interpolation of the last three at a shifted time, D̂_i = Σ_k L_k(τ_i) m_{i−k} with
#   τ_i = t_{i−1} + ρ_i (t_i − t_{i−1}); one ratio ρ_i per step (ρ = 1: plain UniPC), chosen greedily step by step;
# * `method="timesteps"` — **learned time points** (LD3-style, arXiv 2405.15506): the N − 1 interior nodes of the
#   grid, by gradient descent in λ through the sampling loop;
# * `method="s3"` — **S³ schedule search** (arXiv 2312.07243): per step the Taylor order, data or noise prediction,
#   the derivative estimate and a corrector, plus a Karras grid exponent; optuna's TPE proposes, a small random
#   forest screens, and only promising candidates cost model evaluations.
#
# Here: the embedded digits DDPM at **NFE 5**, 16 fitting noises, every fit judged on 64 *other* noises through
# the ordinary pipeline; then the tuned scheduler is saved and loaded back into a pipeline. Under a minute on 2 CPU
# cores.

# %% tags=["parameters"]
import os

NFE = 5
N_FIT, N_VAL = 16, 64  # fitting noises; held-out noises for the verdict
TEACHER = "dpmsolver++3:100"  # teacher solver and its number of model evaluations
TIMESTEP_ITERS = 10  # gradient steps of method="timesteps" (Adam, lr 0.02)
S3_BUDGET = 250  # model evaluations of method="s3" (a candidate costs NFE)
SEED = 0
FIGURES = os.environ.get("FASTSAMPLER_NOTEBOOK_FIGURES")  # `python notebooks/run.py --figures` sets it

# %%
import tempfile
from pathlib import Path

import diffusers
import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers import DiffusionPipeline

import fastsampler
from fastsampler import DCSolverScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsampler.models.digits import load_digits_pipeline

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()  # no tqdm widget while loading
pipe = load_digits_pipeline()
pipe.set_progress_bar_config(disable=True)
config = pipe.scheduler.config


def trailing(cls, **options):
    """From the pipeline's config; trailing spacing so every NFE starts at t = 999 (one reference for all)."""
    return cls.from_config(config, timestep_spacing="trailing", **options)


fit_noise = torch.randn(N_FIT, 1, 16, 16, generator=torch.Generator().manual_seed(SEED))
tune_options = dict(teacher=TEACHER, progress=False)  # teacher trajectories are cached under $FASTSAMPLER_CACHE

# %% [markdown]
# ## DC-Solver ratios
#
# `search="scan"` is a derivative-free 1-D search per step (scipy's Brent), a few model evaluations each; the
# official gradient search (`search="gradient"`, AdamW through the model) gives the same ratios here at several times
# the cost. The first two steps have no history to interpolate and keep ρ = 1. The report has, per step, the loss
# of the plain step and of the tuned one.

# %%
dc = fastsampler.tune(trailing(DCSolverScheduler), pipe, fit_noise, NFE, method="dc", search="scan", **tune_options)
dc_report = dc.tuning_report["steps"][NFE]
print("ratios:", np.round(dc_report["ratios"], 3))
print(f"final loss on the fitting noises: plain {dc_report['final_loss_plain']:.2e} → tuned "
      f"{dc_report['final_loss_tuned']:.2e} ({dc_report['model_evaluations']} model evaluations, "
      f"{dc_report['seconds']:.1f} s)")

# %% [markdown]
# ## Learned time points
#
# The plain grid is uniform in t (999, 799, …, 199). Each iteration linearises the plan in the interior λ's
# (central differences of the closed-form plan builder: no model call) and back-propagates the loss through the
# sampling loop and the UNet. The loss is sharply curved in the time points: at `lr=0.05` Adam overshoots and
# the loss oscillates, hence the default 0.02 (either way `tune` keeps the best grid it has seen; with
# `validation_noise` it keeps the one best on those held-out noises).

# %%
ts = fastsampler.tune(trailing(UniPCScheduler), pipe, fit_noise, NFE, method="timesteps", iters=TIMESTEP_ITERS,
                      **tune_options)
ts_report = ts.tuning_report["steps"][NFE]
print("timesteps:", [int(t) for t in ts_report["timesteps_initial"]], "→",
      [int(t) for t in ts_report["timesteps_learned"]])
print(f"loss: {ts_report['loss_initial']:.2e} → {ts_report['loss_final_grid']:.2e} (after rounding to integer "
      f"timesteps), {ts_report['seconds']:.1f} s")

# %% [markdown]
# ## S³ schedule search, tiny budget
#
# A real search uses thousands of model evaluations (the default budget is 3000); `S3_BUDGET` evaluations is a
# demonstration of the mechanics. The search starts from the scheduler's own solver (UniPC bh2-2 is in the space),
# so it can only improve on the fitting noises. The result is an `S3Scheduler` whose config carries the schedule.

# %%
s3 = fastsampler.tune(trailing(UniPCScheduler), pipe, fit_noise, NFE, method="s3", budget_evaluations=S3_BUDGET,
                      warmup=8, **tune_options)
s3_report = s3.tuning_report["steps"][NFE]
print(f"{s3_report['evaluated']} candidates evaluated, {s3_report['screened_out']} screened out by the predictor; "
      f"loss {s3_report['baseline_score']:.2e} → {s3_report['best_score']:.2e}, {s3_report['seconds']:.1f} s")
for i, step in enumerate(s3_report["best"]["schedule"]["steps"]):
    print(f"  step {i}: {step}")
print("  grid exponent:", s3_report["best"]["grid_power"], "(None: the scheduler's own grid)")

# %% [markdown]
# ## The verdict on held-out noises, through the pipeline
#
# Tuning is judged on noises it never saw: 64 images from the ordinary `DDPMPipeline` call, each scheduler dropped
# in as usual, against a 100-step DPM-Solver++ 3M solve of the same noises (pixel RMSE, images in [0, 1]).

# %%
def generate(scheduler, steps: int = NFE) -> np.ndarray:
    pipe.scheduler = scheduler
    out = pipe(batch_size=N_VAL, num_inference_steps=steps, generator=torch.Generator().manual_seed(SEED + 1),
               output_type="np")
    return out.images[..., 0]


reference = generate(trailing(DPMSolverPlusPlusScheduler, solver_order=3, exact_third_order=True), 100)
tuned = {"plain UniPC bh2-2": trailing(UniPCScheduler), "DC-Solver ratios": dc, "learned timesteps": ts,
         "S³ schedule": s3}
images = {name: generate(s) for name, s in tuned.items()}
val_rmse = {name: float(np.sqrt(np.mean((im - reference) ** 2))) for name, im in images.items()}
fit_gain = {"DC-Solver ratios": dc_report["final_loss_tuned"] / dc_report["final_loss_plain"],
            "learned timesteps": ts_report["loss_final_grid"] / ts_report["loss_initial"],
            "S³ schedule": s3_report["best_score"] / s3_report["baseline_score"]}
print(f"{'':20s} {'fitting loss':>14s} {'held-out RMSE':>14s}")
for name, value in val_rmse.items():
    fit = f"{fit_gain[name]:.2f}× plain" if name in fit_gain else ""
    print(f"{name:20s} {fit:>14s} {value:8.4f} ({value / val_rmse['plain UniPC bh2-2']:.2f}×)")

# %% [markdown]
# Read the two columns together (the fitting loss is a mean *square*, the held-out column an RMSE, so compare
# directions, not sizes). On this model and budget, DC-Solver's gain carries over to noises it never saw: three
# ratios fitted on 16 noises. The learned grid improves the fitting loss more than DC does and keeps none of it on
# the held-out noises: four free time points and 16 noises fit those noises, not the model. The S³ search, at a
# budget of 250 evaluations, finds little and keeps nothing. That is the general rule of tuning: always judge on
# held-out noises (`validation_noise=` reports it from `fastsampler.tune`), and give the searches the noises and
# budget they need (LD3 fits on ~100 noises; S³ searches with thousands of evaluations) before trusting them.

# %% [markdown]
# Top: what each search optimised, on the fitting noises — DC's loss per step (plain vs tuned; the last step's is
# the final loss), the learned-timestep loss per iteration (Adam can step uphill; the best grid seen is kept), and
# S³'s best score after each evaluated candidate. Below: 8 of the held-out images, the same noises in every row.

# %%
def strip(ims: np.ndarray) -> np.ndarray:
    return np.concatenate(list(np.pad(ims, ((0, 0), (0, 0), (0, 1)), constant_values=1.0)), axis=1)[:, :-1]


fig = plt.figure(figsize=(10, 8.6))
top, bottom = fig.subfigures(2, 1, height_ratios=[1, 2.1])
ax = top.subplots(1, 3)
steps = np.arange(NFE)
plain_steps = [np.nan if v is None else v for v in dc_report["step_loss_plain"]]
tuned_steps = [np.nan if v is None else v for v in dc_report["step_loss_tuned"]]
ax[0].bar(steps - 0.2, plain_steps, 0.4, label="plain")
ax[0].bar(steps + 0.2, tuned_steps, 0.4, label="DC")
ax[0].set(yscale="log", xlabel="step", ylabel="loss (fitting noises)", title="DC-Solver: loss per step")
ax[0].legend(fontsize=7)
ax[1].plot(ts_report["losses"], "o-", ms=3)
ax[1].set(xlabel="iteration", title="learned timesteps: final loss")
ax[2].plot(s3_report["history"], "o-", ms=3)
ax[2].axhline(s3_report["baseline_score"], color="0.5", ls=":", label="its own solver")
ax[2].set(xlabel="evaluated candidate", title="S³: best final loss so far")
ax[2].legend(fontsize=7)
top.subplots_adjust(wspace=0.35, bottom=0.2, top=0.88)
rows = {"reference (100-step DPM-Solver++ 3M)": reference, **images}
ax = bottom.subplots(len(rows), 1)
for a, (name, im) in zip(ax, rows.items()):
    a.imshow(strip(im[:8]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    a.set_title(name + (f", NFE {NFE}: held-out RMSE {val_rmse[name]:.4f} (all {N_VAL} images)"
                        if name in val_rmse else ""), fontsize=9, loc="left")
    a.set_axis_off()
bottom.subplots_adjust(hspace=0.45, top=0.94, bottom=0.01)
if FIGURES:
    fig.savefig(Path(FIGURES) / "tuning.png", dpi=72, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Save it, load it, ship it
#
# A tuned scheduler holds its plans (one per tuned step count); `save_pretrained` writes them to
# `fastsampler_plans.json` beside `scheduler_config.json`, and `from_pretrained` restores them — also as part of a
# whole pipeline folder (`DiffusionPipeline.from_pretrained`). A plan is refused if loaded into a scheduler for
# another noise schedule or prediction type. At a step count it was not tuned for, the scheduler runs its plain
# solver (`DCSolverScheduler` says so once).

# %%
with tempfile.TemporaryDirectory() as folder:
    dc.save_pretrained(folder)
    print("scheduler folder:", sorted(p.name for p in Path(folder).iterdir()))
    same = np.array_equal(generate(DCSolverScheduler.from_pretrained(folder)), images["DC-Solver ratios"])
    print("DCSolverScheduler.from_pretrained → identical images:", same)

with tempfile.TemporaryDirectory() as folder:
    pipe.scheduler = s3
    pipe.save_pretrained(folder)
    loaded = DiffusionPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    out = loaded(batch_size=N_VAL, num_inference_steps=NFE, generator=torch.Generator().manual_seed(SEED + 1),
                 output_type="np").images[..., 0]
    print(f"pipeline folder → {type(loaded).__name__} with {type(loaded.scheduler).__name__}; identical images:",
          np.array_equal(out, images["S³ schedule"]))
