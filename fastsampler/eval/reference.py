"""Reference solution of the probability-flow ODE of an exact mixture denoiser, cached on disk.

The PF-ODE in VE variables y = x/α, ρ = σ/α is dy/dρ = ε̂ = (y − x̂₀(y, ρ))/ρ. It is integrated in two
charts, each well conditioned where it is used (scipy ``solve_ivp``, DOP853, the whole batch as one system):

1. high noise, ρ ≥ 1 (only if the start is there): κ = α/σ = 1/ρ ∈ [κ₀, 1], state w = x/σ = κ y,
       dw/dκ = x̂₀(w; α = κ, σ = 1)
   (DPM-Solver++'s data form; finite at κ₀ = 0, so a flow model's pure-noise start s = 1 is exact);
2. low noise, ρ ≤ 1: u = log ρ from 0 down to log ρ_min, state y,
       dy/du = y − x̂₀(y; α = 1, σ = ρ)
   (the right side fades like ρ²/τ² as ρ → 0, so large steps are taken there).

At κ = 1 both states coincide (w = y). The output is x̂₀(y(ρ_min), ρ_min), the ODE's ρ → 0 limit up to a
relative error ≈ ρ_min²/(2τ²) of the within-component deviation; ρ_min = 1e-4·τ by default makes that 5e-9.

``reference_solution`` caches results under ``$FASTSAMPLER_CACHE`` (default ``~/.cache/fastsampler``)/reference,
keyed by a SHA-256 of everything the answer depends on (``reference_key``), written atomically; a cache file
that cannot be read or fails validation is recomputed (and overwritten) with a ``RuntimeWarning`` naming it.
It can also check its own tolerance:
halving rtol and atol must change the answer by less than 1e-3 of a given error scale (RMSE), else the
tolerance is tightened tenfold and the check repeated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

from fastsampler.eval import gmm
from fastsampler.eval.gmm import MixtureDenoiser
from fastsampler.eval.metrics import rmse

REFERENCE_VERSION = "1"
DEFAULT_RTOL = 1e-8
DEFAULT_ATOL = 1e-10
TOLERANCE_CHECK_FRACTION = 1e-3  # halving the tolerance must move the answer by < this × the error scale
MAX_TIGHTENINGS = 3


@dataclass(frozen=True)
class Tolerance:
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    def halved(self) -> "Tolerance":
        return Tolerance(self.rtol / 2, self.atol / 2)

    def tightened(self, factor: float = 10.0) -> "Tolerance":
        return Tolerance(self.rtol / factor, self.atol / factor)


@dataclass(frozen=True)
class ODESolution:
    x0: torch.Tensor  # (B, D) float64
    num_evaluations: int  # denoiser calls, each on the whole batch


@dataclass(frozen=True)
class ReferenceSolution:
    x0: torch.Tensor
    key: str
    tolerance: Tolerance
    num_evaluations: int
    from_cache: bool
    tolerance_check: dict | None  # {"change_rmse", "error_scale", "passed", "tolerance"} when checked


def _integrate(rhs, state: np.ndarray, start: float, end: float, tol: Tolerance) -> tuple[np.ndarray, int]:
    result = solve_ivp(rhs, (start, end), state, method="DOP853", rtol=tol.rtol, atol=tol.atol)
    if not result.success:
        raise RuntimeError(f"reference ODE integration failed: {result.message}")
    return result.y[:, -1], result.nfev


def solve_pf_ode(denoiser: MixtureDenoiser, x_start: torch.Tensor, alpha_start: float, sigma_start: float,
                 tol: Tolerance = Tolerance(), rho_min: float | None = None) -> ODESolution:
    """x₀ of the probability-flow ODE started from x_start at noise level (α₀, σ₀), α₀ ≥ 0, σ₀ > 0."""
    if not (alpha_start >= 0 and sigma_start > 0):
        raise ValueError(f"the start needs α₀ ≥ 0 and σ₀ > 0, got ({alpha_start}, {sigma_start})")
    batch = x_start.shape[0]
    rho_min = 1e-4 * denoiser.mixture.tau if rho_min is None else rho_min
    x = x_start.reshape(batch, -1).to(torch.float64)
    dim = x.shape[1]

    def x0_hat(state: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
        return denoiser(torch.from_numpy(state.reshape(batch, dim)), alpha, sigma).numpy().ravel()

    evaluations = 0
    kappa_start = alpha_start / sigma_start
    if kappa_start < 1.0:
        w, n = _integrate(lambda kappa, w: x0_hat(w, kappa, 1.0), (x / sigma_start).numpy().ravel(),
                          kappa_start, 1.0, tol)
        y, log_rho_start = w, 0.0
        evaluations += n
    else:
        y, log_rho_start = (x / alpha_start).numpy().ravel(), math.log(sigma_start / alpha_start)
    if log_rho_start > math.log(rho_min):
        y, n = _integrate(lambda u, y: y - x0_hat(y, 1.0, math.exp(u)), y, log_rho_start, math.log(rho_min), tol)
        evaluations += n
    x0 = denoiser(torch.from_numpy(y.reshape(batch, dim)), 1.0, rho_min)
    return ODESolution(x0, evaluations + 1)


# Cache ---------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$FASTSAMPLER_CACHE/reference``, default ``~/.cache/fastsampler/reference``."""
    root = os.environ.get("FASTSAMPLER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastsampler")
    return Path(root) / "reference"


