"""`fastsampler tune`: fit a scheduler to a local diffusers pipeline and write a scheduler folder.

    fastsampler tune --pipeline DIR --method coefficients|dc|s3|timesteps --steps 5,6,8 [--guidance-scale 7.5] [--prompts FILE]
                     [--validation-samples 64] [--fid-reference REF] --out DIR

With one guidance scale, ``--out`` is a scheduler folder (``pipe.scheduler = UniPCScheduler.from_pretrained(DIR)``)
holding a tuned plan per step count; with several (``--guidance-scale 1.5,4,7.5``) each gets its folder
``DIR/g<scale>``, and ``DIR`` also holds the ratio file ``dc_ratios.json`` and, from three or more (NFE, CFG)
pairs, the cascade-polynomial-regression file ``dc_cpr.json`` (for ``dc_ratios_file`` / ``dc_cpr_file``) —
these two for ``--method dc``; ``--method s3`` writes ``S3Scheduler`` folders, scoring candidates by the error
against the teacher or, with ``--fid-reference``, by the FID of their samples (the released S³ criterion; the
held-out selection then uses FID too). A report
(``tune_report.json``) records losses, ratios, timings and the command. Teacher trajectories are cached and the
search checkpoints, so a killed run resumes; under ``torchrun`` the teacher is computed sharded.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import click
import torch

from fastsampler import progress as progress_bars
from fastsampler.cli.checks import check_scheduler_name, positive_ints, writable_folder
from fastsampler.eval.spec import parse_scheduler
from fastsampler.tuning import DEFAULT_METHOD


def _method_options(method: str, search: str, iters: int | None, lr: float | None, budget: int | None,
                    budget_seconds: float | None) -> dict:
    """``fastsampler.tune`` options from the command line, refusing those the method does not take."""
    given = {"--iters": iters, "--lr": lr, "--budget": budget, "--budget-seconds": budget_seconds}
    allowed = {"dc": {"--iters", "--lr"}, "timesteps": {"--iters", "--lr"}, "coefficients": {"--iters", "--lr"},
               "s3": {"--budget", "--budget-seconds"}}
    wrong = sorted(k for k, v in given.items() if v is not None and k not in allowed[method])
    if wrong:
        raise click.UsageError(f"{', '.join(wrong)} does not apply to --method {method} "
                               f"(it takes {', '.join(sorted(allowed[method]))})")
    if method == "s3":
        options = {"budget_evaluations": budget, "budget_seconds": budget_seconds}
        if budget is None and budget_seconds is not None:
            options["budget_evaluations"] = None  # the wall time alone bounds the search
        return {k: v for k, v in options.items() if v is not None or k == "budget_evaluations" and budget_seconds}
    options = {"iters": iters, "lr": lr} | ({"search": search} if method == "dc" else {})
    return {k: v for k, v in options.items() if v is not None}


CHECKPOINTS = ".checkpoints"  # inside the output folder while tuning runs; removed once the scheduler is saved
MEASURE = "MSE vs teacher"  # every loss below: mean squared error of the final samples against the teacher's


def _summary(method: str, entry: dict, measure: str = MEASURE) -> str:
    """One line per step count: what was fitted, the loss (named by ``measure``) of the scheduler's own plan →
    the tuned one, on which noises, and the cost."""
    cost = f"{entry['seconds']:.1f} s, {entry['model_evaluations']} model calls (teacher and validation included)"
    held = ""
    if "validation_loss_tuned" in entry:
        held = f"; held-out noises {entry['validation_loss_plain']:.4g} → {entry['validation_loss_tuned']:.4g}"
    if method == "dc":
        return (f"ratios {[round(r, 3) for r in entry['ratios']]}; {measure} on the fitting noises "
                f"{entry['final_loss_plain']:.4g} → {entry['final_loss_tuned']:.4g}{held}; {cost}")
    if method == "timesteps":
        return (f"timesteps {[round(t) for t in entry['timesteps_learned']]}; {measure} on the fitting noises "
                f"{entry['loss_initial']:.4g} → {entry['loss_final_grid']:.4g}{held}; {cost}")
    if method == "coefficients":
        return (f"timesteps {[round(t, 2) for t in entry['timesteps_learned']]}; {measure} on validation "
                f"({entry['validation']}) {entry['validation_base']:.4g} → {entry['validation_tuned']:.4g} after "
                f"{entry['iterations']} iterations (best {entry['best_iteration']}; {entry['stopped']}){held}; {cost}")
    chosen = ""
    if entry.get("validation_best") == entry.get("validation_best"):  # not NaN: the search validated
        chosen = (f"; {entry['chosen']} chosen on validation ({entry['validation']}) "
                  f"{entry['validation_base']:.4g} → {entry['validation_best']:.4g}")
    return (f"{measure} of the scheduler's plan → the best candidate {entry['baseline_score']:.4g} → "
            f"{entry['best_score']:.4g} ({entry['evaluated']} candidates evaluated in "
            f"{entry.get('search_evaluations', 0)} model calls of the search's budget, {entry['screened_out']} "
            f"screened out{chosen}){held}; {cost}")


def _floats(text: str | None) -> list[float | None]:
    try:
        return [None] if not text else [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}",
                                 param_hint="--guidance-scale") from None


def _load_pipeline(path: str, device: str):
    import fastsampler.models.digits_pipeline  # noqa: F401  (registers the digits pipeline class)
    from diffusers import DiffusionPipeline

    from fastsampler.shipped import pipeline_folder

    try:
        folder = pipeline_folder(path)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--pipeline") from None
    return DiffusionPipeline.from_pretrained(folder, local_files_only=True).to(device)


def _scheduler_for(pipe, spec: str):
    from fastsampler.adapters.registry import scheduler_class

    name, options = parse_scheduler(spec)
    cls = scheduler_class(name)
    if cls is None:
        raise click.BadParameter(f"{name!r} is not a fastsampler scheduler", param_hint="--scheduler")
    return cls.from_config(pipe.scheduler.config, **options)


def _noise(pipe, num: int, seed: int, device: str) -> torch.Tensor:
    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    config = module.config
    channels = getattr(config, "in_channels", 4)
    size = getattr(config, "sample_size", 64)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn((num, channels, *size), generator=torch.Generator().manual_seed(seed)).to(device)


@click.command("tune")
@click.option("--pipeline", "pipeline_dir", required=True,
              help="An embedded pipeline (digits, digits-v, digits-cond) or a local diffusers pipeline folder.")
@click.option("--method", type=click.Choice(["dc", "s3", "timesteps", "coefficients"]), default=DEFAULT_METHOD,
              show_default=True)
@click.option("--steps", required=True, help="Comma-separated step counts, e.g. 5,6,8.")
@click.option("--guidance-scale", default=None, help="Guidance scale(s), comma-separated (class- or text-conditional).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text file, one prompt per line (text-to-image pipelines).")
@click.option("--negative-prompt", default=None, help="Negative prompt (text-to-image pipelines, with guidance).")
@click.option("--class-labels", default=None, help="Comma-separated labels (class-conditional); default: balanced.")
@click.option("--scheduler", "scheduler_spec", default="UniPCScheduler", show_default=True,
              metavar="NAME[:key=value,...]", help="The fastsampler scheduler to tune.")
@click.option("--num-samples", type=click.IntRange(min=1), default=10, show_default=True, help="Fitting noises.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--search", type=click.Choice(["gradient", "scan"]), default="gradient", show_default=True,
              help="dc: fit the ratios by gradient or by a grid scan.")
@click.option("--iters", type=click.IntRange(min=1), default=None,
              help="Iterations (dc: 20; timesteps: at most 300, coefficients: at most 400, both stop on a plateau).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Step size (dc, timesteps, coefficients).")
@click.option("--budget", type=click.IntRange(min=1), default=None,
              help="S3: model evaluations per step count (default 3000).")
@click.option("--budget-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="S3: wall-time budget per step count.")
@click.option("--fid-reference", default=None,
              help="S3: score candidates by the FID of their samples against this reference (as `fastsampler fid "
                   "--reference`: digits-train|digits-test|digits-all, an image tensor file or a folder of images) "
                   "instead of the error against the teacher; --num-samples ≥ 100 recommended.")
@click.option("--inception-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="S3 with --fid-reference outside the digits: local InceptionV3 weights for the FID features.")
@click.option("--validation-samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="Extra held-out noises (seed + 1) that validate the fit. 0: every method holds out a quarter of "
                   "the fitting noises instead.")
@click.option("--teacher", default="dpmsolver++3:200", show_default=True, help="SOLVER:STEPS (dpmsolver++3 or ddim).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--cache-dir", default=None, help="Teacher cache (default: $FASTSAMPLER_CACHE or ~/.cache/fastsampler).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@progress_bars.quiet_option
def tune(pipeline_dir: str, method: str, steps: str, guidance_scale: str | None, prompts_file: str | None,
         negative_prompt: str | None, class_labels: str | None, scheduler_spec: str, num_samples: int, seed: int,
         search: str, iters: int | None, lr: float | None, budget: int | None, budget_seconds: float | None,
         fid_reference: str | None, inception_weights: str | None, validation_samples: int, teacher: str,
         device: str, cache_dir: str | None, out_dir: str, no_progress: bool) -> None:
    """Fit a fastsampler scheduler to a pipeline's model (solver coefficients and time points, DC-Solver ratios, an
    S3 schedule or time points alone) and write a scheduler folder."""
    from fastsampler.runtime.distributed import distributed_context, select_device
    from fastsampler.runtime.cache import default_cache_dir
    from fastsampler.tuning.api import tune as tune_fn
    from fastsampler.tuning.cpr import fit_cpr, write_cpr_file, write_ratio_file

    began = time.perf_counter()
    step_counts = positive_ints(steps, "--steps")  # every argument is checked before any work
    check_scheduler_name(parse_scheduler(scheduler_spec)[0], fastsampler_only=True)
    scales = _floats(guidance_scale)
    options = _method_options(method, search, iters, lr, budget, budget_seconds)
    writable_folder(out_dir)
    ctx = distributed_context()
    device = select_device(device, ctx)
    pipe = _load_pipeline(pipeline_dir, device)
    prompts = Path(prompts_file).read_text().splitlines() if prompts_file else None
    prompts = [p for p in prompts if p.strip()] if prompts else None
    is_class_conditional = getattr(getattr(pipe, "unet", None), "config", None) is not None and \
        getattr(pipe.unet.config, "num_class_embeds", None) is not None
    labels = None
    if class_labels:
        labels = [int(v) for v in class_labels.split(",")]
    elif is_class_conditional:
        labels = [i % (int(pipe.unet.config.num_class_embeds) - 1) for i in range(num_samples)]
    if scales != [None] and not (is_class_conditional or prompts):
        raise click.BadParameter(f"{pipeline_dir} is an unconditional model: guidance needs class labels or "
                                 "--prompts", param_hint="--guidance-scale")
    noise = _noise(pipe, num_samples, seed, device)
    validation = _noise(pipe, validation_samples, seed + 1, device) if validation_samples else None
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if fid_reference is not None or inception_weights is not None:
        if method != "s3":
            raise click.UsageError(f"--fid-reference / --inception-weights apply to --method s3, not {method}")
        if fid_reference is None:
            raise click.UsageError("--inception-weights needs --fid-reference")
        from fastsampler.eval.fid import fid_scorer

        options["scorer"] = fid_scorer(pipe, fid_reference, inception_weights=inception_weights,
                                       cache_dir=cache / "ref_stats")
    entries, report = [], {"command": " ".join(sys.argv), "pipeline": pipeline_dir, "method": method,
                           "num_samples": num_samples, "seed": seed, "fid_reference": fid_reference, "runs": {}}
    for scale in scales:
        scheduler = _scheduler_for(pipe, scheduler_spec)
        target = out if len(scales) == 1 else out / f"g{scale:g}"
        tuned = tune_fn(scheduler, pipe, noise, step_counts, method, prompt=prompts, negative_prompt=negative_prompt,
                        guidance_scale=scale, class_labels=labels, teacher=teacher, cache_dir=cache,
                        checkpoint_dir=target / CHECKPOINTS, progress=not no_progress,
                        validation_noise=validation, **options)
        if ctx.is_main:
            tuned.save_pretrained(target)
            shutil.rmtree(target / CHECKPOINTS, ignore_errors=True)  # kept only while a run can still resume
        for n, entry in tuned.tuning_report["steps"].items():
            if method == "dc":
                entries.append({"num_steps": n, "guidance_scale": scale, "ratios": entry["ratios"]})
            where = "" if scale is None else f"guidance {scale:g}, "
            click.echo(f"{where}{n} steps: {_summary(method, entry, 'FID' if fid_reference else MEASURE)}")
        report["runs"][str(scale)] = tuned.tuning_report
    if ctx.is_main and method == "dc":
        config = dict(_scheduler_for(pipe, scheduler_spec).config)
        write_ratio_file(out / "dc_ratios.json", entries, config, note=f"fastsampler tune on {pipeline_dir}")
        pairs = {(e["num_steps"], e["guidance_scale"]) for e in entries if e["guidance_scale"] is not None}
        if len(pairs) >= 3:
            write_cpr_file(out / "dc_cpr.json", fit_cpr(entries, ridge=1e-6), config, sorted(pairs))
    if ctx.is_main:
        report["seconds"] = time.perf_counter() - began
        (out / "tune_report.json").write_text(json.dumps(report, indent=1, default=str))
        click.echo(f"wrote {out} in {report['seconds']:.1f} s")
