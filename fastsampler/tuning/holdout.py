"""Held-out noises that choose among a search's candidates (model selection).

A search that fits a few parameters to a small batch of fitting noises can prefer a candidate that is excellent on
those noises and unstable on others (a learned grid that sends a few guided samples far off, say). Scoring the
candidates a search produced on noises it never fitted, and keeping the best of those, bounds that: the tuned plan
is the candidate that generalises best among those tried, the scheduler's own plan included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fastsampler.plans.format import Plan
from fastsampler.tuning.runner import run


@dataclass
class Holdout:
    """The model (conditioned for the held-out batch), the held-out noises and the teacher's final states on them."""

    model: Callable
    noise: torch.Tensor
    target: torch.Tensor
    evaluations: int = 0

    def loss(self, plan: Plan) -> float:
        """Mean squared error of ``plan``'s samples against the teacher on the held-out noises (inf if not finite)."""
        with torch.no_grad():
            final, _ = run(plan, self.model, self.noise)
        self.evaluations += plan.num_steps
        if not torch.isfinite(final).all():
            return math.inf
        return float((final.double() - self.target.double()).pow(2).mean())  # ok-sync: tuning, host side
