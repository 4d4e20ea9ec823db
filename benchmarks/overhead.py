"""CPU time of one ``step()``: each fastsampler scheduler next to its diffusers equivalent.

Protocol: SD's noise schedule (scaled_linear 0.00085–0.012, ε-prediction), 25 steps, fp32 latents of
1×4×64×64 and 1×4×128×128, ``torch.set_num_threads(1)``. Every repetition calls ``set_timesteps(25)`` and runs
all 25 steps, feeding ``prev_sample`` back in with a fixed random model output; only the ``step()`` calls of
the steady-state middle (steps 5–19, where every multistep history is full) are timed, each with
``time.perf_counter_ns``. Ours and diffusers' repetitions alternate, so load drifts hit both alike. Reported:
the median per step (and the quartiles) and the ratio ours / diffusers; the goal is ≤ 0.3×.

    python benchmarks/overhead.py [--repeats 60] [--out benchmarks/results]

Writes overhead.json and overhead.md with the machine and the date.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import click

import harness
import torch

NUM_STEPS = 25
TIMED_STEPS = range(5, 20)
SHAPES = ((1, 4, 64, 64), (1, 4, 128, 128))
SD_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 prediction_type="epsilon", timestep_spacing="linspace")

# label → (fastsampler class, its options, diffusers class, its options)
PAIRS: dict[str, tuple[str, dict, str, dict]] = {
    "DPM++ 2M": ("DPMSolverPlusPlusScheduler", {"solver_order": 2}, "DPMSolverMultistepScheduler", {"solver_order": 2}),
    "DPM++ 3M": ("DPMSolverPlusPlusScheduler", {"solver_order": 3}, "DPMSolverMultistepScheduler", {"solver_order": 3}),
    "DPM++ 2S (singlestep)": ("DPMSolverPlusPlusScheduler", {"solver_order": 2, "solver_method": "singlestep"},
                              "DPMSolverSinglestepScheduler", {"solver_order": 2}),
    "UniPC bh2 order 2": ("UniPCScheduler", {"solver_type": "bh2", "solver_order": 2},
                          "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2}),
    "DEIS log-rho order 2": ("DEISScheduler", {"solver_order": 2}, "DEISMultistepScheduler", {"solver_order": 2}),
}


def make_scheduler(library: str, name: str, options: dict):
    import diffusers

    import fastsampler

    module = fastsampler if library == "fastsampler" else diffusers
    return getattr(module, name).from_config({**SD_CONFIG, **options})


def timed_run(scheduler, sample: torch.Tensor, model_output: torch.Tensor) -> list[int]:
    """One 25-step run; the nanoseconds of each timed step() call."""
    scheduler.set_timesteps(NUM_STEPS)
    x, times = sample, []
    for i, t in enumerate(scheduler.timesteps):
        start = time.perf_counter_ns()
        x = scheduler.step(model_output, t, x).prev_sample
        elapsed = time.perf_counter_ns() - start
        if i in TIMED_STEPS:
            times.append(elapsed)
    return times


def measure_pair(ours, theirs, shape: tuple[int, ...], repeats: int) -> dict[str, list[int]]:
    """Alternating repetitions of both schedulers on the same inputs (after one warm-up run each)."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(shape, generator=g)
    model_output = torch.randn(shape, generator=g)
    samples: dict[str, list[int]] = {"fastsampler": [], "diffusers": []}
    for scheduler in (ours, theirs):
        timed_run(scheduler, sample, model_output)
    for _ in range(repeats):
        samples["fastsampler"] += timed_run(ours, sample, model_output)
        samples["diffusers"] += timed_run(theirs, sample, model_output)
    return samples


def summarize(ns: list[int]) -> dict[str, float]:
    q25, q50, q75 = np.percentile(np.asarray(ns) / 1e3, [25, 50, 75])
    return {"median_us": float(q50), "q25_us": float(q25), "q75_us": float(q75), "count": len(ns)}


def run(repeats: int, progress: Callable[[str], None] = print) -> dict:
    from diffusers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    results = []
    for label, (ours_cls, ours_opts, theirs_cls, theirs_opts) in PAIRS.items():
        ours = make_scheduler("fastsampler", ours_cls, ours_opts)
        theirs = make_scheduler("diffusers", theirs_cls, theirs_opts)
        for shape in SHAPES:
            samples = measure_pair(ours, theirs, shape, repeats)
            row = {"solver": label, "shape": list(shape), "fastsampler": f"{ours_cls} {ours_opts}",
                   "diffusers": f"{theirs_cls} {theirs_opts}",
                   "ours": summarize(samples["fastsampler"]), "theirs": summarize(samples["diffusers"])}
            row["ratio"] = row["ours"]["median_us"] / row["theirs"]["median_us"]
            results.append(row)
            progress(f"{label:<24}{'×'.join(map(str, shape)):<14}ours {row['ours']['median_us']:8.1f} µs   "
                     f"diffusers {row['theirs']['median_us']:8.1f} µs   ratio {row['ratio']:.2f}")
    return {"machine": harness.machine(), "protocol": {"num_steps": NUM_STEPS, "timed_steps": [TIMED_STEPS.start,
            TIMED_STEPS.stop - 1], "repeats": repeats, "dtype": "float32", "config": SD_CONFIG},
            "results": results}


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# step() overhead: fastsampler vs diffusers", "",
             f"{m['date']} · {m['cpu']} ({m['cpu_count']} cores, torch threads {m['torch_threads']}) · "
             f"torch {m['torch']} · diffusers {m['diffusers']} · fastsampler {m['fastsampler']}", "",
             f"Median CPU time of one `step()` (fp32, steady-state steps {report['protocol']['timed_steps']} of a "
             f"{report['protocol']['num_steps']}-step run, {report['protocol']['repeats']} runs each; "
             "quartiles in brackets). Goal: ratio ≤ 0.3.", "",
             "| solver | latent | fastsampler µs | diffusers µs | ours / diffusers |", "|---|---|---|---|---|"]
    for r in report["results"]:
        o, t = r["ours"], r["theirs"]
        lines.append(f"| {r['solver']} | {'×'.join(map(str, r['shape']))} | {o['median_us']:.1f} "
                     f"[{o['q25_us']:.1f}–{o['q75_us']:.1f}] | {t['median_us']:.1f} [{t['q25_us']:.1f}–"
                     f"{t['q75_us']:.1f}] | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


@harness.command(out=harness.RESULTS, threads=None)
@click.option("--repeats", type=int, default=60, show_default=True, help="25-step runs per scheduler and shape")
def main(args) -> None:
    report = run(args.repeats)
    path = harness.write_results(args.out, "overhead", report, to_markdown(report), indent=2)
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
