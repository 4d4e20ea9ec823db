"""The named schedulers: thin presets over ``PlanScheduler`` that pick a plan builder and its options."""

from __future__ import annotations

import math

import numpy as np
# DiffusionPipeline.from_pretrained looks the loading base class up by name in the module recorded in
# model_index.json (this one), so it must be importable from here.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from fastsampler.adapters.scheduler import PlanScheduler, logger
from fastsampler.schedules.noise import DiscreteVP
from fastsampler.samplers.deis import DEIS
from fastsampler.samplers.dpmsolver import DPMSolverMultistep, DPMSolverSinglestep
from fastsampler.samplers.rules import Nodes
from fastsampler.samplers.unipc import UniPC


class DPMSolverPlusPlusScheduler(PlanScheduler):
    """DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095) and DPM-Solver, as a drop-in diffusers scheduler.

    ``solver_method="multistep"`` (orders 1–3, like ``DPMSolverMultistepScheduler``) or ``"singlestep"``
    (diffusers' grid-based 2S/3S, like ``DPMSolverSinglestepScheduler``); ``algorithm_type`` dpmsolver++
    (data prediction, default), dpmsolver (noise prediction), sde-dpmsolver++ / sde-dpmsolver (noise from
    ``generator``); ``solver_type`` midpoint or heun.
    """

    _algorithm_types = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
    _algorithm_remap = {"deis": "dpmsolver++"}
    _solver_types = ("midpoint", "heun")
    _solver_remap = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}
    _options = frozenset({"euler_at_final", "solver_method", "exact_third_order", "use_lu_lambdas",
                          "lambda_min_clipped", "sde_eta"})

    def _validate_config(self) -> None:
        super()._validate_config()
        c = self.config
        if c.solver_method not in ("multistep", "singlestep"):
            raise ValueError(f"`solver_method` must be 'multistep' or 'singlestep', got {c.solver_method!r}")
        if self.algorithm == "sde-dpmsolver" and c.solver_order > 2:
            raise ValueError("algorithm_type='sde-dpmsolver' supports solver_order 1 or 2")
        if not (isinstance(c.sde_eta, (int, float)) and not isinstance(c.sde_eta, bool) and 0 <= c.sde_eta < math.inf):
            raise ValueError(f"`sde_eta` must be a number ≥ 0, got {c.sde_eta!r}")
        if c.sde_eta != 1.0 and (self.algorithm != "sde-dpmsolver++" or c.solver_method != "multistep"):
            raise ValueError("`sde_eta` (the SDE's η) applies to algorithm_type='sde-dpmsolver++' with "
                             "solver_method='multistep'")

    def _build_solver(self, nodes: Nodes):
        c = self.config
        if c.solver_method == "singlestep":
            return DPMSolverSinglestep(c.solver_order, self.algorithm, self.solver_kind, c.lower_order_final,
                                       nodes.num_steps, bool(nodes.rho[-1] == 0.0))
        return DPMSolverMultistep(c.solver_order, self.algorithm, self.solver_kind, c.lower_order_final,
                                  c.euler_at_final, c.exact_third_order, float(c.sde_eta))

    def _bound_hint(self) -> str:
        if self.algorithm.endswith("++"):
            return super()._bound_hint()
        return (f"algorithm_type={self.algorithm!r} is the noise-prediction form, which divides by α (tiny at the "
                "first node of a flow grid or a zero-SNR schedule); use algorithm_type='dpmsolver++'")


