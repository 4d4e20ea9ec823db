"""``fastsampler fid``: FID vs NFE of one or more schedulers on a local pipeline (JSON + PNG plot).

    fastsampler fid --scheduler DDIMScheduler --scheduler fastsampler.UniPCScheduler --steps 5,10,20 -n 1000
    torchrun --nproc_per_node 2 -m fastsampler.eval.fid_cli --scheduler DPMSolverMultistepScheduler --steps 10

A scheduler is a diffusers class name or a dotted path (``fastsampler.DPMSolverPlusPlusScheduler``), optionally
with its own overrides after a colon: ``"DPMSolverMultistepScheduler:solver_order=3,lower_order_final=false"``.
``--kw key=value`` applies to every scheduler. ``--timestep-spacing trailing`` (default) makes every solver start
at t = T − 1; pass ``--timestep-spacing config`` to keep the pipeline's own setting.
"""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import click
import torch

from fastsampler.eval import spec
from fastsampler.eval.fid import DIGITS_REFERENCES, RunResult, RunSpec, distributed_context, run_sweep


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


def parse_steps(values: Sequence[str]) -> list[int]:
    """``("5,6", "10")`` → ``[5, 6, 10]``."""
    return [int(s) for v in values for s in v.split(",") if s.strip()]


def plot_fid_vs_nfe(results: Sequence[RunResult | dict], path: str | Path, title: str = "FID vs NFE",
                    hlines: dict[str, float] | None = None) -> None:
    """One line per scheduler (+ its kwargs), FID against NFE; ``hlines``: labelled horizontal reference lines."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [asdict(r) if isinstance(r, RunResult) else r for r in results]
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        label = r["scheduler"].replace("fastsampler.", "fs.")
        if r.get("scheduler_kwargs"):
            label += " (" + ", ".join(f"{k}={v}" for k, v in sorted(r["scheduler_kwargs"].items())
                                      if k != "timestep_spacing") + ")"
        series.setdefault(label.replace(" ()", ""), []).append((r["nfe"], r["fid"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, points in series.items():
        points.sort()
        ours = label.startswith("fs.")  # fastsampler dashed on top, so equal curves stay visible
        ax.plot(*zip(*points), marker="x" if ours else "o", linestyle="--" if ours else "-",
                markersize=7 if ours else 5, label=label)
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


@click.command(name="fid")
@click.option("--pipeline", type=click.Path(exists=True, file_okay=False), default=None,
              help="local diffusers pipeline dir [default: the embedded digits DDPM]")
@click.option("--scheduler", "schedulers", multiple=True, default=("DDIMScheduler",), show_default=True,
              help="diffusers class name or dotted path, optionally NAME:key=value,key=value (repeatable)")
@click.option("--steps", "steps", multiple=True, default=("5,10,20",), show_default=True,
              help="comma-separated inference step counts (repeatable)")
@click.option("--kw", "kw", multiple=True, help="scheduler override key=value for every scheduler (repeatable)")
@click.option("--timestep-spacing", default="trailing", show_default=True,
              help="override for every scheduler; 'config' keeps the pipeline's")
@click.option("-n", "--num-samples", default=1000, show_default=True)
@click.option("--shard-size", default=250, show_default=True, help="samples per shard (fixes the seeds)")
@click.option("--seed", default=0, show_default=True)
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
@click.option("--no-progress", is_flag=True)
def fid(pipeline: str | None, schedulers: tuple[str, ...], steps: tuple[str, ...], kw: tuple[str, ...],
        timestep_spacing: str, num_samples: int, shard_size: int, seed: int, out_dir: Path, reference: str,
        features: str, inception_weights: str | None, cache_dir: Path | None, results: Path | None, device: str,
        threads: int, no_progress: bool) -> None:
    """Generate NUM_SAMPLES images per (scheduler, steps) in resumable shards and report FID vs NFE."""
    torch.set_num_threads(threads)
    common = parse_kwargs(kw)
    if timestep_spacing != "config":
        common.setdefault("timestep_spacing", timestep_spacing)
    specs = []
    for text in schedulers:
        name, own = parse_scheduler(text)
        specs += [RunSpec(name, n, {**common, **own}, seed, shard_size) for n in parse_steps(steps)]
    ctx = distributed_context()
    try:
        rows = run_sweep(specs, num_samples, out_dir, pipeline, reference, features, inception_weights, cache_dir,
                         device, progress=not no_progress, ctx=ctx)
    except (FileNotFoundError, ModuleNotFoundError) as err:  # missing weights / torch-fidelity: say which
        raise click.ClickException(str(err)) from err
    if not ctx.is_main:
        return
    results = results or out_dir / "fid_results.json"
    payload = {
        "meta": {"pipeline": pipeline or "embedded digits DDPM (fastsampler/assets/digits_ddpm)",
                 "reference": reference, "features": features, "num_samples": num_samples, "shard_size": shard_size,
                 "seed": seed, "world_size": ctx.world_size, "threads": threads, "device": device,
                 "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                 "date": datetime.datetime.now().isoformat(timespec="seconds")},
        "results": [asdict(r) for r in rows],
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(payload, indent=2) + "\n")
    plot_fid_vs_nfe(rows, results.with_suffix(".png"), title=f"FID vs NFE (N={num_samples})")
    click.echo(f"{'scheduler':45s} {'NFE':>4s} {'FID':>9s}")
    for r in rows:
        click.echo(f"{r.scheduler:45s} {r.nfe:4d} {r.fid:9.3f}")
    click.echo(f"wrote {results} and {results.with_suffix('.png')}")


if __name__ == "__main__":
    fid()
