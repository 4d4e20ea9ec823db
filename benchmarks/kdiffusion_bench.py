"""The k-diffusion functions (``fastsampler.k_diffusion``) on sigma schedules: error vs NFE, identity with the
same solvers as diffusers schedulers, and Align Your Steps vs Karras vs our default grid.

Mixture (the exact digits Gaussian mixture on Stable Diffusion's schedule, 256 noises): every run starts from the
same state, x = noise·√(1 + σ_max²) at σ_max = 14.6146 (SD's t = 999; what a VP pipeline starts from), and ends at
σ = 0. Error: RMSE of the final sample against a 400-step DPM-Solver++(3M) solve on Karras sigmas (to σ = 1e-4,
then 0). Per NFE also the best diffusers built-in (its own configs, trailing spacing; ``tune_bench.BUILT_INS``) on
the same noises, and the largest difference between each function and the diffusers scheduler with the same
solver, stepped along the same Karras sigmas (``sample_diffusers``).

Digits DDPM (the embedded network as ``DiffusersDenoiser``, model time fractional): RMSE against a 200-step solve
on 256 noises, and FID against the digits **test** split of ``--fid-samples`` samples per seed (seeds 0, 1; the
spread is the two seeds), for UniPC (ComfyUI's ``uni_pc``: bh1, order 3) and DPM-Solver++(2M) on AYS (the SD1
table: the digits model's own range is 0.01–157, AYS's 0.029–14.6), Karras and the pipeline's trailing grid.

    python benchmarks/kdiffusion_bench.py [--nfe 4,5,6,8,10] [--fid-samples 1000] [--out benchmarks/results]
"""

from __future__ import annotations

import math

import click
import torch

import harness
import tune_bench

SD_SIGMA_MAX = 14.614646624923662  # SD's scaled-linear table at t = 999 (float32 betas, as diffusers)
SD_SIGMA_MIN = 0.02916753316555422
FUNCTIONS = {"euler": "sample_euler", "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_3m": "sample_dpmpp_3m",
             "unipc (bh1-3)": "sample_unipc", "unipc_bh2 (bh2-3)": "sample_unipc_bh2", "deis (3)": "sample_deis"}
# the diffusers scheduler each function is the same solver as (None: no diffusers counterpart)
COUNTERPARTS = {"dpmpp_2m": ("DPMSolverMultistepScheduler", dict(solver_order=2, lower_order_final=False,
                                                                 final_sigmas_type="zero")),
                "dpmpp_3m": ("DPMSolverMultistepScheduler", dict(solver_order=3, solver_type="heun",
                                                                 lower_order_final=False, final_sigmas_type="zero")),
                "unipc_bh2 (bh2-3)": ("UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2",
                                                                      final_sigmas_type="zero"))}


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(tune_bench.mse(a, b))


def mixture_schedules(n: int) -> dict[str, torch.Tensor]:
    import fastsampler
    import fastsampler.k_diffusion as K
    from fastsampler.eval import bench

    default = fastsampler.UniPCScheduler.from_config(bench.BenchSetup("sd", None, None, 1, 0).config)
    return {"karras": K.get_sigmas_karras(n, SD_SIGMA_MIN, SD_SIGMA_MAX, dtype=torch.float64),
            "ays (sd1)": K.get_sigmas_ays(n, "sd1", dtype=torch.float64),
            "exponential": K.get_sigmas_exponential(n, SD_SIGMA_MIN, SD_SIGMA_MAX, dtype=torch.float64),
            "trailing (our default)": K.get_sigmas_scheduler(default, n, dtype=torch.float64)}


def mixture_rows(nfes: list[int]) -> list[dict]:
    import diffusers

    import fastsampler.k_diffusion as K
    from fastsampler.eval import bench

    setup = bench.BenchSetup("sd", None, None, 256, 1)
    denoiser = setup.denoiser()

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoiser(x.reshape(x.shape[0], -1), 1.0, sigma.reshape(-1, 1).double()).reshape(x.shape)

    noise = setup.noise().double()
    x = noise * math.sqrt(1.0 + SD_SIGMA_MAX ** 2)
    reference = K.sample_dpmpp_3m(model, x, K.get_sigmas_karras(400, 1e-4, SD_SIGMA_MAX, dtype=torch.float64),
                                  disable=True)
    vp_model, vp_noise, config = tune_bench.case("mixture", 256, 1)
    assert torch.equal(vp_noise, noise)
    rows = []
    for n in nfes:
        built_in = {label: rmse(tune_bench.final_sample(getattr(diffusers, cls).from_config(config, **options),
                                                        vp_model, vp_noise, n), reference)
                    for label, (cls, options) in tune_bench.BUILT_INS.items()}
        best = min(built_in, key=built_in.get)
        errors, identity = {}, {}
        for schedule, sigmas in mixture_schedules(n).items():
            for label, function in FUNCTIONS.items():
                final = getattr(K, function)(model, x, sigmas, disable=True)
                errors[f"{label} · {schedule}"] = rmse(final, reference)
                if schedule == "karras" and label in COUNTERPARTS:
                    cls, options = COUNTERPARTS[label]
                    theirs = K.sample_diffusers(model, x, sigmas, disable=True, scheduler=getattr(diffusers, cls)(
                        prediction_type="sample", **config_of(config), **options))
                    identity[label] = float((final - theirs).abs().max())
        rows.append({"nfe": n, "best_built_in": best, "best_built_in_error": built_in[best], "errors": errors,
                     "max_abs_difference_to_diffusers": identity})
        print(f"mixture NFE {n}: best built-in {best} {built_in[best]:.4f}; "
              + ", ".join(f"{k} {v:.4f}" for k, v in errors.items() if "karras" in k), flush=True)
    return rows


