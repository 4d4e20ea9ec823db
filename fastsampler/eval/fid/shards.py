"""Samples in resumable shards: per-shard seeds, atomic shard files with the SHA-256 of their images and everything
they depend on (``shard_metadata``), reuse only when both still match."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from fastsampler import progress as progress_bars
from fastsampler.models.conditions import SampleSource
from fastsampler.runtime.distributed import DistContext
from fastsampler.eval.fid.files import atomic_save_safetensors, images_sha256
from fastsampler.eval.fid.sampling import resolve_scheduler, sample_latents, to_uint8


SHARD_FORMAT = "2"  # "1": no checksum / identity metadata (never reused)
#: Shard metadata that must equal what the run would write for the shard to be reused (besides its checksum).
#: The rest ("nfe", "device") is informational.
#: What a conditional run records about its conditions (``conditions.Conditioning.metadata``). These are compared
#: even when the run would not record them, so an unconditional run never reuses a guided shard or vice versa.
CONDITION_KEYS = ("conditioning", "guidance_scale", "class_labels", "prompts_sha256", "negative_prompt")
SHARD_IDENTITY_KEYS = ("format", "shard", "count", "shape", "dtype", "convention", "seed", "shard_seed",
                       "shard_size", "scheduler", "scheduler_class", "scheduler_config", "steps", "pipeline",
                       *CONDITION_KEYS)


@dataclass(frozen=True)
class RunSpec:
    """One sampler configuration; together with the pipeline and its conditioning it determines every shard.

    ``guidance_scale``: classifier-free guidance for a conditional pipeline (``None``: unconditional pipelines; for
    conditional ones the same as 1, the conditional model).
    """

    scheduler: str
    steps: int
    scheduler_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    shard_size: int = 250
    guidance_scale: float | None = None

    def key(self, pipeline_id: str, conditioning: dict | None = None) -> str:
        """A short, filesystem-safe directory name that changes whenever the samples would.

        ``conditioning``: the run's ``Conditioning.identity()``. An unconditional spec (no guidance scale, no
        conditioning) keeps the key it had before guidance existed, so earlier shards stay reusable.
        """
        fields = asdict(self)
        if self.guidance_scale is None:
            del fields["guidance_scale"]
        payload = json.dumps({**fields, "pipeline": pipeline_id, **({"conditions": conditioning} if conditioning
                                                                     else {})}, sort_keys=True, default=str)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
        guided = "" if self.guidance_scale is None else f"_w{float(self.guidance_scale):g}"
        return f"{_spec_label(self.scheduler)}_s{self.steps}{guided}_{digest}"


def _spec_label(scheduler: str) -> str:
    """A readable, path-free label for a scheduler spec: a folder's own name or the class name.

    A folder spec such as ``/abs/tuned_g1.5`` must not become the run directory itself (joining an absolute
    path escapes ``out``), and the digest already keeps runs apart, so the label only has to be readable.
    """
    name, _, options = scheduler.partition(":")
    if "/" in name or os.sep in name:
        label = Path(name.rstrip("/" + os.sep)).name
    else:
        label = name.rpartition(".")[2]
    if options:
        label = f"{label}_{options}"
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", label)[:80]


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


def _json_default(value: Any) -> Any:
    """JSON for config values ``json`` does not know (arrays, tensors, enums, ...)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    return str(value)


def scheduler_fingerprint(scheduler, steps: int | None = None) -> str:
    """The scheduler's full config as canonical JSON (without diffusers' bookkeeping keys ``_*``), plus the
    fingerprints of the plans installed in it (a tuned scheduler), if any, and — for one of ours and ``steps`` —
    of the plan it runs at that step count: options that name files (``dc_ratios_file``, ``dc_cpr_file``) change
    the samples without changing the config, so a refitted ratio file must not reuse old shards."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    plans = getattr(scheduler, "plans", None)
    if plans:
        config["_plans"] = {str(n): p.fingerprint() for n, p in sorted(plans.items())}
    if steps is not None and hasattr(scheduler, "set_plan"):
        probe = copy.deepcopy(scheduler)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the run itself shows the scheduler's warnings
            probe.set_timesteps(steps)
        config["_plan"] = probe.plan.fingerprint()
    return json.dumps(config, sort_keys=True, default=_json_default)


def shard_metadata(spec: RunSpec, scheduler, index: int, count: int, image_shape: Sequence[int],
                   pipeline: str | None = None, conditions: dict[str, str] | None = None) -> dict[str, str]:
    """What shard ``index`` of ``spec`` must record for its images to be reused (``SHARD_IDENTITY_KEYS``).

    ``scheduler`` is a fresh instance of the run's scheduler (its config is recorded in full); ``image_shape`` is
    (C, H, W); ``pipeline`` the pipeline's identity (``pipeline_id``), when known; ``conditions`` what the shard's
    samples are conditioned on (``Conditioning.metadata``: ``CONDITION_KEYS``), for conditional runs.
    """
    meta = {"format": SHARD_FORMAT, "shard": str(index), "count": str(count),
            "shape": json.dumps([count, *image_shape]), "dtype": str(torch.uint8), "convention": "uint8-round",
            "seed": str(spec.seed), "shard_seed": str(shard_seed(spec.seed, index)),
            "shard_size": str(spec.shard_size), "scheduler": spec.scheduler,
            "scheduler_class": type(scheduler).__name__, "scheduler_config": scheduler_fingerprint(scheduler, spec.steps),
            "steps": str(spec.steps)}
    if pipeline is not None:
        meta["pipeline"] = pipeline
    return {**meta, **(conditions or {})}


def _describe_difference(key: str, stored: str | None, expected: str | None) -> str:
    """One line on how metadata ``key`` differs (for a JSON config: the differing entries)."""
    if stored is None:
        return f"{key} missing (expected {expected!r})"
    if expected is None:
        return f"{key}: stored {stored!r}, this run records none"
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
    ``expected`` (``SHARD_IDENTITY_KEYS``) was recorded with the same value and no condition (``CONDITION_KEYS``)
    was recorded that ``expected`` lacks, and that the tensor's shape and dtype are the expected ones.
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
    checked = [k for k in SHARD_IDENTITY_KEYS if k in expected or k in CONDITION_KEYS]
    differences = [_describe_difference(k, stored.get(k), expected.get(k))
                   for k in checked if stored.get(k) != expected.get(k)]
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


def _write_shard(path: Path, images: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write a shard atomically, recording the SHA-256 of its image bytes with ``metadata``."""
    images = images.contiguous()
    atomic_save_safetensors({"images": images}, path, {**metadata, "sha256": images_sha256(images)})


