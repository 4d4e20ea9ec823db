"""How the S³ search scales with workers: one study, a fixed budget, 1 process vs ``torchrun`` with several.

Tunes UniPC bh2-3 at NFE 5 on the exact digits mixture (SD preset, ``--fit-samples`` noises) with a budget of
``--budget`` candidates, and appends the wall time, the candidates evaluated and the best score to
``benchmarks/results/s3_workers.json`` under the world size. Each world size starts a fresh study.

    python benchmarks/s3_workers.py
    torchrun --nproc_per_node 2 benchmarks/s3_workers.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import click

import fastsampler
from fastsampler.eval import bench as bench_lib
from fastsampler.eval import gmm
from fastsampler.runtime.distributed import distributed_context
from fastsampler.models.denoisers import MixtureDenoiserModel
import harness

RESULTS = Path(__file__).resolve().parent / "results" / "s3_workers.json"


@harness.command(out=None, threads=1)
@click.option("--nfe", type=int, default=5, show_default=True)
@click.option("--budget", type=int, default=120, show_default=True, help="candidates (× NFE model evaluations)")
@click.option("--fit-samples", type=int, default=256, show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=Path(tempfile.gettempdir()) / "fastsampler_s3_workers",
              show_default=True)
def main(args) -> None:
    ctx = distributed_context()
    work = args.work / f"world{ctx.world_size}"
    if ctx.is_main:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    ctx.barrier()
    config = bench_lib.preset_config("sd")
    setup = bench_lib.BenchSetup("sd", None, None, args.fit_samples, 1000)
    model = MixtureDenoiserModel(gmm.MixtureModel.from_scheduler_config(setup.denoiser(), config))
    scheduler = fastsampler.UniPCScheduler.from_config(config, solver_order=3)
    # the teacher first, outside the timing (it is shared through the cache and is not part of the search)
    fastsampler.tune(scheduler, model, setup.noise().double(), args.nfe, method="s3", cache_dir=work / "cache",
                     checkpoint_dir=work / "warm", progress=False, dist=ctx, budget_evaluations=args.nfe)
    ctx.barrier()
    began = time.perf_counter()
    tuned = fastsampler.tune(scheduler, model, setup.noise().double(), args.nfe, method="s3", cache_dir=work / "cache",
                             checkpoint_dir=work / "study", progress=False, dist=ctx,
                             budget_evaluations=args.budget * args.nfe, warmup=24, round_size=8, keep=2)
    seconds = time.perf_counter() - began
    report = tuned.tuning_report["steps"][args.nfe]
    if ctx.is_main:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results[str(ctx.world_size)] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread/worker",
            "nfe": args.nfe, "budget_candidates": args.budget, "fit_samples": args.fit_samples,
            "seconds": seconds, "evaluated": report["evaluated"], "screened_out_by_rank0": report["screened_out"],
            "baseline_score": report["baseline_score"], "best_score": report["best_score"]}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
        print(json.dumps(results[str(ctx.world_size)], indent=1))


if __name__ == "__main__":
    main()
