"""Plan builders state each step as a linear *rule*; ``compile_plan`` turns rules into a ``Plan``.

A rule speaks in *ages* (age 0 = this step's stored prediction D̂, age a = the one stored a steps ago), so a
builder never deals with ring-buffer slots:

    X_next = x·X + p·P + z·Z + Σ_r r_r·R_r + Σ_a d_a·D̂_{i−a}          (``Rule.next``)
    D̂_i    = P, or a combination of P, registers and older predictions  (``Rule.store``; DC-Solver, momentum)
    R'_r   = a combination of the same sources                          (``Rule.registers[r]``; None = unchanged)

P is this step's prediction as the model made it; age 0 is what the step stores. They are the same tensor unless
a transform makes the store differ (DC-Solver's compensation replaces the stored prediction, while UniPC's
corrector keeps using the raw one).

A plan is a base builder followed by *transforms* (``Transform``): each may add history slots or registers,
rescale the output map (model output → P) or rewrite rules. ``compile_plan`` evaluates the rules for every step
and warm-up level (how many earlier predictions the run has), then lays ages out as slots (step i stores into
slot i mod K).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np

from fastsampler.plans.format import (
    OUT_NEXT,
    OUT_REGISTERS,
    OUT_STORE,
    SRC_P,
    SRC_X,
    SRC_Z,
    Plan,
    num_sources,
    src_register,
    src_slot,
)
from fastsampler.samplers.convert import prediction_coefficients
from fastsampler.schedules.grids import Grid


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


def _pad_add(a: tuple[float, ...], b: tuple[float, ...], scale: float = 1.0) -> tuple[float, ...]:
    n = max(len(a), len(b))
    return tuple((a[j] if j < len(a) else 0.0) + scale * (b[j] if j < len(b) else 0.0) for j in range(n))


@dataclass(frozen=True)
class Combo:
    """A linear combination x·X + p·P + z·Z + Σ r_r·R_r + Σ_a d_a·D̂_{i−a} (ages a; registers r)."""

    x: float = 0.0
    p: float = 0.0
    z: float = 0.0
    r: tuple[float, ...] = ()
    d: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "r", tuple(float(v) for v in self.r))
        object.__setattr__(self, "d", tuple(float(v) for v in self.d))

    def __add__(self, other: "Combo") -> "Combo":
        return Combo(self.x + other.x, self.p + other.p, self.z + other.z, _pad_add(self.r, other.r),
                     _pad_add(self.d, other.d))

    def __mul__(self, c: float) -> "Combo":
        return Combo(c * self.x, c * self.p, c * self.z, tuple(c * v for v in self.r), tuple(c * v for v in self.d))

    __rmul__ = __mul__

    def replace_x(self, inner: "Combo") -> "Combo":
        """This combination evaluated at X := ``inner`` (composition of two updates)."""
        return dataclasses.replace(self, x=0.0) + self.x * inner

    def reads_age(self, age: int) -> bool:
        return age < len(self.d) and self.d[age] != 0.0

    def oldest_age(self) -> int:
        """The largest age read (−1 if none)."""
        return max((a for a, c in enumerate(self.d) if c != 0.0), default=-1)

    def reads_registers(self) -> bool:
        return any(c != 0.0 for c in self.r)


def ages(n: int, **terms: float) -> np.ndarray:
    """A vector over ages 0..n−1 from keywords ``a0``, ``a1``, … (for writing divided differences)."""
    v = np.zeros(n)
    for key, c in terms.items():
        v[int(key[1:])] += c
    return v


@dataclass(frozen=True)
class Rule:
    """One step: the next sample, the stored prediction (None: P itself) and each register's new value
    (None: unchanged)."""

    next: Combo
    store: Combo | None = None
    registers: tuple[Combo | None, ...] = ()

    def combos(self) -> list[Combo]:
        return [c for c in (self.next, self.store, *self.registers) if c is not None]


class Builder(Protocol):
    """What a plan builder provides (builders are frozen dataclasses of their options)."""

    data_form: bool  # P is x̂₀ (True) or ε̂ (False)
    history: int  # K: how many predictions a step may read (this step's included)
    registers: tuple[str, ...]  # names of the state registers the rules use
    order_of_accuracy: int  # global order with a full history (what the convergence tests check)

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        """Step i (node i → i+1) with ``available`` earlier predictions (0 on a run's first step)."""


@dataclass(frozen=True)
class PlanShape:
    """What a plan holds besides its rules: history slots, register names, the form of P."""

    history: int
    registers: tuple[str, ...]
    data_form: bool


class Transform:
    """A plan transform: one module, one class. Override what the transform changes; the defaults change nothing.

    Transforms apply in list order after the base builder, each seeing the previous one's output.
    """

    name: ClassVar[str] = "transform"

    def shape(self, shape: PlanShape) -> PlanShape:
        """Extra history slots or registers this transform needs (registers are appended; look yours up by name)."""
        return shape

    def output_map(self, c_x: float, c_o: float, i: int, nodes: Nodes, shape: PlanShape) -> tuple[float, float]:
        """Rewrite step i's output map P = c_x·X + c_o·O."""
        return c_x, c_o

    def rewrite(self, rule: Rule, i: int, available: int, nodes: Nodes, shape: PlanShape) -> Rule:
        """Rewrite step i's rule (``shape`` is the final shape of the plan)."""
        return rule

    def options(self) -> dict[str, Any]:
        return options_of(self)


def options_of(obj: Any) -> dict[str, Any]:
    """The JSON-able dataclass fields of a builder or transform (for plan metadata); fields with a ``to_dict``
    are recorded in that form."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[f.name] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(e, (bool, int, float, str)) for e in v):
            out[f.name] = list(v)
        elif callable(getattr(v, "to_dict", None)):  # an option that is itself data (a USF schedule)
            out[f.name] = v.to_dict()
    return out


# Warm-up and lower-order-final policy, shared by the multistep builders ------------------------------------

def strictly_increasing(lam: np.ndarray) -> bool:
    """Whether λ is finite and strictly increasing (divided differences over these nodes are defined)."""
    return bool(np.all(np.isfinite(lam)) and np.all(np.diff(lam) > 0))


def multistep_order(order: int, i: int, available: int, nodes: Nodes, lower_order_final: bool,
                    lower_below: int | None = 15, euler_at_final: bool = False) -> int:
    """The order of multistep step i: at most ``available + 1`` (warm-up); with ``lower_order_final`` at most the
    number of steps left (diffusers lowers the final orders only below ``lower_below`` = 15 steps for DPM-Solver
    and DEIS, always for UniPC: ``lower_below=None``); 1 on the final step with ``euler_at_final``; and lowered
    until the nodes it spans (the target included) have finite, distinct λ — a zero final σ (λ = ∞) or a repeated
    timestep would make divided differences blow up."""
    n = nodes.num_steps
    p = min(order, available + 1)
    if lower_order_final and (lower_below is None or n < lower_below):
        p = min(p, n - i)
    if euler_at_final and i == n - 1:
        p = 1
    while p > 1 and not strictly_increasing(nodes.lam[i - p + 1:i + 2]):
        p -= 1
    return p


# Compilation ----------------------------------------------------------------------------------------------

def plan_shape(builder: Builder, transforms: Sequence[Transform] = ()) -> PlanShape:
    shape = PlanShape(builder.history, tuple(builder.registers), builder.data_form)
    for t in transforms:
        shape = t.shape(shape)
    return shape


def _scatter(combo: Combo, i: int, shape: PlanShape, out: np.ndarray, where: str) -> None:
    r, k = len(shape.registers), shape.history
    if len(combo.r) > r:
        raise AssertionError(f"{where}: reads register {len(combo.r) - 1} of {r}")
    out[SRC_X] += combo.x
    out[SRC_P] += combo.p
    out[SRC_Z] += combo.z
    for q, c in enumerate(combo.r):
        out[src_register(q)] += c
    for age, c in enumerate(combo.d):
        if c != 0.0:
            if age >= k:
                raise AssertionError(f"{where}: reads a prediction {age} steps back but history holds {k}")
            out[src_slot(r, (i - age) % k)] += c


def _check_rule(rule: Rule, i: int, available: int, shape: PlanShape, where: str) -> None:
    if len(rule.registers) != len(shape.registers):
        raise AssertionError(f"{where}: rule has {len(rule.registers)} register updates, plan has "
                             f"{len(shape.registers)} registers")
    for combo in rule.combos():
        if combo.oldest_age() > available:
            raise AssertionError(f"{where}: reads a prediction {combo.oldest_age()} steps back, {available} available")
        if available == 0 and combo.reads_registers():
            raise AssertionError(f"{where}: reads a register on a run's first step (nothing was written yet)")
    if rule.store is not None and rule.store.reads_age(0):
        raise AssertionError(f"{where}: the stored prediction reads itself")


def compile_plan(builder: Builder, nodes: Nodes, prediction_type: str, transforms: Sequence[Transform] = (),
                 meta: dict[str, Any] | None = None) -> Plan:
    """Evaluate the rules (base builder, then each transform) for every step and warm-up level."""
    shape = plan_shape(builder, transforms)
    n, k, r = nodes.num_steps, shape.history, len(shape.registers)
    levels = k  # available ∈ {0, …, K − 1}: more is never read
    coef = np.zeros((levels, n, OUT_REGISTERS + r, num_sources(r, k)))
    writes = np.zeros((levels, n, r), dtype=bool)
    name = type(builder).__name__
    for w in range(levels):
        for i in range(n):
            available = min(w, i)
            rule = builder.rule(i, available, nodes)
            if len(rule.registers) < r:  # registers added by transforms start unchanged
                rule = dataclasses.replace(rule, registers=rule.registers + (None,) * (r - len(rule.registers)))
            for t in transforms:
                rule = t.rewrite(rule, i, available, nodes, shape)
            where = f"{name} step {i} (level {w})"
            _check_rule(rule, i, available, shape, where)
            _scatter(rule.next, i, shape, coef[w, i, OUT_NEXT], where)
            if rule.store is None:
                coef[w, i, OUT_STORE, SRC_P] = 1.0
            else:
                _scatter(rule.store, i, shape, coef[w, i, OUT_STORE], where)
            for q, update in enumerate(rule.registers):
                if update is not None:
                    writes[w, i, q] = True
                    _scatter(update, i, shape, coef[w, i, OUT_REGISTERS + q], where)
    out_map = np.zeros((n, 2))
    for i in range(n):
        c = prediction_coefficients(prediction_type, shape.data_form, float(nodes.alpha[i]), float(nodes.sigma[i]))
        for t in transforms:
            c = t.output_map(*c, i, nodes, shape)
        out_map[i] = c
    if not (np.all(np.isfinite(coef)) and np.all(np.isfinite(out_map))):
        bad = int(np.argwhere(~np.isfinite(coef))[0][1]) if not np.all(np.isfinite(coef)) else \
            int(np.argwhere(~np.isfinite(out_map))[0][0])
        raise FloatingPointError(f"{name} produced non-finite coefficients at step {bad} "
                                 f"(α = {nodes.alpha[bad]:.3g}, σ = {nodes.sigma[bad]:.3g})")
    info = {"builder": name, "options": options_of(builder),
            "transforms": [{"name": t.name, **t.options()} for t in transforms],
            "prediction_type": prediction_type, **(meta or {})}
    return Plan(out_map=out_map, coef=coef, writes=writes, write_slot=np.arange(n) % k,
                timesteps=nodes.timesteps, rho=nodes.rho, flow=nodes.flow, data_form=shape.data_form,
                registers=shape.registers, meta=info)

