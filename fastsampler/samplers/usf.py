"""USF plan builder: the unified exponential-integrator update of S³ with per-step choices given as data.

USF / S³: Liu, Ning, Yang & Wang, ICLR 2024, arXiv 2312.07243 (the formulas below were checked against the
released ``uni_sampler.py`` of thu-nics/USF @ 5b89ef5; the paper's equation numbers are not verified here).
A step from node s to t (h = λ_t − λ_s) expands the chosen prediction F in λ to Taylor order n:

  data   x_t = (σ_t/σ_s) x_s + α_t Σ_{k<n} h^{k+1} φ_{k+1}(−h) F^(k)(λ_s),   F = x̂₀
  noise  x_t = (α_t/α_s) x_s − σ_t Σ_{k<n} h^{k+1} φ_{k+1}(h)  F^(k)(λ_s),   F = ε̂

(the k = 0 terms are ``ei_step``'s D0 weights, including the limits at σ_t = 0). Each derivative is estimated
from M earlier points j by the Taylor system ("Difference_M")

  Σ_{m=1}^{M} (Δλ_j^m / m!) F^(m) = F_j − F_s,   Δλ_j = λ_j − λ_s,

i.e. F^(k) ≈ Σ_j a_j (F_j − F_s) with a the solution of T a = e_k, T_{mj} = Δλ_j^m/m!, and F′ may be scaled by a
*relaxation* factor: 1 + r·h ("linear", the searched coefficient r) or, with hh = −h (data) / h (noise),
φ₁(hh)/(2φ₂(hh)) ("dpmsolver-2" = "unipc-bh2": DPM-Solver's midpoint and UniPC-bh2's a = ½), 1/(2φ₂(hh))
("unipc-bh1"), 1 ± ½(e^{hh} − 1) ("0.5exp", "-0.5exp").

A pseudo-corrector (UniC-style) re-does step s → t once the model has been evaluated at t, at order n + 1 with
the new point added to every derivative; the next step starts from the corrected state. As in ``unipc.py``, row i
applies the corrector of step i − 1 (from the register ``corrected``, the start state of step i − 1, using this
step's raw prediction P as the new point) and then the predictor of step i from the corrected state.

Plan form: one plan has one output map, so a schedule that mixes prediction types is run in data form (P = x̂₀)
and a noise-form step converts each prediction it reads, ε̂_j = (x̃_j − α_j x̂₀_j)/σ_j, with x̃_j the sample the model
saw at node j: X for this step's node, and the registers ``sample_1``, ``sample_2``, … (a delay line of X) for
earlier nodes. A schedule with only noise-form steps runs in noise form (P = ε̂) and needs none of them.

Analytical first step (``afs="zero_x0"``): step 0 stores ε̂₀ := x_T (data form: x̂₀ = (1 − σ₀)x_T/α₀) instead of the
model's prediction; the stock pipeline still calls the model there, and its output is not used.

History: a run that starts part-way (img2img) reaches step i with fewer earlier predictions than the step's
choices read; it then uses the choices of step ``available`` of the schedule — the ones a run from the start
makes with the same history. A step whose nodes are not strictly increasing in λ (the final step to σ = 0, a
repeated timestep) falls back to first order without corrector, as the other multistep builders do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fastsampler.samplers.dpmsolver import ei_step
from fastsampler.samplers.phi import phi
from fastsampler.samplers.rules import Combo, Nodes, Rule, strictly_increasing
from fastsampler.samplers.usf_schedule import Derivative, USFSchedule, USFStep


def taylor_weights(dlam: Sequence[float], k: int) -> np.ndarray:
    """a with Σ_j a_j Δλ_j^m/m! = δ_{mk} (m = 1..M): F^(k)(λ_s) ≈ Σ_j a_j (F_j − F_s), exact for polynomials of
    degree M (USF's "Difference_M")."""
    d = np.asarray(dlam, dtype=np.float64)
    m = np.arange(1, len(d) + 1)
    system = d[None, :] ** m[:, None] / np.array([math.factorial(int(v)) for v in m])[:, None]
    return np.linalg.solve(system, np.eye(len(d))[k - 1])


def relaxation_factor(kind: str | None, coefficient: float, h: float, hh: float) -> float:
    """USF's scaling of the first-derivative term (``relax_derivative``); h = λ_t − λ_s, hh the φ argument."""
    if kind is None:
        return 1.0
    if kind == "linear":
        return 1.0 + coefficient * h
    if kind in ("dpmsolver-2", "unipc-bh2"):
        return phi(1, hh) / (2.0 * phi(2, hh))  # ½ hh (e^{hh} − 1) / (e^{hh} − 1 − hh)
    if kind == "unipc-bh1":
        return 1.0 / (2.0 * phi(2, hh))  # ½ hh² / (e^{hh} − 1 − hh)
    if kind == "0.5exp":
        return 1.0 + 0.5 * math.expm1(hh)
    if kind == "-0.5exp":
        return 1.0 - 0.5 * math.expm1(hh)
    raise ValueError(f"unknown relaxation {kind!r}")


def taylor_update(nodes: Nodes, s: int, t: int, data: bool, order: int, derivatives: Sequence[Derivative],
                  start: Combo, value: Callable[[int], Combo]) -> Combo:
    """x_t = base·x_s + w_0 F_s + Σ_{k=1}^{n−1} w_k ρ_k F^(k), w_k = ±(α_t | σ_t) h^{k+1} φ_{k+1}(∓h); ``value(j)``
    is F at node j as a combination of the plan's sources."""
    w = ei_step("dpmsolver++" if data else "dpmsolver", nodes, s, t)
    f_s = value(s)
    out = w.base * start + w.c0 * f_s
    if order == 1:
        return out
    lam = nodes.lam
    h = float(lam[t] - lam[s])
    hh = -h if data else h
    scale = float(nodes.alpha[t]) if data else -float(nodes.sigma[t])
    for d in derivatives:
        a = taylor_weights([float(lam[s + p] - lam[s]) for p in d.points], d.k)
        w_k = scale * h ** (d.k + 1) * phi(d.k + 1, hh) * relaxation_factor(d.relaxation, d.coefficient, h, hh)
        for p, a_j in zip(d.points, a):
            out = out + (w_k * a_j) * value(s + p) + (-w_k * a_j) * f_s
    return out


def _one_hot(index: int, length: int) -> tuple[float, ...]:
    return tuple(1.0 if q == index else 0.0 for q in range(length))


@dataclass(frozen=True)
class USF:
    """The USF update for a schedule of per-step choices (``USFSchedule``)."""

    schedule: USFSchedule

    # Shape ------------------------------------------------------------------------------------------------
    @property
    def data_form(self) -> bool:
        """Noise form only when every step expands ε̂; otherwise x̂₀ (noise-form steps convert)."""
        return self.schedule.predictions != frozenset({"noise"})

    @property
    def sample_registers(self) -> int:
        """How many earlier samples x̃ noise-form steps of a data-form plan read (0: none)."""
        if not self.data_form:
            return 0
        noise = [s for s in self.schedule.steps if s.prediction == "noise"]
        return max((s.lookback + (s.corrector != "none") for s in noise), default=0)

    @property
    def registers(self) -> tuple[str, ...]:
        corrected = ("corrected",) if self.schedule.uses_corrector else ()
        return corrected + tuple(f"sample_{a}" for a in range(1, self.sample_registers + 1))

    @property
    def history(self) -> int:
        """K: the oldest prediction read (a corrector, one row later, reads one further back) plus this one."""
        return 1 + max(s.lookback + (s.corrector != "none") for s in self.schedule.steps)

    @property
    def order_of_accuracy(self) -> int:
        """The order of the steady-state steps: not the first K − 1 (the schedule's warm-up, lower-order by
        necessity, as in the other multistep builders), and the final step — which never has a corrector — only
        through its local error (one step of global order q errs by O(h^{q+1}))."""
        steps = self.schedule.steps
        return min([s.accuracy for s in steps[self.history - 1:-1]] + [steps[-1].accuracy + 1])

    # Choices ----------------------------------------------------------------------------------------------
    def choice(self, i: int, available: int, nodes: Nodes) -> USFStep:
        """Step i's choices given ``available`` earlier predictions (see the module docstring)."""
        if nodes.num_steps != self.schedule.num_steps:
            raise ValueError(f"the USF schedule has {self.schedule.num_steps} steps, the grid {nodes.num_steps}")
        step = self.schedule.steps[i]
        if step.lookback > available:
            step = self.schedule.steps[available]
        if step.order > 1 and not strictly_increasing(nodes.lam[i - step.lookback:i + 2]):
            return USFStep(1, step.prediction)
        return step

    # Rule -------------------------------------------------------------------------------------------------
    def _value(self, i: int, prediction: str, raw_new: bool, nodes: Nodes) -> Callable[[int], Combo]:
        """F at node j in row i: the prediction stored ``i − j`` steps ago (the raw P at j = i for a corrector),
        converted to ε̂ = (x̃ − α x̂₀)/σ for a noise-form step of a data-form plan."""
        r = len(self.registers)
        first_sample = r - self.sample_registers

        def value(j: int) -> Combo:
            age = i - j
            pred = Combo(p=1.0) if (age == 0 and raw_new) else Combo(d=_one_hot(age, age + 1))
            if prediction == "data" or not self.data_form:
                return pred
            a, s = float(nodes.alpha[j]), float(nodes.sigma[j])
            sample = Combo(x=1.0) if age == 0 else Combo(r=_one_hot(first_sample + age - 1, r))
            return (1.0 / s) * sample + (-a / s) * pred

        return value

    def _store(self, i: int, nodes: Nodes) -> Combo | None:
        """The analytical first step: ε̂₀ := x_T instead of the model's prediction (None: store P)."""
        if i != 0 or self.schedule.afs != "zero_x0":
            return None
        if not self.data_form:
            return Combo(x=1.0)
        return Combo(x=(1.0 - float(nodes.sigma[0])) / float(nodes.alpha[0]))

    def _corrected(self, i: int, available: int, nodes: Nodes) -> Combo | None:
        """The state at node i corrected with this row's evaluation (None: step i − 1 has no corrector)."""
        if available == 0:
            return None
        prev = self.choice(i - 1, available - 1, nodes)
        derivatives = prev.correction()
        if derivatives is None:
            return None
        reach = max(-p for d in derivatives for p in (0, *d.points))  # nodes before the corrected step's start
        if not strictly_increasing(nodes.lam[i - 1 - reach:i + 1]):
            return None
        start = Combo(r=_one_hot(0, len(self.registers)))  # "corrected" is register 0
        return taylor_update(nodes, i - 1, i, prev.prediction == "data", prev.order + 1, derivatives, start,
                             self._value(i, prev.prediction, True, nodes))

    def _register_updates(self, available: int, start: Combo) -> tuple[Combo | None, ...]:
        r = len(self.registers)
        updates: list[Combo | None] = [start] if self.schedule.uses_corrector else []
        first = len(updates)
        for a in range(1, self.sample_registers + 1):
            if a == 1:
                updates.append(Combo(x=1.0))
            elif available >= a - 1:  # sample_a ← sample_{a−1}; nothing to shift on a run's first rows
                updates.append(Combo(r=_one_hot(first + a - 2, r)))
            else:
                updates.append(None)
        return tuple(updates)

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        step = self.choice(i, available, nodes)
        corrected = self._corrected(i, available, nodes)
        start = corrected if corrected is not None else Combo(x=1.0)
        nxt = taylor_update(nodes, i, i + 1, step.prediction == "data", step.order, step.predictor(), start,
                            self._value(i, step.prediction, False, nodes))
        return Rule(nxt, store=self._store(i, nodes), registers=self._register_updates(available, start))
