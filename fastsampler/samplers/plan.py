"""The plan: every solver as one table of linear-combination coefficients.

For a fixed noise schedule and grid, each solver step is linear in the current sample X, the model output O,
one saved sample S (UniPC's pre-corrector state, or a singlestep macro-step's start), the stored predictions
D_{i−a} of earlier steps, and optionally fresh noise Z:

    D_i    = c_x·X + c_o·O                                            (the solver's prediction, x̂₀ or ε̂)
    X_next = a_x·X + a_s·S + Σ_a b_a·D_{i−a} + a_z·Z
    S_new  = u_x·X + u_s·S + Σ_a w_a·D_{i−a}                          (only on rows that save)

A builder (``Solver.rule``) states each step in *ages* a (0 = this step's prediction). ``compile_plan`` turns
ages into ring-buffer slots (the prediction of step i lives in slot i mod K), so ``step()`` is a row lookup and
one fused update with no per-step arithmetic on the host. Rows exist for every warm-up level (how many earlier
predictions are available), so a run may start at any index (img2img) without rebuilding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fastsampler.schedules.grids import Grid

# Source order of a packed coefficient row: X, S, Z, then the K history slots.
SRC_X, SRC_S, SRC_Z, SRC_SLOTS = 0, 1, 2, 3


@dataclass(frozen=True)
class Rule:
    """One step in ages: X_next = x·X + s·S + Σ_a d[a]·D_{i−a} + z·Z, and optionally S_new = save."""

    x: float
    d: tuple[float, ...]
    s: float = 0.0
    z: float = 0.0
    save: "Rule | None" = None  # S_new, in the same form (its z and save unused)


def compose_after(outer: Rule, inner: Rule) -> Rule:
    """``outer`` applied to the state ``inner`` produces: outer.x·(inner) + the rest of outer (for UniC → UniP)."""
    n = max(len(outer.d), len(inner.d))
    d = [0.0] * n
    for a, c in enumerate(inner.d):
        d[a] += outer.x * c
    for a, c in enumerate(outer.d):
        d[a] += c
    return Rule(x=outer.x * inner.x, d=tuple(d), s=outer.s + outer.x * inner.s, z=outer.z + outer.x * inner.z)


@dataclass(frozen=True)
class Nodes:
    """Per-node quantities of a grid (index N is the final level), all float64."""

    timesteps: np.ndarray
    rho: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    lam: np.ndarray
    flow: bool

    @classmethod
    def from_grid(cls, grid: Grid) -> "Nodes":
        return cls(np.asarray(grid.timesteps, dtype=np.float64), grid.rhos.astype(np.float64), grid.alphas,
                   grid.sigmas, grid.lambdas, grid.flow)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


class Solver(Protocol):
    """What a plan builder provides."""

    data_form: bool  # predictions are x̂₀ (True) or ε̂ (False)
    history: int  # K: how many predictions a step may read (this step's included)
    stochastic: bool  # rows may use fresh noise Z

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        """Step i (node i → i+1) with ``available`` earlier predictions (0 on a run's first step)."""


@dataclass
class Plan:
    """Compiled coefficient tables (float64, CPU). Shapes: W warm-up levels, N steps, C = 3 + K sources."""

    conv: np.ndarray  # (N, 2): D = c_x·X + c_o·O
    x0_conv: np.ndarray  # (N, 2): x̂₀ = c_x·X + c_o·O (for thresholding)
    d_from_x0: np.ndarray  # (N, 2): D = e_x·X + e_0·x̂₀ (after thresholding)
    x_coef: np.ndarray  # (W, N, C)
    s_coef: np.ndarray  # (W, N, C)
    s_write: np.ndarray  # (W, N) bool
    write_slot: np.ndarray  # (N,) int
    meta: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.x_coef.shape[1]

    @property
    def slots(self) -> int:
        return self.x_coef.shape[2] - SRC_SLOTS

    @property
    def levels(self) -> int:
        return self.x_coef.shape[0]

    @property
    def uses_noise(self) -> bool:
        return bool(np.any(self.x_coef[..., SRC_Z] != 0))

    def to_json(self) -> str:
        arrays = {k: getattr(self, k).tolist() for k in  # numpy: ok-sync
                  ("conv", "x0_conv", "d_from_x0", "x_coef", "s_coef", "s_write", "write_slot")}
        return json.dumps({"format": "fastsampler-plan/1", "meta": self.meta, **arrays})

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        obj = json.loads(text)
        if obj.get("format") != "fastsampler-plan/1":
            raise ValueError("not a fastsampler plan (expected format 'fastsampler-plan/1')")
        return cls(
            conv=np.array(obj["conv"]), x0_conv=np.array(obj["x0_conv"]), d_from_x0=np.array(obj["d_from_x0"]),
            x_coef=np.array(obj["x_coef"]), s_coef=np.array(obj["s_coef"]),
            s_write=np.array(obj["s_write"], dtype=bool), write_slot=np.array(obj["write_slot"], dtype=np.int64),
            meta=obj.get("meta", {}),
        )


def _scatter(rule: Rule, i: int, slots: int, out: np.ndarray) -> None:
    out[SRC_X] = rule.x
    out[SRC_S] = rule.s
    out[SRC_Z] = rule.z
    for age, c in enumerate(rule.d):
        if c != 0.0:
            if age > i:
                raise AssertionError(f"rule for step {i} reads a prediction {age} steps back")
            out[SRC_SLOTS + (i - age) % slots] += c


def compile_plan(solver: Solver, nodes: Nodes, prediction_type: str) -> Plan:
    """Evaluate ``solver.rule`` for every step and warm-up level and lay the results out by slot."""
    from fastsampler.samplers.convert import prediction_coefficients, x0_coefficients

    n, k = nodes.num_steps, solver.history
    levels = k  # available ∈ {0, …, K−1}: more is never read
    c = SRC_SLOTS + k
    x_coef = np.zeros((levels, n, c))
    s_coef = np.zeros((levels, n, c))
    s_write = np.zeros((levels, n), dtype=bool)
    for w in range(levels):
        for i in range(n):
            rule = solver.rule(i, min(w, i), nodes)
            if len(rule.d) > min(w, i) + 1 and any(rule.d[min(w, i) + 1:]):
                raise AssertionError(f"{type(solver).__name__}: step {i} reads more history than available")
            _scatter(rule, i, k, x_coef[w, i])
            if rule.save is not None:
                s_write[w, i] = True
                _scatter(rule.save, i, k, s_coef[w, i])
    conv = np.zeros((n, 2))
    x0_conv = np.zeros((n, 2))
    d_from_x0 = np.zeros((n, 2))
    for i in range(n):
        a, s = float(nodes.alpha[i]), float(nodes.sigma[i])
        conv[i] = prediction_coefficients(prediction_type, solver.data_form, a, s)
        x0_conv[i] = x0_coefficients(prediction_type, a, s)
        # D from (x, x̂₀): identity for data form, ε̂ = (x − α x̂₀)/σ for noise form.
        d_from_x0[i] = (0.0, 1.0) if solver.data_form else (1.0 / s, -a / s)
    if not (np.all(np.isfinite(x_coef)) and np.all(np.isfinite(s_coef)) and np.all(np.isfinite(conv))):
        raise FloatingPointError(f"{type(solver).__name__} produced non-finite coefficients on this grid")
    grid = {"timesteps": nodes.timesteps.tolist(), "rho": nodes.rho.tolist(), "flow": nodes.flow}  # numpy: ok-sync
    return Plan(conv, x0_conv, d_from_x0, x_coef, s_coef, s_write, np.arange(n) % k,
                meta={"solver": type(solver).__name__, "prediction_type": prediction_type, **grid})
