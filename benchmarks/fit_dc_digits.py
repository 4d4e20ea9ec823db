"""Fit the DC-Solver ratios and CPR shipped for the embedded digits models (fastsampler/assets/dc/).

* unconditional digits DDPM: UniPC bh2 order 2 (DC-Solver's default base) and bh1 order 3 (our best UniPC on this
  model), NFE 4, 5, 6, 8, 10 → ``digits_ddpm_<base>.json`` (ratio files);
* guided digits model: UniPC bh2 order 2 at guidance 1.5, 4, 7.5 and NFE 4, 5, 6, 8, 10 → the ratio file
  ``digits_cond_unipc-bh2-2.json`` and the cascade-polynomial-regression file ``digits_cond_unipc-bh2-2_cpr.json``
  fitted on the whole (NFE, guidance) grid (other NFE / guidance scales: ``dc_cpr_file`` + ``dc_guidance_scale``).

Schedulers are ``from_config(pipe.scheduler.config, timestep_spacing="trailing", …)`` — the spacing our FID sweeps
use (with the pipelines' "leading" one, 5 steps start at t = 801, not from pure noise); the files record it, and a
scheduler with another spacing gets a warning. Fitting noises: ``--samples`` (16) noises from seed ``--seed`` (1000; FID and the bench use other seeds), labels
i mod 10. Teacher: DPM-Solver++ 3M, 200 evaluations. Search: the official gradient search (AdamW, 20 iterations).
Teacher trajectories and search checkpoints are cached, so a rerun resumes. Records timing per configuration in
benchmarks/results/dc_fit_digits.json.

    python benchmarks/fit_dc_digits.py            # ~40 min on 2 CPU cores
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

import fastsampler
from fastsampler.models.digits import assets_dir, load_digits_cond_pipeline, load_digits_pipeline
from fastsampler.tuning.cpr import fit_cpr, write_cpr_file, write_ratio_file
import harness

NFES = (4, 5, 6, 8, 10)
GUIDANCE = (1.5, 4.0, 7.5)
GUIDED_BASES = ("unipc-bh2-2",)
BASES = {"unipc-bh2-2": {"solver_order": 2, "solver_type": "bh2"},
         "unipc-bh1-3": {"solver_order": 3, "solver_type": "bh1"}}
SPACING = {"timestep_spacing": "trailing"}  # every step count starts at t = 999 (as the FID sweeps sample)
RESULTS = Path(__file__).resolve().parent / "results" / "dc_fit_digits.json"


def fit(pipe, base: str, guidance: float | None, noise: torch.Tensor, labels: list[int] | None, work: Path) -> tuple[list, float]:
    scheduler = fastsampler.UniPCScheduler.from_config(pipe.scheduler.config, **SPACING, **BASES[base])
    began = time.perf_counter()
    tuned = fastsampler.tune(scheduler, pipe, noise, list(NFES), guidance_scale=guidance, class_labels=labels,
                             checkpoint_dir=work / f"{base}_g{guidance}", progress=False)
    seconds = time.perf_counter() - began
    entries = [{"num_steps": n, "guidance_scale": guidance, "ratios": r["ratios"],
                "final_loss_plain": r["final_loss_plain"], "final_loss_tuned": r["final_loss_tuned"],
                "seconds": r["seconds"], "model_evaluations": r["model_evaluations"]}
               for n, r in tuned.tuning_report["steps"].items()]
    return entries, seconds


@harness.command(out=assets_dir() / "dc", threads=1)
@click.option("--samples", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=1000, show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=Path(".cache") / "dc_fit", show_default=True)
def main(args) -> None:
    record = {**harness.run_stamp(), "samples": args.samples,
              "seed": args.seed, "configurations": []}
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.samples, 1, 16, 16, generator=gen)
    labels = [i % 10 for i in range(args.samples)]
    uncond = load_digits_pipeline()
    cond = load_digits_cond_pipeline()
    for base in BASES:
        entries, seconds = fit(uncond, base, None, noise, None, args.work)
        config = fastsampler.UniPCScheduler.from_config(uncond.scheduler.config, **SPACING, **BASES[base]).config
        write_ratio_file(args.out / f"digits_ddpm_{base}.json", entries, config,
                         note=f"benchmarks/fit_dc_digits.py, {args.samples} noises seed {args.seed}")
        record["configurations"].append({"model": "digits_ddpm", "base": base, "seconds": seconds, "entries": entries})
        print(f"digits_ddpm {base}: {seconds:.0f} s", flush=True)
        if base not in GUIDED_BASES:
            continue
        grid = []
        for g in GUIDANCE:
            entries, seconds = fit(cond, base, g, noise, labels, args.work)
            grid += entries
            record["configurations"].append({"model": "digits_cond_ddpm", "base": base, "guidance_scale": g,
                                             "seconds": seconds, "entries": entries})
            print(f"digits_cond_ddpm {base} g={g}: {seconds:.0f} s", flush=True)
        config = fastsampler.UniPCScheduler.from_config(cond.scheduler.config, **SPACING, **BASES[base]).config
        write_ratio_file(args.out / f"digits_cond_{base}.json", grid, config,
                         note=f"benchmarks/fit_dc_digits.py, {args.samples} noises seed {args.seed}")
        write_cpr_file(args.out / f"digits_cond_{base}_cpr.json", fit_cpr(grid, ridge=1e-6), config,
                       sorted({(e["num_steps"], e["guidance_scale"]) for e in grid}),
                       note="CPR fitted on every (NFE, guidance) of digits_cond ratio file")
    RESULTS.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
