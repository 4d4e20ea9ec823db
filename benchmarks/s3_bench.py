"""S³ and learned time points on the exact digits mixture, next to DC-Solver, our best fixed option and diffusers.

For unguided and guidance 7.5 sampling (SD preset), per NFE 4, 5, 6, 8, 10: ``fastsampler.tune(method="s3")``
(starting from UniPC bh2 order 3, ``--budget`` candidates) and ``fastsampler.tune(method="timesteps")`` (learned
grid for UniPC bh2-3) fit on ``--fit-samples`` noises of seed ``--fit-seed`` (1000), choosing among their
candidates on ``--validation-samples`` noises of seed ``--validation-seed`` (2000); the tuned scheduler folders
and the DC ratio files of ``benchmarks/dc_bench.py`` (run it first) are then benchmarked with every diffusers
scheduler and our best fixed option (UniPC bh2-3 ending at σ_min) on the bench's held-out noises (seed 0, batch
256). Writes ``benchmarks/results/s3_bench/`` (tables, JSON, summary.md with ratios to the best diffusers scheduler
and the search cost per configuration).

    python benchmarks/s3_bench.py          # ~1 h on 2 CPU cores
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import click

import fastsampler
from fastsampler.eval import bench as bench_lib
import harness
from ratio_tables import bench_seeds, ratio_table, seed_ratio_table

HERE = Path(__file__).resolve().parent / "results"
NFES = (4, 5, 6, 8, 10)


def tune_all(method: str, guidance: float | None, args, options_for: Callable[[int], dict]) -> tuple[Path, dict]:
    """Tune UniPC bh2-3 with ``method`` at every NFE (options per NFE from ``options_for``), choosing among the
    candidates on ``--validation-samples`` held-out noises; save the scheduler folder holding all the plans."""
    config = bench_lib.preset_config(args.preset)
    scheduler = fastsampler.UniPCScheduler.from_config(config, solver_order=3)
    model, noise = harness.mixture(args.preset, guidance, args.fit_samples, args.fit_seed)
    held_model, held_noise = harness.mixture(args.preset, guidance, args.validation_samples, args.validation_seed) \
        if args.validation_samples else (None, None)
    tuned, cost = None, {}
    for n in NFES:
        began = time.perf_counter()
        result = fastsampler.tune(scheduler, model, noise, n, method=method, progress=False,
                                  checkpoint_dir=args.out / ".checkpoints" / f"{method}_g{guidance}",
                                  validation_noise=held_noise, validation_model=held_model, **options_for(n))
        report = result.tuning_report["steps"][n]
        cost[n] = {"seconds": time.perf_counter() - began, "model_evaluations": report["model_evaluations"]}
        for key in ("baseline_score", "best_score", "evaluated", "screened_out", "loss_initial", "loss_final_grid",
                    "holdout_initial", "holdout_final", "holdout_baseline", "holdout_best"):
            if key in report:
                cost[n][key] = report[key]
        tuned = result if tuned is None else tuned
        tuned.set_plan(result.plans[n])
        print(f"{method} g={guidance} NFE {n}: {cost[n]}", flush=True)
    folder = args.out / "tuned" / f"{method}_g{guidance}"
    tuned.save_pretrained(folder)
    return folder, cost


@harness.command(out=HERE / "s3_bench", threads=1)
@harness.held_out_protocol(256, "held-out noises that choose among the candidates (0: none)")
@click.option("--budget", type=int, default=200, show_default=True, help="S3 candidates per NFE")
@click.option("--dc", type=click.Path(path_type=Path), default=HERE / "dc_bench", show_default=True,
              help="dc_bench.py's output (ratio files)")
def main(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {**harness.run_stamp(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    for guidance in (None, 7.5):
        s3_folder, s3_cost = tune_all("s3", guidance, args, lambda n: dict(
            budget_evaluations=args.budget * n, warmup=24, round_size=8, keep=2))
        ts_folder, ts_cost = tune_all("timesteps", guidance, args, lambda n: dict(iters=40))
        specs = bench_lib.select_solvers("diffusers/*,fs/unipc-bh2-3,fs/unipc-bh2-3-smin",
                                         bench_lib.preset_config(args.preset))
        dc_file = args.dc / f"ratios_dpmpp-2m_g{guidance}.json"
        if dc_file.exists():
            specs.append(bench_lib.custom_spec(f"DPMSolverPlusPlusScheduler:dc_ratios_file={dc_file}"))
        specs += [bench_lib.custom_spec(str(s3_folder)), bench_lib.custom_spec(str(ts_folder))]
        tables = bench_seeds(args.preset, guidance, args.batch_size, args.eval_seeds, specs, NFES,
                             args.out / f"g{guidance}")
        summary["runs"][str(guidance)] = {"table": tables[args.eval_seeds[0]], "seeds": tables,
                                          "cost": {"s3": s3_cost, "timesteps": ts_cost}}
        harness.write_results(args.out, "summary", summary)  # after each guidance: a killed run keeps its cells
    harness.write_results(args.out, "summary", summary, markdown(summary))


def markdown(summary: dict) -> str:
    lines = [f"# S³ and learned time points on the exact digits mixture ({summary['date']}, {summary['machine']})",
             "", "RMSE against the exact ODE solution on the bench's held-out noises (seed 0, batch 256); every tuned "
             "method fitted (and chose among its candidates) on other noises. Ratio = RMSE / best diffusers scheduler's RMSE at that NFE. "
             "`python benchmarks/s3_bench.py`", ""]
    for guidance, run in summary["runs"].items():
        label = lambda s: s.split("/")[-1][:60]  # noqa: E731
        lines += [f"## guidance {guidance}", "", *ratio_table(run["table"], label), "",
                  "On every held-out batch:", "", *seed_ratio_table(run["seeds"], label)]
        lines += ["", "Search cost per NFE (wall seconds, model evaluations of the fitting and held-out batches):", ""]
        for method, cost in run["cost"].items():
            lines.append(f"- {method}: " + ", ".join(f"NFE {n}: {c['seconds']:.0f} s / {c['model_evaluations']}"
                                                      for n, c in cost.items()))
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
