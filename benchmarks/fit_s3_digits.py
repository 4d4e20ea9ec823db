"""Search and ship S³ plans for the embedded digits models at NFE 4, 5, 6, 8, 10 (fastsampler/assets/s3/).

For the unconditional digits DDPM and the guided model at guidance 1.5 and 4, ``fastsampler.tune(method="s3")``
searches a USF schedule and grid per NFE on ``--samples`` fitting noises (seed ``--seed``, 1000: FID and the bench
use other seeds), keeping the best on ``--validation-samples`` held-out noises (seed 2000) of its best candidates, against a 200-evaluation teacher, starting from UniPC bh1 order 3 (our best fixed solver on this
model; ``timestep_spacing="trailing"``, as the FID sweeps sample) with the given model-evaluation budget per NFE. Each model gets a scheduler folder holding the plans for all
NFEs, loaded by name:

    pipe.scheduler = fastsampler.S3Scheduler.from_pretrained(fastsampler.assets("digits-s3"))

The study journals and teacher caches make a rerun resume. Search cost (model evaluations, seconds) per
configuration goes to benchmarks/results/s3_fit_digits.json.

    python benchmarks/fit_s3_digits.py               # ~40 min on 2 CPU cores

``--objective fid`` scores candidates as the released S³ code does, by the FID of their samples (digits CNN
features against the digits train split), on ``--samples`` fitting noises, and chooses among the best on as many
held-out noises by the same FID; the folders get a ``_fid`` suffix (``fastsampler.assets("digits-s3-fid")``):

    python benchmarks/fit_s3_digits.py --objective fid --samples 1000 --validation-samples 1000 \
        --models digits_ddpm                                        # ~50 min: digits-s3-fid, NFE 4–10
    python benchmarks/fit_s3_digits.py --objective fid --samples 1000 --validation-samples 1000 \
        --models digits_cond_g1.5 --nfes 5,6                        # ~50 min: digits-cond-s3-g1.5-fid

A folder keeps the plans of NFEs a later run does not search; a resumed search keeps its original cost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

import fastsampler
from fastsampler.models.digits import assets_dir, load_digits_cond_pipeline, load_digits_pipeline
from fastsampler.eval.fid import fid_scorer
import harness

NFES = (4, 5, 6, 8, 10)
RESULTS = Path(__file__).resolve().parent / "results" / "s3_fit_digits.json"
MODELS = {"digits_ddpm": None, "digits_cond_g1.5": 1.5, "digits_cond_g4": 4.0}


@harness.command(out=assets_dir() / "s3", threads=1)
@click.option("--samples", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=1000, show_default=True)
@click.option("--validation-samples", type=int, default=32, show_default=True,
              help="held-out noises (seed + 1000) choosing among the best candidates")
@click.option("--budget", type=int, default=120, show_default=True, help="candidates per NFE (× NFE model evaluations)")
@click.option("--models", default=",".join(MODELS), show_default=True)
@click.option("--nfes", default=",".join(map(str, NFES)), show_default=True)
@click.option("--objective", type=click.Choice(("mse", "fid")), default="mse", show_default=True,
              help="mse: error against the teacher; fid: FID of the samples (the released S³ criterion)")
@click.option("--work", type=click.Path(path_type=Path), default=Path(".cache") / "s3_fit", show_default=True)
def main(args) -> None:
    record = {**harness.run_stamp(), "seed": args.seed, "budget_candidates_per_nfe": args.budget, "runs": {}}
    if RESULTS.exists():
        record["runs"] = json.loads(RESULTS.read_text()).get("runs", {})
    noise = torch.randn(args.samples, 1, 16, 16, generator=torch.Generator().manual_seed(args.seed))
    labels = [i % 10 for i in range(args.samples)]
    held = torch.randn(args.validation_samples, 1, 16, 16, generator=torch.Generator().manual_seed(args.seed + 1000)) \
        if args.validation_samples else None
    suffix = "_fid" if args.objective == "fid" else ""
    for model_name in args.models.split(","):
        guidance, name = MODELS[model_name], model_name + suffix
        pipe = load_digits_pipeline() if guidance is None else load_digits_cond_pipeline()
        # the released S³ criterion: FID of the samples (digits CNN features, digits train split)
        scorer = fid_scorer(pipe, "digits-train", cache_dir=args.work / "ref_stats") if args.objective == "fid" \
            else None
        scheduler = fastsampler.UniPCScheduler.from_config(pipe.scheduler.config, solver_order=3, solver_type="bh1",
                                                           timestep_spacing="trailing")
        # a folder from an earlier run keeps its plans for the NFEs this run does not search
        tuned = fastsampler.S3Scheduler.from_pretrained(args.out / name) \
            if (args.out / name / "scheduler_config.json").is_file() else None
        seconds = {}
        for n in (int(v) for v in args.nfes.split(",")):
            began = time.perf_counter()
            result = fastsampler.tune(scheduler, pipe, noise, n, method="s3", guidance_scale=guidance,
                                      class_labels=None if guidance is None else labels, validation_noise=held,
                                      checkpoint_dir=args.work / name, progress=False,
                                      budget_evaluations=args.budget * n, warmup=24, round_size=8, keep=2,
                                      **({"scorer": scorer} if scorer is not None else {}))
            seconds[n] = time.perf_counter() - began
            if tuned is None:
                tuned = result
            tuned.set_plan(result.plans[n])
            report = result.tuning_report["steps"][n]
            earlier = record["runs"].get(name, {}).get(str(n), {})
            if earlier.get("objective", "mse") == args.objective and earlier.get("seconds", 0.0) > seconds[n]:
                seconds[n] = earlier["seconds"]  # a resumed search: its cost is the original run's
            record["runs"].setdefault(name, {})[str(n)] = {
                "seconds": seconds[n], "baseline_score": report["baseline_score"], "best_score": report["best_score"],
                "evaluated": report["evaluated"], "screened_out": report["screened_out"],
                "model_evaluations": report["model_evaluations"], "best": report["best"],
                "objective": args.objective, "fit_samples": args.samples,
                "validation_samples": args.validation_samples, "holdout_baseline": report["holdout_baseline"],
                "holdout_best": report["holdout_best"]}
            print(f"{name} NFE {n}: {report['baseline_score']:.4g} → {report['best_score']:.4g} "
                  f"({report['evaluated']} evaluated, {report['screened_out']} screened out, {seconds[n]:.0f} s)",
                  flush=True)
            # merge into what is on disk now: other runs of this script (other models) may have written meanwhile
            on_disk = json.loads(RESULTS.read_text()).get("runs", {}) if RESULTS.exists() else {}
            record["runs"] = {**on_disk, name: record["runs"][name]}
            RESULTS.write_text(json.dumps(record, indent=1, default=str))
            tuned.save_pretrained(args.out / name)  # after every NFE: an interrupted run keeps what it finished


if __name__ == "__main__":
    main()
