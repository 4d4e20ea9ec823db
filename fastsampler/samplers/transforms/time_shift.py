"""The Time-Shift sampler (TS-DPM; Li, Qu, Yao, Sun & Moens, ICLR 2024, arXiv 2305.15583) as candidate plan rows.

Exposure bias: at sampling time the network sees states made by its own earlier, imperfect steps, whose statistics
differ from those of the training marginal at the nominal time. The paper's Algorithm 3 ("Time-Shift Sampler")
therefore conditions the next network call on the time whose noise level best matches the current sample:

    t_s = argmin_{τ ∈ [t − w/2, t + w/2]} | var(x_{t−1}) − σ_τ² |,      σ_τ² = 1 − ᾱ_τ        (Alg. 3, lines 7–9)
    ε = ε_θ(x_t, t_s), and the sampling step is taken "with t_s" as the current time             (Alg. 3, lines 4–6)

only while t > t_c (the cutoff; below it every time looks alike and the nominal time is kept). var(x) is one number
per sample: the unbiased variance over all of that sample's entries (the released code's
``torch.var(x.view(B, -1), dim=-1)``), so each sample gets its own time.

How it runs on the plan engine. For a fixed grid every step is a plan row; a shifted time changes the row. So the
rows for every candidate time are compiled once, in ``set_timesteps``, into a table with a *candidate axis*:
candidate c of row r is the plan's row r with one node moved to the time τ_c = t_j + o_c, o_c ∈ {−⌊w/2⌋, …, ⌊w/2⌋}
(the window on the model's training timesteps; o = 0 is the plan's own row). During sampling the statistic and the
argmin run on the device and the row is gathered by a tensor index: no host read.

Two modes (``time_shift_mode``):

* ``"input"`` (default; the paper's Algorithm 3): node j of row j is moved to τ — the network is called at τ and the
  update treats the sample as sitting at τ (its α_τ, σ_τ convert the output, its λ_τ starts the step to the next
  grid node). After step j − 1 the variance of the new sample x_j selects τ among the candidates around t_j.
* ``"target"`` (the released ``pnm_solver`` code, for reproduction): the network keeps its nominal times; the
  *target* node j + 1 of row j is moved to τ chosen from var(x_j) among the candidates around t_{j+1}, i.e. the step
  lands at τ and the next row starts from the nominal node again. Not on a run's first step (as the code).
  Because var(x_j) ≥ σ²_{t_j} > σ²_τ for τ near t_{j+1} on data with variance, the argmin sits at the upper edge
  of the window unless the sample variance is well below nominal: close to a fixed +⌊w/2⌋ shift of each target.

The window is centred on the next grid time (the paper writes it around t on the full 1000-step series, where
t and t − 1 are adjacent; the released code centres it on t_next), and the cutoff compares that nominal time with
t_c (the code's ``t_next > cut_off_value``). Candidates must stay strictly between the neighbouring grid nodes (in λ)
and inside the training range; where they do not (a window wider than the grid stride, the first and final nodes,
nodes at or below the cutoff) they are not candidates.

Statistic (generalised, ``time_shift_data_variance`` = v₀): the expected per-sample variance of
x_τ = α_τ x₀ + σ_τ ε is α_τ² v₀ + σ_τ² when v₀ is the mean over the data of a sample's own variance over its entries.
v₀ = 0 (default) is the paper's 1 − ᾱ_τ; the paper derives its rule for large t, where α_τ² v₀ is negligible
(Theorem 3.1 drops it), and the reference note's pitfall 4 suggests v₀ for latent and guided models. For VP models
with v₀ = 1 every time has variance 1: the rule then has nothing to go on (refused).

Multistep history: the shifted time enters only the row it selects. Earlier predictions stay at their nominal λ in
later rows (a table over the shifts of every history node would have C^k rows); a shift is a few training steps,
a small fraction of a grid interval. For solvers with one state (DPM-Solver(++) multistep, DEIS) the sample itself
is then re-timed: on exact data whose variance is off by a factor k the mismatch is gone after one shifted step
(tests/test_time_shift.py). Solvers that later integrate again from a *saved* state — UniPC's corrector (register
``corrected``) and singlestep macro steps (``macro_start``) — start that integration at the saved state's nominal
node, so the re-timing is lost at the next macro step, and with UniPC's corrector the mismatch compounds
(k = 1.009 → 1.048 after four shifted steps on exact data); ``warn_if_state_is_resumed`` says so.

Candidate rows are compiled with the scheduler's own builder and transforms, each row on a grid where only its own
node moved: one compilation per window offset (``candidate_rows``), cached with the plan.

Where the chosen time reaches the model (``fastsampler.adapters.scheduler``). Pipelines run
``for t in scheduler.timesteps`` and hand the model ``t``, a view into ``scheduler.timesteps``, after the previous
``step()`` returned; so step j − 1 writes the chosen time of step j into ``scheduler.timesteps[j]`` in place, on the
device, and the model reads it. Step j then gathers the candidate row *of the time it is passed* (the ``timestep``
argument, which pipelines give both the model and ``step()``), so row and model always agree. Limits:

* One time per model call: a pipeline passes one timestep for the batch, so the batch gets one time, chosen from
  the mean of the per-sample variances (classifier-free guidance: both halves share it, as they share the latents).
  The paper's per-sample times need a loop that conditions the model per sample: ``per_sample_timesteps(B)`` gives
  them (pass the same tensor to the model and to ``step()``); the bench and the pipelines use the batch time.
* A pipeline that keeps ``timesteps`` in host memory while sampling on an accelerator (``DDPMPipeline`` calls
  ``set_timesteps`` without a device) passes the model a host value: writing it costs one device→host copy per step.
* A loop that copies the timesteps before it starts (``.tolist()``, its own ``.to(device)``) never shows the model a
  shifted time; since the row follows the time passed to ``step()``, such a run is the plain solver.
* After a run ``scheduler.timesteps`` holds the times the model was given; ``set_timesteps`` restores the grid.
* Not combined with ``thresholding`` or with an installed plan (``set_plan``, tuned folders): both refused by name.
* The statistic's resolution: near t = T neighbouring training times differ in σ² by ~β_t ᾱ_t (≈ 5e-6 at t = 900
  on the linear schedule), far below the sampling error of a variance over D entries (≈ √(2/D) relative), so there
  the choice follows noise, mostly to the window's edges; the cutoff only removes the small-t end.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fastsampler.plans.format import OUT_NEXT, Plan, RowView, src_register
from fastsampler.samplers.rules import Nodes, PlanShape, Rule, Transform, compile_plan
from fastsampler.schedules.noise import alpha_sigma_from_rho
from fastsampler.warn import warn

MODES = ("input", "target")
#: Defaults from the authors' DPM-Solver setting (TS-DPM README: DPM-Solver, 5 steps, ``--window_size 30
#: --cut_off_value 300``); the paper's DDIM ablation (Fig. 7) also finds t_c = 300 best at 20 and 50 steps and
#: w = 30 best at 20 steps. The paper's DDIM windows for other step counts: 40 (10 steps), 8 (50), 2 (100).
DEFAULT_WINDOW = 30
DEFAULT_CUTOFF = 300
#: A candidate must differ in λ from the neighbouring nodes by more than rounding (adjacent training times differ by
#: ≳ 1e-3): one on a neighbour's time would make a zero-length step.
LAMBDA_GAP = 1e-9
#: Registers holding a sample that a later row integrates from again (see "Multistep history" above).
STATE_REGISTERS = ("corrected", "macro_start")


@dataclass(frozen=True)
class TimeShiftOptions:
    """The Time-Shift options of a scheduler config (``time_shift_*``)."""

    window: int = DEFAULT_WINDOW  # w: candidates t ± ⌊w/2⌋ (training timesteps)
    cutoff: float = DEFAULT_CUTOFF  # t_c: shift only where the nominal time exceeds it
    mode: str = "input"
    data_variance: float = 0.0  # v₀ in α_τ² v₀ + σ_τ²

    @property
    def half(self) -> int:
        return self.window // 2


def options_from_config(config: Mapping[str, Any]) -> TimeShiftOptions | None:
    """The checked options, or None when Time-Shift is off (``time_shift=False``, or a window below 2, which
    holds the nominal time only). Errors name the option."""
    on = config.get("time_shift", False)
    window, cutoff = config.get("time_shift_window"), config.get("time_shift_cutoff")
    mode, v0 = config.get("time_shift_mode", "input"), config.get("time_shift_data_variance", 0.0)
    if not isinstance(on, bool):
        raise ValueError(f"`time_shift` must be True or False, got {on!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0):
        raise ValueError(f"`time_shift_window` must be a non-negative integer (training timesteps), got {window!r}")
    if cutoff is not None and (isinstance(cutoff, bool) or not isinstance(cutoff, (int, float, np.integer, np.floating))
                               or not math.isfinite(cutoff) or cutoff < 0):
        raise ValueError(f"`time_shift_cutoff` must be a finite timestep ≥ 0, got {cutoff!r}")
    if mode not in MODES:
        raise ValueError(f"`time_shift_mode` must be one of {MODES}, got {mode!r}")
    if isinstance(v0, bool) or not isinstance(v0, (int, float, np.integer, np.floating)) or not math.isfinite(v0) \
            or v0 < 0:
        raise ValueError(f"`time_shift_data_variance` must be a finite number ≥ 0, got {v0!r}")
    if not on:
        given = [name for name, value, default in (("time_shift_window", window, None), ("time_shift_cutoff", cutoff, None),
                                                   ("time_shift_mode", mode, "input"),
                                                   ("time_shift_data_variance", v0, 0.0)) if value != default]
        if given:
            raise ValueError(f"`{given[0]}` is set but `time_shift=False`; pass time_shift=True to use it")
        return None
    if config.get("thresholding"):
        raise ValueError("`time_shift=True` cannot be combined with `thresholding=True` (the clamp would need the "
                         "shifted node's x̂₀ map); turn one of them off")
    if v0 == 1.0 and not config.get("use_flow_sigmas"):
        raise ValueError("`time_shift_data_variance=1` makes every time's variance α²·1 + σ² = 1 on a VP schedule: "
                         "the statistic cannot tell times apart; use a value measured on your data")
    options = TimeShiftOptions(DEFAULT_WINDOW if window is None else int(window),
                               DEFAULT_CUTOFF if cutoff is None else float(cutoff), mode, float(v0))
    return options if options.half > 0 else None


def expected_variance(alpha: np.ndarray, sigma: np.ndarray, data_variance: float) -> np.ndarray:
    """α² v₀ + σ²: the expected per-sample variance of x = α x₀ + σ ε (v₀ = 0: the paper's σ² = 1 − ᾱ)."""
    return np.asarray(alpha) ** 2 * data_variance + np.asarray(sigma) ** 2


def _node_at_lambda(lam: np.ndarray, flow: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ρ, α, σ) of nodes at half-log-SNR λ = log(α/σ): VP ρ = σ/α = e^{−λ}; flow s = σ = 1/(1 + e^λ)."""
    rho = 1.0 / (1.0 + np.exp(lam)) if flow else np.exp(-lam)
    alpha, sigma = alpha_sigma_from_rho(rho, flow)
    return rho, alpha, sigma


def _moved(nodes: Nodes, at: np.ndarray, times: np.ndarray, lam: np.ndarray) -> Nodes:
    """``nodes`` with node ``at[k]`` moved to model time ``times[k]`` at λ ``lam[k]``."""
    ts, rho, alpha, sigma, lams = (np.array(a, dtype=np.float64) for a in
                                   (nodes.timesteps, nodes.rho, nodes.alpha, nodes.sigma, nodes.lam))
    ts[at] = times
    rho[at], alpha[at], sigma[at] = _node_at_lambda(lam, nodes.flow)
    lams[at] = lam
    return Nodes(ts, rho, alpha, sigma, lams, nodes.flow)


def union_row(rows: list[RowView]) -> RowView:
    """One kernel row serving every candidate of a row: the first row with the union of what the candidates read
    (the fused kernel's flags say which sources to load; a source a candidate does not use has weight 0 there)."""
    first = rows[0]
    store = next((r.store_terms for r in rows if r.store_terms is not None), None)
    return dataclasses.replace(
        first, store_terms=store, uses_noise=any(r.uses_noise for r in rows),
        kernel_registers=int(np.bitwise_or.reduce([r.kernel_registers for r in rows])),
        kernel_slots=int(np.bitwise_or.reduce([r.kernel_slots for r in rows])))


@dataclass(frozen=True, eq=False)
class CandidateRows:
    """The rows of every candidate time, for one plan (N steps, W warm-up levels, C = 2⌊w/2⌋ + 1 candidates).

    Row r's candidate c moves node r (input mode) or r + 1 (target mode) to the model time ``times[r, c]``;
    ``plans[c]`` holds candidate c of every row (rows without that candidate keep the plan's own), ``plans[center]``
    is the plan itself. ``variance[r, c]`` is the statistic's target α_τ² v₀ + σ_τ² (+∞ where c is no candidate;
    rows that cannot shift have only the centre, at 0, so an argmin over them always returns it).
    """

    options: TimeShiftOptions
    offsets: np.ndarray  # (C,) int
    times: np.ndarray  # (N, C) float64 model times (the nominal time + offset)
    valid: np.ndarray  # (N, C) bool
    variance: np.ndarray  # (N, C) float64
    plans: tuple[Plan, ...]  # (C,)

    @property
    def center(self) -> int:
        return self.options.half

    @property
    def num_candidates(self) -> int:
        return len(self.offsets)

    @cached_property
    def shiftable(self) -> np.ndarray:
        """(N,) bool: rows with a candidate besides their own time."""
        others = np.delete(self.valid, self.center, axis=1)
        return others.any(axis=1)

    def index_of(self, time: float, r: int) -> int:
        """The candidate of row r whose time is ``time`` (host value; clamped to the window)."""
        return int(min(max(round(time - self.times[r, 0]), 0), self.num_candidates - 1))

    @cached_property
    def dense(self) -> np.ndarray:
        """(W, N, C, L) float64: ``Plan.dense`` of every candidate (the torch and traced paths)."""
        return np.stack([p.dense for p in self.plans], axis=2)

    @cached_property
    def packed(self) -> np.ndarray:
        """(W, N, C, L′) float32: ``Plan.packed`` of every candidate (the fused kernel reads a gathered row)."""
        return np.stack([p.packed for p in self.plans], axis=2)

    @cached_property
    def kernel_rows(self) -> tuple[tuple[RowView, ...], ...]:
        """``[w][r]``: one fused-kernel row view per plan row, valid for every candidate (``union_row``)."""
        return tuple(tuple(union_row([self.plans[c].rows[w][r] for c in np.flatnonzero(self.valid[r])])
                           for r in range(len(self.times))) for w in range(self.plans[0].levels))


def warn_if_state_is_resumed(plan: Plan) -> None:
    """Warn when ``plan``'s rows integrate again from a saved state (``STATE_REGISTERS``): the shift then reaches the
    network but does not re-time the sample."""
    resumed = [name for q, name in enumerate(plan.registers)
               if name in STATE_REGISTERS and np.any(plan.coef[:, :, OUT_NEXT, src_register(q)] != 0.0)]
    if resumed:
        warn(f"time_shift: this solver integrates again from a saved state (register {resumed[0]!r}: UniPC's "
             "corrector or a singlestep macro step), which starts at its nominal time, so the shift reaches "
             "the network but the sample is not re-timed (with UniPC's corrector a variance mismatch grows); "
             "DPMSolverPlusPlusScheduler (multistep) or DEISScheduler give the paper's behaviour")


@dataclass(frozen=True)
class _RowGrids:
    """A builder whose step i is ``builder``'s step i evaluated on its own grid ``grids[i]``."""

    builder: Any
    grids: tuple[Nodes, ...]

    @property
    def data_form(self) -> bool:
        return self.builder.data_form

    @property
    def history(self) -> int:
        return self.builder.history

    @property
    def registers(self) -> tuple[str, ...]:
        return tuple(self.builder.registers)

    @property
    def order_of_accuracy(self) -> int:
        return self.builder.order_of_accuracy

    def rule(self, i: int, available: int, nodes: Nodes) -> Rule:
        return self.builder.rule(i, available, self.grids[i])


@dataclass(frozen=True)
class _RowGridsTransform(Transform):
    """``transform`` with step i's output map and rule rewritten on the grid ``grids[i]``."""

    transform: Transform
    grids: tuple[Nodes, ...]

    def shape(self, shape: PlanShape) -> PlanShape:
        return self.transform.shape(shape)

    def output_map(self, c_x: float, c_o: float, i: int, nodes: Nodes, shape: PlanShape) -> tuple[float, float]:
        return self.transform.output_map(c_x, c_o, i, self.grids[i], shape)

    def rewrite(self, rule: Rule, i: int, available: int, nodes: Nodes, shape: PlanShape) -> Rule:
        return self.transform.rewrite(rule, i, available, self.grids[i], shape)


def candidate_rows(plan: Plan, nodes: Nodes, builder: Any, transforms: Sequence[Transform], prediction_type: str,
                   lambda_at: Callable[[np.ndarray], np.ndarray], time_range: tuple[float, float],
                   options: TimeShiftOptions) -> CandidateRows:
    """The candidate rows of ``plan``, which ``builder`` and ``transforms`` (the scheduler's) compiled from ``nodes``.
    ``lambda_at``: the schedule's λ at model times; ``time_range``: the model's training times.

    A moved node keeps the grid's own offset from the schedule: λ_τ = λ_j + λ(τ) − λ(t_j) (= λ(τ) on grids whose
    nodes are the schedule at their timesteps). One compilation per offset: each row is evaluated on a grid where only
    its own node moved (``_RowGrids``), exactly as if it were compiled alone."""
    n, h = plan.num_steps, options.half
    offsets = np.arange(-h, h + 1)
    target = options.mode == "target"
    node = np.arange(n) + int(target)  # the node each row moves
    inner = (node >= 1) & (node <= n - 1)  # never the start (exact prior) or the final level
    j = np.clip(node, 1, n - 1)
    nominal = nodes.timesteps[np.minimum(node, n - 1)]  # (the final level has no model time; never moved)
    times = nominal[:, None] + offsets[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = nodes.lam[j][:, None] + lambda_at(times) - lambda_at(nominal)[:, None]
        valid = (inner & (nominal > options.cutoff))[:, None] & np.isfinite(lam) \
            & (times >= time_range[0]) & (times <= time_range[1]) \
            & (lam - nodes.lam[j - 1][:, None] > LAMBDA_GAP) & (nodes.lam[j + 1][:, None] - lam > LAMBDA_GAP)
    valid[:, h] = True
    variance = np.full(times.shape, np.inf)
    _, alpha, sigma = _node_at_lambda(np.where(valid, lam, 0.0), nodes.flow)
    variance[valid] = expected_variance(alpha, sigma, options.data_variance)[valid]
    own = expected_variance(nodes.alpha[node], nodes.sigma[node], options.data_variance)
    variance[:, h] = np.where(valid.sum(axis=1) > 1, own, 0.0)
    plans = []
    for c, offset in enumerate(offsets):
        rows = np.flatnonzero(valid[:, c])
        if c == h or len(rows) == 0:
            plans.append(plan)
            continue
        grids = [nodes] * n
        for r in rows:
            grids[r] = _moved(nodes, node[r:r + 1], times[r:r + 1, c], lam[r:r + 1, c])
        # The output map of row r reads node r: moved in input mode, the plan's own in target mode.
        outer = nodes if target else _moved(nodes, node[rows], times[rows, c], lam[rows, c])
        try:
            moved = compile_plan(_RowGrids(builder, tuple(grids)), outer, prediction_type,
                                 [_RowGridsTransform(t, tuple(grids)) for t in transforms])
        except (FloatingPointError, ValueError) as exc:
            raise ValueError(f"`time_shift_window`: the candidate times {times[rows, c].tolist()} (offset {offset}) "
                             f"give unusable coefficients ({exc}); use a smaller window") from None
        if not np.array_equal(moved.writes, plan.writes):
            raise AssertionError("moving a node changed which registers the rows write")
        coef, out_map = plan.coef.copy(), plan.out_map.copy()
        coef[:, rows], out_map[rows] = moved.coef[:, rows], moved.out_map[rows]
        plans.append(Plan(out_map=out_map, coef=coef, writes=plan.writes, write_slot=plan.write_slot,
                          timesteps=plan.timesteps, rho=plan.rho, flow=plan.flow, data_form=plan.data_form,
                          registers=plan.registers, meta={"time_shift_offset": int(offset)}))
    return CandidateRows(options, offsets, times, valid, variance, tuple(plans))
