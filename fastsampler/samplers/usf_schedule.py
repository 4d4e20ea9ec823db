"""A USF / S³ solver schedule as data: per-step choices (and optional time points) with a versioned JSON form.

USF (Liu, Ning, Yang & Wang, "A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic
Models", ICLR 2024, arXiv 2312.07243) describes a sampler as a sequence of per-step decisions; S³ searches them.
The choices here are those of the released search space (thu-nics/USF @ 5b89ef5, ``uni_sampler.py`` and
``utils/search_utils.py``; the paper's section numbers are not verified here):

* ``order`` n — the Taylor order of the exponential-integrator expansion (1–4);
* ``prediction`` — expand the data prediction x̂₀ ("data") or the noise prediction ε̂ ("noise");
* ``estimate`` M — how many earlier predictions estimate the first derivative ("low-order derivative estimation";
  default n − 1); the higher derivatives always use the n − 1 previous ones;
* ``relaxation`` / ``coefficient`` — the scaling of the first-derivative term: "linear" (1 + r·h, the searched
  coefficient r) or one of USF's analytic factors ("dpmsolver-2", "unipc-bh1", "unipc-bh2", "0.5exp", "-0.5exp");
* ``corrector`` — "none" or "pseudo": UniC-style, the next evaluation re-does this step at order n + 1 (each
  derivative gains the new point; no extra model evaluation). ``corrector_relaxation`` scales the corrector's
  first derivative (the released search leaves it None; UniPC's UniC-1 is "unipc-bh1" / "unipc-bh2");
* ``afs`` (per schedule) — analytical first step "zero_x0": the first prediction is ε̂ := x_T, not the model's.

Time points (optional): ``timesteps`` (model timesteps of the N evaluation points, as diffusers'
``set_timesteps(timesteps=…)``) or ``sigmas`` (as ``set_timesteps(sigmas=…)``). Without them the schedule runs on
the scheduler's own grid of N steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

FORMAT = "fastsampler-usf/1"
PREDICTIONS = ("data", "noise")
RELAXATIONS = ("linear", "dpmsolver-2", "unipc-bh1", "unipc-bh2", "0.5exp", "-0.5exp")
CORRECTORS = ("none", "pseudo")
AFS = (None, "zero_x0")
MAX_ORDER = 4  # the released space's Taylor orders (a pseudo-corrector then has order 5)

Points = tuple[int, ...]  # node offsets from a step's start node s: −1 = node s − 1, … ; +1 = its target (correctors)


@dataclass(frozen=True)
class Derivative:
    """How an update estimates F^(k)(λ_s): a Taylor system over the points (USF "Difference_M", M = len(points)),
    its result scaled by the relaxation factor (first derivative only)."""

    k: int
    points: Points
    relaxation: str | None = None
    coefficient: float = 0.0


@dataclass(frozen=True)
class USFStep:
    """The choices of one step (node s → s + 1). ``None`` / defaults are the plain multistep choices."""

    order: int = 1
    prediction: str = "data"
    estimate: int | None = None
    relaxation: str | None = None
    coefficient: float = 0.0
    corrector: str = "none"
    corrector_relaxation: str | None = None
    corrector_coefficient: float = 0.0

    def check(self, where: str = "step") -> None:
        """Refuse a choice outside the space, naming it."""
        n = self.order
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_ORDER:
            raise ValueError(f"{where}: `order` must be an integer in 1..{MAX_ORDER}, got {n!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"{where}: `prediction` must be one of {PREDICTIONS}, got {self.prediction!r}")
        m = self.estimate
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n - 1):
            raise ValueError(f"{where}: `estimate` (points for the first derivative) must be an integer in "
                             f"1..{n - 1} for order {n}, or None, got {m!r}")
        if self.corrector not in CORRECTORS:
            raise ValueError(f"{where}: `corrector` must be one of {CORRECTORS}, got {self.corrector!r}")
        _check_relaxation(where, "relaxation", self.relaxation, self.coefficient, has_derivative=n > 1)
        _check_relaxation(where, "corrector_relaxation", self.corrector_relaxation, self.corrector_coefficient,
                          has_derivative=self.corrector == "pseudo")

    # The updates this step makes -------------------------------------------------------------------------
    def predictor(self) -> tuple[Derivative, ...]:
        """The derivatives of the predictor: F′ from the ``estimate`` previous nodes, F^(k ≥ 2) from n − 1."""
        n = self.order
        full = tuple(range(-1, -n, -1))
        first = full if self.estimate is None else tuple(range(-1, -self.estimate - 1, -1))
        return tuple(Derivative(k, first if k == 1 else full, self.relaxation if k == 1 else None,
                                self.coefficient if k == 1 else 0.0) for k in range(1, n))

    def correction(self) -> tuple[Derivative, ...] | None:
        """The pseudo-corrector's derivatives (order n + 1), derived as USF's ``get_corrector_mutate``: every
        predictor derivative gains the new point (+1), and F^(n) uses the last one's points; None: no corrector."""
        if self.corrector == "none":
            return None
        grown = [d.points + (1,) for d in self.predictor()] or [(1,)]
        grown.append(grown[-1])
        return tuple(Derivative(k, grown[k - 1], self.corrector_relaxation if k == 1 else None,
                                self.corrector_coefficient if k == 1 else 0.0) for k in range(1, self.order + 1))

    @property
    def lookback(self) -> int:
        """How many earlier predictions the step reads, counted from its start node: the predictor's points and
        the corrector's points before the start (the corrector runs one row later, where each is one age older)."""
        ages = [-p for d in self.predictor() for p in d.points]
        ages += [-p for d in self.correction() or () for p in d.points if p < 0]
        return max(ages, default=0)

    @property
    def accuracy(self) -> int:
        """The global order a run of such steps attains: the Taylor order, each derivative's estimate (M points
        → order M + 1), 2 under a relaxation that is not 1 + O(h²); a corrector adds one to the predictor's."""
        pred = _update_accuracy(self.order, self.predictor())
        corr = self.correction()
        return pred if corr is None else min(pred + 1, _update_accuracy(self.order + 1, corr))

    # JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Only the fields that differ from their defaults (order and prediction always)."""
        out: dict[str, Any] = {"order": self.order, "prediction": self.prediction}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in out and v != f.default:
                out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "step") -> "USFStep":
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where} must be a JSON object, got {obj!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a step has {sorted(names)}")
        step = cls(**{k: (float(v) if k.endswith("coefficient") and isinstance(v, int) and not isinstance(v, bool)
                          else v) for k, v in obj.items()})
        step.check(where)
        return step


def _check_relaxation(where: str, name: str, kind: str | None, coefficient: float, has_derivative: bool) -> None:
    coef_name = name.replace("relaxation", "coefficient")
    if kind is not None and kind not in RELAXATIONS:
        raise ValueError(f"{where}: `{name}` must be one of {RELAXATIONS} or None, got {kind!r}")
    if kind is not None and not has_derivative:
        raise ValueError(f"{where}: `{name}` scales a first derivative, which this "
                         f"{'first-order step' if name == 'relaxation' else 'step without corrector'} does not have")
    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) or not math.isfinite(coefficient):
        raise ValueError(f"{where}: `{coef_name}` must be a finite number, got {coefficient!r}")
    if coefficient != 0.0 and kind != "linear":
        raise ValueError(f"{where}: `{coef_name}` ({coefficient}) is the slope of a 'linear' relaxation; `{name}` is "
                         f"{kind!r}")


