"""The plan format: every solver run as one table of linear-combination coefficients.

For a fixed noise schedule and grid, step i (node i → i+1) of every solver here is linear in these *sources*:

    X          the current sample
    P          this step's prediction, from the model output O by the *output map*  P = c_x·X + c_o·O
               (x̂₀ for data-form solvers, ε̂ for noise-form ones; a thresholding hook may replace it)
    Z          fresh Gaussian noise (SDE rows)
    R_0…R_{R−1}  state registers: UniPC's corrected sample, a singlestep macro-step start, a momentum velocity, …
    H_0…H_{K−1}  history slots: the stored predictions of earlier steps (step i stores into slot ``write_slot[i]``)

and a row computes these *outputs*, each a linear combination of the sources:

    D̂      the prediction this step stores into its history slot (usually P itself; DC-Solver or momentum store a
            mix of P, registers and older slots). D̂ never reads its own slot.
    X_next  the next sample (reading the write slot means reading D̂)
    R'_r    the new value of register r, on rows that write it (others keep their value)

``Plan`` holds the tables; ``RowView`` is one row with everything a kernel needs precomputed (non-zero terms as
Python floats for the torch path, a packed float32 row and flags for the fused kernel). Both are built once per
plan. The layout constants live here and nowhere else.

JSON: format ``fastsampler-plan/2``; version-1 files (one saved register S, tables ``conv``/``x_coef``/``s_coef``)
still load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

FORMAT = "fastsampler-plan/2"
FORMAT_V1 = "fastsampler-plan/1"

# Sources: X, P, Z, then R registers, then K history slots.
SRC_X, SRC_P, SRC_Z, SRC_REGISTERS = 0, 1, 2, 3
# Outputs: the stored prediction D̂, X_next, then one row per register.
OUT_STORE, OUT_NEXT, OUT_REGISTERS = 0, 1, 2

Terms = tuple[tuple[int, float], ...]


def num_sources(registers: int, slots: int) -> int:
    return SRC_REGISTERS + registers + slots


def src_register(r: int) -> int:
    return SRC_REGISTERS + r


def src_slot(registers: int, k: int) -> int:
    return SRC_REGISTERS + registers + k


def _frozen(a: np.ndarray, dtype) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True)
    out.flags.writeable = False
    return out


def _deep_freeze(obj: Any) -> Any:
    """Read-only views of nested dicts/lists (plans are shared through caches: nothing in them may change)."""
    if isinstance(obj, Mapping):
        return MappingProxyType({k: _deep_freeze(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return tuple(_deep_freeze(v) for v in obj)
    return obj


def _thaw(obj: Any) -> Any:
    """Plain JSON-able copies of frozen metadata."""
    if isinstance(obj, Mapping):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_thaw(v) for v in obj]
    return obj


@dataclass(frozen=True)
class RowView:
    """One plan row, ready for a kernel.

    Torch path (few tensor ops): ``store_terms`` is None when D̂ = P, and then uses of P in the other outputs are
    folded into the write slot, so P lives only in its slot; ``register_terms[r]`` is None when register r is
    unchanged. Fused kernel: ``packed`` is the float32 row [c_x, c_o, M (2+R)×C row-major] in which the write slot
    is substituted by the store row, so every output is a combination of X, P, Z, registers and *other* slots and
    one pass computes all of them; ``kernel_slots`` / ``kernel_registers`` say which of those it must load.
    """

    index: int
    write_slot: int
    c_x: float
    c_o: float
    store_terms: Terms | None
    next_terms: Terms
    register_terms: tuple[Terms | None, ...]
    registers: int
    slots: int
    uses_noise: bool  # any output reads Z (registers included)
    writes_registers: int  # bit r: register r is written
    torch_registers: int  # bit r: the torch terms read register r
    kernel_registers: int  # bit r: the fused row reads register r
    kernel_slots: int  # bit k: the fused row reads slot k (never the write slot)
    packed: np.ndarray

    @property
    def mixes_store(self) -> bool:
        return self.store_terms is not None


def _terms(v: np.ndarray) -> Terms:
    return tuple((int(j), float(v[j])) for j in np.flatnonzero(v))


def _mask(used: np.ndarray, first: int, count: int) -> int:
    return sum(1 << j for j in range(count) if used[first + j])


@dataclass(frozen=True, eq=False)
class Plan:
    """Compiled coefficient tables (float64, CPU, read-only). W warm-up levels, N steps, R registers, K slots.

    Row (w, i) is used for step i when the run has taken w steps so far (capped at W − 1): a run may start at any
    index (img2img) and the first rows fall back to lower orders.
    """

    out_map: np.ndarray  # (N, 2): P = c_x·X + c_o·O
    coef: np.ndarray  # (W, N, 2 + R, C): outputs × sources
    writes: np.ndarray  # (W, N, R) bool: register r is written
    write_slot: np.ndarray  # (N,) int
    timesteps: np.ndarray  # (N,) the model timesteps
    rho: np.ndarray  # (N + 1,) stored sigmas (VP: σ/α; flow: s), the final level last
    flow: bool
    data_form: bool  # P is x̂₀ (True) or ε̂ (False)
    registers: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __copy__(self) -> "Plan":
        return self

    def __deepcopy__(self, memo: dict) -> "Plan":
        # Immutable (read-only tables, frozen metadata): copies of a scheduler share its plans, as caches do.
        return self

    def __post_init__(self) -> None:
        n = len(self.timesteps)
        r = len(self.registers)
        for name, dtype in (("out_map", np.float64), ("coef", np.float64), ("writes", bool), ("write_slot", np.int64),
                            ("timesteps", np.float64), ("rho", np.float64)):
            object.__setattr__(self, name, _frozen(getattr(self, name), dtype))
        object.__setattr__(self, "registers", tuple(self.registers))
        object.__setattr__(self, "meta", _deep_freeze(dict(self.meta)))
        w, n_rows, outputs, c = self.coef.shape if self.coef.ndim == 4 else (0, 0, 0, 0)
        if self.coef.ndim != 4 or n_rows != n or outputs != OUT_REGISTERS + r or c < SRC_REGISTERS + r + 1:
            raise ValueError(f"plan tables do not fit: coef {self.coef.shape}, {n} steps, {r} registers")
        if self.out_map.shape != (n, 2) or self.writes.shape != (w, n, r) or self.write_slot.shape != (n,) \
                or self.rho.shape != (n + 1,):
            raise ValueError("plan tables do not fit: out_map (N, 2), writes (W, N, R), write_slot (N,), rho (N + 1,)")
        if not (np.all(np.isfinite(self.coef)) and np.all(np.isfinite(self.out_map))):
            raise ValueError("plan coefficients must be finite")
        if np.any(self.write_slot != np.arange(n) % max(self.slots, 1)):
            raise ValueError(f"plan `write_slot` must be step mod {self.slots} (a ring buffer of the history slots)")

    # Shape ------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.coef.shape[1]

    @property
    def levels(self) -> int:
        return self.coef.shape[0]

    @property
    def num_registers(self) -> int:
        return len(self.registers)

    @property
    def slots(self) -> int:
        return self.coef.shape[3] - SRC_REGISTERS - self.num_registers

    @property
    def alpha(self) -> np.ndarray:
        return 1.0 - self.rho if self.flow else 1.0 / np.sqrt(1.0 + self.rho**2)

    @property
    def sigma(self) -> np.ndarray:
        return self.rho if self.flow else self.rho / np.sqrt(1.0 + self.rho**2)

    # Rows -------------------------------------------------------------------------------------------
    @cached_property
    def rows(self) -> tuple[tuple[RowView, ...], ...]:
        """``rows[w][i]``: every row as a kernel-ready view, built once per plan."""
        return tuple(tuple(self._row(w, i) for i in range(self.num_steps)) for w in range(self.levels))

    @cached_property
    def packed(self) -> np.ndarray:
        """(W, N, 2 + (2+R)·C) float32: the table the fused kernel reads on the device."""
        return _frozen(np.stack([[row.packed for row in level] for level in self.rows]), np.float32)

    @cached_property
    def dense(self) -> np.ndarray:
        """(W, N, 2 + (2+R)·C) float64: every row in one uniform form for traced code (``torch.compile``), where
        the row's structure must not depend on the step: the write slot substituted by the store row (as in
        ``packed``) and registers a row leaves unchanged given an identity row."""
        r = self.num_registers
        out = self.coef.copy()
        write_src = src_slot(r, 0) + self.write_slot  # (N,)
        for i, j in enumerate(write_src):
            store = out[:, i, OUT_STORE, :]  # (W, C)
            out[:, i, OUT_NEXT:, :] += out[:, i, OUT_NEXT:, j, None] * store[:, None, :]
            out[:, i, OUT_NEXT:, j] = 0.0
        for q in range(r):
            keep = ~self.writes[..., q]
            out[keep, OUT_REGISTERS + q, :] = 0.0
            out[keep, OUT_REGISTERS + q, src_register(q)] = 1.0
        w, n = self.levels, self.num_steps
        maps = np.broadcast_to(self.out_map, (w, n, 2))
        return _frozen(np.concatenate([maps, out.reshape(w, n, -1)], axis=2), np.float64)

    def _row(self, w: int, i: int) -> RowView:
        r, k = self.num_registers, self.slots
        m = self.coef[w, i]
        write_src = src_slot(r, int(self.write_slot[i]))
        written = [bool(self.writes[w, i, q]) for q in range(r)]
        live = [OUT_NEXT] + [OUT_REGISTERS + q for q in range(r) if written[q]]
        store = m[OUT_STORE]
        mixes = bool(np.any(store != np.eye(1, len(store), SRC_P)[0]))
        # Fused form: outputs read D̂ = store·sources instead of the write slot.
        fused = m.copy()
        fused[OUT_NEXT:] += np.outer(m[OUT_NEXT:, write_src], store)
        fused[OUT_NEXT:, write_src] = 0.0
        # Torch form: without a mix, P is the write slot's content.
        torch_m = m.copy()
        if not mixes:
            torch_m[OUT_NEXT:, write_src] += torch_m[OUT_NEXT:, SRC_P]
            torch_m[OUT_NEXT:, SRC_P] = 0.0
        used_torch = np.any(torch_m[([OUT_STORE] if mixes else []) + live] != 0.0, axis=0)
        used_fused = np.any(fused[([OUT_STORE] if mixes else []) + live] != 0.0, axis=0)
        return RowView(
            index=i, write_slot=int(self.write_slot[i]), c_x=float(self.out_map[i, 0]), c_o=float(self.out_map[i, 1]),
            store_terms=_terms(store) if mixes else None, next_terms=_terms(torch_m[OUT_NEXT]),
            register_terms=tuple(_terms(torch_m[OUT_REGISTERS + q]) if written[q] else None for q in range(r)),
            registers=r, slots=k, uses_noise=bool(used_fused[SRC_Z] or used_torch[SRC_Z]),
            writes_registers=sum(1 << q for q in range(r) if written[q]),
            torch_registers=_mask(used_torch, SRC_REGISTERS, r), kernel_registers=_mask(used_fused, SRC_REGISTERS, r),
            kernel_slots=_mask(used_fused, SRC_REGISTERS + r, k),
            packed=_frozen(np.concatenate([self.out_map[i], fused.ravel()]), np.float32),
        )

    @property
    def uses_noise(self) -> bool:
        return any(row.uses_noise for level in self.rows for row in level)

    # Output map views (thresholding) ----------------------------------------------------------------
    def x0_map(self, i: int) -> tuple[float, float]:
        """x̂₀ = a·X + b·O at step i, derived from the output map (data form: P itself; noise form:
        x̂₀ = (X − σ P)/α)."""
        c_x, c_o = self.out_map[i]
        if self.data_form:
            return float(c_x), float(c_o)
        a, s = float(self.alpha[i]), float(self.sigma[i])
        return (1.0 - s * c_x) / a, -s * c_o / a

    def p_from_x0(self, i: int) -> tuple[float, float]:
        """P = e_x·X + e_0·x̂₀ at step i (data form: identity; noise form: ε̂ = (X − α x̂₀)/σ)."""
        if self.data_form:
            return 0.0, 1.0
        a, s = float(self.alpha[i]), float(self.sigma[i])
        return 1.0 / s, -a / s

    # Identity ---------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A digest of everything that determines a run (tables and grid; not the free-form metadata)."""
        h = hashlib.sha256()
        for a in (self.out_map, self.coef, self.writes, self.write_slot, self.timesteps, self.rho):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr((self.flow, self.data_form, self.registers)).encode())
        return h.hexdigest()[:16]

    # JSON -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "meta": _thaw(self.meta), "registers": list(self.registers), "flow": self.flow,
            "data_form": self.data_form, "timesteps": self.timesteps.tolist(), "rho": self.rho.tolist(),  # numpy: ok-sync
            "out_map": self.out_map.tolist(), "coef": self.coef.tolist(),  # numpy: ok-sync
            "writes": self.writes.tolist(), "write_slot": self.write_slot.tolist(),  # numpy: ok-sync
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "Plan":
        fmt = obj.get("format")
        if fmt == FORMAT_V1:
            return _from_v1(obj)
        if fmt != FORMAT:
            raise ValueError(f"not a fastsampler plan: `format` is {fmt!r}, expected {FORMAT!r} or {FORMAT_V1!r}")
        missing = [k for k in ("out_map", "coef", "writes", "write_slot", "timesteps", "rho", "flow", "data_form")
                   if k not in obj]
        if missing:
            raise ValueError(f"plan JSON lacks {missing}")
        registers = tuple(obj.get("registers", ()))
        coef = np.asarray(obj["coef"], dtype=np.float64)
        writes = np.asarray(obj["writes"], dtype=bool)
        if writes.size == 0:
            writes = writes.reshape(coef.shape[0], coef.shape[1], len(registers))
        return cls(out_map=np.asarray(obj["out_map"], dtype=np.float64), coef=coef, writes=writes,
                   write_slot=np.asarray(obj["write_slot"], dtype=np.int64),
                   timesteps=np.asarray(obj["timesteps"], dtype=np.float64), rho=np.asarray(obj["rho"], dtype=np.float64),
                   flow=bool(obj["flow"]), data_form=bool(obj["data_form"]), registers=registers,
                   meta=dict(obj.get("meta", {})))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a fastsampler plan: invalid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise ValueError("not a fastsampler plan: expected a JSON object")
        return cls.from_dict(obj)