def config_of(config: dict) -> dict:
    """The noise-schedule part of a scheduler config (the solver options come from each counterpart)."""
    return {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}


def digits_rows(nfes: list[int], fid_samples: int, seeds: list[int]) -> list[dict]:
    import fastsampler
    import fastsampler.k_diffusion as K
    from fastsampler.models.digits import load_digits_pipeline
    from fastsampler.eval.fid import fid_scorer

    pipe = load_digits_pipeline()
    pipe.unet.requires_grad_(False)
    model = K.DiffusersDenoiser(pipe.unet, pipe.scheduler.config)
    score = fid_scorer(pipe, "digits-test") if fid_samples > 0 else None

    def noise(batch: int, seed: int) -> torch.Tensor:
        return torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))

    trailing = fastsampler.UniPCScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    start = math.sqrt(1.0 + model.sigma_max ** 2)
    held = noise(256, 1) * start
    with torch.no_grad():
        reference = K.sample_dpmpp_3m(model, held, K.get_sigmas_scheduler(trailing, 200, dtype=torch.float32),
                                      disable=True)
    rows = []
    for n in nfes:
        schedules = {"ays (sd1)": K.get_sigmas_ays(n, "sd1"),
                     "karras": K.get_sigmas_karras(n, model.sigma_min, model.sigma_max),
                     "trailing (our default)": K.get_sigmas_scheduler(trailing, n)}
        for schedule, sigmas in schedules.items():
            for label in ("unipc (bh1-3)", "dpmpp_2m"):
                function = getattr(K, FUNCTIONS[label])
                scale = math.sqrt(1.0 + float(sigmas[0]) ** 2)
                with torch.no_grad():
                    error = rmse(function(model, held / start * scale, sigmas, disable=True), reference)
                    fid = [score(function(model, noise(fid_samples, tune_bench.FID_SEED_OFFSET + seed) * scale,
                                          sigmas, disable=True)) for seed in seeds] if score else []
                rows.append({"nfe": n, "schedule": schedule, "function": label, "error": error, "fid": fid})
                print(f"digits NFE {n} {label} · {schedule}: RMSE {error:.4f}, FID {fid}", flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["# k-diffusion functions: error vs NFE and sigma schedules", "",
             f"{result['date']}, {result['machine']}. Reproduce: `python benchmarks/kdiffusion_bench.py`.", "",
             "## Mixture (exact digits mixture, SD schedule, 256 noises; RMSE vs a 400-step solve)", ""]
    mixture = result["mixture"]
    if mixture:
        keys = list(mixture[0]["errors"])
        lines += ["| sampler · sigmas | " + " | ".join(f"NFE {r['nfe']}" for r in mixture) + " |",
                  "|---|" + "---|" * len(mixture)]
        lines += ["| best diffusers built-in | " + " | ".join(
            f"{r['best_built_in_error']:.4f} ({r['best_built_in']})" for r in mixture) + " |"]
        lines += [f"| {k} | " + " | ".join(f"{r['errors'][k]:.4f}" for r in mixture) + " |" for k in keys]
        lines += ["", "Largest |difference| to the diffusers scheduler with the same solver on the same Karras "
                      "sigmas: " + "; ".join(f"NFE {r['nfe']}: " + ", ".join(
                          f"{k} {v:.1e}" for k, v in r["max_abs_difference_to_diffusers"].items()) for r in mixture)
                  + ". (diffusers' DPM-Solver step casts the sample to float32, ours keeps the float64 of the run: "
                    "the DPM gaps are float32 rounding; its UniPC keeps the dtype.)"]
    digits = result["digits"]
    if digits:
        lines += ["", "## Digits DDPM (RMSE vs a 200-step solve on 256 noises; FID vs the digits test split, "
                      "seeds 0 / 1)", "", "| NFE | sampler | sigmas | RMSE | FID |", "|---|---|---|---|---|"]
        lines += [f"| {r['nfe']} | {r['function']} | {r['schedule']} | {r['error']:.4f} | "
                  + " / ".join(f"{v:.3f}" for v in r["fid"]) + " |" for r in digits]
    return "\n".join(lines) + "\n"


@harness.command(out=harness.RESULTS, threads=1)
@click.option("--nfe", default="4,5,6,8,10", show_default=True)
@click.option("--digits-nfe", default="5,10", show_default=True)
@click.option("--fid-samples", type=int, default=1000, show_default=True)
@click.option("--fid-seeds", default="0,1", show_default=True)
def main(args) -> None:
    result = {**harness.run_stamp(), "mixture": mixture_rows([int(v) for v in args.nfe.split(",") if v]),
              "digits": digits_rows([int(v) for v in args.digits_nfe.split(",") if v], args.fid_samples,
                                    [int(v) for v in args.fid_seeds.split(",") if v])}
    harness.write_results(args.out, "kdiffusion_bench", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
