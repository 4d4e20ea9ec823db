"""FID of any diffusers-compatible scheduler on a local unconditional pipeline, sharded and resumable.

The pieces, in the order a run uses them:

* ``resolve_scheduler`` — a class name (``"DDIMScheduler"``: diffusers; ``"fastsampler.UniPCScheduler"``, or
  any ``"package.module.Class"``) → an instance built with ``from_config(pipeline_config, **overrides)``.
* ``sample`` — a plain diffusers loop (``set_timesteps``; ``init_noise_sigma``; ``scale_model_input``; ``step``,
  with ``generator=`` only where ``step`` accepts it), so every diffusers scheduler works. Counts the NFE.
* ``generate_shards`` — samples in fixed-size shards with per-shard seeds (``shard_seed``), so the image set does
  not depend on the number of processes. Shard *i* goes to rank ``i % world_size``; each is written atomically
  (``shard_00003.safetensors``, uint8 NCHW) as soon as it is done, and existing shards are skipped, so an
  interrupted run resumes where it stopped. Each shard records the SHA-256 of its image bytes and everything
  its images depend on (``shard_metadata``); on resume a shard is only reused when both still match, otherwise
  it is regenerated with a ``RuntimeWarning`` naming the file and what differed.
* ``FIDEvaluator`` — torchmetrics ``FrechetInceptionDistance`` with either the digits CNN extractor or
  InceptionV3 (only from a local weights file), reference statistics cached on disk (``reference_stats``),
  fake statistics from the shards in index order, so the number is identical for any world size. A cache file
  that cannot be read or fails validation (checksum, key, shapes) is recomputed with a ``RuntimeWarning``.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``distributed_context`` initialises a gloo
process group; every rank generates its shards, all meet at a barrier and rank 0 computes the FID. With
``device="cuda"`` each rank samples on ``cuda:<LOCAL_RANK>`` (``select_device``).

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
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
DIGITS_REFERENCES = ("digits-train", "digits-test", "digits-all")
STATS_VERSION = 1  # bump when the way reference statistics are computed changes
SHARD_FORMAT = "2"  # "1": no checksum / identity metadata (never reused)
#: Shard metadata that must equal what the run would write for the shard to be reused (besides its checksum).
#: The rest ("nfe", "device") is informational.
SHARD_IDENTITY_KEYS = ("format", "shard", "count", "shape", "dtype", "convention", "seed", "shard_seed",
                       "shard_size", "scheduler", "scheduler_class", "scheduler_config", "steps", "pipeline")


# --------------------------------------------------------------------------------------------------
# Distributed context
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistContext:
    """Rank, world size and node-local rank of this process (``world_size == 1``: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index among the processes on this machine: the GPU it uses (torchrun's LOCAL_RANK)

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
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun) and initialise a gloo group when there is more
    than one rank. Without ``LOCAL_RANK`` the local rank is the global rank (one machine)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    return DistContext(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", str(rank))))


def select_device(device: str | torch.device, ctx: DistContext) -> str:
    """The device this rank samples on.

    ``"cuda"`` without an index becomes ``"cuda:<local rank>"`` (so torchrun's ranks each get their own GPU instead
    of all landing on ``cuda:0``); a CUDA device is also made the current one (``torch.cuda.set_device``). Any
    other device is returned unchanged.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return str(device)
    index = ctx.local_rank if dev.index is None else dev.index
    visible = torch.cuda.device_count()
    if index >= visible:
        raise RuntimeError(f"device {device!r} on rank {ctx.rank} (LOCAL_RANK {ctx.local_rank}) needs cuda:{index}, "
                           f"but only {visible} CUDA device(s) are visible")
    torch.cuda.set_device(index)
    return f"cuda:{index}"


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


def images_sha256(images: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(images.detach().cpu().numpy())).hexdigest()


def _json_default(value: Any) -> Any:
    """JSON for config values ``json`` does not know (arrays, tensors, enums, ...)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    return str(value)


def scheduler_fingerprint(scheduler) -> str:
    """The scheduler's full config as canonical JSON (without diffusers' bookkeeping keys ``_*``)."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return json.dumps(config, sort_keys=True, default=_json_default)


def shard_metadata(spec: RunSpec, scheduler, index: int, count: int, image_shape: Sequence[int],
                   pipeline: str | None = None) -> dict[str, str]:
    """What shard ``index`` of ``spec`` must record for its images to be reused (``SHARD_IDENTITY_KEYS``).

    ``scheduler`` is a fresh instance of the run's scheduler (its config is recorded in full); ``image_shape`` is
    (C, H, W); ``pipeline`` the pipeline's identity (``pipeline_id``), when known.
    """
    meta = {"format": SHARD_FORMAT, "shard": str(index), "count": str(count),
            "shape": json.dumps([count, *image_shape]), "dtype": str(torch.uint8), "convention": "uint8-round",
            "seed": str(spec.seed), "shard_seed": str(shard_seed(spec.seed, index)),
            "shard_size": str(spec.shard_size), "scheduler": spec.scheduler,
            "scheduler_class": type(scheduler).__name__, "scheduler_config": scheduler_fingerprint(scheduler),
            "steps": str(spec.steps)}
    if pipeline is not None:
        meta["pipeline"] = pipeline
    return meta


def _describe_difference(key: str, stored: str | None, expected: str) -> str:
    """One line on how metadata ``key`` differs (for a JSON config: the differing entries)."""
    if stored is None:
        return f"{key} missing (expected {expected!r})"
    if key == "scheduler_config":
        try:
            old, new = json.loads(stored), json.loads(expected)
        except ValueError:
            return f"{key}: stored value is not valid JSON"
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
        return f"{key}: " + ", ".join(f"{k} stored {old.get(k, '<unset>')!r}, expected {new.get(k, '<unset>')!r}"
                                      for k in keys)
    return f"{key}: stored {stored!r}, expected {expected!r}"


def shard_mismatch(path: Path, expected: dict[str, str]) -> str | None:
    """Why the shard file at ``path`` cannot be reused as a shard with metadata ``expected`` (None: it can).

    Checks that the file reads, that its image bytes hash to the recorded SHA-256, that every identity key of
    ``expected`` (``SHARD_IDENTITY_KEYS``) was recorded with the same value, and that the tensor's shape and dtype
    are the expected ones.
    """
    try:
        images, stored = read_shard(path)
    except Exception as err:  # truncated / corrupt file
        return f"unreadable ({type(err).__name__}: {err})"
    if "sha256" not in stored:
        return "no checksum recorded (written by an older fastsampler, or not a shard of this run)"
    actual = images_sha256(images)
    if actual != stored["sha256"]:
        return (f"checksum mismatch: the image bytes hash to {actual[:16]}…, the file records "
                f"{stored['sha256'][:16]}…")
    differences = [_describe_difference(k, stored.get(k), expected[k])
                   for k in SHARD_IDENTITY_KEYS if k in expected and stored.get(k) != expected[k]]
    if differences:
        return "metadata differs: " + "; ".join(differences)
    if json.dumps(list(images.shape)) != expected["shape"] or str(images.dtype) != expected["dtype"]:
        return (f"the tensor is {images.dtype} {list(images.shape)}, expected {expected['dtype']} "
                f"{expected['shape']}")
    return None


def _reusable_shard(path: Path, expected: dict[str, str]) -> bool:
    """Whether the shard at ``path`` exists and matches ``expected``; warns (naming the file) when it exists but
    does not."""
    if not path.is_file():
        return False
    problem = shard_mismatch(path, expected)
    if problem is None:
        return True
    warnings.warn(f"FID shard {path} cannot be reused, regenerating it: {problem}", RuntimeWarning, stacklevel=3)
    return False


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (temporary file in the same directory, then ``os.replace``)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_shard(path: Path, images: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write a shard atomically, recording the SHA-256 of its image bytes with ``metadata``."""
    images = images.contiguous()
    _atomic_save_safetensors({"images": images}, path, {**metadata, "sha256": images_sha256(images)})


@dataclass
class GenerationReport:
    """What ``generate_shards`` did on this rank."""

    generated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    nfe: int | None = None
    seconds: float = 0.0


def generate_shards(unet: nn.Module, base_config: dict, spec: RunSpec, num_samples: int, run_dir: Path,
                    ctx: DistContext = DistContext(), device: str | torch.device = "cpu",
                    progress: bool = True, pipeline: str | None = None) -> GenerationReport:
    """Generate this rank's missing shards of ``spec`` into ``run_dir`` (shard i belongs to rank i % world).

    An existing shard is reused only when its checksum and metadata (``shard_metadata``; ``pipeline``: the
    pipeline's identity, recorded and checked when given) match; otherwise it is regenerated with a warning.
    """
    from tqdm.auto import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) \
        else (cfg.in_channels, *cfg.sample_size)
    counts = shard_counts(num_samples, spec.shard_size)
    reference_scheduler = resolve_scheduler(spec.scheduler, base_config, spec.scheduler_kwargs)  # before any use
    mine = [i for i in range(len(counts)) if i % ctx.world_size == ctx.rank]
    report = GenerationReport()
    t0 = time.perf_counter()
    bar = tqdm(mine, desc=f"{spec.scheduler.rpartition('.')[2]} {spec.steps} steps", unit="shard",
               disable=not (progress and ctx.is_main), leave=False)
    for i in bar:
        path = shard_path(run_dir, i)
        expected = shard_metadata(spec, reference_scheduler, i, counts[i], shape, pipeline)
        if _reusable_shard(path, expected):
            report.skipped.append(i)
            continue
        gen = torch.Generator(device="cpu").manual_seed(shard_seed(spec.seed, i))
        noise = torch.randn((spec.shard_size, *shape), generator=gen)[:counts[i]].to(device)
        step_gen = gen if str(device) == "cpu" else torch.Generator(device=device).manual_seed(shard_seed(spec.seed, i))
        scheduler = resolve_scheduler(spec.scheduler, base_config, spec.scheduler_kwargs)
        x, nfe = sample(unet, scheduler, spec.steps, noise, step_gen)
        report.nfe = nfe
        _write_shard(path, to_uint8(x).cpu(), {**expected, "nfe": str(nfe), "device": torch.device(device).type})
        report.generated.append(i)
    report.seconds = time.perf_counter() - t0
    return report


def iter_shards(run_dir: Path, num_samples: int, shard_size: int) -> Iterator[torch.Tensor]:
    """The uint8 images of every shard, in index order (each checked against its recorded checksum)."""
    for i, count in enumerate(shard_counts(num_samples, shard_size)):
        path = shard_path(run_dir, i)
        images, meta = read_shard(path)
        if images.shape[0] != count:
            raise RuntimeError(f"{path} holds {images.shape[0]} images, expected {count}")
        if meta.get("sha256") != images_sha256(images):
            raise RuntimeError(f"{path}: the image bytes do not match the recorded checksum (the file changed after "
                               "it was generated); rerun to regenerate it")
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
    key = {"version": STATS_VERSION, "reference": reference_id(reference), "convention": "uint8-round",
           **extractor.identity()}
    key_json = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key_json.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"refstats_{extractor.name}_{digest}.safetensors"
    if path.is_file():
        cached = _load_reference_stats(path, key_json)
        if cached is not None:
            return cached
    metric = extractor.metric()
    images = load_reference_images(reference)
    for i in range(0, images.shape[0], batch_size):
        metric.update(extractor.prepare(images[i:i + batch_size]), real=True)
    states = {name: getattr(metric, name).detach().clone() for name in REAL_STATES}
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save_safetensors(states, path, {"key": key_json, "sha256": _states_sha256(states)})
    return states


def _states_sha256(states: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``states``."""
    h = hashlib.sha256()
    for name in sorted(states):
        t = states[name]
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(images_sha256(t).encode())
    return h.hexdigest()


def _check_reference_stats(states: dict[str, torch.Tensor], metadata: dict[str, str], key_json: str) -> None:
    """Raise ``ValueError`` saying why cached reference statistics are unusable."""
    if set(states) != set(REAL_STATES):
        raise ValueError(f"holds {sorted(states)}, expected {sorted(REAL_STATES)}")
    if metadata.get("key") != key_json:
        raise ValueError("its recorded key does not match the extractor/reference it is named after")
    if metadata.get("sha256") != _states_sha256(states):
        raise ValueError("checksum mismatch (missing, or the tensors changed after they were written)")
    total, cov, count = (states[name] for name in REAL_STATES)
    features = total.shape[0] if total.dim() == 1 else -1
    if features < 1 or tuple(cov.shape) != (features, features) or count.numel() != 1 or int(count) < 2:
        raise ValueError(f"inconsistent shapes/count: sum {list(total.shape)}, cov_sum {list(cov.shape)}, "
                         f"num_samples {count.tolist()}")
    if not (torch.isfinite(total).all() and torch.isfinite(cov).all()):
        raise ValueError("non-finite statistics")


def _load_reference_stats(path: Path, key_json: str) -> dict[str, torch.Tensor] | None:
    """Cached reference statistics from ``path``, or None (with a warning naming the file) when unusable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            states = {name: f.get_tensor(name) for name in f.keys()}
            metadata = dict(f.metadata() or {})
        _check_reference_stats(states, metadata, key_json)
    except Exception as err:  # unreadable, truncated, or fails validation: recompute
        warnings.warn(f"FID reference statistics cache {path} is unusable, recomputing it: "
                      f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=3)
        return None
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
                             progress, pipeline=pipe_id)
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

    ``features="auto"``: the digits extractor for the ``digits-*`` references, InceptionV3 otherwise. ``device``
    goes through ``select_device`` (``"cuda"``: ``cuda:<LOCAL_RANK>``). Returns the results on rank 0 and an empty
    list on the other ranks.
    """
    from tqdm.auto import tqdm

    ctx = ctx or distributed_context()
    if features == "auto":
        features = "digits" if reference in DIGITS_REFERENCES else "inception"
    extractor = Extractor.create(features, inception_weights)  # every rank fails early on a bad choice
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "ref_stats"
    device = select_device(device, ctx)  # "cuda" → this rank's own GPU
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
