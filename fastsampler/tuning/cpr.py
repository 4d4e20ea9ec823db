"""Ratio files and cascade polynomial regression (CPR) for DC-Solver: fit once, reuse at unseen (NFE, CFG).

CPR (reference note §2.4): ρ(i) = Σ_k c_k(g, n) s^k with c_k = Σ_j A_kj(n) g^{2−j}, A_kj = Σ_l W_kjl n^{2−l},
g = CFG/12, n = NFE/50, s = i/NFE — linear in the 36 coefficients W, so ``fit_cpr`` is one least-squares solve over
every searched ratio (steps whose ratio is fixed at 1 by the search's start are left out, since CPR overrides
ρ_1 = ρ_2 = 1 itself). ``fastsampler.samplers.transforms.dc`` evaluates the result (``cpr_predict``) and reads
both file formats; this module writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from fastsampler.samplers.transforms.dc import CPR_CLAMP, CPR_FORMAT, RATIOS_FORMAT, cpr_features, fitted_config


def fit_cpr(entries: Iterable[Mapping[str, Any]], first_searched: int = 2, ridge: float = 0.0) -> np.ndarray:
    """The (4, 3, 3) CPR coefficients fitting entries {num_steps, guidance_scale, ratios} by least squares
    (``ridge`` > 0 adds a small Tikhonov term when the grid of (NFE, CFG) is too small to pin all 36)."""
    rows, targets = [], []
    for e in entries:
        n, g = int(e["num_steps"]), float(e["guidance_scale"])
        features = cpr_features(n, g)
        for i, r in enumerate(e["ratios"]):
            if i >= first_searched:
                rows.append(features[i])
                targets.append(float(r))
    if not rows:
        raise ValueError("no searched ratios to fit (every entry is shorter than the fixed first steps)")
    a, b = np.asarray(rows), np.asarray(targets)
    if ridge > 0:
        a = np.vstack([a, np.sqrt(ridge) * np.eye(36)])
        b = np.concatenate([b, np.zeros(36)])
    coefficients, *_ = np.linalg.lstsq(a, b, rcond=None)
    return coefficients.reshape(4, 3, 3)


def _write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    return path


def write_ratio_file(path: str | Path, entries: Iterable[Mapping[str, Any]], config: Mapping[str, Any],
                     note: str = "") -> Path:
    """A versioned ratio file: ratios per (num_steps, guidance_scale) and the configuration they were fitted for."""
    clean = [{"num_steps": int(e["num_steps"]), "guidance_scale": e.get("guidance_scale"),
              "ratios": [float(r) for r in e["ratios"]]} for e in entries]
    return _write_json(path, {"format": RATIOS_FORMAT, "config": fitted_config(config), "note": note,
                              "entries": clean})


def write_cpr_file(path: str | Path, coefficients: np.ndarray, config: Mapping[str, Any],
                   fitted_on: Iterable[tuple[int, float]] = (), clamp: tuple[float, float] = CPR_CLAMP,
                   note: str = "") -> Path:
    return _write_json(path, {"format": CPR_FORMAT, "config": fitted_config(config), "clamp": list(clamp),
                              "coefficients": np.asarray(coefficients, dtype=np.float64).reshape(4, 3, 3).tolist(),  # numpy: ok-sync
                              "fitted_on": [list(p) for p in fitted_on], "note": note})
