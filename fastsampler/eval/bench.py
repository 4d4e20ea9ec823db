"""ODE error against the exact solution, per solver and NFE, on an exact Gaussian-mixture model.

The model is ``MixtureModel`` over the digits mixture (``gmm.digits_mixture``): its outputs are exact, so a
solver's error is its discretisation error alone. Every solver starts from the same noise at its first
timestep (timestep_spacing "trailing": t = T − 1 for every VP scheduler) and is driven by a plain diffusers
loop::

    x = noise · init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample

(flow-matching schedulers without ``init_noise_sigma`` / ``scale_model_input`` are driven as SD3 pipelines
drive them). Error = RMSE of the final x against the reference ODE solution (``reference.reference_solution``)
from the same noise at the same model noise level; NFE = the number of model calls actually made (Heun: 2N − 1
calls for N steps, so an even target NFE gets one call less, and the actual count is reported). The table, CSV,
JSON and plot it writes: ``bench_report``.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fastsampler import progress as progress_bars
from fastsampler.eval import gmm, metrics
from fastsampler.eval.spec import parse_scheduler
from fastsampler.eval.reference import ReferenceSolution, Tolerance, reference_solution

DEFAULT_NFES = (4, 5, 6, 8, 10, 15, 20)
FAMILIES = ("fastsampler", "diffusers")
#: The reference must be reproducible (tolerance check) to 1e-3 of this RMSE; the table never resolves less.
REFERENCE_ERROR_SCALE = 1e-4
REFERENCE_TOLERANCE = Tolerance(rtol=1e-7, atol=1e-9)

# Presets: the scheduler config of the (imaginary) model ------------------------------------------------------

_VP = dict(num_train_timesteps=1000, timestep_spacing="trailing", prediction_type="epsilon")
PRESETS: dict[str, dict[str, Any]] = {
    "sd": {**_VP, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "ddpm": {**_VP, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cosine": {**_VP, "beta_schedule": "squaredcos_cap_v2"},
    # FlowMatch* schedulers read `shift`; the multistep ones `use_flow_sigmas` / `flow_shift`.
    "flow": dict(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=3.0, shift=3.0,
                 prediction_type="flow_prediction", timestep_spacing="trailing"),
}


def is_flow(config: dict[str, Any]) -> bool:
    return bool(config.get("use_flow_sigmas"))


def preset_config(preset: str, prediction_type: str | None = None) -> dict[str, Any]:
    """The preset's scheduler config, with ``prediction_type`` overridden if given."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    config = dict(PRESETS[preset])
    if prediction_type is not None:
        if is_flow(config) and prediction_type != "flow_prediction":
            raise ValueError("the flow preset's model predicts velocity: use prediction_type 'flow_prediction'")
        if not is_flow(config) and prediction_type == "flow_prediction":
            raise ValueError("flow_prediction needs the flow preset")
        config["prediction_type"] = prediction_type
    return config


