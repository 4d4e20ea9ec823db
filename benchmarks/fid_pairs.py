"""Paired FID differences from a ``fid_sweep.py`` results JSON: each configuration against its plain solver.

Seed s gives every cell the same initial noises (and labels), so the difference between two cells *within* a seed
is far less noisy than the spread of their absolute values. For every run with options, the base is the run of the
same scheduler with only ``timestep_spacing`` set, same NFE, guidance scale and seed. Prints a markdown table:
mean FID over the seeds, then the per-seed differences (negative: the option lowers FID).

    python benchmarks/fid_pairs.py benchmarks/results/fid/plugins_guided_w4.json
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import click

import harness


def _options(run: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in run["scheduler_kwargs"].items() if k != "timestep_spacing"))


def paired_table(results: dict) -> list[str]:
    runs = results["results"]
    cells = defaultdict(dict)  # (scheduler, options, guidance) → {nfe: {seed: fid}}
    for r in runs:
        cells[(r["scheduler"], _options(r), r.get("guidance_scale"))].setdefault(r["nfe"], {})[r["seed"]] = r["fid"]
    nfes = sorted({r["nfe"] for r in runs})
    lines = ["| configuration | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for (scheduler, options, w), by_nfe in cells.items():
        base = cells.get((scheduler, (), w))
        label = scheduler.split(".")[-1] + (" " + ", ".join(f"{k}={v}" for k, v in options) if options else "")
        label += f" (w={w:g})" if w is not None else ""
        row = []
        for n in nfes:
            fids = by_nfe.get(n, {})
            if not fids:
                row.append("–")
                continue
            text = f"{sum(fids.values()) / len(fids):.3f}"
            if options and base and n in base:
                deltas = [fids[s] - base[n][s] for s in sorted(fids) if s in base[n]]
                text += " (Δ " + " / ".join(f"{d:+.3f}" for d in deltas) + ")"
            row.append(text)
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


@harness.command(out=None, threads=None)
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def main(results: tuple[str, ...]) -> None:
    for path in results:
        print(f"{Path(path).name}:\n")
        print("\n".join(paired_table(json.loads(Path(path).read_text()))) + "\n")


if __name__ == "__main__":
    main()
