"""FID of any diffusers-compatible scheduler on a local unconditional pipeline, sharded and resumable.

The pieces, in the order a run uses them:

* ``resolve_scheduler`` — a class name (``"DDIMScheduler"``: diffusers; ``"fastsampler.UniPCScheduler"``, or
  any ``"package.module.Class"``) → an instance built with ``from_config(pipeline_config, **overrides)``.
* ``sample`` — a plain diffusers loop (``set_timesteps``; ``init_noise_sigma``; ``scale_model_input``; ``step``,
  with ``generator=`` only where ``step`` accepts it), so every diffusers scheduler works. Counts the NFE.
* ``generate_shards`` — samples in fixed-size shards with per-shard seeds (``shard_seed``), so the image set does
  not depend on the number of processes. Shard *i* goes to rank ``i % world_size``; each is written atomically
  (``shard_00003.safetensors``, uint8 NCHW) as soon as it is done, and existing shards are skipped, so an
  interrupted run resumes where it stopped.
* ``FIDEvaluator`` — torchmetrics ``FrechetInceptionDistance`` with either the digits CNN extractor or
  InceptionV3 (only from a local weights file), reference statistics cached on disk (``reference_stats``),
  fake statistics from the shards in index order, so the number is identical for any world size.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``distributed_context`` initialises a gloo
process group; every rank generates its shards, all meet at a barrier and rank 0 computes the FID.

Image convention: samples in [−1, 1] are stored and scored as uint8 ``round((x + 1) · 127.5)`` (what a PNG would
hold); reference images get exactly the same conversion. The metric is used with ``normalize=False`` and uint8
input for both extractors.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
DIGITS_REFERENCES = ("digits-train", "digits-test", "digits-all")
STATS_VERSION = 1  # bump when the way reference statistics are computed changes


# --------------------------------------------------------------------------------------------------
# Distributed context
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistContext:
    """Rank and world size of this process (``world_size == 1``: no process group)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """``obj`` from rank 0 on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def distributed_context() -> DistContext:
    """Read ``RANK``/``WORLD_SIZE`` (set by torchrun) and initialise a gloo group when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())


# --------------------------------------------------------------------------------------------------
# Schedulers and the sampling loop
# --------------------------------------------------------------------------------------------------

def resolve_scheduler_class(name: str) -> type:
    """``"DDIMScheduler"`` → ``diffusers.DDIMScheduler``; ``"fastsampler.X"`` / ``"pkg.mod.X"`` → that attribute."""
    module_name, _, attr = name.rpartition(".")
    module = importlib.import_module(module_name or "diffusers")
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"scheduler {name!r}: {module.__name__} has no attribute {attr!r}") from None


def resolve_scheduler(name: str, base_config: dict, overrides: dict | None = None):
    """An instance of scheduler ``name`` with the pipeline's noise schedule (``from_config``) and ``overrides``."""
    return resolve_scheduler_class(name).from_config(dict(base_config), **(overrides or {}))


def accepts_generator(scheduler) -> bool:
    """Whether ``scheduler.step`` takes a ``generator`` argument (stochastic samplers)."""
    return "generator" in inspect.signature(scheduler.step).parameters


