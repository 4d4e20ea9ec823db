"""Teacher trajectories: a high-accuracy solve from the same noises, stored at the student's nodes.

The teacher's grid contains every node of the student's grid: each student interval [ρ_i, ρ_{i+1}] is cut into
m_i steps uniform in λ, with m_i ∝ its λ-length and Σ m_i ≈ ``TeacherSpec.steps``; an interval ending at σ = 0
is refined down to the smallest trained noise level and closed by the exact first-order jump. So the teacher's
state at student node i needs no interpolation. The solver is DPM-Solver++ 3M with the exact third-order weight
by default, or DDIM (first order, what the official DC-Solver code uses with 200 steps); the model is called at
the model time of each node (``PlanScheduler.model_timesteps``: fractional between training timesteps).

Results are cached on disk in shards of samples (``<cache>/teacher/<key>/shard_*.safetensors``, written
atomically, with a checksum), keyed on everything that affects them: the model (``cache_key()``), the noises,
the student's nodes and schedule, the prediction type and the teacher spec. A rerun reuses finished shards; under
``torchrun`` rank r computes shards r, r + W, … and every rank then reads all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastsampler import progress as progress_bars
from fastsampler.runtime.distributed import DistContext
from fastsampler.plans.format import Plan
from fastsampler.samplers.dpmsolver import DPMSolverMultistep
from fastsampler.samplers.rules import Nodes, compile_plan
from fastsampler.models.denoisers import subset, tensor_digest
from fastsampler.tuning.runner import run

TEACHER_VERSION = 1
TEACHER_SOLVERS = ("dpmsolver++3", "ddim")


@dataclass(frozen=True)
class TeacherSpec:
    """How the reference trajectory is computed: ``solver`` ("dpmsolver++3" or "ddim") and the total number of
    model evaluations ``steps``."""

    solver: str = "dpmsolver++3"
    steps: int = 200

    def __post_init__(self) -> None:
        if self.solver not in TEACHER_SOLVERS:
            raise ValueError(f"teacher `solver` must be one of {TEACHER_SOLVERS}, got {self.solver!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"teacher `steps` must be a positive integer, got {self.steps!r}")


def _lambda(rho: np.ndarray, flow: bool) -> np.ndarray:
    """λ = log(α/σ) of stored noise levels (VP: ρ = σ/α; flow: s with α = 1 − s, σ = s)."""
    return np.log1p(-rho) - np.log(rho) if flow else -np.log(rho)


def _rho(lam: np.ndarray, flow: bool) -> np.ndarray:
    """Inverse of ``_lambda``."""
    return 1.0 / (1.0 + np.exp(lam)) if flow else np.exp(-lam)


def teacher_grid(student: Plan, scheduler, spec: TeacherSpec) -> tuple[Nodes, list[int]]:
    """The teacher's nodes and, for each student node 0..N, its index among them."""
    flow = student.flow
    rho = np.asarray(student.rho, dtype=np.float64)
    final_zero = rho[-1] == 0.0
    ends = rho.copy()
    if final_zero:  # refine to the smallest trained noise level, then the exact jump to σ = 0
        ends[-1] = min(scheduler.training_rho_range()[0], rho[-2])
    lam = _lambda(ends, flow)
    lengths = np.maximum(np.diff(lam), 0.0)
    total = lengths.sum()
    counts = [max(1, int(round(spec.steps * length / total))) if length > 0 else 1 for length in lengths]
    refined, index = [lam[0]], [0]
    for i, m in enumerate(counts):
        refined.extend(np.linspace(lam[i], lam[i + 1], m + 1)[1:])
        index.append(len(refined) - 1)
    nodes_rho = _rho(np.asarray(refined), flow)
    nodes_rho[index] = ends  # student nodes exactly, not through exp/log
    if final_zero:
        if ends[-1] < rho[-2]:
            nodes_rho = np.append(nodes_rho, 0.0)
            index[-1] = len(nodes_rho) - 1
        else:
            nodes_rho[-1] = 0.0
    timesteps = scheduler.model_timesteps(nodes_rho[:-1])
    alpha, sigma = (1.0 - nodes_rho, nodes_rho) if flow else (1.0 / np.sqrt(1.0 + nodes_rho**2),
                                                               nodes_rho / np.sqrt(1.0 + nodes_rho**2))
    with np.errstate(divide="ignore"):
        lam_nodes = np.log(alpha) - np.log(sigma)
    return Nodes(timesteps, nodes_rho, alpha, sigma, lam_nodes, flow), index


