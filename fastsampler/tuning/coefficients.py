"""Learned solver coefficients and time points: S4S-Alt's idea on a plan (Frankel et al., ICML 2025, arXiv
2502.17423), with GS's "theory + correction" parametrisation (arXiv 2510.17699, Eq. 15–19).

Parameters, learned jointly by Adam against the teacher's final samples (a global loss):

* the N − 1 interior time points, in λ = log(α/σ), as in ``fastsampler.tuning.timesteps`` (softmax increments:
  ordered, ends kept), starting from the scheduler's grid (``init="base"``) or from the Nelder–Mead baseline's time
  points (``init="nelder-mead"``: the search then contains the baseline's result, at the baseline's cost — on the
  digits DDPM at NFE 5 it doubled the tuning time and did not lower the held-out error); ``learn_timesteps=False``
  holds the scheduler's grid; ``learn_start=True`` frees the first node too (a truncated start, at most half the
  λ range inward: the initial noise is taken as the sample there, as Align Your Steps' SD tables start at σ = 14.6
  whatever the model's σ_max; ``GridFamily``. Digits DDPM, held-out: NFE 5 0.74× → 0.72× the best built-in, FID
  0.912 / 1.189 → 0.804 / 1.063, DDIM 250's 0.851 / 1.059; NFE 8 0.73× → 0.90× in the mean but FID 0.837 / 1.014
  → 0.757 / 0.946; NFE 10: the start stays);
* a correction θ on the rows a run from step 0 uses (the stored prediction D̂, the next sample, the registers):
  row = base(λ) + s ⊙ Π θ, with s = |base(λ₀)| where the base row reads a source and 0.1 where it does not. The
  base row is the scheduler's own solver rebuilt on the current grid (linearised around it by central differences),
  so θ = 0 at the initial grid is the scheduler itself, bit for bit. ``support="history"`` (default) corrects every
  source the step can read — X, P, the registers written so far and every earlier prediction, on a history ring of
  ``history`` slots (default: all N, up to the fused kernel's 8; ``fastsampler.tuning.support``), as S4S and GS
  learn weights on the whole history; ``support="base"`` only the base row's non-zero entries;
* decoupled evaluation times (``learn_eval_times=True``; free rows only): the model is called at
  t'_i = t_i + b_i tanh(ξ_i), b_i = ½ · the smaller model-time gap to a neighbouring node (the first node's upper
  neighbour: the largest trained time), while the coefficients keep the grid's λ_i — LD3's evaluation grid
  (bounded by half the smallest gap), S4S's and GS's ξ. ξ = 0 is the grid's own times; the evaluation times stay
  ordered and trained, and are rounded (kept distinct) where the model needs integers. Not in the consistent fits
  ("full", "data"): an exact model called at a shifted time returns another output, which would break the
  consistency they keep. Off by default. Held-out RMSE as a ratio to the best built-in, on versus off
  (``benchmarks/tune_bench.py`` cells, 2026-12-07): digits DDPM NFE 5 0.66× vs 0.72× (FID 0.901 / 1.110 vs
  0.804 / 1.063: farther from DDIM 250's 0.851 / 1.059), NFE 10 0.75× vs 0.77× (FID 0.804 / 0.986 vs 0.836 /
  1.018); guided w 4 NFE 5 0.68× vs 0.75× (FID 0.692 / 0.674 vs 0.687 / 0.669), w 1.5 NFE 5 0.70× vs 0.69×; the
  exact mixtures' ten cells 1.13× vs 1.06× (geometric mean; a quarter of the gap instead of half: 1.01×, digits NFE 5
  0.73×, FID 0.872 / 1.156).

Consistency (zeroth order): Π projects each row's correction onto the corrections that change nothing on an exactly
consistent run — x_i = α_i x₀ + σ_i ε with the exact model output of a point mass at x₀, i.e. δ·S = 0 where S
holds each source's (x₀, ε) components on that run. ``consistency="full"`` (True) keeps both components: the tuned
plan maps a consistent state to the same state as its base (for our solvers x_{i+1} = α_{i+1} x₀ + σ_{i+1} ε
exactly); in data form this is a_i σ_i = σ_{i+1} and a_i α_i + Σ_j b_ij = α_{i+1}. ``"data"`` keeps the x₀
component only (a constant data prediction is carried exactly; the noise part's scale is free). ``"none"`` (False)
drops Π: the corrections stay anchored to the consistent base (θ = 0) and validation guards them. ``"auto"`` (the
default) races two fits for ``probe`` iterations — "full" and free rows from the scheduler's own plan — and trains
the better on validation to its end; when "full" wins, free rows continue it (its time points still learned;
iteration 0 is the "full" fit's best parameters), so the result contains the "full" fit (see ``_learn_auto``).
Measured on the embedded digits DDPM (64 fitting noises, 256 held-out, RMSE against the teacher
as a ratio to the best diffusers built-in): at NFE 5 "none" 0.74×, "full" 0.91×; at NFE 10 "none" 1.03× (worse
than the base: the free rows overfit), "full" 0.75×; free rows continuing "full" 0.83× / 0.73× (holding the
"full" grid instead: 0.87× / 0.74×). At NFE 5 also FID against the digits test split (seeds 0 /
1; base UniPC 1.169 / 1.508): "none" 0.910 / 1.187, "full" 0.960 / 1.304, "data" 1.103 / 1.526 — the free rows
do not shrink the samples (pixel std 0.6350 against the teacher's 0.6352). Blobs CFG 7.5, NFE 5: "none" 0.72×,
"data" 0.71×, "full" 1.08×.

Loss: the mean squared error of the final sample against the teacher (``loss="final"``); the mean of each sample's
RMS distance (``loss="distance"``: the distance d of S4S / LD3 / GS as L2, not its square, so that the few far
samples weigh less); or LD3's relaxed form (``loss="relaxed"``: per sample, only the RMS distance beyond ``slack``
counts; Tong et al., ICLR 2025). Validation uses the same per-sample loss. "distance" against "final", held-out
RMSE as a ratio to the best built-in (``benchmarks/tune_bench.py`` cells, 2026-12-07): on the networks it is lower
in four of six cells — digits DDPM NFE 5 0.572× vs 0.716×, NFE 6 0.612× vs 0.82×, NFE 10 0.747× vs 0.769×, guided
w 4 NFE 5 0.638× vs 0.749× — and higher at digits NFE 4 (0.602× vs 0.54×) and guided w 1.5 NFE 5 (0.719× vs
0.69×), with FID about equal (NFE 5: 0.841 / 1.127 vs 0.804 / 1.063; w 4: 0.713 / 0.672 vs 0.687 / 0.669); on the
exact mixtures, whose rare samples end in another mode, it is higher (geometric mean over their ten cells 1.27× vs
1.07×), so "final" stays the default.

Validation: without held-out noises (``holdout``) the last ``validation_fraction`` of the fitting batch is held out
*inside* the batch — the model still sees the whole batch, so per-sample conditions that follow the batch position
stay aligned — and its loss, from the same forward pass, selects the parameters. When it has not improved for
``patience`` iterations, training returns to the best parameters with half the step size (LD3's schedule); after
``lr_decays`` halvings (or ``iters`` iterations) it stops; the best-on-validation parameters are
returned, and never a plan worse than the base on validation (the base is iteration 0's candidate, and the final
plan — timesteps rounded for discrete-time models — is checked again). Checkpoints after every iteration; a rerun
resumes.

Modules: the parametrisation (u, θ, ξ → the plan; the differentiable run) is ``coefficient_plan``, the options and
the report ``coefficient_search``; this module is the fit.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fastsampler import progress as progress_bars
from fastsampler.plans.format import Plan
from fastsampler.tuning.coefficient_plan import (Parametrisation, consistent_sources, exact_output, projectors, sample,
                                                 used_rows, with_rows)
from fastsampler.tuning.coefficient_search import CoefficientReport, CoefficientSearch
from fastsampler.tuning.holdout import Holdout
from fastsampler.tuning.validation import Validation, per_sample_loss
from fastsampler.runtime.distributed import DistContext
from fastsampler.models.denoisers import search_key, subset, tensor_digest
from fastsampler.tuning.runner import run
from fastsampler.tuning.teacher import shardable

MIN_IMPROVEMENT = 1e-4  # relative: smaller validation gains do not reset the patience


# Training ---------------------------------------------------------------------------------------------------
class BatchShard:
    """This process's rows of the fitting batch: all of them, or under ``torchrun`` a contiguous slice (the model
    sliced by its ``subset``), with the losses summed over every process and the gradients all-reduced, so each
    process takes the same step as one process on the whole batch."""

    def __init__(self, ctx: DistContext, model: Callable, noise: torch.Tensor, target: torch.Tensor,
                 validation: Validation):
        batch = noise.shape[0]
        self.ctx = ctx
        if ctx.world_size > 1 and not shardable(model):
            raise ValueError("splitting the fitting noises across processes needs a model with `subset(start, stop)` "
                             "(or `per_sample_conditions = False`)")
        a, b = (int(v) for v in np.linspace(0, batch, ctx.world_size + 1).round()[ctx.rank:ctx.rank + 2])
        self.model = subset(model, a, b) if ctx.world_size > 1 else model
        self.noise, self.target = noise[a:b], target[a:b]
        self.fit = validation.fit[(validation.fit >= a) & (validation.fit < b)] - a
        self.held = validation.held[(validation.held >= a) & (validation.held < b)] - a
        self.n_fit, self.n_held = len(validation.fit), len(validation.held)

    def total(self, value: torch.Tensor) -> float:
        """The sum of a detached scalar over the processes."""
        value = value.detach().to(torch.float64).clone()
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(value)
        return float(value)  # ok-sync: tuning, host side

    def reduce_gradients(self, parameters: list[torch.Tensor]) -> None:
        if self.ctx.world_size > 1:
            for p in parameters:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
def learn_coefficients(scheduler, model: Callable, noise: torch.Tensor, target: torch.Tensor,
                       search: CoefficientSearch = CoefficientSearch(), checkpoint: str | Path | None = None,
                       progress: bool = True, holdout: Holdout | None = None, start: Plan | None = None,
                       ctx: DistContext = DistContext()) -> tuple[Plan, CoefficientReport]:
    """Learn the coefficients (and time points) of the scheduler's current plan (after ``set_timesteps(N)``) so
    its samples from ``noise`` approach ``target``, the teacher's final states; returns the plan and a report.
    ``start``: a plan of the same solver on another grid to start from (the base stays the scheduler's plan).
    Under ``torchrun`` (``ctx``) the fitting noises are split across the processes and the gradients all-reduced."""
    if search.consistency == "auto":
        return _learn_auto(scheduler, model, noise, target, search, checkpoint, progress, holdout, start, ctx)
    return CoefficientFit(scheduler, model, noise, target, search, checkpoint, progress, holdout, start,
                          ctx).train().finish()


class CoefficientFit:
    """One training run, resumable in parts: ``train(until)`` runs its iterations up to ``until`` (all of them
    by default; it also ends at the validation plateau), ``finish()`` returns the best plan on validation."""

    def __init__(self, scheduler, model: Callable, noise: torch.Tensor, target: torch.Tensor,
                 search: CoefficientSearch, checkpoint: str | Path | None = None, progress: bool = True,
                 holdout: Holdout | None = None, start: Plan | None = None, ctx: DistContext = DistContext()):
        self.began = time.perf_counter()
        self.scheduler, self.model, self.noise, self.target, self.search = scheduler, model, noise, target, search
        self.progress, self.ctx = progress, ctx
        start_report = None
        if start is None and search.init == "nelder-mead" and search.learn_timesteps and scheduler.plan.num_steps > 1:
            from fastsampler.tuning.nelder_mead import NelderMeadSearch, fit_timesteps_nelder_mead

            start, start_report = fit_timesteps_nelder_mead(
                scheduler, model, noise, target, NelderMeadSearch(search.init_evaluations, search.validation_fraction),
                Path(checkpoint).with_suffix(".nelder_mead.json") if checkpoint is not None else None, progress,
                holdout)
        self.param = param = Parametrisation(scheduler, search, start)
        self.dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
        self.validation = Validation(holdout, noise.shape[0], search.validation_fraction)
        self.holdout = holdout
        self.report = report = CoefficientReport(param.base.num_steps, validation=self.validation.describe)
        if start_report is not None:
            report.start = asdict(start_report)
            report.model_evaluations += start_report.model_evaluations
        self.shard = BatchShard(ctx, model, noise, target, self.validation)
        self.u = u = param.initial_u().requires_grad_(param.family is not None)
        self.theta = theta = param.initial_theta(u.detach()).requires_grad_(True)
        # ξ = 0: the nodes' own times (a start plan's are those of its grid: the fits it comes from are not decoupled)
        self.xi = xi = torch.zeros(param.base.num_steps, dtype=torch.float64).requires_grad_(param.decoupled)
        groups = [{"params": [theta], "lr": search.lr, "rate": search.lr}] \
            + ([{"params": [u], "lr": search.lr_time, "rate": search.lr_time}] if param.family is not None else []) \
            + ([{"params": [xi], "lr": search.lr_time, "rate": search.lr_time}] if param.decoupled else [])
        self.optimiser = torch.optim.Adam(groups)
        self.best = {"u": u.detach().clone(), "theta": theta.detach().clone(), "xi": xi.detach().clone(),
                     "loss": math.inf, "iteration": 0}
        self.schedule = {"decays": 0, "since": 0}
        self.next = 0  # the next iteration
        self.done = False
        self.path = Path(checkpoint) if checkpoint is not None else None
        self.key = search_key(param.base, model, noise, target, search, start=param.start.fingerprint(),
                              extra="" if holdout is None else tensor_digest(holdout.noise, holdout.target))
        if self.path is not None and self.path.is_file():
            saved = torch.load(self.path, weights_only=False)
            if saved.get("key") == self.key:
                with torch.no_grad():
                    u.copy_(saved["u"])
                    theta.copy_(saved["theta"])
                    xi.copy_(saved["xi"])
                self.optimiser.load_state_dict(saved["adam"])
                self.best, self.next, self.schedule = saved["best"], saved["iteration"], saved["schedule"]
                report.fit_losses, report.validation_losses = saved["fit_losses"], saved["validation_losses"]
                report.model_evaluations = saved["model_evaluations"]
                report.validation_start = report.validation_losses[0] if report.validation_losses else math.nan
        ctx.barrier()  # every process has read the checkpoint before the first writes it
        report.stopped = f"iteration limit ({search.iters})"
        self.limit = report.stopped

    @property
    def best_loss(self) -> float:
        """The best validation loss so far (in-loop: continuous model times)."""
        return self.best["loss"]

    def train(self, until: int | None = None) -> "CoefficientFit":
        """Run iterations up to (not including) ``until``, or to the end of training."""
        search, report, best = self.search, self.report, self.best
        u, theta, xi, optimiser, shard, param = self.u, self.theta, self.xi, self.optimiser, self.shard, self.param
        last = search.iters + 1 if until is None else min(until, search.iters + 1)
        if self.done or self.next >= last:
            return self
        report.stopped = self.limit
        bar = progress_bars.bar(range(self.next, last), desc=f"coefficients ({param.base.num_steps} steps)",
                                enabled=self.progress)
        for it in bar:
            if it - max(best["iteration"], self.schedule["since"]) > search.patience:
                if self.schedule["decays"] >= search.lr_decays:
                    report.stopped = (f"validation plateau (no gain for {search.patience} iterations after "
                                      f"{search.lr_decays} step-size halvings)")
                    self.done = True
                    break
                # LD3's schedule: back to the best parameters with half the step size
                with torch.no_grad():
                    u.copy_(best["u"])
                    theta.copy_(best["theta"])
                    xi.copy_(best["xi"])
                self.schedule = {"decays": self.schedule["decays"] + 1, "since": it}
            for group in optimiser.param_groups:
                group["lr"] = group["rate"] * 0.5 ** self.schedule["decays"] * min(1.0, (it + 1) / search.lr_warmup)
            optimiser.zero_grad()
            final = sample(param, u, theta, shard.model, shard.noise, self.dtype, xi)
            losses = per_sample_loss(final, shard.target, search.loss, search.slack)
            fit_loss = losses[shard.fit].sum() / shard.n_fit
            report.model_evaluations += param.base.num_steps
            report.fit_losses.append(shard.total(fit_loss))
            if self.holdout is not None:
                score = self.holdout.loss(param.materialise(u.detach(), theta.detach(), xi.detach()))
            else:
                score = shard.total(losses[shard.held].sum()) / shard.n_held
                score = score if math.isfinite(score) else math.inf
            report.validation_losses.append(score)
            if it == 0:
                report.validation_start = score
            if score < best["loss"] * (1 - MIN_IMPROVEMENT) or it == 0:
                best = self.best = {"u": u.detach().clone(), "theta": theta.detach().clone(),
                                    "xi": xi.detach().clone(), "loss": score, "iteration": it}
            bar.set_postfix(fit=f"{report.fit_losses[-1]:.4g}", val=f"{score:.4g}", best=f"{best['loss']:.4g}")
            if it < search.iters and math.isfinite(report.fit_losses[-1]):
                fit_loss.backward()
                shard.reduce_gradients([theta, u, xi])
                optimiser.step()
            self.next = it + 1
            self._save()
        self.done = self.done or self.next > search.iters
        if not self.done:
            report.stopped = f"stopped after {self.next} iterations (more to come)"
        report.iterations, report.best_iteration = len(report.fit_losses), self.best["iteration"]
        return self

    def _save(self) -> None:
        if self.path is None or not self.ctx.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        torch.save({"key": self.key, "u": self.u.detach(), "theta": self.theta.detach(), "xi": self.xi.detach(),
                    "adam": self.optimiser.state_dict(), "best": self.best, "schedule": self.schedule,
                    "iteration": self.next, "fit_losses": self.report.fit_losses,
                    "validation_losses": self.report.validation_losses,
                    "model_evaluations": self.report.model_evaluations}, tmp)
        os.replace(tmp, self.path)

    def finish(self) -> tuple[Plan, CoefficientReport]:
        """The best of the scheduler's plan, the starting plan and the learned one on validation, and the report."""
        param, report, search = self.param, self.report, self.search
        args = (self.model, self.noise, self.target, search, self.validation, report)
        if param.starts_at_base:
            report.validation_base = report.validation_start
        else:  # both as finished plans (the in-loop score of the start has continuous timesteps)
            report.validation_base = report.start["validation_base"] if report.start else \
                _validation_of(param.base, *args)
            report.validation_start = report.start["validation_tuned"] if report.start else \
                _validation_of(param.given_start, *args)
        report.iterations = len(report.fit_losses)
        report.best_iteration = self.best["iteration"]
        tuned = _final_plan(self.scheduler, param, self.best, *args)
        report.timesteps_learned = [float(t) for t in tuned.timesteps]
        report.seconds = time.perf_counter() - self.began
        return tuned, report


def _learn_auto(scheduler, model: Callable, noise: torch.Tensor, target: torch.Tensor, search: CoefficientSearch,
                checkpoint: str | Path | None, progress: bool, holdout: Holdout | None, start: Plan | None,
                ctx: DistContext) -> tuple[Plan, CoefficientReport]:
    """``consistency="auto"``: a race of two fits, ``probe`` iterations each — the consistent fit ("full") and
    free rows from the scheduler's own plan. The free fit, if better on validation then, trains to its end and is
    returned. Otherwise the consistent fit trains to its end, and free rows continue it (time points and rows from
    the "full" plan; iteration 0 is that fit's best parameters, before its model times were rounded): that fit
    contains the "full" one. Each returned fit is already the best of itself, its start and the base.
    Why both: free rows from the base find what the projection's basin hides (digits DDPM, NFE 5: 0.74× vs 0.83×
    the best built-in on held-out noises); at NFE 10 their first steps overshoot (validation 1.7× the base's at
    iteration 25) and the continuing fit holds (0.73× vs 1.03×). Why a race: training all three to the end took
    three fits' time (250 s at NFE 5 on 2 cores). The 30-iteration probe picked what the finished fits picked at
    NFE 5 and 10 and gave the same held-out errors (0.741×, 0.728×) in 168 and 287 iterations instead of ~410."""
    began = time.perf_counter()
    stage = (lambda suffix: Path(checkpoint).with_suffix(suffix) if checkpoint is not None else None)
    common = (model, noise, target)
    consistent = CoefficientFit(scheduler, *common, replace(search, consistency="full"), stage(".full.pt"), progress,
                                holdout, start, ctx).train(search.probe)
    free = replace(search, consistency="none", init="base")
    from_base = CoefficientFit(scheduler, *common, free, stage(".free.pt"), progress, holdout, start,
                               ctx).train(search.probe)
    probe = {"probe_iterations": search.probe, "validation_best": {"consistent (full)": consistent.best_loss,
                                                                     "free rows from the scheduler's plan":
                                                                     from_base.best_loss}}
    if from_base.best_loss <= consistent.best_loss:
        plan, report = from_base.train().finish()
        report.stage = "free rows from the scheduler's plan"
        report.alternative = {**asdict(consistent.report), "stage": "consistent (full)", "stopped": "lost the race"}
        report.model_evaluations += consistent.report.model_evaluations
    else:
        full_plan, full = consistent.train().finish()
        plan, report = CoefficientFit(scheduler, *common, free, checkpoint, progress, holdout, full_plan,
                                      ctx).train().finish()
        report.start = asdict(replace(full, stage="consistent (full)"))
        report.stage = "free rows continuing the consistent fit"
        report.alternative = {**asdict(from_base.report), "stage": "free rows from the scheduler's plan",
                              "stopped": "lost the race"}
        report.model_evaluations += full.model_evaluations + from_base.report.model_evaluations
    report.race = probe
    report.seconds = time.perf_counter() - began
    return plan, report


def _validation_of(plan: Plan, model, noise, target, search, validation: Validation,
                   report: CoefficientReport) -> float:
    """The validation loss of a finished plan (held-out noises, or the batch's held rows from a fresh run)."""
    if validation.holdout is not None:
        return validation.holdout.loss(plan)
    with torch.no_grad():
        final, _ = run(plan, model, noise)
    report.model_evaluations += plan.num_steps
    return validation.loss(per_sample_loss(final, target, search.loss, search.slack), lambda: plan)


def _final_plan(scheduler, param: Parametrisation, best: dict, model, noise, target, search, validation,
                report: CoefficientReport) -> Plan:
    """The best of the scheduler's plan, the starting plan and the learned parameters (as a plan, integer
    timesteps where the model's schedule is discrete), by validation loss; ties keep the simpler plan."""
    candidates = [(report.validation_base, param.base)]
    if not param.starts_at_base:
        candidates.append((report.validation_start, param.given_start))
    if best["iteration"] > 0:
        discrete = scheduler.timesteps.dtype == torch.int64
        tuned = param.materialise(best["u"], best["theta"], best["xi"], round_timesteps=discrete)
        score = _validation_of(tuned, model, noise, target, search, validation, report)
        report.rounding_cost = score / best["loss"] if best["loss"] > 0 else 1.0
        candidates.append((score, tuned))
    chosen = min(range(len(candidates)), key=lambda k: (candidates[k][0], k))
    report.validation_tuned = candidates[chosen][0]
    report.kept_base = chosen == 0
    report.kept_start = chosen == 1 and not param.starts_at_base
    return candidates[chosen][1]


# the parametrisation and the options live in their own modules; their names stay importable from here
__all__ = ["learn_coefficients", "CoefficientFit", "CoefficientSearch", "CoefficientReport", "Parametrisation",
           "consistent_sources", "exact_output", "projectors", "sample", "used_rows", "with_rows", "MIN_IMPROVEMENT"]
