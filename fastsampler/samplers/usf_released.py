"""The released S³ schedule format (thu-nics/USF ``solver_schedules/*.pth``) decoded into a ``USFSchedule``.

A released file is ``torch.save`` of a decision dict, or of ``[decision, FID]``. The dict holds (USF's names):
``timesteps`` (N + 1 times: continuous VP t ∈ (0, 1], or EDM σ), ``orders``, ``prediction_types``
("data_prediction", "noise_prediction", "dpmsolver_v3_prediction"), ``start_points`` (−1 = multistep),
``derivative_types`` (per step, n − 1 dicts ``estimate="Difference_M"``, ``active_points`` (buffer indices: −1 the
newest evaluation), ``relaxation``, ``relaxation_coefficient``), ``corrector_types`` (``type`` no_corrector / pseudo
/ implicit, ``start_point`` −2, ``taylor_order``, ``derivative_type``), ``afs`` (no_afs / zero_x0 / average_x0) and
``skip_coefficients``.

Inside our space: data / noise prediction, multistep start points, a first derivative from the previous M nodes
with any relaxation, higher derivatives from the previous n − 1 nodes, no corrector or the pseudo-corrector USF
derives from the predictor, afs none / zero_x0. Refused, naming the entry: the DPM-Solver-v3 prediction (needs
EMS statistics of the model), other start points (singlestep), other active points, the implicit corrector (an
extra evaluation), afs ``average_x0`` (the data set's mean image), skip coefficients ≠ 1 (a modified U-Net; pass
``ignore_skip_coefficients=True`` to run without them).

Time points: the first N times become the schedule's time points; the final time (USF stops at t_end ≈ 1e-3
without denoising) is dropped — the scheduler's ``final_sigmas_type`` decides the final level.
``time_input="discrete"`` maps VP time t to the model timestep 1000·t − 1 (DPM-Solver's discrete-time convention
t_n = (n + 1)/1000, as USF's model wrapper), rounded to the integer a discrete model takes; ``"continuous"`` to
1000·t (our continuous VP schedules); ``"sigma"`` takes EDM σ as the VE sigma σ/α (``sigmas``); ``None`` drops them;
``"auto"``: "sigma" when the first time exceeds 1, else "discrete".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fastsampler.samplers.usf_schedule import MAX_ORDER, RELAXATIONS, USFSchedule, USFStep

PREDICTIONS = {"data_prediction": "data", "noise_prediction": "noise"}
TIME_INPUTS = ("auto", "discrete", "continuous", "sigma", None)


def _values(v: Any) -> list:
    """A tensor / array / list as a plain list."""
    return v.tolist() if hasattr(v, "tolist") else list(v)


def _difference(d: Mapping[str, Any], where: str) -> tuple[int, list[int]]:
    """(M, active points) of a ``Difference_M`` derivative dict (None points: USF's default, the previous M)."""
    est = d.get("estimate")
    if not isinstance(est, str) or not est.startswith("Difference_") or not est[11:].isdigit():
        raise ValueError(f"{where}.estimate = {est!r} is not supported (only 'Difference_M')")
    m = int(est[11:])
    points = d.get("active_points")
    points = list(range(-2, -m - 2, -1)) if points is None else [int(p) for p in points]
    if len(points) != m:
        raise ValueError(f"{where}: {m} points expected for {est}, got active_points {points}")
    return m, points


def _relaxation(d: Mapping[str, Any], where: str) -> tuple[str | None, float]:
    kind = d.get("relaxation")
    if kind in (None, "no_relaxation"):
        return None, 0.0
    if kind not in RELAXATIONS:
        raise ValueError(f"{where}.relaxation = {kind!r} is not supported (one of {RELAXATIONS})")
    coefficient = float(d.get("relaxation_coefficient", 0.0) or 0.0) if kind == "linear" else 0.0
    return kind, coefficient


def _step(decision: Mapping[str, Any], i: int) -> USFStep:
    order = int(decision["orders"][i])
    where = f"orders[{i}]"
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"{where} = {order} is not supported (Taylor orders 1..{MAX_ORDER})")
    kind = decision["prediction_types"][i]
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction_types[{i}] = {kind!r} is not supported (only {sorted(PREDICTIONS)}; the "
                         "DPM-Solver-v3 prediction needs the model's EMS statistics)")
    start = int(_values(decision.get("start_points") or [-1] * (i + 1))[i])
    if start != -1:
        raise ValueError(f"start_points[{i}] = {start} is not supported (multistep only: −1)")
    derivs = list(decision["derivative_types"][i] or [])
    if len(derivs) != order - 1:
        raise ValueError(f"derivative_types[{i}] has {len(derivs)} entries for order {order}")
    estimate, relaxation, coefficient = None, None, 0.0
    full = list(range(-2, -order - 1, -1))
    for k, d in enumerate(derivs, start=1):
        at = f"derivative_types[{i}][{k - 1}]"
        m, points = _difference(d, at)
        if k == 1:
            if sorted(points, reverse=True) != list(range(-2, -m - 2, -1)):
                raise ValueError(f"{at}.active_points = {points} is not supported (the previous M nodes only)")
            estimate = None if m == order - 1 else m
            relaxation, coefficient = _relaxation(d, at)
        elif sorted(points, reverse=True) != full:
            raise ValueError(f"{at} = Difference_{m} over {points} is not supported (derivatives of order ≥ 2 use "
                             f"the previous {order - 1} nodes: {full})")
    step = USFStep(order, PREDICTIONS[kind], estimate, relaxation, coefficient)
    return _with_corrector(step, (decision.get("corrector_types") or [None] * (i + 1))[i], i)