def _code_digest() -> str:
    """Version tag plus the source of the modules the answer is computed by."""
    h = hashlib.sha256(REFERENCE_VERSION.encode())
    for path in (__file__, gmm.__file__):
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor | None, dtype: torch.dtype) -> bytes:
    if t is None:
        return b"none"
    t = t.detach().cpu().to(dtype).contiguous()
    return repr(tuple(t.shape)).encode() + t.numpy().tobytes()


def reference_key(denoiser: MixtureDenoiser, x_start: torch.Tensor, alpha_start: float, sigma_start: float,
                  tol: Tolerance, rho_min: float | None, error_scale: float | None) -> str:
    """SHA-256 of the mixture, conditioning, start, tolerances, check scale and code."""
    mix = denoiser.mixture
    parts = {
        "code": _code_digest().encode(),
        "means": _tensor_bytes(mix.means, torch.float64),
        "tau": repr(float(mix.tau)).encode(),
        "weights": _tensor_bytes(mix.weights, torch.float64),
        "labels": _tensor_bytes(mix.labels, torch.int64),
        "classes": _tensor_bytes(denoiser.classes, torch.int64),
        "guidance_scale": repr(denoiser.guidance_scale).encode(),
        "x_start": _tensor_bytes(x_start, torch.float64),
        "alpha_start": repr(float(alpha_start)).encode(),
        "sigma_start": repr(float(sigma_start)).encode(),
        "rtol": repr(float(tol.rtol)).encode(),
        "atol": repr(float(tol.atol)).encode(),
        "rho_min": repr(rho_min).encode(),
        "error_scale": repr(error_scale).encode(),
    }
    h = hashlib.sha256()
    for name, value in parts.items():
        h.update(name.encode() + b"\0" + hashlib.sha256(value).digest())
    return h.hexdigest()


def _read(path: Path, key: str, shape: tuple[int, ...] | None) -> ReferenceSolution:
    """The solution stored at ``path``; raises (``ValueError``, ``BadZipFile``, ``KeyError``, ...) when the file
    is unreadable or its content is not a valid solution for ``key`` (of ``shape``, when given)."""
    with np.load(path, allow_pickle=False) as f:  # zip members are CRC-checked as they are read
        meta = json.loads(str(f["meta"]))
        x0 = torch.from_numpy(f["x0"].copy())
    if meta.get("key", key) != key:
        raise ValueError(f"it records key {meta['key']!r}")
    if x0.dtype != torch.float64 or x0.dim() != 2 or (shape is not None and tuple(x0.shape) != shape):
        raise ValueError(f"x0 is {x0.dtype} {list(x0.shape)}, expected float64 {list(shape or ('B', 'D'))}")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 is not finite")
    check = meta["tolerance_check"]
    if check is not None and not isinstance(check, dict):
        raise ValueError(f"tolerance_check is {check!r}")
    return ReferenceSolution(x0, key, Tolerance(**meta["tolerance"]), int(meta["num_evaluations"]), True, check)


