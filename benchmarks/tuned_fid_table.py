"""The README's FID tables for tuned schedulers: each tuned row beside the solver it was tuned from.

Reads the results JSON of a ``fastsampler fid`` sweep over plain and tuned schedulers (``tuned_uncond.json``,
``tuned_cond_w*.json``) and, optionally, the 250-step DDIM result of the same model. Cells give the FID of seed 0 /
seed 1 (each seed fixes every cell's noises and labels); tuned rows add the paired difference to their base solver
per seed, which is far less noisy than the spread of the absolute values.

    python benchmarks/tuned_fid_table.py benchmarks/results/fid/tuned_uncond.json \
        --ddim benchmarks/results/fid/ddim250_uncond.json
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

import harness

# (label, scheduler class or a regular expression for a folder path, options that identify the row, label of
# the base row or None)
ROWS: list[tuple[str, str, dict, str | None]] = [
    ("diffusers DPM-Solver++ 2M", "DPMSolverMultistepScheduler", {}, None),
    ("diffusers UniPC bh2-2", "UniPCMultistepScheduler", {}, None),
    ("diffusers UniPC bh2-3", "UniPCMultistepScheduler", {"solver_order": 3}, None),
    ("UniPC bh1-3 (best fixed option)", "fastsampler.UniPCScheduler", {"solver_order": 3, "solver_type": "bh1"}, None),
    ("DC on UniPC bh2-2 (shipped ratios)", "fastsampler.UniPCScheduler", {"dc_ratios_file": "bh2-2"},
     "diffusers UniPC bh2-2"),
    ("DC on UniPC bh1-3 (shipped ratios)", "fastsampler.UniPCScheduler", {"solver_order": 3, "solver_type": "bh1",
                                                                                 "dc_ratios_file": "bh1-3"},
     "UniPC bh1-3 (best fixed option)"),
    ("DC on UniPC bh2-2 (shipped ratios at this guidance)", "fastsampler.UniPCScheduler",
     {"dc_ratios_file": "bh2-2", "dc_guidance_scale": ""}, "diffusers UniPC bh2-2"),
    ("S³, teacher error (shipped plans)", r"s3/digits_(ddpm|cond_g[0-9.]+)$", {}, "UniPC bh1-3 (best fixed option)"),
    ("S³, FID-scored (shipped plans)", r"s3/digits_(ddpm|cond_g[0-9.]+)_fid$", {}, "UniPC bh1-3 (best fixed option)"),
]


def _matches(run: dict, scheduler: str, options: dict) -> bool:
    kwargs = {k: v for k, v in run["scheduler_kwargs"].items() if k != "timestep_spacing"}
    if "/" in scheduler:
        return re.search(scheduler, run["scheduler"].rstrip("/")) is not None
    if run["scheduler"] != scheduler or set(kwargs) != set(options):
        return False
    return all(str(want) in str(kwargs[k]) for k, want in options.items())


def _folder_nfes(folder: str) -> set[int]:
    """The step counts a scheduler folder holds plans for."""
    from fastsampler.adapters.plan_store import PLANS_FILE

    path = Path(folder) / PLANS_FILE
    return {len(plan["timesteps"]) for plan in json.loads(path.read_text())["plans"]} if path.is_file() else set()


def tuned_table(results: dict, ddim: dict | None = None) -> list[str]:
    runs = results["results"]
    nfes = sorted({r["nfe"] for r in runs})
    cells: dict[str, dict[int, dict[int, float]]] = {}
    for label, scheduler, options, _ in ROWS:
        for r in runs:
            # a tuned folder without a plan for this NFE samples its config's plain solver: not a tuned cell
            if _matches(r, scheduler, options) and ("/" not in scheduler or r["nfe"] in _folder_nfes(r["scheduler"])):
                cells.setdefault(label, {}).setdefault(r["nfe"], {})[r["seed"]] = r["fid"]
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for label, _, _, base_label in ROWS:
        if label not in cells:
            continue
        row = []
        for n in nfes:
            fids = cells[label].get(n, {})
            text = " / ".join(f"{fids[s]:.3f}" for s in sorted(fids)) or "–"
            base = cells.get(base_label, {}).get(n, {}) if base_label else {}
            if base and fids:
                text += " (Δ " + " / ".join(f"{fids[s] - base[s]:+.3f}" for s in sorted(fids) if s in base) + ")"
            row.append(text)
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    if ddim is not None:
        w = {r.get("guidance_scale") for r in runs}
        fids = {r["seed"]: r["fid"] for r in ddim["results"] if r.get("guidance_scale") in w}
        lines.append("| DDIM, 250 steps (NFE 250) | " + " / ".join(f"{fids[s]:.3f}" for s in sorted(fids))
                     + " |" + " |" * (len(nfes) - 1))
    return lines


@harness.command(out=None, threads=None)
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--ddim", type=click.Path(exists=True, dir_okay=False), help="results JSON of the DDIM-250 run")
def main(results: str, ddim: str | None) -> None:
    print("\n".join(tuned_table(json.loads(Path(results).read_text()),
                                json.loads(Path(ddim).read_text()) if ddim else None)))


if __name__ == "__main__":
    main()