@torch.no_grad()
def sample(unet: nn.Module, scheduler, num_steps: int, noise: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Run ``scheduler`` for ``num_steps`` from ``noise`` (unit variance); returns ``(x0 in [−1, 1], NFE)``."""
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    step_kwargs = {"generator": generator} if accepts_generator(scheduler) else {}
    nfe = 0
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = unet(model_in, t).sample
        nfe += 1
        x = scheduler.step(out, t, x, return_dict=False, **step_kwargs)[0]
    return x.clamp(-1.0, 1.0), nfe


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] float → uint8 ``round((x + 1) · 127.5)`` (the PNG convention)."""
    return ((x.to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    """One sampler configuration; together with the pipeline it determines every shard."""

    scheduler: str
    steps: int
    scheduler_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    shard_size: int = 250

    def key(self, pipeline_id: str) -> str:
        """A short, filesystem-safe directory name that changes whenever the samples would."""
        payload = json.dumps({**asdict(self), "pipeline": pipeline_id}, sort_keys=True, default=str)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
        return f"{self.scheduler.rpartition('.')[2]}_s{self.steps}_{digest}"


def shard_seed(seed: int, shard: int) -> int:
    """The seed of shard ``shard``: a hash of (seed, shard), independent of world size and shard order."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1, dtype=np.uint64)[0] >> 1)


def shard_counts(num_samples: int, shard_size: int) -> list[int]:
    """Samples per shard: full shards then the remainder."""
    full, rest = divmod(num_samples, shard_size)
    return [shard_size] * full + ([rest] if rest else [])


def shard_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"shard_{index:05d}.safetensors"


def read_shard(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """(uint8 images, metadata) of a shard file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("images"), dict(f.metadata() or {})


def _shard_is_complete(path: Path, count: int) -> bool:
    if not path.is_file():
        return False
    try:
        images, _ = read_shard(path)
    except Exception:  # truncated / corrupt file: regenerate it
        return False
    return images.shape[0] == count


def _write_shard(path: Path, images: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"images": images.contiguous()}, str(tmp), metadata=metadata)
    tmp.replace(path)


@dataclass
class GenerationReport:
    """What ``generate_shards`` did on this rank."""

    generated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    nfe: int | None = None
    seconds: float = 0.0


def generate_shards(unet: nn.Module, base_config: dict, spec: RunSpec, num_samples: int, run_dir: Path,
                    ctx: DistContext = DistContext(), device: str | torch.device = "cpu",
                    progress: bool = True) -> GenerationReport:
    """Generate this rank's missing shards of ``spec`` into ``run_dir`` (shard i belongs to rank i % world)."""
    from tqdm.auto import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) \
        else (cfg.in_channels, *cfg.sample_size)
    counts = shard_counts(num_samples, spec.shard_size)
    mine = [i for i in range(len(counts)) if i % ctx.world_size == ctx.rank]
    report = GenerationReport()
    t0 = time.perf_counter()
    bar = tqdm(mine, desc=f"{spec.scheduler.rpartition('.')[2]} {spec.steps} steps", unit="shard",
               disable=not (progress and ctx.is_main), leave=False)
    for i in bar:
        path = shard_path(run_dir, i)
        if _shard_is_complete(path, counts[i]):
            report.skipped.append(i)
            continue
        gen = torch.Generator(device="cpu").manual_seed(shard_seed(spec.seed, i))
        noise = torch.randn((spec.shard_size, *shape), generator=gen)[:counts[i]].to(device)
        step_gen = gen if str(device) == "cpu" else torch.Generator(device=device).manual_seed(shard_seed(spec.seed, i))
        scheduler = resolve_scheduler(spec.scheduler, base_config, spec.scheduler_kwargs)
        x, nfe = sample(unet, scheduler, spec.steps, noise, step_gen)
        report.nfe = nfe
        _write_shard(path, to_uint8(x).cpu(), {"shard": str(i), "nfe": str(nfe), "seed": str(shard_seed(spec.seed, i)),
                                               "scheduler": spec.scheduler, "steps": str(spec.steps)})
        report.generated.append(i)
    report.seconds = time.perf_counter() - t0
    return report


def iter_shards(run_dir: Path, num_samples: int, shard_size: int) -> Iterator[torch.Tensor]:
    """The uint8 images of every shard, in index order."""
    for i, count in enumerate(shard_counts(num_samples, shard_size)):
        images, _ = read_shard(shard_path(run_dir, i))
        if images.shape[0] != count:
            raise RuntimeError(f"{shard_path(run_dir, i)} holds {images.shape[0]} images, expected {count}")
        yield images


def shard_nfe(run_dir: Path) -> int | None:
    """The NFE recorded in the first shard of a run (None when it has none)."""
    path = shard_path(run_dir, 0)
    return int(read_shard(path)[1]["nfe"]) if path.is_file() else None


# --------------------------------------------------------------------------------------------------
# Pipelines and references
# --------------------------------------------------------------------------------------------------

def load_pipeline(path: str | Path | None):
    """A local diffusers pipeline with ``unet`` and ``scheduler`` (``None``: the embedded digits DDPM), in eval mode."""
    if path is None:
        from fastsampler.eval.digits import load_digits_pipeline

        pipe = load_digits_pipeline("eps")
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "scheduler"):
        raise ValueError(f"{path}: need an unconditional pipeline with `unet` and `scheduler` components")
    pipe.unet.eval().requires_grad_(False)
    return pipe


