"""Shared by the tuning benchmarks: RMSE per solver and NFE next to the best diffusers scheduler, as ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def ratio_rows(result, nfes) -> dict:
    """{nfe: {"best_diffusers": [name, rmse], solver: [rmse, rmse / best]}} for the fastsampler runs of a bench."""
    rows = {}
    for nfe in nfes:
        best = result.best("diffusers", nfe)
        rows[nfe] = {"best_diffusers": [best.solver, best.rmse]}
        for run in result.runs:
            if run.nfe == nfe and run.family == "fastsampler":
                rows[nfe][run.solver] = [run.rmse, run.rmse / best.rmse]
    return rows


def ratio_table(table: dict, label=lambda s: s) -> list[str]:
    """Markdown lines: one row per solver, one column per NFE, 'rmse (ratio×)'."""
    solvers = [s for s in next(iter(table.values())) if s != "best_diffusers"]
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in table) + " |", "|---|" + "---:|" * len(table),
             "| best diffusers | " + " | ".join(f"{v['best_diffusers'][1]:.4f} ({v['best_diffusers'][0]})"
                                               for v in table.values()) + " |"]
    for s in solvers:
        lines.append(f"| {label(s)} | " + " | ".join(f"{v[s][0]:.4f} ({v[s][1]:.2f}×)" for v in table.values()) + " |")
    return lines


def seed_ratio_table(tables: dict, label=lambda s: s) -> list[str]:
    """Markdown lines: per solver and NFE the ratio to that batch's best diffusers scheduler, as the mean over the
    held-out batches (seeds) of ``tables`` ({seed: ratio_rows(...)}) with its min–max: one batch of a few hundred
    samples is a noisy yardstick (a tuned grid measured 0.86–1.04× on four batches)."""
    seeds = list(tables)
    first = tables[seeds[0]]
    solvers = [s for s in next(iter(first.values())) if s != "best_diffusers"]
    lines = [f"| solver (ratio, mean over seeds {', '.join(map(str, seeds))}; min–max) | "
             + " | ".join(f"NFE {n}" for n in first) + " |", "|---|" + "---:|" * len(first)]
    for s in solvers:
        cells = []
        for n in first:
            ratios = [tables[seed][n][s][1] for seed in seeds]
            cells.append(f"{sum(ratios) / len(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})")
        lines.append(f"| {label(s)} | " + " | ".join(cells) + " |")
    return lines


def bench_seeds(preset: str, guidance: float | None, batch_size: int, seeds: Sequence[int], specs, nfes,
                out: Path) -> dict:
    """Run the bench on one held-out batch per seed ({seed: ratio_rows}); the first seed's outputs go to ``out``,
    the others' to ``out/seed<s>``."""
    from fastsampler.eval import bench as bench_lib, bench_report

    tables = {}
    for seed in seeds:
        setup = bench_lib.BenchSetup(preset, None, guidance, batch_size, seed)
        result = bench_lib.run_bench(setup, specs, nfes, progress=False)
        bench_report.write_outputs(result, out if seed == seeds[0] else out / f"seed{seed}")
        tables[seed] = ratio_rows(result, nfes)
        if seed == seeds[0]:
            print(bench_report.format_table(result), flush=True)
    return tables
