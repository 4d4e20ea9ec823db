"""What a tuned plan's longer history costs per ``step()``: the base UniPC plan next to the densest plan
``tune(method="coefficients")`` can return (every source a step can read, on a ring of all earlier predictions up
to 8 slots), and diffusers' UniPC, in one run.

Protocol as ``benchmarks/overhead.py`` (SD's schedule, fp32, ``torch.set_num_threads(1)``, a fixed random model
output fed back), but every step of an NFE-``n`` run is timed (tuning targets 5–10 steps, so there is no steady
state to single out). Reported: the median µs per step and the ratios to the base plan and to diffusers.

    python benchmarks/history_cost.py [--nfe 5,8,10] [--repeats 40] [--out benchmarks/results]
"""

from __future__ import annotations

import time

import click
import numpy as np
import torch

import harness
from overhead import SD_CONFIG, make_scheduler

SHAPE = (1, 4, 128, 128)
DENSE_OFFSET = 0.01  # added to every readable entry: a plan that reads every source it may (the worst case)


def dense_plan(scheduler):
    """The scheduler's current plan widened to the default tuned history, with every readable entry non-zero."""
    from fastsampler.tuning.coefficients import used_rows, with_rows
    from fastsampler.tuning.support import alive_sources, history_slots, widen

    plan = widen(scheduler.plan, history_slots(None, scheduler.plan))
    return with_rows(plan, used_rows(plan) + DENSE_OFFSET * alive_sources(plan), {"tuned": "coefficients"})


def step_times(scheduler, n: int, sample: torch.Tensor, model_output: torch.Tensor) -> list[int]:
    scheduler.set_timesteps(n)
    x, times = sample, []
    for t in scheduler.timesteps:
        began = time.perf_counter_ns()
        x = scheduler.step(model_output, t, x).prev_sample
        times.append(time.perf_counter_ns() - began)
    return times


def measure(n: int, repeats: int) -> dict:
    base = make_scheduler("fastsampler", "UniPCScheduler", {"solver_order": 2})
    base.set_timesteps(n)
    dense = make_scheduler("fastsampler", "UniPCScheduler", {"solver_order": 2})
    dense.set_plan(dense_plan(base))
    theirs = make_scheduler("diffusers", "UniPCMultistepScheduler", {"solver_order": 2})
    g = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    runs = {"base": base, "dense": dense, "diffusers": theirs}
    ns: dict[str, list[int]] = {k: [] for k in runs}
    for s in runs.values():
        step_times(s, n, sample, model_output)  # warm-up
    for _ in range(repeats):  # alternating, so load drifts hit all alike
        for k, s in runs.items():
            ns[k] += step_times(s, n, sample, model_output)
    median = {k: float(np.median(v)) / 1e3 for k, v in ns.items()}
    return {"nfe": n, "slots": dense.plan.slots, "base_slots": base.plan.slots, "median_us": median,
            "dense_over_base": median["dense"] / median["base"], "dense_over_diffusers": median["dense"] / median["diffusers"]}


@harness.command(out=harness.RESULTS, threads=1)
@click.option("--nfe", default="5,8,10", show_default=True)
@click.option("--repeats", type=int, default=40, show_default=True)
def main(args) -> None:
    rows = [measure(int(n), args.repeats) for n in args.nfe.split(",") if n]
    report = {"machine": harness.machine(), "shape": list(SHAPE), "config": SD_CONFIG, "repeats": args.repeats, "results": rows}
    m = report["machine"]
    lines = ["# Per-step cost of a tuned plan's longer history", "",
             f"{m['date']} · {m['cpu']} (torch threads {m['torch_threads']}) · torch {m['torch']} · "
             f"diffusers {m['diffusers']}", "",
             f"Median µs per `step()` over every step of an NFE-n run, fp32 {'×'.join(map(str, SHAPE))}, "
             f"{args.repeats} runs each. `python benchmarks/history_cost.py`.", "",
             "| NFE | slots base → dense | base plan | dense tuned plan | diffusers UniPC | dense / base | dense / diffusers |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        us = r["median_us"]
        lines.append(f"| {r['nfe']} | {r['base_slots']} → {r['slots']} | {us['base']:.1f} | {us['dense']:.1f} | "
                     f"{us['diffusers']:.1f} | {r['dense_over_base']:.2f} | {r['dense_over_diffusers']:.2f} |")
    harness.write_results(args.out, "history_cost", report, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    main()
