"""Why do DC-Solver's fits lower the error yet move the distribution (issue 21, item 5)?

On the embedded digits DDPM, DC ratios are fitted at ``--nfe`` on ``--fit`` noises in several variants, each
testing one suspect, and every sampler runs from ``--eval`` other noises. Per sampler: the RMSE against the ODE
solution from the same noise (DPM-Solver++ 3M, ``--ode-steps`` steps: the "error"), the pixel Fréchet distance
of its samples to the ODE's own samples (how far the distribution moved from the ODE's) and to the digits test
split (359 images) — both on the digits' native 8×8 grid —, the mean per-pixel standard deviation across samples
(spread: a sampler that blurs towards
the mean lowers it), and the fitted ratios.

Variants: ``dc`` (tune's defaults: gradient search, bounds 0.3–1.7, per-step objective, in-batch validation),
``dc-256`` (four times the fitting noises: overfitting?), ``dc-bounds0.8-1.2`` (small ratios only: too-large
ratios?), ``dc-final`` (the final sample as each step's objective), ``dc-teacher500`` (a 500-step teacher: the
teacher?); and ``dc, last ratio 1`` (the default fit with its last, largest ratio set to 1).

    python benchmarks/dc_frechet.py [--variant eps|v] [--nfe 10] [--fit 64] [--eval 1000] [--ode-steps 500]

Writes ``benchmarks/results/dc_frechet.{json,md}`` with the machine and the date.
"""

from __future__ import annotations

import json
import time

import numpy as np
import click
import torch
from scipy import linalg

import harness
from tune_bench import BUILT_INS, final_sample

VARIANTS = {"dc": ({}, 1, None), "dc-256": ({}, 4, None), "dc-bounds0.8-1.2": ({"bounds": (0.8, 1.2)}, 1, None),
            "dc-final": ({"objective": "final"}, 1, None), "dc-teacher500": ({}, 1, "dpmsolver++3:500")}


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the pixels of two image sets, on the digits' native 8×8 grid
    (2×2 means: the 16×16 images are bilinear upsamplings of 8×8 digits, so the data's 256-pixel covariance is
    singular)."""
    pool = torch.nn.functional.avg_pool2d
    x, y = pool(a.detach().double(), 2).flatten(1).numpy(), pool(b.detach().double(), 2).flatten(1).numpy()
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(cov_x @ cov_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y - 2 * root))


def sample(scheduler, model, noise: torch.Tensor, n: int) -> torch.Tensor:
    from fastsampler.tuning.runner import run

    scheduler.set_timesteps(n)
    with torch.no_grad():
        return run(scheduler.plan, model, noise)[0]


@harness.command(out=harness.RESULTS, threads=1)
@click.option("--nfe", type=int, default=10, show_default=True)
@click.option("--variant", type=click.Choice(["eps", "v"]), default="eps", show_default=True,
              help="the digits DDPM's prediction type")
@click.option("--fit", type=int, default=64, show_default=True)
@click.option("--eval", type=int, default=1000, show_default=True)
@click.option("--ode-steps", type=int, default=500, show_default=True)
def main(args) -> None:

    import fastsampler
    from fastsampler.models.digits import digits_dataset, load_digits_pipeline
    from fastsampler.tuning.api import default_cache_dir
    from fastsampler.models.denoisers import from_pipeline
    from fastsampler.tuning.teacher import TeacherSpec, teacher_trajectories

    pipe = load_digits_pipeline(args.variant)
    pipe.unet.requires_grad_(False)  # only DC's ratios are fitted
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    held = torch.randn(args.eval, *shape, generator=torch.Generator().manual_seed(1))
    held_model = from_pipeline(pipe, args.eval)
    base = fastsampler.UniPCScheduler.from_config(pipe.scheduler.config)
    base.set_timesteps(args.nfe)
    ode = teacher_trajectories(base, held_model, held, TeacherSpec(steps=args.ode_steps), default_cache_dir(),
                               progress=False)[-1]  # cached: the ODE solve is most of the cost
    data = digits_dataset("test")

    def measure(samples: torch.Tensor) -> dict:
        return {"rmse": float((samples.double() - ode.double()).pow(2).mean().sqrt()),
                "fd_ode": frechet(samples, ode), "fd_data": frechet(samples, data),
                "spread": float(samples.double().std(0).mean())}

    rows = {"ODE": {**measure(ode), "rmse": 0.0},
            "base (UniPC bh2-2)": measure(sample(base, held_model, held, args.nfe))}
    import diffusers

    for name in ("DPM++ 2M", "DEIS 3", "UniPC bh2-3"):
        cls, opts = BUILT_INS[name]
        rows[name] = measure(final_sample(getattr(diffusers, cls).from_config(pipe.scheduler.config, **opts),
                                          held_model, held, args.nfe))
    for name, (options, scale, teacher) in VARIANTS.items():
        noise = torch.randn(args.fit * scale, *shape, generator=torch.Generator().manual_seed(0))
        began = time.perf_counter()
        tuned = fastsampler.tune(base, from_pipeline(pipe, noise.shape[0]), noise, args.nfe, "dc", cache_dir=None,
                                 progress=False, teacher=teacher, teacher_check=False, **options)
        seconds = time.perf_counter() - began
        entry = tuned.tuning_report["steps"][args.nfe]
        rows[name] = {**measure(sample(tuned, held_model, held, args.nfe)), "ratios": entry["ratios"],
                      "kept_plain": entry.get("kept_plain", False), "seconds": seconds}
        print(name, json.dumps(rows[name]), flush=True)
    # the last step's ratio alone (the largest, and where an overshoot reaches the samples undamped): set to 1
    from fastsampler.tuning.dc import dc_plan

    ratios = [*rows["dc"]["ratios"][:-1], 1.0]
    probe = fastsampler.UniPCScheduler.from_config(pipe.scheduler.config)
    probe.set_timesteps(args.nfe)
    probe.set_plan(dc_plan(probe, ratios, 2))
    rows["dc, last ratio 1"] = {**measure(sample(probe, held_model, held, args.nfe)), "ratios": ratios}
    stamp = harness.run_stamp()
    result = {**stamp, "variant": args.variant, "nfe": args.nfe, "fit": args.fit, "eval": args.eval,
              "ode_steps": args.ode_steps, "rows": rows}
    lines = [f"# DC ratios vs the distribution, digits DDPM ({args.variant}), NFE {args.nfe} "
             f"({stamp['date']}, {stamp['machine']})",
             "", f"`python benchmarks/dc_frechet.py --variant {args.variant} --nfe {args.nfe} --eval {args.eval} "
             f"--ode-steps {args.ode_steps}`: {args.eval} held-out noises; "
             f"ODE = DPM-Solver++ 3M with {args.ode_steps} steps; FD = pixel Fréchet distance on the digits' "
             "native 8×8 grid.", "",
             "| sampler | RMSE vs ODE | FD to ODE samples | FD to test digits | pixel spread | ratios |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ratios = " ".join(f"{v:.2f}" for v in r.get("ratios", [])) + (" (kept plain)" if r.get("kept_plain") else "")
        lines.append(f"| {name} | {r['rmse']:.4f} | {r['fd_ode']:.4f} | {r['fd_data']:.4f} | {r['spread']:.4f} | "
                     f"{ratios} |")
    harness.write_results(args.out, f"dc_frechet_{args.variant}_nfe{args.nfe}", result, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    main()