def _update_accuracy(order: int, derivatives: Sequence[Derivative]) -> int:
    acc = order
    for d in derivatives:
        acc = min(acc, len(d.points) + 1)
        exact = d.relaxation is None or (d.relaxation == "linear" and d.coefficient == 0.0)
        if not exact:
            acc = min(acc, 2)
    return acc


def _floats(values: Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"USF schedule: `{name}` must be a list of numbers, got {values!r}")
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"USF schedule: `{name}` must be finite")
    return out


@dataclass(frozen=True)
class USFSchedule:
    """Per-step choices for N steps, the analytical first step, and optional time points."""

    steps: tuple[USFStep, ...]
    afs: str | None = None
    timesteps: tuple[float, ...] | None = None
    sigmas: tuple[float, ...] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "timesteps", _floats(self.timesteps, "timesteps"))
        object.__setattr__(self, "sigmas", _floats(self.sigmas, "sigmas"))
        self.check()

    def check(self) -> None:
        n = len(self.steps)
        if n == 0:
            raise ValueError("USF schedule: `steps` must not be empty")
        for j, step in enumerate(self.steps):
            if not isinstance(step, USFStep):
                raise ValueError(f"USF schedule: steps[{j}] must be a USFStep, got {type(step).__name__}")
            step.check(f"USF schedule steps[{j}]")
            if step.lookback > j:
                raise ValueError(f"USF schedule steps[{j}]: its choices (order {step.order}, estimate "
                                 f"{step.estimate}, corrector {step.corrector!r}) read {step.lookback} earlier "
                                 f"predictions, but a run from the start has only {j} there")
        if self.steps[-1].corrector != "none":
            raise ValueError(f"USF schedule steps[{n - 1}]: the final step cannot have a corrector (no model "
                             "evaluation follows it)")
        if self.afs not in AFS:
            raise ValueError(f"USF schedule: `afs` must be one of {AFS}, got {self.afs!r}")
        if self.timesteps is not None and self.sigmas is not None:
            raise ValueError("USF schedule: give `timesteps` or `sigmas`, not both")
        if self.timesteps is not None and len(self.timesteps) != n:
            raise ValueError(f"USF schedule: `timesteps` has {len(self.timesteps)} entries for {n} steps")
        if self.sigmas is not None and len(self.sigmas) - (self.sigmas[-1:] == (0.0,)) != n:
            raise ValueError(f"USF schedule: `sigmas` has {len(self.sigmas)} entries for {n} steps (N, or N + 1 "
                             "with a trailing 0)")

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def uses_corrector(self) -> bool:
        return any(s.corrector != "none" for s in self.steps)

    @property
    def predictions(self) -> frozenset[str]:
        return frozenset(s.prediction for s in self.steps)

    # JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "afs": self.afs, "steps": [s.to_dict() for s in self.steps]}
        for name in ("timesteps", "sigmas"):
            if getattr(self, name) is not None:
                out[name] = list(getattr(self, name))
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "USFSchedule":
        if not isinstance(obj, Mapping):
            raise ValueError(f"not a USF schedule: expected a JSON object, got {type(obj).__name__}")
        if obj.get("format") != FORMAT:
            raise ValueError(f"not a USF schedule: `format` is {obj.get('format')!r}, expected {FORMAT!r}")
        unknown = sorted(set(obj) - {"format", "afs", "steps", "timesteps", "sigmas", "meta"})
        if unknown:
            raise ValueError(f"USF schedule: unknown key(s) {unknown}")
        steps = obj.get("steps")
        if not isinstance(steps, Sequence) or isinstance(steps, (str, bytes)):
            raise ValueError("USF schedule: `steps` must be a list of step objects")
        return cls(tuple(USFStep.from_dict(s, f"USF schedule steps[{j}]") for j, s in enumerate(steps)),
                   afs=obj.get("afs"), timesteps=obj.get("timesteps"), sigmas=obj.get("sigmas"),
                   meta=dict(obj.get("meta") or {}))

    @classmethod
    def from_json(cls, text: str) -> "USFSchedule":
        """``from_dict`` of the parsed text (invalid JSON raises ``json.JSONDecodeError``, a ValueError)."""
        return cls.from_dict(json.loads(text))