# Solvers ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SolverSpec:
    """One benchmarked scheduler: a class, its options, and how many steps a target NFE buys."""

    name: str
    family: str
    scheduler: str  # class name, in fastsampler or diffusers
    options: dict[str, Any] = field(default_factory=dict)
    flow: bool | None = None  # None: every preset; True: only flow matching; False: only VP
    calls_per_step: int = 1  # Heun-type: 2 calls per step, minus one (the last step is Euler)

    def supports(self, config: dict[str, Any]) -> bool:
        return self.flow is None or self.flow == is_flow(config)

    def steps_for(self, nfe: int) -> int:
        """Steps N whose model calls (N, or 2N − 1 for Heun) come closest to ``nfe`` without exceeding it."""
        return max(1, (nfe + self.calls_per_step - 1) // self.calls_per_step)

    def build(self, config: dict[str, Any]):
        import diffusers

        from fastsampler.adapters.registry import scheduler_class

        if self.scheduler.startswith("folder:"):  # a saved (e.g. tuned) scheduler folder
            folder = self.scheduler.removeprefix("folder:")
            cls_name = json.loads((Path(folder) / "scheduler_config.json").read_text())["_class_name"]
            cls = scheduler_class(cls_name) or getattr(diffusers, cls_name)
            if self.options:
                raise ValueError("options cannot be combined with a scheduler folder")
            return cls.from_pretrained(folder)
        if "." in self.scheduler:  # a dotted path from --scheduler
            module_name, _, cls_name = self.scheduler.rpartition(".")
            cls = getattr(importlib.import_module(module_name), cls_name)
        else:
            cls = scheduler_class(self.scheduler) if self.family == "fastsampler" else getattr(diffusers, self.scheduler)
        return cls.from_config(config, **self.options)


def custom_spec(text: str) -> SolverSpec:
    """A solver from the command line: ``NAME[:key=value,…]`` (``fastsampler.eval.spec``), e.g.
    ``UniPCScheduler:momentum=hb,momentum_beta=0.8``; ours when fastsampler has the class, else diffusers'; or the
    path of a saved scheduler folder (a tuned scheduler: its plans run at the NFEs it has them for)."""
    import diffusers

    from fastsampler.adapters.registry import scheduler_class

    if Path(text).is_dir():  # a saved scheduler folder (its plans run where it has one for the NFE)
        return SolverSpec(f"folder/{Path(text).name}", "fastsampler", f"folder:{text}")
    name, options = parse_scheduler(text)
    short = name.removeprefix("fastsampler.")
    if scheduler_class(short) is not None and "." not in short:
        family, cls_name = "fastsampler", short
    elif hasattr(diffusers, name):
        family, cls_name = "diffusers", name
    elif "." in name:
        family, cls_name = ("fastsampler" if name.startswith("fastsampler.") else "custom"), name
    else:
        raise ValueError(f"unknown scheduler {name!r}: not in fastsampler or diffusers, and not a dotted path")
    label = ("fs" if family == "fastsampler" else family) + "/" + short.rsplit(".", 1)[-1] + (
        ":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
    return SolverSpec(label, family, cls_name, options)


def _fastsampler_specs() -> list[SolverSpec]:
    dpm, unipc, deis = "DPMSolverPlusPlusScheduler", "UniPCScheduler", "DEISScheduler"
    specs = [SolverSpec(f"fs/dpmpp-{k}m", "fastsampler", dpm, {"solver_order": k}) for k in (2, 3)]
    specs += [SolverSpec(f"fs/dpmpp-{k}s", "fastsampler", dpm, {"solver_order": k, "solver_method": "singlestep"})
              for k in (2, 3)]
    specs += [SolverSpec(f"fs/unipc-{v}-{k}", "fastsampler", unipc, {"solver_type": v, "solver_order": k})
              for v in ("bh1", "bh2") for k in (2, 3)]
    specs += [SolverSpec(f"fs/deis-{v}-{k}", "fastsampler", deis, {"solver_type": v, "solver_order": k})
              for v, k in (("logrho", 2), ("logrho", 3), ("tab", 3), ("rhoab", 3))]
    # Options diffusers lacks: the exact 3M weight, DDIM's time-quadratic grid, and stopping at σ_min
    # (diffusers' DEIS always does) instead of a first-order jump to σ = 0.
    specs.append(SolverSpec("fs/dpmpp-3m-exact", "fastsampler", dpm, {"solver_order": 3, "exact_third_order": True}))
    for suffix, grid in (("tq", {"timestep_spacing": "time_quadratic"}), ("smin", {"final_sigmas_type": "sigma_min"}),
                         ("tq-smin", {"timestep_spacing": "time_quadratic", "final_sigmas_type": "sigma_min"})):
        specs.append(SolverSpec(f"fs/unipc-bh2-3-{suffix}", "fastsampler", unipc, {"solver_order": 3, **grid}))
    return specs


def _diffusers_specs() -> list[SolverSpec]:
    specs = [
        SolverSpec("diffusers/ddim", "diffusers", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True},
                   flow=False),
        SolverSpec("diffusers/euler", "diffusers", "EulerDiscreteScheduler", flow=False),
        SolverSpec("diffusers/heun", "diffusers", "HeunDiscreteScheduler", flow=False, calls_per_step=2),
        SolverSpec("diffusers/flow-euler", "diffusers", "FlowMatchEulerDiscreteScheduler", flow=True),
        SolverSpec("diffusers/flow-heun", "diffusers", "FlowMatchHeunDiscreteScheduler", flow=True, calls_per_step=2),
    ]
    specs += [SolverSpec(f"diffusers/dpmpp-{k}m", "diffusers", "DPMSolverMultistepScheduler", {"solver_order": k})
              for k in (2, 3)]
    specs += [SolverSpec(f"diffusers/dpmpp-{k}s", "diffusers", "DPMSolverSinglestepScheduler", {"solver_order": k})
              for k in (2, 3)]
    specs += [SolverSpec(f"diffusers/unipc-{v}-{k}", "diffusers", "UniPCMultistepScheduler",
                         {"solver_type": v, "solver_order": k}) for v in ("bh1", "bh2") for k in (2, 3)]
    specs += [SolverSpec(f"diffusers/deis-{k}", "diffusers", "DEISMultistepScheduler", {"solver_order": k})
              for k in (2, 3)]
    return specs


SOLVERS: tuple[SolverSpec, ...] = tuple(_fastsampler_specs() + _diffusers_specs())


def select_solvers(patterns: str | Sequence[str], config: dict[str, Any]) -> list[SolverSpec]:
    """The solvers matching any comma-separated name or glob, that support the preset, in registry order."""
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatch(s.name, p) for s in SOLVERS)]
    if unmatched:
        raise ValueError(f"no solver matches {unmatched}; known: {', '.join(s.name for s in SOLVERS)}")
    return [s for s in SOLVERS if s.supports(config) and any(fnmatch.fnmatch(s.name, p) for p in patterns)]