def pipeline_id(path: str | Path | None) -> str:
    """Identity of a pipeline directory for cache keys: its path plus the size and mtime of every file in it."""
    from fastsampler.eval.digits import pipeline_dir

    root = Path(path) if path is not None else pipeline_dir("eps")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    listing = [(str(p.relative_to(root)), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return hashlib.sha256(json.dumps([str(root.resolve()), listing]).encode()).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_reference_images(reference: str) -> torch.Tensor:
    """Reference images as uint8 NCHW: ``digits-train|test|all``, a tensor file (.pt/.safetensors/.npz; uint8
    or float in [−1, 1]) or a directory of image files."""
    if reference in DIGITS_REFERENCES:
        from fastsampler.eval.digits import digits_dataset

        return to_uint8(digits_dataset(reference.split("-", 1)[1]))
    path = Path(reference)
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
        if not files:
            raise FileNotFoundError(f"no images in {path}")
        arrays = [np.asarray(Image.open(p)) for p in files]
        x = torch.as_tensor(np.stack(arrays))
        return (x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)).contiguous()
    if not path.is_file():
        raise FileNotFoundError(f"reference {reference!r} is neither one of {DIGITS_REFERENCES} nor a file/directory")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        x = tensors.get("images", next(iter(tensors.values())))
    elif path.suffix == ".npz":
        with np.load(path) as data:
            x = torch.as_tensor(data[data.files[0]])
    else:
        x = torch.load(path, weights_only=True)
    return x if x.dtype == torch.uint8 else to_uint8(x)


def reference_id(reference: str) -> dict:
    """What the reference images depend on (for the statistics cache key)."""
    if reference in DIGITS_REFERENCES:
        from fastsampler.eval import digits

        return {"digits": reference, "split_seed": digits.SPLIT_SEED, "test_fraction": digits.TEST_FRACTION,
                "size": digits.IMAGE_SIZE}
    path = Path(reference)
    if path.is_dir():
        return {"dir": str(path.resolve()), "files": sorted((p.name, p.stat().st_size, int(p.stat().st_mtime))
                                                            for p in path.iterdir() if p.is_file())}
    return {"file_sha256": _file_sha256(path)}


# --------------------------------------------------------------------------------------------------
# Feature extractors and the metric
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Extractor:
    """A feature space: ``name`` (``digits`` | ``inception``), and its weights file."""

    name: str
    weights: Path

    @classmethod
    def create(cls, name: str, inception_weights: str | Path | None = None) -> "Extractor":
        """Validate the choice early: InceptionV3 needs a local weights file (nothing is ever downloaded)."""
        if name == "digits":
            from fastsampler.eval.digits import CLASSIFIER_FILE, assets_dir

            return cls("digits", assets_dir() / CLASSIFIER_FILE)
        if name != "inception":
            raise ValueError(f"feature extractor must be 'digits' or 'inception', got {name!r}")
        if inception_weights is None:
            raise FileNotFoundError(
                "InceptionV3 FID needs a local weights file: pass --inception-weights PATH pointing at "
                f"torch-fidelity's '{INCEPTION_WEIGHTS_FILE}' (pt_inception-2015-12-05 weights); "
                "nothing is downloaded.")
        path = Path(inception_weights)
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights {path}: file not found (expected torch-fidelity's "
                                    f"'{INCEPTION_WEIGHTS_FILE}')")
        return cls("inception", path)

    def identity(self) -> dict:
        return {"extractor": self.name, "weights_sha256": _file_sha256(self.weights)}

    def metric(self):
        """A fresh ``FrechetInceptionDistance`` (uint8 input, ``reset_real_features=False``).

        ``sync_on_compute=False``: only rank 0 scores (all shards, read from disk), so torchmetrics must not try to
        all-gather its states across the process group.
        """
        from torchmetrics.image.fid import FrechetInceptionDistance

        if self.name == "digits":
            from fastsampler.eval.features import DigitsFeatureExtractor

            return FrechetInceptionDistance(feature=DigitsFeatureExtractor.from_file(self.weights),
                                            reset_real_features=False, normalize=False, sync_on_compute=False)
        try:
            return FrechetInceptionDistance(feature=2048, reset_real_features=False, normalize=False,
                                            feature_extractor_weights_path=str(self.weights), antialias=False,
                                            sync_on_compute=False)
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError("InceptionV3 FID needs torch-fidelity: pip install torch-fidelity "
                                      "(or fastsampler[fid])") from err

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW → what the extractor takes (Inception: 3 channels; it resizes to 299 itself)."""
        if self.name == "inception" and images.shape[1] == 1:
            return images.expand(-1, 3, -1, -1).contiguous()
        return images


REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def reference_stats(extractor: Extractor, reference: str, cache_dir: Path, batch_size: int = 500) -> dict:
    """The metric's real-feature states for ``reference``, computed once and cached in ``cache_dir``.

    The cache file name is a hash of the extractor weights, the reference's identity, the image convention and
    ``STATS_VERSION``; a stale file can therefore never be picked up.
    """
    from safetensors.torch import load_file, save_file

    key = {"version": STATS_VERSION, "reference": reference_id(reference), "convention": "uint8-round",
           **extractor.identity()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"refstats_{extractor.name}_{digest}.safetensors"
    if path.is_file():
        return load_file(str(path))
    metric = extractor.metric()
    images = load_reference_images(reference)
    for i in range(0, images.shape[0], batch_size):
        metric.update(extractor.prepare(images[i:i + batch_size]), real=True)
    states = {name: getattr(metric, name).detach().clone() for name in REAL_STATES}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(states, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)})
    tmp.replace(path)
    return states


class FIDEvaluator:
    """FID of image batches against cached reference statistics (torchmetrics ``FrechetInceptionDistance``)."""

    def __init__(self, extractor: Extractor, reference: str, cache_dir: Path) -> None:
        self.extractor = extractor
        self.metric = extractor.metric()
        for name, value in reference_stats(extractor, reference, cache_dir).items():
            setattr(self.metric, name, value.clone())
        self.reference_count = int(self.metric.real_features_num_samples)

    def __call__(self, batches: Iterator[torch.Tensor] | Sequence[torch.Tensor]) -> float:
        """FID of all images in ``batches`` (uint8 NCHW); the fake statistics are reset first."""
        self.metric.reset()  # keeps the real statistics (reset_real_features=False)
        for images in batches:
            self.metric.update(self.extractor.prepare(images), real=False)
        return float(self.metric.compute())


# --------------------------------------------------------------------------------------------------
# One run, end to end
# --------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """One row of the FID table."""

    scheduler: str
    steps: int
    nfe: int
    fid: float
    num_samples: int
    scheduler_kwargs: dict
    seconds: float
    shards_generated: int
    shards_reused: int
    run_dir: str


def evaluate_run(pipe, pipe_id: str, spec: RunSpec, num_samples: int, out_dir: Path,
                 evaluator: FIDEvaluator | None, ctx: DistContext = DistContext(), device: str = "cpu",
                 progress: bool = True, on_generated: Callable[[GenerationReport], None] | None = None
                 ) -> RunResult | None:
    """Generate (resuming) the shards of ``spec`` on every rank, then FID on rank 0 (other ranks get ``None``).

    ``evaluator`` is only used on rank 0 (pass ``None`` elsewhere).
    """
    run_dir = Path(out_dir) / spec.key(pipe_id)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps({**asdict(spec), "pipeline_id": pipe_id,
                                                      "num_samples": num_samples}, indent=2) + "\n")
    t0 = time.perf_counter()
    report = generate_shards(pipe.unet, dict(pipe.scheduler.config), spec, num_samples, run_dir, ctx, device,
                             progress)
    if on_generated is not None:
        on_generated(report)
    ctx.barrier()
    seconds = time.perf_counter() - t0
    counts = _gather_counts(ctx, len(report.generated), len(report.skipped))
    if not ctx.is_main:
        return None
    fid = evaluator(iter_shards(run_dir, num_samples, spec.shard_size))
    return RunResult(scheduler=spec.scheduler, steps=spec.steps, nfe=int(shard_nfe(run_dir) or spec.steps),
                     fid=fid, num_samples=num_samples, scheduler_kwargs=dict(spec.scheduler_kwargs),
                     seconds=round(seconds, 2), shards_generated=counts[0], shards_reused=counts[1],
                     run_dir=str(run_dir))


def _gather_counts(ctx: DistContext, generated: int, skipped: int) -> tuple[int, int]:
    """Sum (generated, skipped) shard counts over ranks."""
    if ctx.world_size == 1:
        return generated, skipped
    t = torch.tensor([generated, skipped], dtype=torch.int64)
    torch.distributed.all_reduce(t)
    return int(t[0]), int(t[1])


def run_sweep(specs: Sequence[RunSpec], num_samples: int, out_dir: str | Path, pipeline: str | Path | None = None,
              reference: str = "digits-train", features: str = "auto", inception_weights: str | Path | None = None,
              cache_dir: str | Path | None = None, device: str = "cpu", progress: bool = True,
              ctx: DistContext | None = None) -> list[RunResult]:
    """Evaluate every spec in order (shared pipeline, reference statistics and output dir).

    ``features="auto"``: the digits extractor for the ``digits-*`` references, InceptionV3 otherwise. Returns the
    results on rank 0 and an empty list on the other ranks.
    """
    from tqdm.auto import tqdm

    ctx = ctx or distributed_context()
    if features == "auto":
        features = "digits" if reference in DIGITS_REFERENCES else "inception"
    extractor = Extractor.create(features, inception_weights)  # every rank fails early on a bad choice
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "ref_stats"
    pipe = load_pipeline(pipeline).to(device)
    pipe_id = pipeline_id(pipeline)
    evaluator = FIDEvaluator(extractor, reference, cache_dir) if ctx.is_main else None
    results: list[RunResult] = []
    for spec in tqdm(specs, desc="runs", unit="run", disable=not (progress and ctx.is_main)):
        result = evaluate_run(pipe, pipe_id, spec, num_samples, out_dir, evaluator, ctx, device, progress)
        if result is not None:
            results.append(result)
            if progress:
                tqdm.write(f"{spec.scheduler} steps={spec.steps} NFE={result.nfe}: FID {result.fid:.3f} "
                           f"({result.seconds:.0f}s, {result.shards_generated} shards new)")
    return results
