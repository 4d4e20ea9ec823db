"""Epsilon Scaling (Ning et al., ICLR 2024, arXiv 2308.15321): divide the noise prediction by λ_t slightly above 1.

Exposure bias makes ‖ε̂‖ larger at sampling time than on training inputs; the fix replaces ε_θ(x_t, t) by
ε_θ(x_t, t)/λ_t wherever the sampler uses it, with the linear schedule

    λ_t = k·t + b,      t = the index in the sampling chain (N − 1 at the first, noisiest step; 0 at the last)

(the official ADM-ES code, ``gaussian_diffusion.py``: ``sampling_scaler[t]`` over the respaced chain, and its README:
k = 0.0025, b = 1.0 at 20 steps); the recommended practical form is the uniform λ = b (k = 0), e.g. b = 1.017 on
CIFAR-10 at 100 steps, 1.004–1.006 on ImageNet. ComfyUI's node uses the same rewrite after CFG.

Here it is an output-map rewrite (``Transform.output_map``), so it applies to the guided model output of every
prediction type and every solver form, and thresholding clamps the scaled x̂₀. At a fixed sample X:

    noise form   ε̂'  = ε̂/λ                                   P = c_x·X + c_o·O  →  (c_x/λ, c_o/λ)
    data form    x̂₀' = (X − σ ε̂/λ)/α = x̂₀/λ + (1 − 1/λ)·X/α  →  (c_x/λ + (1 − 1/λ)/α, c_o/λ)

(EDM-ES's D' = x − (x − D)/λ in VP coordinates). Option ``epsilon_scaling``: b, or [k, b]; λ = 1 is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from fastsampler.samplers.rules import Nodes, PlanShape, Transform
from fastsampler.samplers.transforms.checks import number

#: λ_t must stay in this range at every step (ComfyUI's Epsilon Scaling node allows 0.5–1.5; published values are
#: 0.998–1.05).
LAMBDA_RANGE = (0.5, 1.5)
OPTION = "epsilon_scaling"


@dataclass(frozen=True)
class EpsilonScaling(Transform):
    """ε̂ → ε̂/λ_i with λ_i = k·(N − 1 − i) + b at step i of N."""

    b: float
    k: float = 0.0

    name = "epsilon_scaling"

    def scale(self, i: int, num_steps: int) -> float:
        lam = self.k * (num_steps - 1 - i) + self.b
        low, high = LAMBDA_RANGE
        if not low <= lam <= high:
            raise ValueError(f"`{OPTION}` = [k={self.k:g}, b={self.b:g}] gives λ = {lam:.4g} at step {i} of "
                             f"{num_steps}; λ_t = k·t + b must stay in [{low:g}, {high:g}]")
        return lam

    def output_map(self, c_x: float, c_o: float, i: int, nodes: Nodes, shape: PlanShape) -> tuple[float, float]:
        lam = self.scale(i, nodes.num_steps)
        if shape.data_form:
            return c_x / lam + (1.0 - 1.0 / lam) / float(nodes.alpha[i]), c_o / lam
        return c_x / lam, c_o / lam


def parse(value: Any) -> tuple[float, float]:
    """(k, b) from the option: b alone, or [k, b]."""
    low, high = LAMBDA_RANGE
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"`{OPTION}` must be b or [k, b] (λ_t = k·t + b), got {value!r}")
        return number(f"{OPTION} k", value[0], -1.0, 1.0), number(f"{OPTION} b", value[1], low, high)
    return 0.0, number(OPTION, value, low, high)


def plugin(options: Mapping[str, Any], builder: Any) -> tuple[Any, EpsilonScaling | None]:
    value = options.get(OPTION)
    if value is None:
        return builder, None
    k, b = parse(value)
    if k == 0.0 and b == 1.0:
        return builder, None
    return builder, EpsilonScaling(b=b, k=k)
