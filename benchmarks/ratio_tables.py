"""Shared by the tuning benchmarks: RMSE per solver and NFE next to the best diffusers scheduler, as ratios."""

from __future__ import annotations


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
