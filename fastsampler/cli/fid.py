"""``fastsampler fid``: FID vs NFE of one or more schedulers on a local pipeline (JSON + PNG plot).

    fastsampler fid --scheduler DDIMScheduler --scheduler fastsampler.UniPCScheduler --steps 5,10,20 -n 1000
    torchrun --nproc_per_node 2 -m fastsampler.cli.fid --scheduler DPMSolverMultistepScheduler --steps 10
    fastsampler fid --pipeline digits-cond --guidance-scale 1.5,4 --seed 0,1 --steps 10 -n 1000
    fastsampler fid --pipeline path/to/sd --prompts prompts.txt --guidance-scale 5 --negative-prompt "blurry" \
        --reference path/to/real_images --inception-weights weights-inception-2015-12-05-6726825d.pth

``--pipeline``: ``digits`` (the embedded DDPM, default), ``digits-v``, ``digits-cond`` (class-conditional: labels
j mod 10) or a local pipeline folder (unconditional, class-conditional, or text-to-image with ``--prompts``). Every
(scheduler, steps, guidance scale, seed) is one run; with several seeds the seed-to-seed spread of FID per cell
(mean ± sample std, min–max) is printed and stored under ``"spread"``.

A scheduler is a diffusers class name or a dotted path (``fastsampler.DPMSolverPlusPlusScheduler``), optionally
with its own overrides after a colon: ``"DPMSolverMultistepScheduler:solver_order=3,lower_order_final=false"``.
``--kw key=value`` applies to every scheduler. ``--timestep-spacing trailing`` (default) makes every solver start
at t = T − 1; pass ``--timestep-spacing config`` to keep the pipeline's own setting.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import click
import torch

from fastsampler import progress as progress_bars
from fastsampler.cli.checks import check_scheduler_name, writable_folder
from fastsampler.eval import spec
from fastsampler.models.conditions import OptionError, read_prompts
from fastsampler.eval.fid import (DIGITS_REFERENCES, EMBEDDED_PIPELINES, RunResult, RunSpec, atomic_write_text,
                                  distributed_context, run_sweep)

#: What one cell of a seed sweep shares (every key but the seed).
CELL_KEYS = ("scheduler", "scheduler_kwargs", "steps", "nfe", "guidance_scale", "num_samples")


def parse_scheduler(text: str) -> tuple[str, dict]:
    """``"Name:k=v,k2=v2"`` → ``("Name", {"k": v, "k2": v2})`` (``fastsampler.eval.spec``), as a click error."""
    try:
        return spec.parse_scheduler(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def parse_kwargs(items: Sequence[str]) -> dict:
    try:
        return spec.parse_kwargs(items)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def parse_list(values: Sequence[str], cast: Callable[[str], int | float], option: str) -> list:
    """``("5,6", "10")`` → ``[5, 6, 10]`` (``cast`` each item); a ``click.BadParameter`` naming ``option``."""
    try:
        return [cast(s) for v in values for s in v.split(",") if s.strip()]
    except ValueError as err:
        raise click.BadParameter(f"{option}: {err}") from None


def parse_steps(values: Sequence[str]) -> list[int]:
    """``("5,6", "10")`` → ``[5, 6, 10]``."""
    return parse_list(values, int, "--steps")


def _rows(results: Sequence[RunResult | dict]) -> list[dict]:
    return [asdict(r) if isinstance(r, RunResult) else r for r in results]


def seed_spread(results: Sequence[RunResult | dict]) -> list[dict]:
    """FID over seeds per cell (``CELL_KEYS``: same scheduler, settings, NFE, guidance scale and N), in first-seen
    order: the cell's keys plus ``seeds``, ``fids``, ``mean``, ``std`` (sample std, n − 1; 0 for one seed),
    ``min`` and ``max``."""
    cells: dict[str, dict] = {}
    for r in _rows(results):
        cell = {k: r.get(k) for k in CELL_KEYS}
        entry = cells.setdefault(json.dumps(cell, sort_keys=True, default=str), {**cell, "seeds": [], "fids": []})
        entry["seeds"].append(r.get("seed"))
        entry["fids"].append(r["fid"])
    return [{**c, "mean": statistics.fmean(c["fids"]),
             "std": statistics.stdev(c["fids"]) if len(c["fids"]) > 1 else 0.0,
             "min": min(c["fids"]), "max": max(c["fids"])} for c in cells.values()]


def format_spread(cell: dict) -> str:
    """``"0.321 ± 0.012 (0.310–0.333, 3 seeds)"``."""
    return (f"{cell['mean']:.3f} ± {cell['std']:.3f} ({cell['min']:.3f}–{cell['max']:.3f}, "
            f"{len(cell['fids'])} seeds)")


def series_label(row: dict) -> str:
    """Scheduler (``fs.`` for ours), its kwargs except ``timestep_spacing``, and ``w=`` when guided."""
    label = row["scheduler"].replace("fastsampler.", "fs.")
    settings = [f"{k}={v}" for k, v in sorted((row.get("scheduler_kwargs") or {}).items()) if k != "timestep_spacing"]
    if row.get("guidance_scale") is not None:
        settings.append(f"w={row['guidance_scale']:g}")
    return f"{label} ({', '.join(settings)})" if settings else label


def plot_fid_vs_nfe(results: Sequence[RunResult | dict], path: str | Path, title: str = "FID vs NFE",
                    hlines: dict[str, float] | None = None) -> None:
    """One line per scheduler (+ its kwargs and guidance scale), FID against NFE (over several seeds: the mean, with
    the sample std as error bars); ``hlines``: labelled horizontal reference lines."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(results)
    series: dict[str, list[tuple[int, float, float]]] = {}
    for cell in seed_spread(rows):
        series.setdefault(series_label(cell), []).append((cell["nfe"], cell["mean"], cell["std"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, points in series.items():
        nfe, mean, std = zip(*sorted(points))
        ours = label.startswith("fs.")  # fastsampler dashed on top, so equal curves stay visible
        ax.errorbar(nfe, mean, yerr=std if any(std) else None, marker="x" if ours else "o",
                    linestyle="--" if ours else "-", markersize=7 if ours else 5, capsize=3, label=label)
    for j, (label, value) in enumerate((hlines or {}).items()):
        ax.axhline(value, color=("black", "grey", "tab:brown")[j % 3], linestyle=":", label=f"{label}: {value:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    nfes = sorted({r["nfe"] for r in rows})
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(n) for n in nfes])
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    ax.set_xlabel("NFE (UNet evaluations)")
    ax.set_ylabel("FID")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_specs(schedulers: Sequence[str], steps: Sequence[int], common: dict, seeds: Sequence[int],
                shard_size: int, guidance_scales: Sequence[float | None]) -> list[RunSpec]:
    """One run per (scheduler, steps, guidance scale, seed), seeds innermost (a cell's runs are adjacent)."""
    specs = []
    for text in schedulers:
        name, own = parse_scheduler(text)
        specs += [RunSpec(name, n, {**common, **own}, seed, shard_size, w)
                  for n in steps for w in guidance_scales for seed in seeds]
    return specs


def conditions_meta(pipeline: str, prompts_file: Path | None, prompts: Sequence[str] | None,
                    negative_prompt: str | None, guidance_scales: Sequence[float | None]) -> dict:
    """What the results JSON records about the pipeline and its conditions."""
    from fastsampler.models.conditions import prompts_sha256
    from fastsampler.eval.fid import embedded_pipeline_dir

    meta = {"pipeline": pipeline, "guidance_scales": list(guidance_scales)}
    if pipeline in EMBEDDED_PIPELINES:
        meta["pipeline_dir"] = str(embedded_pipeline_dir(pipeline))
    if prompts:
        meta["prompts"] = {"file": str(prompts_file), "count": len(prompts), "sha256": prompts_sha256(prompts)}
        meta["negative_prompt"] = negative_prompt
    return meta


def echo_results(rows: Sequence[RunResult], spread: Sequence[dict]) -> None:
    """The per-run table, and the per-cell seed spread when there are several seeds."""
    click.echo(f"{'scheduler':45s} {'NFE':>4s} {'w':>5s} {'seed':>5s} {'FID':>9s}")
    for r in rows:
        w = "–" if r.guidance_scale is None else f"{r.guidance_scale:g}"
        click.echo(f"{r.scheduler:45s} {r.nfe:4d} {w:>5s} {r.seed:5d} {r.fid:9.3f}")
    if any(len(cell["fids"]) > 1 for cell in spread):
        click.echo("\nseed-to-seed spread (mean ± sample std, min–max):")
        for cell in spread:
            click.echo(f"{series_label(cell):45s} NFE {cell['nfe']:3d}: {format_spread(cell)}")


@click.command(name="fid")
@click.option("--pipeline", default="digits", show_default=True,
              help=f"embedded pipeline ({', '.join(EMBEDDED_PIPELINES)}; digits-cond: class-conditional, labels "
                   "j mod 10) or a local diffusers pipeline folder (unconditional, class-conditional or "
                   "text-to-image)")
@click.option("--scheduler", "schedulers", multiple=True, default=("DDIMScheduler",), show_default=True,
              help="diffusers class name or dotted path, optionally NAME:key=value,key=value (repeatable)")
@click.option("--steps", "steps", multiple=True, default=("5,10,20",), show_default=True,
              help="comma-separated inference step counts (repeatable)")
@click.option("--kw", "kw", multiple=True, help="scheduler override key=value for every scheduler (repeatable)")
@click.option("--timestep-spacing", default="trailing", show_default=True,
              help="override for every scheduler; 'config' keeps the pipeline's")
@click.option("--guidance-scale", "guidance", multiple=True,
              help="comma-separated classifier-free guidance scales, one run each (repeatable; conditional "
                   "pipelines only) [default: 1, the conditional model]")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="text-to-image pipelines: a file with one prompt per line; sample j uses prompt j mod P")
@click.option("--negative-prompt", default=None, help="text-to-image pipelines: the negative prompt of every sample")
@click.option("-n", "--num-samples", default=1000, show_default=True)
@click.option("--shard-size", default=250, show_default=True,
              help="samples per shard and per batch (fixes the seeds)")
@click.option("--seed", "seeds", multiple=True, default=("0",), show_default=True,
              help="comma-separated seeds, one run each (repeatable); several: the seed-to-seed spread is reported")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("fid_out"),
              show_default=True, help="shards, reference statistics, results")
