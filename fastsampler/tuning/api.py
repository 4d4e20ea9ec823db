"""``fastsampler.tune``: fit a scheduler to the user's model and step budget; returns a scheduler that runs it.

    tuned = fastsampler.tune(scheduler, model, noise, num_inference_steps, method="coefficients", **options)
    tuned.save_pretrained("my_scheduler")       # pipe.scheduler = UniPCScheduler.from_pretrained("my_scheduler")

``scheduler``: one of ours, configured for the model (``from_config(pipe.scheduler.config)``). ``model``: a callable
``model(x, t)`` returning the output in the scheduler's ``prediction_type`` (``fastsampler.models.denoisers`` has
adapters), or a diffusers pipeline (then ``prompt`` / ``negative_prompt`` / ``guidance_scale`` / ``class_labels``
choose its conditions). ``noise``: the fitting noises (B, …) — tuning is judged on other noises:
``validation_noise`` reports the losses there, and also chooses among the candidates the search produced (DC: the
fitted ratios or none; the learned grid's iterates; S³'s best candidates and the starting solver), which guards
against a candidate that fits only the fitting noises. ``num_inference_steps``: one step count or several; the tuned scheduler holds
a plan for each (``scheduler.plans``) and saves them in its folder.

Methods: ``"dc"`` (DC-Solver's compensation ratios, ``fastsampler.tuning.dc``), ``"timesteps"`` (learned
time points, ``fastsampler.tuning.timesteps``), ``"coefficients"`` (learned solver coefficients and time points,
S4S-Alt-style, ``fastsampler.tuning.coefficients``; validates on a held-out part of the fitting noises by default) and ``"s3"`` (a searched USF schedule and grid,
``fastsampler.tuning.s3``; the result is an ``S3Scheduler``). Every method compares against a
teacher trajectory (``fastsampler.tuning.teacher``) cached on disk under ``cache_dir``, and checkpoints under
``checkpoint_dir`` so a killed run resumes. Under ``torchrun`` (or with ``dist``) the teacher is computed sharded
across the processes, and ``method="s3"`` searches one shared study from every process (give a shared
``checkpoint_dir`` or ``storage``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fastsampler.runtime.distributed import DistContext, distributed_context
from fastsampler.tuning import DEFAULT_METHOD
from fastsampler.tuning.dc import DCSearch, dc_plan, final_loss as dc_final_loss, search_ratios
from fastsampler.tuning.holdout import Holdout
from fastsampler.models.denoisers import from_pipeline
from fastsampler.tuning.teacher import TeacherSpec, teacher_trajectories
from fastsampler.tuning.validation import Validation
from fastsampler.adapters.scheduler import UntunedStepsWarning
from fastsampler.runtime.cache import default_cache_dir  # noqa: F401  (tune's cache; a public name here)
from fastsampler.warn import warn



def is_pipeline(model: Any) -> bool:
    """A diffusers pipeline (its components registered), as opposed to a ``model(x, t)`` callable — our own
    adapters (``UNetDenoiser`` …) also hold a ``unet`` but carry their conditions, which must not be rebuilt."""
    from diffusers import DiffusionPipeline

    return isinstance(model, DiffusionPipeline)


def _model(model: Any, batch: int, prompt, negative_prompt, guidance_scale, class_labels) -> Callable:
    if is_pipeline(model):
        return from_pipeline(model, batch, prompt=prompt, negative_prompt=negative_prompt,
                             guidance_scale=guidance_scale, class_labels=class_labels)
    if prompt is not None or class_labels is not None:
        raise ValueError("`prompt` / `class_labels` apply to pipelines; a model callable carries its own conditions")
    return model


def _frozen(model: Callable) -> Callable:
    """Model parameters never need gradients while tuning (only the sampler's parameters do)."""
    for attr in ("unet", "transformer"):
        module = getattr(model, attr, None)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return model


def _teacher_spec(teacher: TeacherSpec | dict | str | None) -> TeacherSpec:
    if teacher is None:
        return TeacherSpec()
    if isinstance(teacher, TeacherSpec):
        return teacher
    if isinstance(teacher, dict):
        return TeacherSpec(**teacher)
    solver, _, steps = str(teacher).partition(":")
    return TeacherSpec(solver, int(steps) if steps else 200)


def validation_loss(scheduler, model: Callable, noise: torch.Tensor, teacher: TeacherSpec,
                    cache_dir: Path | None, progress: bool) -> float:
    """Mean squared error of the scheduler's samples against the teacher's final states, on ``noise``."""
    from fastsampler.tuning.runner import run

    reference = teacher_trajectories(scheduler, model, noise, teacher, cache_dir, progress=progress)[-1]
    with torch.no_grad():
        final, _ = run(scheduler.plan, model, noise)
    return float((final.double() - reference.double()).pow(2).mean())


TEACHER_LIMIT = 3.0  # a student within this factor of its teacher's own error is limited by the teacher
TEACHER_CHECK_SAMPLES = 16


def teacher_error(student, model: Callable, noise: torch.Tensor, reference: torch.Tensor, spec: TeacherSpec,
                  cache_dir: Path | None, ctx: DistContext, progress: bool) -> float:
    """The teacher's own error: mean squared difference of its final samples from a teacher with twice the steps,
    on the first ``TEACHER_CHECK_SAMPLES`` noises (the whole batch for a model that cannot be sliced)."""
    from fastsampler.models.denoisers import subset
    from fastsampler.tuning.teacher import shardable

    k = min(TEACHER_CHECK_SAMPLES, noise.shape[0]) if shardable(model) else noise.shape[0]
    finer = TeacherSpec(spec.solver, 2 * spec.steps)
    fine = teacher_trajectories(student, subset(model, 0, k), noise[:k], finer, cache_dir, ctx=ctx,
                                progress=progress)[-1]
    return float((reference[-1][:k].double() - fine.double()).pow(2).mean())


def _student_error(plan, model: Callable, noise: torch.Tensor, reference: torch.Tensor) -> float:
    from fastsampler.tuning.runner import run

    with torch.no_grad():
        final, _ = run(plan, model, noise)
    return float((final.double() - reference[-1].double()).pow(2).mean())


def _tune_dc(student, fit_model, noise, reference, n, options: dict, checkpoint_dir, progress, holdout, ctx):
    search = DCSearch(method=options.get("search", "gradient"), iters=options.get("iters", 20),
                      lr=options.get("lr", 0.1), weight_decay=options.get("weight_decay", 0.0),
                      bounds=tuple(options.get("bounds", (0.3, 1.7))), order=options.get("dc_order", 2),
                      objective=options.get("objective", "next"))
    checkpoint = Path(checkpoint_dir) / f"dc_{n}.json" if checkpoint_dir is not None else None
    validation = Validation(holdout, noise.shape[0], options.get("validation_fraction", 0.25))
    rows = validation.fit if holdout is None else None
    result = search_ratios(student, fit_model, noise, reference, search, checkpoint, progress, rows)
    plan, entry = dc_plan(student, result.ratios, search.order), asdict(result)
    entry["validation"] = validation.describe
    if holdout is None and any(r != 1.0 for r in result.ratios):  # the batch's held rows choose: ratios or none
        entry["validation_base"], calls = dc_final_loss(student, [1.0] * n, search.order, fit_model, noise, reference,
                                                         validation.held)
        entry["validation_tuned"], more = dc_final_loss(student, result.ratios, search.order, fit_model, noise,
                                                         reference, validation.held)
        entry["kept_plain"] = not entry["validation_tuned"] < entry["validation_base"]
        entry["model_evaluations"] += calls + more
        if entry["kept_plain"]:
            plan, entry["ratios"] = student.plan, [1.0] * n
    if holdout is not None:  # the ratios must carry over to noises they were not fitted on, else none are kept
        entry["holdout_plain"], entry["holdout_tuned"] = holdout.loss(student.plan), holdout.loss(plan)
        entry["kept_plain"] = entry["holdout_tuned"] >= entry["holdout_plain"]
        if entry["kept_plain"]:
            plan, entry["ratios"] = student.plan, [1.0] * n
        entry["model_evaluations"] += holdout.evaluations
    return plan, entry, asdict(search)


def _tune_timesteps(student, fit_model, noise, reference, n, options: dict, checkpoint_dir, progress, holdout, ctx):
    from fastsampler.tuning.timesteps import TimestepSearch, learn_timesteps

    search_kind = options.get("search", "adam")
    if search_kind not in TIMESTEP_SEARCHES:
        raise ValueError(f"method='timesteps': `search` must be one of {TIMESTEP_SEARCHES}, got {search_kind!r}")
    if search_kind == "nelder-mead":
        return _tune_timesteps_nelder_mead(student, fit_model, noise, reference, n, options, checkpoint_dir, progress,
                                           holdout)
    wrong = set(options) & set(NELDER_MEAD_OPTIONS) - {"search", "validation_fraction"}
    if wrong:
        raise ValueError(f"{sorted(wrong)} apply to method='timesteps' with search='nelder-mead'")

    search = TimestepSearch(**{k: options[k] for k in ("iters", "lr", "fd_step", "patience", "validation_fraction")
                               if k in options})
    checkpoint = Path(checkpoint_dir) / f"timesteps_{n}.json" if checkpoint_dir is not None else None
    plan, result = learn_timesteps(student, fit_model, noise, reference[-1], search, checkpoint, progress, holdout)
    return plan, asdict(result), asdict(search)


TIMESTEP_SEARCHES = ("adam", "nelder-mead")
NELDER_MEAD_OPTIONS = ("search", "max_evaluations", "validation_fraction", "initial_step")


def _tune_timesteps_nelder_mead(student, fit_model, noise, reference, n, options: dict, checkpoint_dir, progress,
                                holdout):
    from fastsampler.tuning.nelder_mead import NelderMeadSearch, fit_timesteps_nelder_mead

    wrong = set(options) - set(NELDER_MEAD_OPTIONS)
    if wrong:
        raise ValueError(f"{sorted(wrong)} do not apply to search='nelder-mead' (it takes {NELDER_MEAD_OPTIONS[1:]})")
    search = NelderMeadSearch(**{k: options[k] for k in NELDER_MEAD_OPTIONS[1:] if k in options})
    checkpoint = Path(checkpoint_dir) / f"nelder_mead_{n}.json" if checkpoint_dir is not None else None
    plan, result = fit_timesteps_nelder_mead(student, fit_model, noise, reference[-1], search, checkpoint, progress,
                                             holdout)
    return plan, asdict(result), asdict(search)


def _tune_coefficients(student, fit_model, noise, reference, n, options: dict, checkpoint_dir, progress, holdout,
                       ctx):
    from fastsampler.tuning.coefficients import CoefficientSearch, learn_coefficients

    search = CoefficientSearch(**{k: options[k] for k in COEFFICIENT_OPTIONS if k in options})
    checkpoint = Path(checkpoint_dir) / f"coefficients_{n}.pt" if checkpoint_dir is not None else None
    plan, result = learn_coefficients(student, fit_model, noise, reference[-1], search, checkpoint, progress, holdout,
                                      ctx=ctx)
    return plan, asdict(result), asdict(search)


COEFFICIENT_OPTIONS = ("iters", "lr", "lr_time", "learn_timesteps", "learn_start", "learn_eval_times", "loss", "slack",
                       "patience", "lr_decays", "validation_fraction", "consistency", "init", "init_evaluations", "fd_step",
                       "support", "history", "probe", "lr_warmup")


def _tune_s3(student, fit_model, noise, reference, n, options: dict, checkpoint_dir, progress, holdout, ctx):
    from fastsampler.tuning.s3 import S3Search, search_schedule

    fields = {k: options[k] for k in ("budget_evaluations", "budget_seconds", "warmup", "round_size", "keep",
                                      "max_order", "search_grid", "seed", "validate_top", "validation_fraction", "seed_timesteps",
                                      "refine_top") if k in options}
    if "grid_power_range" in options:
        fields["grid_power_range"] = tuple(options["grid_power_range"])
    search = S3Search(**fields)
    storage = options.get("storage")
    if storage is None and checkpoint_dir is not None:
        storage = Path(checkpoint_dir) / "s3_study.log"
    plan, result = search_schedule(student, fit_model, noise, reference[-1], search, storage,
                                   options.get("scorer"), None, progress, holdout, ctx.barrier)
    return plan, asdict(result), asdict(search)


_METHODS = {"dc": (_tune_dc, {"search", "iters", "lr", "weight_decay", "bounds", "dc_order", "objective",
                              "validation_fraction"}),
            "timesteps": (_tune_timesteps, {"iters", "lr", "fd_step", "patience", *NELDER_MEAD_OPTIONS}),
            "coefficients": (_tune_coefficients, set(COEFFICIENT_OPTIONS)),
            "s3": (_tune_s3, {"budget_evaluations", "budget_seconds", "warmup", "round_size", "keep", "max_order",
                              "search_grid", "grid_power_range", "seed", "storage", "scorer", "validate_top",
                              "validation_fraction", "seed_timesteps", "refine_top"})}


def _result_class(scheduler, method: str) -> type:
    """The class of the tuned scheduler: the input's, except that a searched USF schedule is an S3Scheduler."""
    if method == "s3":
        from fastsampler.adapters.s3 import S3Scheduler

        return S3Scheduler
    return type(scheduler)


def tune(scheduler, model, noise: torch.Tensor, num_inference_steps: int | Sequence[int],
         method: str | None = None, *,
         prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
         guidance_scale: float | None = None, class_labels: Sequence[int] | torch.Tensor | None = None,
         teacher: TeacherSpec | dict | str | None = None, validation_noise: torch.Tensor | None = None,
         validation_model: Callable | None = None,
         cache_dir: str | Path | None = "default", checkpoint_dir: str | Path | None = None,
         progress: bool = True, dist: DistContext | None = None, teacher_check: bool = True, **options: Any):
    """Fit ``scheduler`` to ``model`` at each ``num_inference_steps``; returns a new scheduler of the same class.

    ``method`` None: ``fastsampler.tuning.DEFAULT_METHOD`` (``"coefficients"``, the best of
    ``benchmarks/tune_bench.py``).     ``method="dc"`` options: ``search`` ("gradient" | "scan"), ``iters``, ``lr``, ``weight_decay``, ``bounds``,
    ``dc_order``, ``objective`` ("next" | "final") (``fastsampler.tuning.dc.DCSearch``), ``validation_fraction``
    (without ``validation_noise``, the ratios are fitted on the rest of the batch and kept only if better on it). ``method="timesteps"``: ``iters``, ``lr``, ``fd_step``
    (``fastsampler.tuning.timesteps.TimestepSearch``); with ``search="nelder-mead"`` the baseline every method must
    beat, a derivative-free fit of the same time points: ``max_evaluations``, ``validation_fraction``,
    ``initial_step`` (``fastsampler.tuning.nelder_mead.NelderMeadSearch``). ``method="coefficients"``: ``iters``, ``lr``, ``lr_time``,
    ``learn_timesteps``, ``learn_start`` (the first node too: a truncated start), ``learn_eval_times`` (free rows call
    the model at a learned offset from each node's time), ``loss`` ("final" | "distance" | "relaxed"),
    ``slack``, ``patience``, ``lr_decays``, ``validation_fraction``,
    ``consistency`` ("auto" | "full" | "none" | "data"), ``init`` ("base" | "nelder-mead"), ``init_evaluations``, ``fd_step``,
    ``support`` ("history" | "base"), ``history`` (slots; None: every earlier prediction, up to 8), ``lr_warmup``
    (iterations of linear step-size ramp), ``probe``
    (``consistency="auto"``: the iterations each of its two fits gets before the better one trains on)
    (``fastsampler.tuning.coefficients.CoefficientSearch``). ``method="s3"``: ``budget_evaluations``, ``budget_seconds``,
    ``warmup``, ``round_size``, ``keep``, ``max_order``, ``search_grid``, ``grid_power_range``, ``seed``,
    ``validate_top``, ``validation_fraction``, ``seed_timesteps``, ``refine_top``, ``storage``, ``scorer``
    (``fastsampler.tuning.s3.S3Search``; the search contains ``method="timesteps"``: its learned grid is a grid
    choice and a candidate, and the best candidates' time points are refined by gradient; a ``scorer`` of the final
    samples, lower is better, replaces the teacher error in the search and in the held-out selection). The returned scheduler's ``tuning_report`` holds, per step
    count, what was fitted and the losses on the fitting noises before and after, and — with
    ``validation_noise`` — on held-out noises. With ``teacher_check`` (default) it also holds the teacher's own error
    (``teacher_error``: against a teacher with twice the steps, on up to 16 of the fitting noises) next to the tuned
    sampler's (``student_error``), and warns when the student is within 3× of it: the teacher is then the limit. A model callable that carries per-sample conditions for the fitting
    batch needs ``validation_model``, the same model conditioned for the held-out batch (a pipeline is adapted to
    either batch by itself).
    """
    method = DEFAULT_METHOD if method is None else method
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {tuple(_METHODS)}, got {method!r}")
    fit, allowed = _METHODS[method]
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown options for method={method!r}: {sorted(unknown)}; allowed: {sorted(allowed)}")
    steps = [num_inference_steps] if isinstance(num_inference_steps, int) else list(num_inference_steps)
    if not steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in steps):
        raise ValueError(f"`num_inference_steps` must be a positive integer or a list of them, got {num_inference_steps!r}")
    if noise.ndim < 2 or noise.shape[0] < 1:
        raise ValueError(f"`noise` must be a batch (B, …) of fitting noises, got shape {tuple(noise.shape)}")
    spec = _teacher_spec(teacher)
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir is not None else None)
    fit_model = _frozen(_model(model, noise.shape[0], prompt, negative_prompt, guidance_scale, class_labels))
    held_out = None
    if validation_model is not None and validation_noise is None:
        raise ValueError("`validation_model` is the model for `validation_noise`: pass both")
    if validation_noise is not None:
        held_out = _frozen(validation_model if validation_model is not None else
                           _model(model, validation_noise.shape[0], prompt, negative_prompt, guidance_scale,
                                  class_labels))
    if not hasattr(fit_model, "cache_key") and cache is not None:
        cache = None  # no identity for the model: never reuse a cached teacher
    ctx = distributed_context() if dist is None else dist
    if ctx.world_size > 1 and cache is None:
        raise ValueError("several processes share teacher trajectories through `cache_dir`; pass one")
    student = copy.deepcopy(scheduler)
    student._warned = True  # a DCSolverScheduler without ratios is what the search starts from: no warning
    tuned = _result_class(scheduler, method).from_config(scheduler.config)
    report: dict[int, dict] = {}
    settings = None
    for n in steps:
        with warnings.catch_warnings():  # the step count is being tuned: its missing plan is what tune makes
            warnings.simplefilter("ignore", UntunedStepsWarning)
            student.set_timesteps(n, device=noise.device)
        reference = teacher_trajectories(student, fit_model, noise, spec, cache, ctx=ctx, progress=progress)
        holdout = None
        if held_out is not None:  # the held-out noises also choose among the candidates
            target = teacher_trajectories(student, held_out, validation_noise, spec, cache, ctx=ctx,
                                          progress=progress)[-1]
            holdout = Holdout(held_out, validation_noise, target, scorer=options.get("scorer"))
        plan, entry, settings = fit(student, fit_model, noise, reference, n, options, checkpoint_dir, progress,
                                    holdout, ctx)
        ctx.barrier()
        if teacher_check:
            entry["teacher_error"] = teacher_error(student, fit_model, noise, reference, spec, cache, ctx, progress)
            entry["student_error"] = _student_error(plan, fit_model, noise, reference)
            if entry["student_error"] < TEACHER_LIMIT * entry["teacher_error"]:  # (stacklevel: tune's caller)
                warn(f"{n} steps: the tuned sampler's error against its teacher ({entry['student_error']:.3g}) "
                     f"is within {TEACHER_LIMIT:g}× of the teacher's own error ({entry['teacher_error']:.3g}, "
                     f"vs {2 * spec.steps} steps): the teacher limits it; pass e.g. "
                     f"teacher=\"{spec.solver}:{2 * spec.steps}\"", RuntimeWarning)
        tuned.set_plan(plan)
        if held_out is not None:
            entry["validation_loss_plain"] = validation_loss(student, held_out, validation_noise, spec, cache, progress)
            probe = type(scheduler).from_config(scheduler.config)
            probe.set_plan(plan)
            entry["validation_loss_tuned"] = validation_loss(probe, held_out, validation_noise, spec, cache, progress)
        report[n] = entry
    tuned.tuning_report = {"method": method, "teacher": asdict(spec), "search": settings, "steps": report}
    tuned.set_timesteps(steps[0])
    return tuned