@dataclass
class GenerationReport:
    """What ``generate_shards`` did on this rank."""

    generated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    nfe: int | None = None
    seconds: float = 0.0


def generate_shards(model: nn.Module | SampleSource, base_config: dict, spec: RunSpec, num_samples: int,
                    run_dir: Path, ctx: DistContext = DistContext(), device: str | torch.device = "cpu",
                    progress: bool = True, pipeline: str | None = None) -> GenerationReport:
    """Generate this rank's missing shards of ``spec`` into ``run_dir`` (shard i belongs to rank i % world).

    ``model``: an unconditional network (``UNet2DModel``), or a ``SampleSource`` (a pipeline with its conditioning:
    class-balanced labels or prompts, guided with ``spec.guidance_scale``). An existing shard is reused only when its
    checksum and metadata (``shard_metadata``; ``pipeline``: the pipeline's identity, recorded and checked when
    given) match; otherwise it is regenerated with a warning.
    """
    source = SampleSource.wrap(model)
    source.conditioning.check_guidance(spec.guidance_scale)
    run_dir.mkdir(parents=True, exist_ok=True)
    counts = shard_counts(num_samples, spec.shard_size)
    reference_scheduler = resolve_scheduler(spec.scheduler, base_config, spec.scheduler_kwargs)  # before any use
    mine = [i for i in range(len(counts)) if i % ctx.world_size == ctx.rank]
    report = GenerationReport()
    t0 = time.perf_counter()
    bar = progress_bars.bar(mine, desc=f"{spec.scheduler.rpartition('.')[2]} {spec.steps} steps", unit="shard",
                            enabled=progress and ctx.is_main, leave=False)
    for i in bar:
        path = shard_path(run_dir, i)
        conditions = source.conditioning.metadata(spec.guidance_scale, i * spec.shard_size, counts[i])
        expected = shard_metadata(spec, reference_scheduler, i, counts[i], source.image_shape, pipeline, conditions)
        if _reusable_shard(path, expected):
            report.skipped.append(i)
            continue
        images, report.nfe = _sample_shard(source, base_config, spec, i, counts[i], device)
        _write_shard(path, images, {**expected, "nfe": str(report.nfe), "device": torch.device(device).type})
        report.generated.append(i)
    report.seconds = time.perf_counter() - t0
    return report


def _sample_shard(source: SampleSource, base_config: dict, spec: RunSpec, index: int, count: int,
                  device: str | torch.device) -> tuple[torch.Tensor, int]:
    """The uint8 images (CPU) of shard ``index`` (``count`` samples) and the NFE it took.

    The noise is the first ``count`` of ``shard_size`` draws from the shard's seed (CPU generator), so it does not
    depend on the device or on how many samples the last shard holds.
    """
    gen = torch.Generator(device="cpu").manual_seed(shard_seed(spec.seed, index))
    dtype = getattr(source.network, "dtype", torch.float32)
    noise = torch.randn((spec.shard_size, *source.noise_shape), generator=gen)[:count].to(device, dtype)
    step_gen = gen if str(device) == "cpu" else torch.Generator(device=device).manual_seed(shard_seed(spec.seed, index))
    scheduler = resolve_scheduler(spec.scheduler, base_config, spec.scheduler_kwargs)
    denoiser = source.denoiser(spec.guidance_scale, index * spec.shard_size, count)
    x, nfe = sample_latents(denoiser, scheduler, spec.steps, noise, step_gen)
    return to_uint8(source.decode(x)).cpu(), nfe


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
