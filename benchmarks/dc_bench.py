"""DC-Solver on the exact digits mixture: ratios fitted on some noises, error measured on others.

For each guidance setting (unguided, 7.5) and each base solver (UniPC bh2 order 2 and 3, DPM-Solver++ 2M and 3M),
``fastsampler.tune(method="dc")`` fits one ratio list per NFE on ``--fit-samples`` noises (seed ``--fit-seed``,
default 1000: never the bench's seed 0) against a 200-evaluation teacher, keeps them only where they also lower the
error on ``--validation-samples`` other noises (seed 2000), and writes them as a ratio file. Then
``fastsampler.eval.bench`` runs, side by side and on the bench's own held-out noises (seed 0, batch 256): every
diffusers scheduler, the plain solvers, and the same solvers with ``dc_ratios_file``. Results go to
``benchmarks/results/dc_bench/`` (ratio files, bench tables and JSON per guidance, and summary.md with the ratio of
each DC solver's error to the best diffusers scheduler's at each NFE, plus tuning time per configuration).

    python benchmarks/dc_bench.py                 # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

import fastsampler
from fastsampler.eval import bench as bench_lib
from fastsampler.tuning.cpr import write_ratio_file
import harness
from ratio_tables import bench_seeds, ratio_table, seed_ratio_table

RESULTS = Path(__file__).resolve().parent / "results" / "dc_bench"
NFES = (4, 5, 6, 8, 10)
BASES = {  # name → (scheduler class, options)
    "unipc-bh2-2": ("UniPCScheduler", {"solver_order": 2}),
    "unipc-bh2-3": ("UniPCScheduler", {"solver_order": 3}),
    "dpmpp-2m": ("DPMSolverPlusPlusScheduler", {"solver_order": 2}),
    "dpmpp-3m": ("DPMSolverPlusPlusScheduler", {"solver_order": 3}),
}


def fit(preset: str, guidance: float | None, base: str, fit_samples: int, fit_seed: int, out: Path,
        search: str, objective: str, validation: tuple[int, int]) -> tuple[Path, float, dict]:
    cls_name, options = BASES[base]
    scheduler = getattr(fastsampler, cls_name).from_config(bench_lib.preset_config(preset), **options)
    model, noise = harness.mixture(preset, guidance, fit_samples, fit_seed)
    held_model, held = harness.mixture(preset, guidance, *validation) if validation[0] else (None, None)
    began = time.perf_counter()
    tuned = fastsampler.tune(scheduler, model, noise, list(NFES), search=search, objective=objective,
                             validation_noise=held, validation_model=held_model, progress=False,
                             checkpoint_dir=out / ".checkpoints" / f"{base}_g{guidance}_{objective}")
    seconds = time.perf_counter() - began
    entries = [{"num_steps": n, "guidance_scale": guidance, "ratios": r["ratios"]}
               for n, r in tuned.tuning_report["steps"].items()]
    path = write_ratio_file(out / f"ratios_{base}_g{guidance}.json", entries, scheduler.config,
                            note=f"dc_bench.py: {fit_samples} fitting noises, seed {fit_seed}, {search} search")
    return path, seconds, tuned.tuning_report


@harness.command(out=RESULTS, threads=1)
@harness.held_out_protocol(64, "held-out noises (seed --validation-seed): fitted ratios that do worse there are "
                                "dropped")
@click.option("--search", type=click.Choice(("gradient", "scan")), default="gradient", show_default=True)
@click.option("--objective", type=click.Choice(("next", "final")), default="final", show_default=True,
              help="DC search loss: the official next-node loss, or the final sample's (default here: on the exact "
                   "mixture the final jump to σ = 0 dominates the error)")
def main(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {**harness.run_stamp(), "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    for guidance in (None, 7.5):
        specs = bench_lib.select_solvers("diffusers/*", bench_lib.preset_config(args.preset))
        tuning = {}
        for base, (cls_name, options) in BASES.items():
            opts = ",".join(f"{k}={v}" for k, v in options.items())
            specs.append(bench_lib.custom_spec(f"{cls_name}:{opts}"))
            path, seconds, report = fit(args.preset, guidance, base, args.fit_samples, args.fit_seed, args.out,
                                        args.search, args.objective, (args.validation_samples, args.validation_seed))
            specs.append(bench_lib.custom_spec(f"{cls_name}:{opts},dc_ratios_file={path}"))
            tuning[base] = {"seconds": seconds, "ratio_file": path.name,
                            "per_nfe": {n: {k: r[k] for k in ("ratios", "final_loss_plain", "final_loss_tuned",
                                                              "fell_back_to_plain", "model_evaluations", "seconds", "holdout_plain",
                                                              "holdout_tuned", "kept_plain") if k in r}
                                        for n, r in report["steps"].items()}}
            print(f"g={guidance} {base}: tuned {len(NFES)} NFEs in {seconds:.1f} s", flush=True)
        tables = bench_seeds(args.preset, guidance, args.batch_size, args.eval_seeds, specs, NFES,
                             args.out / f"g{guidance}")
        summary["runs"][str(guidance)] = {"tuning": tuning, "table": tables[args.eval_seeds[0]], "seeds": tables}
    harness.write_results(args.out, "summary", summary, markdown(summary))


def markdown(summary: dict) -> str:
    lines = [f"# DC-Solver on the exact digits mixture ({summary['date']}, {summary['machine']})", "",
             "RMSE against the exact ODE solution on the bench's held-out noises (seed 0, batch 256); DC ratios fitted "
             "on other noises (`--fit-seed`). Ratio = solver RMSE / best diffusers scheduler RMSE at that NFE "
             "(< 1: better). `python benchmarks/dc_bench.py`", ""]
    for guidance, run in summary["runs"].items():
        label = lambda s: s.replace(str(RESULTS) + "/", "")  # noqa: E731
        lines += [f"## guidance {guidance}", "", *ratio_table(run["table"], label), "",
                  "On every held-out batch:", "", *seed_ratio_table(run["seeds"], label)]
        lines += ["", "Tuning time (all NFEs, 2-core CPU): " + ", ".join(
            f"{b}: {t['seconds']:.0f} s" for b, t in run["tuning"].items()), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