# One run -------------------------------------------------------------------------------------------------

def sample(scheduler, model: Callable, noise: torch.Tensor) -> torch.Tensor:
    """The plain diffusers sampling loop after ``set_timesteps`` (no guidance logic: the model is guided)."""
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for t in scheduler.timesteps:
        x = scheduler.step(model(scale_input(x, t), t), t, x).prev_sample
    return x


@dataclass
class RunResult:
    solver: str
    family: str
    nfe: int  # target
    nfe_actual: int  # model calls made
    steps: int
    rmse: float
    component_mismatch: float
    overshoot: float
    seconds: float
    start_timestep: float
    error: str | None = None


@dataclass
class BenchSetup:
    """Everything a bench run depends on except the solver list."""

    preset: str = "sd"
    prediction_type: str | None = None
    guidance_scale: float | None = None
    batch_size: int = 256
    seed: int = 0
    tau: float = gmm.DIGITS_TAU

    @property
    def config(self) -> dict[str, Any]:
        return preset_config(self.preset, self.prediction_type)

    def classes(self) -> torch.Tensor | None:
        """Guided runs condition sample i on digit i mod 10."""
        return None if self.guidance_scale is None else torch.arange(self.batch_size) % 10

    def denoiser(self) -> gmm.MixtureDenoiser:
        return gmm.MixtureDenoiser(gmm.digits_mixture(self.tau), self.classes(), self.guidance_scale)

    def noise(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.batch_size, 1, 8, 8, generator=generator)


class References:
    """Reference solutions per start timestep (every VP solver starts at T − 1; flow grids differ)."""

    def __init__(self, denoiser: gmm.MixtureDenoiser, model: gmm.MixtureModel, noise: torch.Tensor):
        self.denoiser, self.model, self.noise = denoiser, model, noise
        self.solutions: dict[float, ReferenceSolution] = {}
        self.seconds: dict[float, float] = {}

    def at(self, start_timestep: float) -> ReferenceSolution:
        if start_timestep not in self.solutions:
            began = time.perf_counter()
            alpha, sigma = self.model.alpha_sigma(start_timestep)
            self.solutions[start_timestep] = reference_solution(
                self.denoiser, self.noise, float(alpha), float(sigma), REFERENCE_TOLERANCE,
                error_scale=REFERENCE_ERROR_SCALE)
            self.seconds[start_timestep] = time.perf_counter() - began
        return self.solutions[start_timestep]

    def summary(self) -> list[dict[str, Any]]:
        mixture = self.denoiser.mixture
        return [{"start_timestep": t, "from_cache": r.from_cache, "seconds": self.seconds[t], "key": r.key,
                 "tolerance": asdict(r.tolerance), "tolerance_check": r.tolerance_check,
                 "num_evaluations": r.num_evaluations, "overshoot": metrics.overshoot(r.x0),
                 "components_hit": int(metrics.component_of(mixture, r.x0).unique().numel())}
                for t, r in self.solutions.items()]


