"""Held-out noises that choose among a search's candidates (model selection).

A search that fits a few parameters to a small batch of fitting noises can prefer a candidate that is excellent on
those noises and unstable on others (a learned grid that sends a few guided samples far off, say). Scoring the
candidates a search produced on noises it never fitted, and keeping the best of those, bounds that: the tuned plan
is the candidate that generalises best among those tried, the scheduler's own plan included. A search scored by a
user ``scorer`` of the samples (S³'s small-sample FID, say) is held out by the same scorer: the selection must
measure what the search optimised, on other noises.
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
    """The model (conditioned for the held-out batch), the held-out noises, the teacher's final states on them and,
    optionally, the search's own ``scorer`` of samples (lower is better)."""

    model: Callable
    noise: torch.Tensor
    target: torch.Tensor
    evaluations: int = 0
    scorer: Callable[[torch.Tensor], float] | None = None

    def loss(self, plan: Plan) -> float:
        """``scorer`` of ``plan``'s samples from the held-out noises, or their mean squared error against the
        teacher (inf if not finite)."""
        if self.scorer is None:
            return float(self.per_sample(plan).mean())  # ok-sync: tuning, host side
        final = self._run(plan)
        return float(self.scorer(final)) if torch.isfinite(final).all() else math.inf

    def per_sample(self, plan: Plan) -> torch.Tensor:
        """(B,) each held-out sample's mean squared error against the teacher (inf where not finite)."""
        final = self._run(plan)
        mse = (final.double() - self.target.double()).pow(2).flatten(1).mean(1)
        return torch.where(torch.isfinite(mse), mse, torch.full_like(mse, math.inf))

    def _run(self, plan: Plan) -> torch.Tensor:
        with torch.no_grad():
            final, _ = run(plan, self.model, self.noise)
        self.evaluations += plan.num_steps
        return final
