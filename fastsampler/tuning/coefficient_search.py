"""The options of ``method="coefficients"`` (``CoefficientSearch``, validated when built, each error naming the
option and what is allowed) and what a fit reports (``CoefficientReport``). What each option does and what it
measured: the docstring of ``fastsampler.tuning.coefficients``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastsampler.tuning.support import SUPPORTS, check_history
from fastsampler.tuning.validation import check_fraction


LOSSES = ("final", "distance", "relaxed")
CONSISTENCY = ("auto", "full", "none", "data")
INITS = ("nelder-mead", "base")


@dataclass(frozen=True)
class CoefficientSearch:
    iters: int = 400
    lr: float = 0.03  # on θ: relative corrections of the base coefficients
    lr_time: float = 0.02  # on the grid parameters (as TimestepSearch)
    learn_timesteps: bool = True
    learn_start: bool = True  # the first node too (a truncated start; ``GridFamily``); needs learn_timesteps
    learn_eval_times: bool = False  # free rows call the model at t_i + b_i tanh(ξ_i), ξ learned (module docstring)
    loss: str = "final"
    slack: float = 0.0  # relaxed loss: RMS distance (per sample) that costs nothing
    patience: int = 20  # iterations without a validation gain before the step size halves (LD3)
    lr_decays: int = 1  # halvings before training stops (3: digits NFE 10 0.73× vs 0.77×, NFE 5 equal, ~45 % more iterations)
    validation_fraction: float = 0.25
    consistency: str | bool = "auto"  # "auto" | "full" (True) | "none" (False) | "data": see the module docstring
    init: str = "base"  # start from the scheduler's grid or the Nelder–Mead time points (the baseline; slower)
    init_evaluations: int = 0  # Nelder–Mead budget; 0: its default (60 per free time point)
    fd_step: float = 1e-5
    support: str = "history"  # correct every source a step can read, or only the base row's non-zero entries
    history: int | None = None  # history slots of the tuned plan (None: all earlier predictions, up to 8; 0: base's)
    probe: int = 30  # consistency="auto": iterations of each fit before the better one on validation trains on
    lr_warmup: int = 1  # iterations over which the step sizes ramp up linearly (1: none). Adam's first steps are
    # ~lr in every parameter; 10 kept free rows continuing the consistent fit on the mixture at NFE 10 from a 10×
    # jump in loss (1.31× instead of 1.69×) but raised digits NFE 5 from 0.716× to 0.729× (FID 0.903 / 1.161 vs
    # 0.804 / 1.063)

    def __post_init__(self) -> None:
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"coefficients search: `iters` must be an integer ≥ 0, got {self.iters!r}")
        for name in ("lr", "lr_time", "fd_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"coefficients search: `{name}` must be positive, got {getattr(self, name)!r}")
        if self.init not in INITS:
            raise ValueError(f"coefficients search: `init` must be one of {INITS}, got {self.init!r}")
        if self.support not in SUPPORTS:
            raise ValueError(f"coefficients search: `support` must be one of {SUPPORTS}, got {self.support!r}")
        check_history(self.history)
        for name in ("learn_timesteps", "learn_start", "learn_eval_times"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"coefficients search: `{name}` must be True or False, got {getattr(self, name)!r}")
        mode = {True: "full", False: "none"}.get(self.consistency, self.consistency) \
            if isinstance(self.consistency, bool) else self.consistency
        if mode not in CONSISTENCY:
            raise ValueError(f"coefficients search: `consistency` must be one of {CONSISTENCY} (or True / False for "
                             f"\"full\" / \"none\"), got {self.consistency!r}")
        object.__setattr__(self, "consistency", mode)
        if self.loss not in LOSSES:
            raise ValueError(f"coefficients search: `loss` must be one of {LOSSES}, got {self.loss!r}")
        if not self.slack >= 0:
            raise ValueError(f"coefficients search: `slack` must be ≥ 0, got {self.slack!r}")
        if isinstance(self.lr_decays, bool) or not isinstance(self.lr_decays, int) or self.lr_decays < 0:
            raise ValueError(f"coefficients search: `lr_decays` must be an integer ≥ 0, got {self.lr_decays!r}")
        for name in ("patience", "probe", "lr_warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"coefficients search: `{name}` must be an integer ≥ 1, got {value!r}")
        check_fraction("coefficients search", self.validation_fraction)


@dataclass
class CoefficientReport:
    num_steps: int
    fit_losses: list[float] = field(default_factory=list)  # per iteration, on the fitting noises
    validation_losses: list[float] = field(default_factory=list)  # per iteration, on the held-out noises
    validation: str = ""  # "in-batch (last 16 of 64 noises)" or "held-out noises (32)"
    best_iteration: int = 0
    iterations: int = 0
    stopped: str = ""  # why training ended
    validation_base: float = math.nan  # the scheduler's own plan
    validation_start: float = math.nan  # where training started (the Nelder–Mead grid by default)
    start: dict = field(default_factory=dict)  # the report of the fit training started from (Nelder–Mead, "full")
    stage: str = ""  # which fit of consistency="auto" this is (see _learn_auto)
    alternative: dict = field(default_factory=dict)  # consistency="auto": the report of the fit not chosen
    race: dict = field(default_factory=dict)  # consistency="auto": the probe's length and both fits' best losses
    validation_tuned: float = math.nan  # the returned plan (timesteps rounded where the model needs integers)
    rounding_cost: float = math.nan  # validation_tuned / best continuous validation loss
    kept_base: bool = False
    kept_start: bool = False
    timesteps_learned: list[float] = field(default_factory=list)
    model_evaluations: int = 0
    seconds: float = 0.0