@click.option("--reference", default="digits-train", show_default=True,
              help=f"one of {', '.join(DIGITS_REFERENCES)}, an image tensor file (.pt/.safetensors/.npz) "
                   "or a folder of images")
@click.option("--features", type=click.Choice(["auto", "digits", "inception"]), default="auto", show_default=True,
              help="auto: digits CNN for digits references, InceptionV3 otherwise")
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None,
              help="local torch-fidelity InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth)")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="reference statistics cache [default: OUT/ref_stats]")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="results JSON [default: OUT/fid_results.json]; the plot goes next to it (.png)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch threads per process")
@progress_bars.quiet_option
def fid(pipeline: str, schedulers: tuple[str, ...], steps: tuple[str, ...], kw: tuple[str, ...],
        timestep_spacing: str, guidance: tuple[str, ...], prompts_file: Path | None, negative_prompt: str | None,
        num_samples: int, shard_size: int, seeds: tuple[str, ...], out_dir: Path, reference: str, features: str,
        inception_weights: str | None, cache_dir: Path | None, results: Path | None, device: str, threads: int,
        no_progress: bool) -> None:
    """Generate NUM_SAMPLES images per (scheduler, steps, guidance scale, seed) in resumable shards and report
    FID vs NFE."""
    for text in schedulers:  # every argument is checked before any work
        check_scheduler_name(parse_scheduler(text)[0])
    writable_folder(out_dir)
    if results is not None:
        writable_folder(results.parent, "--results")
    torch.set_num_threads(threads)
    common = parse_kwargs(kw)
    if timestep_spacing != "config":
        common.setdefault("timestep_spacing", timestep_spacing)
    guidance_scales = parse_list(guidance, float, "--guidance-scale") or [None]
    seed_list = parse_list(seeds, int, "--seed")
    specs = build_specs(schedulers, parse_steps(steps), common, seed_list, shard_size, guidance_scales)
    ctx = distributed_context()
    try:
        prompts = read_prompts(prompts_file) if prompts_file is not None else None
        rows = run_sweep(specs, num_samples, out_dir, pipeline, reference, features, inception_weights, cache_dir,
                         device, progress=not no_progress, ctx=ctx, prompts=prompts, negative_prompt=negative_prompt)
    except (FileNotFoundError, ModuleNotFoundError, OptionError) as err:  # missing weights, wrong option: say which
        raise click.ClickException(str(err)) from err
    if not ctx.is_main:
        return
    results = results or out_dir / "fid_results.json"
    spread = seed_spread(rows)
    payload = {
        "meta": {**conditions_meta(pipeline, prompts_file, prompts, negative_prompt, guidance_scales),
                 "reference": reference, "features": features, "num_samples": num_samples, "shard_size": shard_size,
                 "seeds": seed_list, "world_size": ctx.world_size, "threads": threads, "device": device,
                 "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                 "date": datetime.datetime.now().isoformat(timespec="seconds")},
        "results": [asdict(r) for r in rows],
        "spread": spread,
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results, json.dumps(payload, indent=2) + "\n")
    plot_fid_vs_nfe(rows, results.with_suffix(".png"), title=f"FID vs NFE (N={num_samples})")
    echo_results(rows, spread)
    click.echo(f"wrote {results} and {results.with_suffix('.png')}")


if __name__ == "__main__":
    fid()