def _load(path: Path, key: str, shape: tuple[int, ...] | None = None) -> ReferenceSolution | None:
    """The cached solution at ``path``; None when there is none, or when it is unusable (then with a
    ``RuntimeWarning`` naming the file, and the caller recomputes and overwrites it)."""
    if not path.exists():
        return None
    try:
        return _read(path, key, shape)
    except Exception as err:  # truncated, garbage, wrong content: recompute
        warnings.warn(f"reference solution cache {path} is unusable, recomputing it: {type(err).__name__}: {err}",
                      RuntimeWarning, stacklevel=3)
        return None


def _store(path: Path, ref: ReferenceSolution) -> None:
    """Write ``ref`` to ``path`` atomically (temporary file in the same directory, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": ref.key, "tolerance": {"rtol": ref.tolerance.rtol, "atol": ref.tolerance.atol},
            "num_evaluations": ref.num_evaluations, "tolerance_check": ref.tolerance_check}
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, x0=ref.x0.numpy(), meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Reference with tolerance check --------------------------------------------------------------------------

def checked_solution(denoiser: MixtureDenoiser, x_start: torch.Tensor, alpha_start: float, sigma_start: float,
                     error_scale: float, tol: Tolerance = Tolerance(), rho_min: float | None = None
                     ) -> tuple[ODESolution, Tolerance, dict]:
    """Solve at ``tol`` and at half of it; tighten tenfold until the answers differ by < 1e-3·error_scale."""
    for _ in range(MAX_TIGHTENINGS + 1):
        coarse = solve_pf_ode(denoiser, x_start, alpha_start, sigma_start, tol, rho_min)
        fine = solve_pf_ode(denoiser, x_start, alpha_start, sigma_start, tol.halved(), rho_min)
        change = rmse(coarse.x0, fine.x0)
        check = {"change_rmse": change, "error_scale": error_scale, "tolerance": [tol.rtol, tol.atol],
                 "passed": change < TOLERANCE_CHECK_FRACTION * error_scale}
        if check["passed"]:
            total = coarse.num_evaluations + fine.num_evaluations
            return ODESolution(fine.x0, total), tol, check
        tol = tol.tightened()
    raise RuntimeError(f"reference ODE: halving the tolerance still moves the answer by {change:.3g} RMSE, more "
                       f"than {TOLERANCE_CHECK_FRACTION:g} × {error_scale:g}, at rtol {tol.rtol:g}")


def reference_solution(denoiser: MixtureDenoiser, x_start: torch.Tensor, alpha_start: float, sigma_start: float,
                       tol: Tolerance = Tolerance(), rho_min: float | None = None, error_scale: float | None = None,
                       use_cache: bool = True) -> ReferenceSolution:
    """The ODE's x₀ from x_start at (α₀, σ₀), from the disk cache when the same inputs were solved before.

    With ``error_scale`` the tolerance is checked (``checked_solution``) and the check is stored with the result.
    """
    key = reference_key(denoiser, x_start, alpha_start, sigma_start, tol, rho_min, error_scale)
    path = cache_dir() / f"{key}.npz"
    if use_cache:
        cached = _load(path, key, (x_start.shape[0], x_start[0].numel()))
        if cached is not None:
            return cached
    if error_scale is None:
        solution, used, check = solve_pf_ode(denoiser, x_start, alpha_start, sigma_start, tol, rho_min), tol, None
    else:
        solution, used, check = checked_solution(denoiser, x_start, alpha_start, sigma_start, error_scale, tol,
                                                 rho_min)
    ref = ReferenceSolution(solution.x0, key, used, solution.num_evaluations, False, check)
    if use_cache:
        _store(path, ref)
    return ref
