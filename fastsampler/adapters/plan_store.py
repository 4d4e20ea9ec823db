"""Plans that travel with a scheduler: checked against its noise schedule, saved in its folder.

A plan records what built it and a fingerprint of the noise schedule it was built for: the kind of schedule and
(α, σ) of that schedule at the plan's timesteps (what the model sees). ``check_plan`` refuses a plan whose
schedule, prediction type or grid kind differs from the scheduler's, naming the difference. A scheduler folder
(``save_pretrained``) holds ``scheduler_config.json`` and, when plans are installed, ``fastsampler_plans.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from fastsampler.plans.format import Plan
from fastsampler.warn import warn

PLANS_FILE = "fastsampler_plans.json"
PLANS_FORMAT = "fastsampler-plans/1"
FINGERPRINT_RTOL = 1e-6


def schedule_fingerprint(kind: str, num_train_timesteps: int, alpha: np.ndarray, sigma: np.ndarray) -> dict[str, Any]:
    return {"kind": kind, "num_train_timesteps": int(num_train_timesteps),
            "alpha": [float(v) for v in alpha], "sigma": [float(v) for v in sigma]}


def check_plan(plan: Plan, expected: Mapping[str, Any], prediction_type: str, flow: bool) -> None:
    """Raise ValueError naming the first difference between ``plan`` and the scheduler it is installed into.

    ``expected``: ``schedule_fingerprint`` of the scheduler's own schedule at the plan's timesteps."""
    meta = plan.meta
    if "prediction_type" not in meta:
        raise ValueError("the plan's metadata lacks `prediction_type`; it cannot be checked against this scheduler")
    if meta["prediction_type"] != prediction_type:
        raise ValueError(f"the plan was built for prediction_type={meta['prediction_type']!r}, this scheduler has "
                         f"{prediction_type!r}")
    if plan.flow != flow:
        kinds = {True: "a flow-matching grid (use_flow_sigmas=True)", False: "a VP grid"}
        raise ValueError(f"the plan is for {kinds[plan.flow]} but this scheduler uses {kinds[flow]}")
    got = meta.get("schedule")
    if got is None:
        # Version-1 plans predate the fingerprint: what can be checked was, the schedule cannot be.
        warn("the plan carries no noise-schedule fingerprint (a version-1 plan); its noise schedule cannot "
             "be checked against this scheduler's — rebuild and save it to record one")
        return
    for key in ("kind", "num_train_timesteps"):
        if got.get(key) != expected[key]:
            raise ValueError(f"the plan was built for a noise schedule with {key}={got.get(key)!r}, this scheduler "
                             f"has {expected[key]!r}")
    for key in ("alpha", "sigma"):
        a, b = np.asarray(got.get(key, ()), dtype=np.float64), np.asarray(expected[key], dtype=np.float64)
        if a.shape != b.shape or not np.allclose(a, b, rtol=FINGERPRINT_RTOL, atol=1e-12):
            worst = int(np.argmax(np.abs(a - b))) if a.shape == b.shape else -1
            detail = f" (step {worst}: {a[worst]:.6g} vs {b[worst]:.6g})" if worst >= 0 else ""
            raise ValueError(f"the plan was built for another noise schedule: its {key} at the plan's timesteps "
                             f"differs from this scheduler's{detail}; check beta_schedule, beta_start/beta_end, "
                             "trained_betas, rescale_betas_zero_snr and noise_schedule")


def save_plans(directory: str | os.PathLike, plans: Iterable[Plan]) -> Path | None:
    """Write the plans (or remove a stale file when there are none) atomically; returns the path written."""
    path = Path(directory) / PLANS_FILE
    plans = list(plans)
    if not plans:
        if path.exists():
            path.unlink()
        return None
    payload = {"format": PLANS_FORMAT, "plans": [p.to_dict() for p in plans]}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".plans-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; save_pretrained's other files follow the umask
    os.replace(tmp, path)
    return path


def load_plans(directory: str | os.PathLike) -> list[Plan]:
    """The plans saved in a scheduler folder (none if it has no plans file)."""
    path = Path(directory) / PLANS_FILE
    if not path.is_file():
        return []
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable plans file: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != PLANS_FORMAT:
        raise ValueError(f"{path}: expected format {PLANS_FORMAT!r}")
    return [Plan.from_dict(p) for p in payload.get("plans", [])]
