"""Tuning methods side by side, judged on noises they never saw: error against the teacher per case and NFE.

Cases: ``mixture`` (the exact digits Gaussian mixture, SD schedule), ``mixture-cfg7.5`` (its class-conditional form
with exact classifier-free guidance at 7.5), ``digits`` (the embedded digits DDPM), ``digits-cond-w1.5`` /
``digits-cond-w4`` (the embedded class-conditional model, guided; labels 0–9 in turn); the networks' schedulers
use ``timestep_spacing="trailing"``. Every method starts from the same scheduler
(UniPC bh2 order 2, the pipeline's config), fits on ``--fit`` noises with its defaults (its own validation
included) and is scored on ``--eval`` other noises: the mean squared error of the final sample against the teacher
(DPM-Solver++ 3M, 200 steps) from the same noise. Reported per cell: its root (RMSE over all samples and pixels)
as a ratio to the best diffusers
built-in scheduler at the same NFE (DPM-Solver++ 2M/3M, UniPC bh1/bh2 order 2/3, DEIS 2/3, DDIM; best on the
evaluation noises themselves, which favours the built-ins) and to the Nelder–Mead baseline, and the tuning seconds
(teacher and teacher check included). For the network cases also the FID against the digits **test** split of
``--fid-samples`` samples per seed in ``--fid-seeds`` (digits-CNN features, ``fastsampler.eval.fid.fid_scorer``),
next to DDIM with 250 steps and the best built-in.

    python benchmarks/tune_bench.py [--cases mixture,mixture-cfg7.5,digits] [--nfe 4,5,6,8,10] \\
        [--methods baseline,timesteps,coefficients,dc,s3] [--fit 64] [--eval 256] [--fid-samples 1000] \\
        [--fid-seeds 0,1]

Results accumulate in ``benchmarks/results/tune_bench.json`` (a rerun skips the cells it has) and the table in
``tune_bench.md``, with the machine and the date.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable

import click
import torch

import harness

METHODS = {"baseline": ("timesteps", {"search": "nelder-mead"}), "timesteps": ("timesteps", {}),
           "coefficients": ("coefficients", {}), "dc": ("dc", {}), "s3": ("s3", {"budget_evaluations": 1500})}
BUILT_INS = {"DPM++ 2M": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
             "DPM++ 3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
             "UniPC bh2-2": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
             "UniPC bh1-3": ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1",
                                                         "final_sigmas_type": "sigma_min"}),
             "UniPC bh2-3": ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}),
             "DEIS 2": ("DEISMultistepScheduler", {"solver_order": 2}),
             "DEIS 3": ("DEISMultistepScheduler", {"solver_order": 3}),
             "DDIM": ("DDIMScheduler", {})}


def case(name: str, batch: int, seed: int) -> tuple[Callable, torch.Tensor, dict]:
    """(model(x, t) for ``batch`` noises, the noises, the scheduler config) of a case."""
    if name.startswith("mixture"):
        from fastsampler.eval import bench, gmm
        from fastsampler.models.denoisers import MixtureDenoiserModel

        guidance = float(name.partition("cfg")[2]) if "cfg" in name else None
        setup = bench.BenchSetup("sd", None, guidance, batch, seed)
        config = setup.config
        return MixtureDenoiserModel(gmm.MixtureModel.from_scheduler_config(setup.denoiser(), config)), \
            setup.noise().double(), config
    from fastsampler.models.digits import load_digits_cond_pipeline, load_digits_pipeline
    from fastsampler.models.denoisers import from_pipeline

    if name == "digits":
        pipe, options = load_digits_pipeline(), {}
    elif name.startswith("digits-cond-w"):
        pipe = load_digits_cond_pipeline()
        options = {"guidance_scale": float(name.rpartition("w")[2]), "class_labels": [j % 10 for j in range(batch)]}
    else:
        raise ValueError(f"unknown case {name!r}")
    size = pipe.unet.config.sample_size
    noise = torch.randn(batch, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    model = from_pipeline(pipe, batch, **options)
    model.unet.requires_grad_(False)
    # every sampler starts at t = 999 ("leading" spacing would start NFE 5 at t = 800 from pure noise), as in
    # benchmarks/fid_digits.py and the shipped tuned folders
    return model, noise, {**pipe.scheduler.config, "timestep_spacing": "trailing"}


def final_sample(scheduler, model: Callable, noise: torch.Tensor, n: int) -> torch.Tensor:
    """A diffusers-contract sampling loop (ours and diffusers' schedulers alike)."""
    scheduler.set_timesteps(n)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


def median_sample_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """The median over samples of each sample's mean squared error: insensitive to the rare sample that ends in
    another mode, which dominates the mean under strong guidance."""
    return float((a.double() - b.double()).pow(2).flatten(1).mean(1).median())


FID_SEED_OFFSET = 1000  # the FID noises' generator seeds: offset + seed (never the fitting or evaluation noises)
CEILING_STEPS = 250  # DDIM with this many steps: the FID the tuned samplers are held to


class FIDCheck:
    """FID against the digits **test** split (the digits CNN's features) of a sampler's samples from ``samples``
    fresh noises per seed, for the network cases."""

    def __init__(self, name: str, samples: int, seeds: list[int]):
        from fastsampler.models.digits import load_digits_cond_pipeline, load_digits_pipeline
        from fastsampler.eval.fid import fid_scorer

        pipe = load_digits_pipeline() if name == "digits" else load_digits_cond_pipeline()
        self.score = fid_scorer(pipe, "digits-test")
        self.runs = [case(name, samples, FID_SEED_OFFSET + seed)[:2] for seed in seeds]

    def __call__(self, scheduler, n: int) -> list[float]:
        return [self.score(final_sample(scheduler, model, noise, n)) for model, noise in self.runs]


def run_cell(name: str, n: int, methods: list[str], fit: int, evaluate: int, fid: FIDCheck | None = None,
             ceiling: list[float] | None = None, on_method: Callable[[dict], None] = lambda cell: None) -> dict:
    """One case at one NFE: the teacher, the built-ins, then each method (``on_method(cell)`` after each, so an
    interrupted run keeps the methods it finished). ``ceiling``: DDIM-250's FID of this case from an earlier cell
    (it does not depend on the NFE; recomputing it costs ~5 min a seed on the guided model)."""
    import diffusers

    import fastsampler
    from fastsampler.tuning.teacher import TeacherSpec, teacher_trajectories

    model, noise, config = case(name, fit, 0)
    held_model, held, _ = case(name, evaluate, 1)
    base = fastsampler.UniPCScheduler.from_config(config)
    base.set_timesteps(n)
    target = teacher_trajectories(base, held_model, held, TeacherSpec(), None, progress=False)[-1]
    built_in = {label: mse(final_sample(getattr(diffusers, cls).from_config(config, **opts), held_model, held, n),
                           target) for label, (cls, opts) in BUILT_INS.items()}
    cell = {"case": name, "nfe": n, "fit": fit, "eval": evaluate, "built_in": built_in,
            "best_built_in": min(built_in, key=built_in.get), "base": mse(final_sample(base, held_model, held, n),
                                                                           target), "methods": {}}
    if fid is not None:
        cls, opts = BUILT_INS[cell["best_built_in"]]
        cell["fid"] = {f"DDIM {CEILING_STEPS}": ceiling or fid(diffusers.DDIMScheduler.from_config(config),
                                                                CEILING_STEPS),
                       cell["best_built_in"]: fid(getattr(diffusers, cls).from_config(config, **opts), n)}
    for method in methods:
        kind, options = METHODS[method]
        began = time.perf_counter()
        tuned = fastsampler.tune(base, model, noise, n, kind, cache_dir=None, progress=False, **options)
        seconds = time.perf_counter() - began
        final = final_sample(tuned, held_model, held, n)
        cell["methods"][method] = {"error": mse(final, target), "median": median_sample_mse(final, target),
                                   "seconds": seconds}
        if fid is not None:
            cell["methods"][method]["fid"] = fid(tuned, n)
        print(f"{name} NFE {n} {method}: RMSE "
              f"{(cell['methods'][method]['error'] / built_in[cell['best_built_in']]) ** 0.5:.3f}× "
              f"best built-in ({seconds:.0f} s)", flush=True)
        on_method(cell)
    return cell


def markdown(results: list[dict], stamp: dict) -> str:
    methods = [m for m in METHODS if any(m in r["methods"] for r in results)]
    lines = [f"# Tuning methods on held-out noises ({stamp['date']}, {stamp['machine']})", "",
             "RMSE of the final samples against the teacher on noises never used for fitting, as a ratio to the "
             "best diffusers built-in at the same NFE (first number) and to the Nelder–Mead baseline (second); "
             "tuning seconds in brackets. `python benchmarks/tune_bench.py`.", "",
             "| case | NFE | best built-in | base (UniPC bh2-2) | " + " | ".join(methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    for r in sorted(results, key=lambda r: (r["case"], r["nfe"])):
        best = r["built_in"][r["best_built_in"]]
        baseline = r["methods"].get("baseline", {}).get("error")
        cells = []
        for m in methods:
            entry = r["methods"].get(m)
            if entry is None:
                cells.append("–")
                continue
            vs = f" / {(entry['error'] / baseline) ** 0.5:.2f}" if baseline else ""
            cells.append(f"{(entry['error'] / best) ** 0.5:.2f}{vs} ({entry['seconds']:.0f} s)")
        lines.append(f"| {r['case']} | {r['nfe']} | {r['best_built_in']} | {(r['base'] / best) ** 0.5:.2f} | "
                     + " | ".join(cells) + " |")
    complete = [r for r in results if all(m in r["methods"] for m in methods)]
    if complete:  # what chooses tune's default method
        means = {m: math.exp(sum(math.log(r["methods"][m]["error"] / r["built_in"][r["best_built_in"]])
                                 for r in complete) / (2 * len(complete))) for m in methods}
        lines += ["", f"Geometric mean of the RMSE ratios to the best built-in over the {len(complete)} cells every "
                  "method has: " + ", ".join(f"{m} {v:.3f}" for m, v in sorted(means.items(), key=lambda kv: kv[1]))
                  + "."]
    fid_rows = [r for r in sorted(results, key=lambda r: (r["case"], r["nfe"])) if "fid" in r]
    if fid_rows:
        lines += ["", f"FID against the digits **test** split (359 images; digits-CNN features) of samples from fresh "
                  f"noises, one value per seed (`--fid-samples` each); DDIM {CEILING_STEPS} steps is the ceiling "
                  "the tuned samplers are held to.", "",
                  f"| case | NFE | DDIM {CEILING_STEPS} | best built-in | " + " | ".join(methods) + " |",
                  "|---|---|---|---|" + "---|" * len(methods)]
        for r in fid_rows:
            ceiling, best = r["fid"][f"DDIM {CEILING_STEPS}"], r["fid"][r["best_built_in"]]
            values = [" / ".join(f"{v:.3f}" for v in r["methods"].get(m, {}).get("fid", [])) or "–" for m in methods]
            lines.append(f"| {r['case']} | {r['nfe']} | {' / '.join(f'{v:.3f}' for v in ceiling)} | "
                         f"{r['best_built_in']} {' / '.join(f'{v:.3f}' for v in best)} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


@harness.command(out=harness.RESULTS, threads=1)
@click.option("--cases", default="mixture,mixture-cfg7.5,digits", show_default=True)
@click.option("--nfe", default="4,5,6,8,10", show_default=True)
@click.option("--methods", default="baseline,timesteps,coefficients,dc,s3", show_default=True)
@click.option("--rerun", default="", show_default=True,
              help="methods to recompute in cells that have them (after a change)")
@click.option("--fit", type=int, default=64, show_default=True)
@click.option("--eval", type=int, default=256, show_default=True)
@click.option("--fid-samples", type=int, default=1000, show_default=True,
              help="per seed, for the network cases (0: none)")
@click.option("--fid-seeds", default="0,1", show_default=True)
def main(args) -> None:
    methods = [m for m in args.methods.split(",") if m]
    args.rerun = [m for m in args.rerun.split(",") if m]
    unknown = sorted(set(methods + args.rerun) - set(METHODS))
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; choose from {sorted(METHODS)}", param_hint="--methods")
    store = args.out / "tune_bench.json"
    results = json.loads(store.read_text())["results"] if store.is_file() else []
    stamp = harness.run_stamp()
    fid_seeds = [int(v) for v in args.fid_seeds.split(",") if v]
    for name in [c for c in args.cases.split(",") if c]:
        for n in [int(v) for v in args.nfe.split(",") if v]:
            old = next((r for r in results if r["case"] == name and r["nfe"] == n and r["fit"] == args.fit), None)
            todo = [m for m in methods if old is None or m not in old["methods"] or m in args.rerun]
            if not todo:
                continue
            fid = None
            if name.startswith("digits") and args.fid_samples > 0:
                fid = FIDCheck(name, args.fid_samples, fid_seeds)
                todo = [m for m in methods if old is None or "fid" not in old["methods"].get(m, {})
                        or m in args.rerun]  # FID for every method of the cell, or the table would mix runs
            ceiling = next((r["fid"][f"DDIM {CEILING_STEPS}"] for r in results if r["case"] == name and "fid" in r
                            and r.get("fid_samples", 1000) == args.fid_samples
                            and r.get("fid_seeds", [0, 1]) == fid_seeds), None)

            def save(cell: dict, old: dict | None = old) -> None:
                """Merge the finished methods into the store (each keeps its own date) and write it."""
                for method, entry in cell["methods"].items():
                    entry.setdefault("date", stamp["date"])
                merged = {**cell, **({"fid_samples": args.fid_samples, "fid_seeds": fid_seeds} if "fid" in cell else {}),
                          "methods": {**(old or {}).get("methods", {}), **cell["methods"]}}
                results[:] = [r for r in results if not (r["case"] == name and r["nfe"] == n and r["fit"] == args.fit)]
                results.append(merged)
                args.out.mkdir(parents=True, exist_ok=True)
                store.write_text(json.dumps({**stamp, "results": results}, indent=1) + "\n")

            run_cell(name, n, todo, args.fit, args.eval, fid, ceiling, save)
    (args.out / "tune_bench.md").write_text(markdown(results, stamp))
    print(markdown(results, stamp))
    return 0


if __name__ == "__main__":
    main()