def _with_corrector(step: USFStep, corrector: Mapping[str, Any] | str | None, i: int) -> USFStep:
    """The step with its corrector, if the released one is USF's pseudo-corrector derived from this predictor."""
    where = f"corrector_types[{i}]"
    if corrector in (None, "no_corrector"):
        return step
    if not isinstance(corrector, Mapping):
        raise ValueError(f"{where} = {corrector!r} is not supported (a corrector dict or 'no_corrector')")
    kind = corrector.get("type")
    if kind == "no_corrector":
        return step
    if kind != "pseudo":
        raise ValueError(f"{where}.type = {kind!r} is not supported (no_corrector or pseudo; 'implicit' costs an "
                         "extra model evaluation per step)")
    if corrector.get("start_point") != -2 or corrector.get("taylor_order") != step.order + 1:
        raise ValueError(f"{where}: start_point {corrector.get('start_point')} / taylor_order "
                         f"{corrector.get('taylor_order')} is not supported (−2 and order + 1 = {step.order + 1})")
    derivs = list(corrector.get("derivative_type") or [])
    relaxation, coefficient = _relaxation(derivs[0], f"{where}.derivative_type[0]") if derivs else (None, 0.0)
    out = USFStep(step.order, step.prediction, step.estimate, step.relaxation, step.coefficient, "pseudo",
                  relaxation, coefficient)
    expected = out.correction() or ()
    got = [_difference(d, f"{where}.derivative_type[{k}]")[1] for k, d in enumerate(derivs)]
    # USF buffer index b after the new evaluation is node offset b + 2 from the corrected step's start.
    if len(got) != len(expected) or any(sorted(p + 2 for p in g) != sorted(e.points) for g, e in zip(got, expected)):
        raise ValueError(f"{where}.derivative_type = {derivs} is not supported (only the corrector USF derives from "
                         "the predictor: each derivative's points plus the new evaluation)")
    return out


def _time_points(times: Sequence[float], n: int, time_input: str | None) -> dict[str, Any]:
    if time_input not in TIME_INPUTS:
        raise ValueError(f"`time_input` must be one of {TIME_INPUTS}, got {time_input!r}")
    t = np.asarray(times, dtype=np.float64)
    if len(t) != n + 1:
        raise ValueError(f"timesteps has {len(t)} entries for {n} steps (N + 1 expected)")
    if time_input is None:
        return {}
    if time_input == "auto":
        time_input = "sigma" if t[0] > 1.0 else "discrete"
    if time_input == "sigma":
        return {"sigmas": t[:n].tolist()}
    if t.max() > 1.0:
        raise ValueError(f"timesteps reach {t.max():g}: not VP times in (0, 1] (use time_input='sigma' for EDM σ)")
    model = 1000.0 * t[:n] - (1.0 if time_input == "discrete" else 0.0)
    return {"timesteps": (np.round(model) if time_input == "discrete" else model).tolist()}


def schedule_from_released(obj: Mapping[str, Any] | Sequence[Any], time_input: str | None = "auto",
                           ignore_skip_coefficients: bool = False) -> USFSchedule:
    """Decode a released decision (the dict, or ``[dict, FID]``); a choice outside our space raises ValueError
    naming the entry."""
    decision = obj[0] if isinstance(obj, Sequence) and not isinstance(obj, Mapping) else obj
    if not isinstance(decision, Mapping) or "orders" not in decision:
        raise ValueError("not a released S³ schedule: expected a decision dict with `orders`")
    unknown = sorted(set(decision) - {"timesteps", "orders", "prediction_types", "start_points", "derivative_types",
                                      "corrector_types", "afs", "skip_coefficients"})
    if unknown:
        raise ValueError(f"released S³ schedule: unknown key(s) {unknown}")
    afs = decision.get("afs") or "no_afs"
    if afs not in ("no_afs", "zero_x0"):
        raise ValueError(f"afs = {afs!r} is not supported (no_afs or zero_x0; 'average_x0' needs the training "
                         "data's mean image)")
    skip = decision.get("skip_coefficients")
    if skip is not None and not ignore_skip_coefficients and any(abs(float(v) - 1.0) > 1e-6 for v in _values(skip)):
        raise ValueError("skip_coefficients ≠ 1 are not supported (they scale a modified U-Net's skip connections); "
                         "pass ignore_skip_coefficients=True to run the schedule without them")
    n = len(decision["orders"])
    steps = tuple(_step(decision, i) for i in range(n))
    if steps[-1].corrector != "none":
        raise ValueError(f"corrector_types[{n - 1}]: a corrector after the final step is not supported (it costs an "
                         "extra model evaluation)")
    times = _time_points(_values(decision["timesteps"]), n, time_input) if decision.get("timesteps") is not None \
        else {}
    meta = {"source": "released S³ schedule"}
    if isinstance(obj, Sequence) and not isinstance(obj, Mapping) and len(obj) > 1:
        meta["search_fid"] = float(obj[1])
    return USFSchedule(steps, afs=None if afs == "no_afs" else afs, meta=meta, **times)


def _numpy_scalar_globals() -> list:
    """What ``torch.load(weights_only=True)`` must be allowed to rebuild a numpy scalar (the FID of ``[decision,
    FID]`` files): numpy's scalar reconstructor under its numpy-1 and numpy-2 names, and numeric dtypes. Data
    only."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = [type(np.dtype(c)) for c in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def load_released(path: str | Path, time_input: str | None = "auto",
                  ignore_skip_coefficients: bool = False) -> USFSchedule:
    """A released schedule file: ``.pth`` via ``torch.load(weights_only=True)`` (tensors, lists, dicts and numpy
    scalars only — never unpickling code), or a JSON export of the same structure."""
    path = Path(path)
    if path.suffix == ".json":
        obj = json.loads(path.read_text())
    else:
        import torch

        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    return schedule_from_released(obj, time_input, ignore_skip_coefficients)
