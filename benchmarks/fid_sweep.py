"""FID of solvers × NFE × guidance scales, repeated over seeds, with the seed-to-seed spread of every cell.

The project states this spread next to every FID gain it claims: a difference between two cells smaller than
their spread is not resolved at that N. Any pipeline ``fastsampler fid`` takes works (``--pipeline digits``, the
unconditional embedded DDPM, is the default; ``digits-cond`` is the class-conditional one, sampled class-balanced
with classifier-free guidance; a local folder; text-to-image pipelines with ``--prompts``). Every scheduler is
``from_config(pipe.scheduler.config, timestep_spacing="trailing", …)``. Writes ``RESULTS`` (JSON), and ``.md`` and
``.png`` next to it; generation is resumable (shards in ``--out``) and torchrun-aware:

    python benchmarks/fid_sweep.py --pipeline digits-cond --solver fastsampler.UniPCScheduler \
        --solver DDIMScheduler --nfe 10 --guidance-scales 1.5,4 --seeds 0,1 -n 200
    torchrun --nproc_per_node 2 benchmarks/fid_sweep.py --seeds 0,1,2 -n 1000

Per cell: the mean ± sample standard deviation (n − 1) of FID over the seeds, and min–max. Seed s gives every cell
the same initial noises (and, for digits-cond, the same labels), so differences *within* a seed are less noisy than
the spread of the absolute values.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click
import torch
import torchmetrics

from fastsampler.models.conditions import OptionError, read_prompts
from fastsampler.eval.fid import DIGITS_REFERENCES, atomic_write_text, distributed_context, run_sweep
from fastsampler.cli.fid import (build_specs, format_spread, parse_list, plot_fid_vs_nfe, seed_spread,
                                      series_label)
import harness

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "fid_sweep.json"


def markdown(meta: dict, spread: list[dict]) -> str:
    """One row per (solver, guidance scale), one column per NFE: mean ± std (min–max) over the seeds."""
    nfes = sorted({cell["nfe"] for cell in spread})
    table: dict[str, dict[int, dict]] = {}
    for cell in spread:
        table.setdefault(series_label(cell), {})[cell["nfe"]] = cell
    lines = [f"# FID sweep on `{meta['pipeline']}` ({meta['date'][:10]})", "",
             *([meta["note"], ""] if meta.get("note") else []),
             f"N = {meta['num_samples']} samples per run (shards of {meta['shard_size']}), seeds "
             f"{', '.join(map(str, meta['seeds']))}; reference = {meta['reference']}, features = {meta['features']}, "
             f"torchmetrics {meta['torchmetrics']} `FrechetInceptionDistance`. Every scheduler "
             "`from_config(pipe.scheduler.config, timestep_spacing=\"trailing\")`. Cells: mean ± sample std "
             "(min–max) of FID over the seeds; lower is better.", "",
             "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for label, cells in table.items():
        lines.append(f"| {label} | " + " | ".join(_cell(cells.get(n)) for n in nfes) + " |")
    lines += ["", "Per seed: " + "; ".join(f"{series_label(c)} NFE {c['nfe']}: "
                                           + " / ".join(f"{v:.3f}" for v in c["fids"]) for c in spread), "",
              f"Machine: {meta['machine']}; {meta['processes']} process(es) × 1 thread; wall time "
              f"{meta['wall_seconds']:.0f} s (generation + FID).", "", f"Reproduce: `{meta['command']}`", ""]
    return "\n".join(lines)


def _cell(cell: dict | None) -> str:
    if cell is None:
        return "–"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f} ({cell['min']:.3f}–{cell['max']:.3f})"


def render(payload: dict, results: Path) -> None:
    """Write the .md and .png next to ``results`` from a recorded payload, and print the spread."""
    meta, spread = payload["meta"], payload["spread"]
    plot_fid_vs_nfe(payload["results"], results.with_suffix(".png"),
                    title=f"{meta['pipeline']}: FID vs NFE (N={meta['num_samples']}, {len(meta['seeds'])} seeds)")
    atomic_write_text(results.with_suffix(".md"), markdown(meta, spread))
    for cell in spread:
        click.echo(f"{series_label(cell):50s} NFE {cell['nfe']:3d}: {format_spread(cell)}")


@harness.command(out=None)
@click.option("--pipeline", default="digits", show_default=True,
              help="digits, digits-v, digits-cond or a local pipeline folder (as `fastsampler fid --pipeline`)")
@click.option("--solver", "solvers", multiple=True, default=("DDIMScheduler", "fastsampler.UniPCScheduler"),
              show_default=True, help="scheduler NAME[:key=value,...] (repeatable)")
@click.option("--nfe", default="10", show_default=True, help="comma-separated step counts")
@click.option("--guidance-scales", default="", help="comma-separated guidance scales (conditional pipelines)")
@click.option("--seeds", default="0,1,2", show_default=True, help="comma-separated seeds")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="text-to-image pipelines: one prompt per line")
@click.option("--negative-prompt", default=None)
@click.option("-n", "--num-samples", default=1000, show_default=True)
@click.option("--shard-size", default=250, show_default=True)
@click.option("--reference", default="digits-train", show_default=True)
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=REPO / "fid_out" / "sweep",
              show_default=True, help="shards and reference statistics (resumable)")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS, show_default=True,
              help="results JSON; .md and .png go next to it")
@click.option("--note", default="", help="a line printed under the title of the .md (what the sweep is for)")
@click.option("--render-only", is_flag=True, help="only redraw .md/.png from an existing results JSON")
def main(pipeline: str, solvers: tuple[str, ...], nfe: str, guidance_scales: str, seeds: str,
         prompts_file: Path | None, negative_prompt: str | None, num_samples: int, shard_size: int, reference: str,
         inception_weights: str | None, out_dir: Path, results: Path, note: str, render_only: bool) -> None:
    """Run the sweep over all seeds and write RESULTS (.json, .md, .png)."""
    if render_only:
        render(json.loads(results.read_text()), results)
        return
    ctx = distributed_context()
    seed_list = parse_list([seeds], int, "--seeds")
    scales = parse_list([guidance_scales], float, "--guidance-scales") or [None]
    specs = build_specs(solvers, parse_list([nfe], int, "--nfe"), {"timestep_spacing": "trailing"}, seed_list,
                        shard_size, scales)
    wall0 = time.time()
    try:
        prompts = read_prompts(prompts_file) if prompts_file is not None else None
        rows = run_sweep(specs, num_samples, out_dir, pipeline, reference, inception_weights=inception_weights,
                         ctx=ctx, prompts=prompts, negative_prompt=negative_prompt)
    except (FileNotFoundError, ModuleNotFoundError, OptionError) as err:
        raise click.ClickException(str(err)) from err
    if not ctx.is_main:
        return
    meta = {"pipeline": pipeline, "note": note, "num_samples": num_samples, "shard_size": shard_size,
            "seeds": seed_list, "guidance_scales": scales, "reference": reference,
            "features": "digits CNN (64-d)" if reference in DIGITS_REFERENCES else "InceptionV3 (2048-d)",
            "wall_seconds": round(time.time() - wall0, 1), "processes": ctx.world_size,
            "machine": f"{os.cpu_count()}-core {platform.machine()} CPU (shared), torch {torch.__version__}",
            "torchmetrics": torchmetrics.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python benchmarks/fid_sweep.py " + shlex.join(sys.argv[1:])}
    records = [{**asdict(r), "run_dir": os.path.relpath(r.run_dir, REPO)} for r in rows]
    payload = {"meta": meta, "results": records, "spread": seed_spread(rows)}
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results, json.dumps(payload, indent=2) + "\n")
    render(payload, results)


if __name__ == "__main__":
    main()
