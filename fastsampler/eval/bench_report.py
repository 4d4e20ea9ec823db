"""What ``fastsampler bench`` writes: the RMSE table (best of each family marked, the ratio of the best
fastsampler solver to the best diffusers one per NFE), ``results.csv``, ``results.json`` and the error-vs-NFE
plot. The runs themselves: ``fastsampler.eval.bench``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from fastsampler.eval.bench import FAMILIES, BenchResult


CELL = 16  # table cell width: "1.234e-01*(19)" plus a gap


def format_table(result: BenchResult) -> str:
    """RMSE per solver (rows) and NFE (columns); '*' marks the best of each family at an NFE, '(n)' an
    actual NFE that differs from the column's; then the best fastsampler vs the best diffusers solver."""
    best = {(f, n): b.solver for n in result.nfes for f in FAMILIES if (b := result.best(f, n))}
    cells = {(r.solver, r.nfe): r for r in result.runs}
    width = max(len(s) for s in result.solvers()) + 2
    header = "solver \\ NFE"
    lines = [f"{header:<{width}}" + "".join(f"{n:>{CELL}}" for n in result.nfes)]
    for solver in result.solvers():
        row = f"{solver:<{width}}"
        for n in result.nfes:
            r = cells[(solver, n)]
            text = "error" if r.error else f"{r.rmse:.3e}"
            text += "*" if best.get((r.family, n)) == solver else ""
            text += f"({r.nfe_actual})" if r.nfe_actual != n and not r.error else ""
            row += f"{text:>{CELL}}"
        lines.append(row)
    lines += ["", f"{'NFE':>4}  {'best fastsampler':<28}{'RMSE':>11}  {'best diffusers':<28}{'RMSE':>11}  ratio (diffusers / fastsampler, > 1: fastsampler better)"]
    for n in result.nfes:
        ours, theirs = result.best("fastsampler", n), result.best("diffusers", n)
        if ours is None or theirs is None:
            continue
        lines.append(f"{n:>4}  {ours.solver:<28}{ours.rmse:>11.3e}  {theirs.solver:<28}{theirs.rmse:>11.3e}"
                     f"  {theirs.rmse / ours.rmse:5.2f}x")
    failures: dict[tuple[str, str], list[int]] = {}
    for r in result.runs:
        if r.error or not math.isfinite(r.rmse):
            failures.setdefault((r.solver, r.error or "non-finite output"), []).append(r.nfe)
    if failures:
        lines += ["", "failures:"] + [f"  {solver} @ NFE {','.join(map(str, nfes))}: {error}"
                                      for (solver, error), nfes in failures.items()]
    return "\n".join(lines[:len(result.solvers()) + 1] + [TABLE_LEGEND] + lines[len(result.solvers()) + 1:])


TABLE_LEGEND = ("RMSE of the final samples vs the exact ODE solution. *: the best of its family (fastsampler / "
                "diffusers) at that NFE; (n): the solver's actual model calls where they differ from the column's NFE.")


def write_csv(result: BenchResult, path: Path) -> None:
    import csv

    rows = [asdict(r) for r in result.runs]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["solver"])
        writer.writeheader()
        writer.writerows(rows)


def plot(result: BenchResult, path: Path) -> None:
    """RMSE vs actual NFE, log-log: one panel per family (fastsampler, diffusers), a distinct colour and marker per
    solver within a panel; solvers with no finite result are listed under the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter, ScalarFormatter

    families = [f for f in FAMILIES if any(r.family == f for r in result.runs)] or list(FAMILIES)
    fig, axes = plt.subplots(1, len(families), figsize=(8 * len(families), 6), sharey=True, squeeze=False)
    colors, markers = plt.get_cmap("tab10"), "osD^vP*Xph<>"
    missing = []
    for ax, family in zip(axes[0], families):
        solvers = [s for s in result.solvers() if any(r.solver == s and r.family == family for r in result.runs)]
        for i, solver in enumerate(solvers):  # colour and marker together are distinct within a panel
            runs = [r for r in result.runs if r.solver == solver and math.isfinite(r.rmse)]
            if not runs:
                missing.append(solver)
                continue
            ax.plot([r.nfe_actual for r in runs], [r.rmse for r in runs], "-", marker=markers[i // 10 % len(markers)],
                    markersize=4, color=colors(i % 10), label=solver)
        ax.set(xscale="log", yscale="log", xlabel="NFE (model calls)", title=family)
        ax.set_xticks(result.nfes)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left", ncol=2)
    axes[0][0].set_ylabel("RMSE vs reference ODE solution")
    guidance = "unconditional" if result.setup.guidance_scale is None else f"guidance {result.setup.guidance_scale:g}"
    fig.suptitle(f"preset {result.setup.preset}, {guidance}, batch {result.setup.batch_size}")
    if missing:  # solvers without one finite result are named, not silently absent
        fig.text(0.01, 0.01, "no finite result (see table.txt): " + ", ".join(missing), fontsize=8, color="C3")
    fig.tight_layout(rect=(0, 0.03 if missing else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: BenchResult, out_dir: str | Path) -> dict[str, Path]:
    """results.csv, results.json, table.txt and error_vs_nfe.png in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "table": out / "table.txt",
             "plot": out / "error_vs_nfe.png"}
    write_csv(result, paths["csv"])
    paths["json"].write_text(json.dumps(result.to_json(), indent=2, default=float))
    paths["table"].write_text(format_table(result) + "\n")
    plot(result, paths["plot"])
    return paths