def _from_v1(obj: Mapping[str, Any]) -> Plan:
    """Version-1 plans: sources (X, S, Z, slots), one register S, D = conv·(X, O) stored unmixed."""
    meta = dict(obj.get("meta", {}))
    x_coef = np.asarray(obj["x_coef"], dtype=np.float64)
    s_coef = np.asarray(obj["s_coef"], dtype=np.float64)
    s_write = np.asarray(obj["s_write"], dtype=bool)
    conv = np.asarray(obj["conv"], dtype=np.float64)
    d_from_x0 = np.asarray(obj["d_from_x0"], dtype=np.float64)
    w, n, c1 = x_coef.shape
    k = c1 - 3
    coef = np.zeros((w, n, OUT_REGISTERS + 1, num_sources(1, k)))
    coef[:, :, OUT_STORE, SRC_P] = 1.0
    for out, table in ((OUT_NEXT, x_coef), (OUT_REGISTERS, s_coef)):
        coef[:, :, out, SRC_X] = table[..., 0]
        coef[:, :, out, src_register(0)] = table[..., 1]
        coef[:, :, out, SRC_Z] = table[..., 2]
        coef[:, :, out, src_slot(1, 0):] = table[..., 3:]
    coef[:, :, OUT_REGISTERS] *= s_write[..., None]
    timesteps = np.asarray(meta.pop("timesteps"), dtype=np.float64)
    rho = np.asarray(meta.pop("rho"), dtype=np.float64)
    flow = bool(meta.pop("flow"))
    data_form = bool(np.all(d_from_x0[:, 0] == 0.0))
    meta.setdefault("builder", meta.pop("solver", None))
    return Plan(out_map=conv, coef=coef, writes=s_write[..., None], write_slot=np.asarray(obj["write_slot"]),
                timesteps=timesteps, rho=rho, flow=flow, data_form=data_form, registers=("saved",), meta=meta)
