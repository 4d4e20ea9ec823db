"""One FID run end to end (shards on every rank, the score on rank 0) and a sweep of runs sharing a pipeline,
reference statistics and output folder."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastsampler import progress as progress_bars
from fastsampler.models.conditions import Conditioning, SampleSource, conditioning_for
from fastsampler.runtime.distributed import DistContext, distributed_context, select_device
from fastsampler.eval.fid.files import atomic_write_text
from fastsampler.eval.fid.shards import GenerationReport, RunSpec, generate_shards, iter_shards, shard_nfe
from fastsampler.eval.fid.extractor import Extractor
from fastsampler.eval.fid.reference import DIGITS_REFERENCES
from fastsampler.eval.fid.pipelines import load_pipeline, pipeline_id
from fastsampler.eval.fid.evaluator import FIDEvaluator


@dataclass
class RunResult:
    """One row of the FID table."""

    scheduler: str
    steps: int
    nfe: int
    fid: float
    num_samples: int
    scheduler_kwargs: dict
    seconds: float
    shards_generated: int
    shards_reused: int
    run_dir: str
    seed: int | None = None
    guidance_scale: float | None = None


def evaluate_run(pipe, pipe_id: str, spec: RunSpec, num_samples: int, out_dir: Path,
                 evaluator: FIDEvaluator | None, ctx: DistContext = DistContext(), device: str = "cpu",
                 progress: bool = True, on_generated: Callable[[GenerationReport], None] | None = None,
                 conditioning: Conditioning | None = None) -> RunResult | None:
    """Generate (resuming) the shards of ``spec`` on every rank, then FID on rank 0 (other ranks get ``None``).

    ``evaluator`` is only used on rank 0 (pass ``None`` elsewhere). ``conditioning``: what a conditional pipeline's
    samples are conditioned on (``conditions.conditioning_for``; default: unconditional).
    """
    source = SampleSource(pipe, conditioning or Conditioning())
    identity = source.conditioning.identity()
    run_dir = Path(out_dir) / spec.key(pipe_id, identity)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "run.json", json.dumps({**asdict(spec), "pipeline_id": pipe_id, **identity,
                                                            "num_samples": num_samples}, indent=2) + "\n")
    t0 = time.perf_counter()
    report = generate_shards(source, dict(pipe.scheduler.config), spec, num_samples, run_dir, ctx, device,
                             progress, pipeline=pipe_id)
    if on_generated is not None:
        on_generated(report)
    ctx.barrier()
    seconds = time.perf_counter() - t0
    counts = _gather_counts(ctx, len(report.generated), len(report.skipped))
    if not ctx.is_main:
        return None
    fid = evaluator(iter_shards(run_dir, num_samples, spec.shard_size))
    return RunResult(scheduler=spec.scheduler, steps=spec.steps, nfe=int(shard_nfe(run_dir) or spec.steps),
                     fid=fid, num_samples=num_samples, scheduler_kwargs=dict(spec.scheduler_kwargs),
                     seconds=round(seconds, 2), shards_generated=counts[0], shards_reused=counts[1],
                     run_dir=str(run_dir), seed=spec.seed, guidance_scale=spec.guidance_scale)


def _gather_counts(ctx: DistContext, generated: int, skipped: int) -> tuple[int, int]:
    """Sum (generated, skipped) shard counts over ranks."""
    if ctx.world_size == 1:
        return generated, skipped
    t = torch.tensor([generated, skipped], dtype=torch.int64)
    torch.distributed.all_reduce(t)
    return int(t[0]), int(t[1])


def run_sweep(specs: Sequence[RunSpec], num_samples: int, out_dir: str | Path, pipeline: str | Path | None = None,
              reference: str = "digits-train", features: str = "auto", inception_weights: str | Path | None = None,
              cache_dir: str | Path | None = None, device: str = "cpu", progress: bool = True,
              ctx: DistContext | None = None, prompts: Sequence[str] | None = None,
              negative_prompt: str | None = None) -> list[RunResult]:
    """Evaluate every spec in order (shared pipeline, reference statistics and output dir).

    ``pipeline``: one of ``EMBEDDED_PIPELINES`` (``None``: ``"digits"``) or a local folder. A class-conditional
    pipeline samples class-balanced labels, a text-to-image one needs ``prompts`` (sample j: prompt j mod P) and
    takes a ``negative_prompt``; each spec's ``guidance_scale`` applies (``conditions``). ``features="auto"``: the
    digits extractor for the ``digits-*`` references, InceptionV3 otherwise. ``device`` goes through
    ``select_device`` (``"cuda"``: ``cuda:<LOCAL_RANK>``). Returns the results on rank 0 and an empty list on the
    other ranks. Options that do not fit the pipeline raise ``conditions.OptionError`` before any sampling.
    """
    ctx = ctx or distributed_context()
    if features == "auto":
        features = "digits" if reference in DIGITS_REFERENCES else "inception"
    extractor = Extractor.create(features, inception_weights)  # every rank fails early on a bad choice
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "ref_stats"
    device = select_device(device, ctx)  # "cuda" → this rank's own GPU
    pipe = load_pipeline(pipeline).to(device)
    conditioning = conditioning_for(pipe, prompts, negative_prompt)
    for spec in specs:
        conditioning.check_guidance(spec.guidance_scale)
    pipe_id = pipeline_id(pipeline)
    evaluator = FIDEvaluator(extractor, reference, cache_dir) if ctx.is_main else None
    results: list[RunResult] = []
    for spec in progress_bars.bar(specs, desc="runs", unit="run", enabled=progress and ctx.is_main):
        result = evaluate_run(pipe, pipe_id, spec, num_samples, out_dir, evaluator, ctx, device, progress,
                              conditioning=conditioning)
        if result is not None:
            results.append(result)
            if progress:
                guided = "" if spec.guidance_scale is None else f" w={spec.guidance_scale:g}"
                progress_bars.write(f"{spec.scheduler} steps={spec.steps}{guided} seed={spec.seed} NFE={result.nfe}: "
                           f"FID {result.fid:.3f} ({result.seconds:.0f}s, {result.shards_generated} shards new)")
    return results
