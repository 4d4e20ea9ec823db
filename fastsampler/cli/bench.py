"""`fastsampler bench`: ODE error vs NFE of every solver on an exact Gaussian-mixture model."""

from __future__ import annotations

import time

import click
import torch

from fastsampler import progress as progress_bars
from fastsampler.cli.checks import writable_folder
from fastsampler.eval import bench as bench_lib, bench_report


def _parse_nfes(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        nfes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not nfes or min(nfes) < 1:
        raise click.BadParameter("NFE values must be positive integers")
    return sorted(set(nfes))


@click.command("bench")
@click.option("--preset", type=click.Choice(sorted(bench_lib.PRESETS)), default="sd", show_default=True,
              help="sd: scaled_linear 0.00085–0.012; ddpm: linear 1e-4–0.02; cosine: squaredcos_cap_v2; "
                   "flow: flow matching, shift 3.0 (all 1000 training steps).")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction", "sample", "flow_prediction"]),
              default=None, help="Model parameterisation (default: the preset's).")
@click.option("--guidance-scale", type=float, default=None,
              help="Class-conditional mixture with exact classifier-free guidance at this scale "
                   "(sample i is conditioned on digit i mod 10). Default: unconditional.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--solvers", default="*", show_default=True,
              help="Comma-separated solver names or globs, e.g. 'fs/*,diffusers/dpmpp-*'.")
@click.option("--scheduler", "extra", multiple=True, metavar="NAME[:key=value,...]",
              help="An extra solver with any options, e.g. 'UniPCScheduler:momentum=hb,momentum_beta=0.8' "
                   "(repeatable; benchmarked next to --solvers).")
@click.option("--nfe", "nfes", default=",".join(map(str, bench_lib.DEFAULT_NFES)), show_default=True,
              callback=_parse_nfes, help="Comma-separated NFE values.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="./bench_out", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads. The model calls are small matmuls; one thread avoids the large slowdown "
                   "of oversubscribed cores.")
@click.option("--list-solvers", is_flag=True, help="List the solver names and exit.")
@progress_bars.quiet_option
def bench(preset: str, prediction_type: str | None, guidance_scale: float | None, batch_size: int, seed: int,
          solvers: str, extra: tuple[str, ...], nfes: list[int], out_dir: str, threads: int, list_solvers: bool,
          no_progress: bool) -> None:
    """RMSE vs the exact ODE solution, per solver and NFE, on the digits Gaussian mixture.

    Writes results.csv, results.json, table.txt and error_vs_nfe.png to --out. The reference solution is
    cached (FASTSAMPLER_CACHE, default ~/.cache/fastsampler).
    """
    try:
        setup = bench_lib.BenchSetup(preset, prediction_type, guidance_scale, batch_size, seed)
        config = setup.config
        specs = bench_lib.select_solvers(solvers, config) if solvers else []
        specs += [bench_lib.custom_spec(text) for text in extra]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if list_solvers:
        click.echo("\n".join(f"{s.name:<26}{s.family:<13}{s.scheduler} {s.options or ''}" for s in specs))
        return
    if not specs:
        raise click.UsageError(f"no selected solver supports the {preset!r} preset")
    writable_folder(out_dir)  # before the benchmark, not after it
    began = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = bench_lib.run_bench(setup, specs, nfes, progress=not no_progress)
    finally:
        torch.set_num_threads(previous_threads)
    paths = bench_report.write_outputs(result, out_dir)
    click.echo(bench_report.format_table(result))
    for ref in result.references:
        cached = "cached" if ref["from_cache"] else f"{ref['num_evaluations']} evaluations"
        click.echo(f"reference from t={ref['start_timestep']:g}: {cached}, {ref['seconds']:.1f} s")
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - began:.1f} s")