class UniPCScheduler(PlanScheduler):
    """UniPC (Zhao et al. 2023, arXiv 2302.04867): UniP predictor + UniC corrector, bh1 / bh2, orders 1–3."""

    _algorithm_types = ("dpmsolver++", "dpmsolver")  # diffusers keeps dpmsolver++ here; data/noise via predict_x0
    _algorithm_remap = {"deis": "dpmsolver++", "sde-dpmsolver++": "dpmsolver++", "sde-dpmsolver": "dpmsolver"}
    _solver_types = ("bh2", "bh1")
    _solver_remap = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}
    _flow_grid = "unipc"
    _options = frozenset({"predict_x0", "disable_corrector", "use_lu_lambdas"})

    def _build_solver(self, nodes: Nodes):
        c = self.config
        return UniPC(c.solver_order, self.solver_kind, c.predict_x0, c.lower_order_final,
                     tuple(c.disable_corrector or ()))

    def _bound_hint(self) -> str:
        if self.config.predict_x0:
            return super()._bound_hint()
        return ("predict_x0=False is UniPC's noise-prediction form, which divides by α (tiny at the first node of "
                "a flow grid or a zero-SNR schedule); use predict_x0=True")


class DCSolverScheduler(UniPCScheduler):
    """DC-Solver (Zhao, Wang, Zhou & Lu, ECCV 2024, arXiv 2409.03755): UniPC with dynamic compensation.

    The same scheduler as ``UniPCScheduler``; its compensation ratios come from ``dc_ratios`` (one per step), a
    ratio file (``dc_ratios_file``) or a cascade-polynomial-regression file (``dc_cpr_file`` with
    ``dc_guidance_scale``), or from ``fastsampler.tune(scheduler, model, noise, steps, method="dc")``, which fits
    them to your model and installs the tuned plans (kept by ``save_pretrained``). Without any of these it runs
    plain UniPC, and says so once.
    """

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, mu=None,
                      final_sigma=None) -> None:
        super().set_timesteps(num_inference_steps, device, timesteps, sigmas, mu, final_sigma)
        c = self.config
        tuned = num_inference_steps in self._plans
        if not tuned and not (c.dc_ratios or c.dc_ratios_file or c.dc_cpr_file) and not getattr(self, "_warned", False):
            self._warned = True
            logger.warning("DCSolverScheduler has no compensation ratios for %s steps (no dc_ratios, ratio file, "
                           "CPR file or tuned plan): it runs plain UniPC. Fit ratios with fastsampler.tune(..., "
                           "method='dc').", self.num_inference_steps)


class DEISScheduler(PlanScheduler):
    """DEIS (Zhang & Chen 2023, arXiv 2204.13902): multistep exponential integrator, ε-prediction form.

    ``solver_type="logrho"`` (diffusers' closed-form variant: Lagrange in log ρ, integrated in ρ, default),
    ``"tab"`` (polynomial in t), ``"rhoab"`` (polynomial in ρ); orders 1–3.
    """

    _algorithm_types = ("deis",)
    _algorithm_remap = {"dpmsolver++": "deis", "dpmsolver": "deis", "sde-dpmsolver++": "deis", "sde-dpmsolver": "deis"}
    _solver_types = ("logrho", "tab", "rhoab")
    _solver_remap = {"midpoint": "logrho", "heun": "logrho", "bh1": "logrho", "bh2": "logrho"}
    _options = frozenset({"use_lu_lambdas", "lambda_min_clipped"})

    def _build_solver(self, nodes: Nodes):
        c = self.config
        knots = self._noise_schedule.rhos if isinstance(self._noise_schedule, DiscreteVP) else None
        return DEIS(c.solver_order, self.solver_kind, c.lower_order_final, self._t_of_rho(), knots)

    def _bound_hint(self) -> str:
        return ("DEIS integrates in the noise-prediction form x/α, which divides by α (tiny at the first node of a "
                "flow grid or a zero-SNR schedule); use DPMSolverPlusPlusScheduler or UniPCScheduler there")

    def _t_of_rho(self):
        """Model time as a function of the VE sigma ρ = σ/α (for tAB-DEIS)."""
        c = self.config
        if c.use_flow_sigmas:
            return lambda r: r / (1.0 + r) * c.num_train_timesteps
        sched = self._noise_schedule
        if isinstance(sched, DiscreteVP):
            rhos, ts = sched.rhos, np.arange(sched.num_train_timesteps, dtype=np.float64)
            return lambda r: np.interp(r, rhos, ts)  # exact inverse of the linear-in-t ρ(t)
        return lambda r: sched.t_from_rho(r) * 1000.0