def teacher_plan(student: Plan, scheduler, spec: TeacherSpec) -> tuple[Plan, list[int]]:
    nodes, index = teacher_grid(student, scheduler, spec)
    order = 3 if spec.solver == "dpmsolver++3" else 1
    builder = DPMSolverMultistep(order=order, lower_order_final=False, exact_third_order=True)
    return compile_plan(builder, nodes, scheduler.config.prediction_type), index


def teacher_key(student: Plan, scheduler, model, noise: torch.Tensor, spec: TeacherSpec) -> str:
    payload = json.dumps({"version": TEACHER_VERSION, "model": model.cache_key(), "noise": tensor_digest(noise),
                          "rho": student.rho.tolist(), "timesteps": student.timesteps.tolist(),  # numpy: ok-sync
                          "schedule": dict(student.meta.get("schedule", {})) if student.meta.get("schedule") else None,
                          "prediction_type": scheduler.config.prediction_type, "spec": asdict(spec)},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _shard_file(directory: Path, index: int) -> Path:
    return directory / f"shard_{index:05d}.safetensors"


def _read_shard(path: Path, count: int) -> torch.Tensor | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            states = f.get_tensor("states")
            meta = f.metadata() or {}
        if states.shape[1] != count or meta.get("sha256") != tensor_digest(states):
            raise ValueError("checksum or size mismatch")
        return states
    except Exception as exc:  # unreadable or corrupt: recompute
        warnings.warn(f"teacher shard {path} is unusable ({exc}); recomputing it", RuntimeWarning, stacklevel=3)
        return None


def _write_shard(path: Path, states: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"states": states.contiguous()}, str(tmp), metadata={"sha256": tensor_digest(states)})
    os.replace(tmp, path)


@torch.no_grad()
def shardable(model) -> bool:
    """Whether the teacher may run ``model`` on slices of the batch: it declares how (``subset(start, stop)``,
    slicing its per-sample conditions) or that it has no per-sample conditions (``per_sample_conditions = False``).
    A plain callable is run on the whole batch, since a label that follows the batch position would otherwise be
    paired with the wrong noise in every slice after the first."""
    return hasattr(model, "subset") or getattr(model, "per_sample_conditions", True) is False


def teacher_trajectories(scheduler, model, noise: torch.Tensor, spec: TeacherSpec = TeacherSpec(),
                         cache_dir: str | Path | None = None, shard_size: int = 16,
                         ctx: DistContext = DistContext(), progress: bool = True) -> torch.Tensor:
    """(N + 1, B, …) teacher states at the student's nodes (the student is ``scheduler`` after
    ``set_timesteps(N)``), state 0 being the noise itself."""
    student = scheduler.plan
    if student is None:
        raise RuntimeError("call scheduler.set_timesteps(num_inference_steps) before computing teacher trajectories")
    plan, index = teacher_plan(student, scheduler, spec)
    if not shardable(model):  # its conditions may follow the batch position: only the whole batch is safe
        if ctx.world_size > 1:
            raise ValueError("this model callable has no `subset(start, stop)`, so the teacher cannot be split across "
                             "processes (per-sample conditions would pair with the wrong noises): implement "
                             "`subset`, or set `model.per_sample_conditions = False` if it has none")
        shard_size = max(noise.shape[0], 1)
    shards = list(range(0, noise.shape[0], shard_size))
    directory = None
    if cache_dir is not None:
        directory = Path(cache_dir) / "teacher" / teacher_key(student, scheduler, model, noise, spec)
    done: dict[int, torch.Tensor] = {}
    mine = [s for k, s in enumerate(shards) if k % ctx.world_size == ctx.rank]
    for start in progress_bars.bar(mine, desc="teacher", enabled=progress, unit="shard"):
        part = noise[start:start + shard_size]
        cached = _read_shard(_shard_file(directory, start), part.shape[0]) if directory is not None and \
            _shard_file(directory, start).exists() else None
        if cached is None:
            _, states = run(plan, subset(model, start, start + part.shape[0]), part, record=True)
            cached = torch.stack([states[j] for j in index]).to(noise.dtype)
            if directory is not None:
                _write_shard(_shard_file(directory, start), cached)
        done[start] = cached
    ctx.barrier()
    for start in shards:
        if start not in done:
            if directory is None:
                raise RuntimeError("several processes need a shared `cache_dir` to exchange teacher shards")
            states = _read_shard(_shard_file(directory, start), noise[start:start + shard_size].shape[0])
            if states is None:
                raise RuntimeError(f"teacher shard {_shard_file(directory, start)} is missing after the barrier")
            done[start] = states
    return torch.cat([done[s] for s in shards], dim=1)