def run_one(spec: SolverSpec, nfe: int, config: dict[str, Any], model: gmm.MixtureModel, noise: torch.Tensor,
            references: References) -> RunResult:
    """One solver at one NFE; a failure is recorded (error text, NaN metrics), not raised."""
    steps = spec.steps_for(nfe)
    model.num_calls = 0
    began = time.perf_counter()
    start, error = math.nan, None
    try:
        scheduler = spec.build(config)
        scheduler.set_timesteps(steps)
        start = float(scheduler.timesteps[0])
        x = sample(scheduler, model, noise)
    except Exception as exc:  # a solver that crashes is a result too
        x, error = None, f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - began
    nan = math.nan
    if x is None:
        return RunResult(spec.name, spec.family, nfe, model.num_calls, steps, nan, nan, nan, seconds, start, error)
    reference = references.at(start).x0
    mixture = model.denoiser.mixture
    return RunResult(spec.name, spec.family, nfe, model.num_calls, steps, metrics.rmse(x, reference),
                     metrics.component_mismatch(mixture, x, reference), metrics.overshoot(x), seconds, start, error)


@dataclass
class BenchResult:
    setup: BenchSetup
    nfes: list[int]
    runs: list[RunResult]
    references: list[dict[str, Any]]
    seconds: float

    def best(self, family: str, nfe: int) -> RunResult | None:
        """The lowest finite RMSE of a family at a target NFE."""
        candidates = [r for r in self.runs if r.family == family and r.nfe == nfe and math.isfinite(r.rmse)]
        return min(candidates, key=lambda r: r.rmse, default=None)

    def solvers(self) -> list[str]:
        return list(dict.fromkeys(r.solver for r in self.runs))

    def to_json(self) -> dict[str, Any]:
        best = {str(n): {f: (b.solver, b.rmse) if (b := self.best(f, n)) else None for f in FAMILIES}
                for n in self.nfes}
        return {"setup": asdict(self.setup), "config": self.setup.config, "nfes": self.nfes,
                "runs": [asdict(r) for r in self.runs], "best": best, "references": self.references,
                "seconds": self.seconds, "torch": torch.__version__}


def run_bench(setup: BenchSetup, solvers: Sequence[SolverSpec], nfes: Sequence[int] = DEFAULT_NFES,
              progress: bool = True) -> BenchResult:
    """Every solver at every NFE, against the reference from the same noise."""

    began = time.perf_counter()
    config = setup.config
    denoiser = setup.denoiser()
    model = gmm.MixtureModel.from_scheduler_config(denoiser, config)
    noise = setup.noise()
    references = References(denoiser, model, noise)
    runs = []
    with _quiet_diffusers(), progress_bars.bar(total=len(solvers) * len(nfes), desc="bench",
                                                  enabled=progress) as bar:
        for spec in solvers:
            for nfe in nfes:
                bar.set_postfix_str(f"{spec.name} @ {nfe}")
                runs.append(run_one(spec, nfe, config, model, noise, references))
                bar.update()
    return BenchResult(setup, list(nfes), runs, references.summary(), time.perf_counter() - began)


class _quiet_diffusers:
    """Silence diffusers' config warnings (unused preset keys, lower_order_final notices) during a run."""

    def __enter__(self):
        from diffusers.utils import logging

        self._logging, self._level = logging, logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        self._logging.set_verbosity(self._level)


_REPORTS = ("CELL", "TABLE_LEGEND", "format_table", "write_csv", "plot", "write_outputs")


def __getattr__(name: str):
    """The report functions moved to ``bench_report`` (which imports this module, so they load on first use):
    ``bench.format_table`` and the rest keep working for scripts written before the move."""
    if name in _REPORTS:
        from fastsampler.eval import bench_report

        return getattr(bench_report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
