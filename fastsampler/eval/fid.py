"""FID of any diffusers-compatible scheduler on a local pipeline, sharded and resumable.

Pipelines: unconditional (the embedded digits DDPM), class-conditional with classifier-free guidance (the embedded
``digits-cond`` model; class-balanced labels ``j mod K``) and text-to-image (prompts ``j mod P`` from a file);
``fastsampler.eval.conditions`` holds what a run is conditioned on and draws the denoiser of each shard from
``fastsampler.tuning.model.from_pipeline``.

The pieces, in the order a run uses them:

* ``resolve_scheduler`` — a class name (``"DDIMScheduler"``: diffusers; ``"fastsampler.UniPCScheduler"``, or
  any ``"package.module.Class"``) → an instance built with ``from_config(pipeline_config, **overrides)``.
* ``sample`` / ``sample_latents`` — a plain diffusers loop (``set_timesteps``; ``init_noise_sigma``;
  ``scale_model_input``; ``step``, with ``generator=`` only where ``step`` accepts it), so every diffusers scheduler
  works, around a network or a guided denoiser ``model(x, t)``. Counts the NFE (a guided step, both halves in one
  batch, is one).
* ``generate_shards`` — samples in fixed-size shards with per-shard seeds (``shard_seed``), so the image set does
  not depend on the number of processes. Shard *i* goes to rank ``i % world_size``; each is written atomically
  (``shard_00003.safetensors``, uint8 NCHW) as soon as it is done, and existing shards are skipped, so an
  interrupted run resumes where it stopped. Each shard records the SHA-256 of its image bytes and everything
  its images depend on (``shard_metadata``: sampler, seeds, pipeline, and for conditional runs the guidance
  scale, the class labels or a digest of the prompts, the negative prompt); on resume a shard is only reused when
  both still match, otherwise it is regenerated with a ``RuntimeWarning`` naming the file and what differed.
  Latent models' samples are decoded with the pipeline's VAE before they are stored.
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

import copy
import hashlib
import importlib
import inspect
import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from fastsampler import progress as progress_bars
from fastsampler.eval.conditions import Conditioning, OptionError, SampleSource, conditioning_for
from fastsampler.eval.distributed import DistContext, distributed_context, select_device  # noqa: F401
# the embedded pipelines by the one name every entry point takes: the digits DDPM (ε; the default), its
# v-prediction twin, and the class-conditional digits model (classifier-free guidance)
from fastsampler.shipped import EMBEDDED_PIPELINES, canonical  # noqa: F401

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
DIGITS_REFERENCES = ("digits-train", "digits-test", "digits-all")
STATS_VERSION = 1  # bump when the way reference statistics are computed changes
SHARD_FORMAT = "2"  # "1": no checksum / identity metadata (never reused)
#: Shard metadata that must equal what the run would write for the shard to be reused (besides its checksum).
#: The rest ("nfe", "device") is informational.
#: What a conditional run records about its conditions (``conditions.Conditioning.metadata``). These are compared
#: even when the run would not record them, so an unconditional run never reuses a guided shard or vice versa.
CONDITION_KEYS = ("conditioning", "guidance_scale", "class_labels", "prompts_sha256", "negative_prompt")
SHARD_IDENTITY_KEYS = ("format", "shard", "count", "shape", "dtype", "convention", "seed", "shard_seed",
                       "shard_size", "scheduler", "scheduler_class", "scheduler_config", "steps", "pipeline",
                       *CONDITION_KEYS)


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
    """An instance of scheduler ``name`` with the pipeline's noise schedule (``from_config``) and ``overrides``;
    or, when ``name`` is a saved scheduler folder (e.g. a tuned one), that scheduler with its plans."""
    if Path(name).is_dir():
        saved = json.loads((Path(name) / "scheduler_config.json").read_text())
        # a sweep's common options may restate what the folder holds; anything else would change the tuned scheduler
        differing = sorted(k for k, v in (overrides or {}).items() if saved.get(k) != v)
        if differing:
            raise ValueError(f"options {', '.join(f'{k}={overrides[k]!r}' for k in differing)} differ from the scheduler "
                             f"folder {name} ({', '.join(f'{k}={saved.get(k)!r}' for k in differing)}); a tuned "
                             "scheduler runs as saved")
        class_name = saved["_class_name"]
        import fastsampler

        cls = getattr(fastsampler, class_name, None) or resolve_scheduler_class(class_name)
        return cls.from_pretrained(name)
    return resolve_scheduler_class(name).from_config(dict(base_config), **(overrides or {}))


def accepts_generator(scheduler) -> bool:
    """Whether ``scheduler.step`` takes a ``generator`` argument (stochastic samplers)."""
    return "generator" in inspect.signature(scheduler.step).parameters


@torch.no_grad()
def sample_latents(model: Callable, scheduler, num_steps: int, noise: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Run ``scheduler`` for ``num_steps`` from ``noise`` (unit variance); returns ``(x0, NFE)``, x0 unclamped.

    ``model(x, t)``: a diffusers network (its output's ``.sample`` is used) or a denoiser returning the tensor
    (``fastsampler.tuning.model``). Schedulers without ``scale_model_input`` / ``init_noise_sigma`` (flow matching)
    get the identity / 1.
    """
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)
    step_kwargs = {"generator": generator} if accepts_generator(scheduler) else {}
    nfe = 0
    for t in scheduler.timesteps:
        out = model(scale_input(x, t), t)
        out = out if isinstance(out, torch.Tensor) else out.sample
        nfe += 1
        x = scheduler.step(out, t, x, return_dict=False, **step_kwargs)[0]
    return x, nfe


def sample(model: Callable, scheduler, num_steps: int, noise: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """``sample_latents`` of a pixel-space model; returns ``(x0 in [−1, 1], NFE)``."""
    x, nfe = sample_latents(model, scheduler, num_steps, noise, generator)
    return x.clamp(-1.0, 1.0), nfe


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] float → uint8 ``round((x + 1) · 127.5)`` (the PNG convention)."""
    return ((x.to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------

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


def images_sha256(images: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(images.detach().cpu().numpy())).hexdigest()


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


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s directory, then ``os.replace`` it onto ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically."""
    from safetensors.torch import save_file

    _atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                              metadata=metadata))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    _atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


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


# --------------------------------------------------------------------------------------------------
# Pipelines and references
# --------------------------------------------------------------------------------------------------



def embedded_pipeline_dir(name: str) -> Path:
    """The asset folder of an embedded pipeline (``EMBEDDED_PIPELINES``)."""
    from fastsampler.eval import digits

    if name == "digits-cond":
        return digits.assets_dir() / digits.COND_PIPELINE_DIR
    return digits.pipeline_dir("v" if name == "digits-v" else "eps")


def _load_embedded(name: str):
    from fastsampler.eval import digits

    if name == "digits-cond":
        return digits.load_digits_cond_pipeline()
    return digits.load_digits_pipeline("v" if name == "digits-v" else "eps")


def load_pipeline(path: str | Path | None):
    """A pipeline with a ``unet`` (or ``transformer``) and a ``scheduler``, its network in eval mode.

    ``path``: one of ``EMBEDDED_PIPELINES`` (``None``: ``"digits"``) or a local diffusers pipeline folder
    (unconditional, class-conditional, e.g. a saved ``DigitsConditionalPipeline``, or text-to-image).
    """
    name = "digits" if path is None else canonical(str(path))
    if name in EMBEDDED_PIPELINES:
        pipe = _load_embedded(name)
    elif not Path(name).is_dir():
        raise FileNotFoundError(f"--pipeline {name}: neither one of {', '.join(EMBEDDED_PIPELINES)} nor a folder")
    else:
        from diffusers import DiffusionPipeline

        import fastsampler.eval.cond_pipeline  # noqa: F401  (lets diffusers resolve DigitsConditionalPipeline)

        pipe = DiffusionPipeline.from_pretrained(name, local_files_only=True)
    if not hasattr(pipe, "scheduler"):
        raise OptionError(f"--pipeline {name}: need a pipeline with a `scheduler` component")
    SampleSource(pipe).network.eval().requires_grad_(False)
    return pipe


def pipeline_id(path: str | Path | None) -> str:
    """Identity of a pipeline directory for cache keys: its path plus the size and mtime of every file in it
    (``None`` and the names of ``EMBEDDED_PIPELINES``: their asset folders)."""
    name = "digits" if path is None else str(path)
    root = embedded_pipeline_dir(name) if name in EMBEDDED_PIPELINES else Path(name)
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


def fid_scorer(pipe, reference: str = "digits-train", features: str = "auto",
               inception_weights: str | Path | None = None, cache_dir: str | Path | None = None,
               batch_size: int = 250) -> Callable[[torch.Tensor], float]:
    """A small-sample FID of sampler outputs, for S³'s ``scorer`` (``fastsampler.tune(method="s3", scorer=…)``).

    The returned function takes a batch of final samples in the network's space (latents go through the
    pipeline's VAE, as ``fastsampler fid`` decodes them) and returns their FID against ``reference``'s cached
    statistics (``features="auto"``: the digits CNN for the digits references, InceptionV3 otherwise). Lower is
    better; the FID of a few hundred samples is biased upwards but ranks candidates on the same noises.
    """
    if features == "auto":
        features = "digits" if reference in DIGITS_REFERENCES else "inception"
    from fastsampler.tuning.api import default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "ref_stats"
    evaluator = FIDEvaluator(Extractor.create(features, inception_weights), reference, cache)
    source = SampleSource(pipe)

    def score(x: torch.Tensor) -> float:
        return evaluator([to_uint8(source.decode(x[i:i + batch_size]).cpu()) for i in range(0, x.shape[0], batch_size)])

    score.key = json.dumps({"fid": reference_id(reference), **evaluator.extractor.identity()}, sort_keys=True)
    return score


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
    seed: int | None = None
    guidance_scale: float | None = None


def evaluate_run(pipe, pipe_id: str, spec: RunSpec, num_samples: int, out_dir: Path,
                 evaluator: FIDEvaluator | None, ctx: DistContext = DistContext(), device: str = "cpu",
                 progress: bool = True, on_generated: Callable[[GenerationReport], None] | None = None,
                 conditioning: Conditioning | None = None) -> RunResult | None:
    """Generate (resuming) the shards of ``spec`` on every rank, then FID on rank 0 (other ranks get ``None``).

    ``evaluator`` is only used on rank 0 (pass ``None`` elsewhere). ``conditioning``: what a conditional pipeline's
    samples are conditioned on (``conditions.conditioning_for``; default: unconditional).
    """
    source = SampleSource(pipe, conditioning or Conditioning())
    identity = source.conditioning.identity()
    run_dir = Path(out_dir) / spec.key(pipe_id, identity)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "run.json", json.dumps({**asdict(spec), "pipeline_id": pipe_id, **identity,
                                                            "num_samples": num_samples}, indent=2) + "\n")
    t0 = time.perf_counter()
    report = generate_shards(source, dict(pipe.scheduler.config), spec, num_samples, run_dir, ctx, device,
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
                     run_dir=str(run_dir), seed=spec.seed, guidance_scale=spec.guidance_scale)


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
              ctx: DistContext | None = None, prompts: Sequence[str] | None = None,
              negative_prompt: str | None = None) -> list[RunResult]:
    """Evaluate every spec in order (shared pipeline, reference statistics and output dir).

    ``pipeline``: one of ``EMBEDDED_PIPELINES`` (``None``: ``"digits"``) or a local folder. A class-conditional
    pipeline samples class-balanced labels, a text-to-image one needs ``prompts`` (sample j: prompt j mod P) and
    takes a ``negative_prompt``; each spec's ``guidance_scale`` applies (``conditions``). ``features="auto"``: the
    digits extractor for the ``digits-*`` references, InceptionV3 otherwise. ``device`` goes through
    ``select_device`` (``"cuda"``: ``cuda:<LOCAL_RANK>``). Returns the results on rank 0 and an empty list on the
    other ranks. Options that do not fit the pipeline raise ``conditions.OptionError`` before any sampling.
    """
    ctx = ctx or distributed_context()
    if features == "auto":
        features = "digits" if reference in DIGITS_REFERENCES else "inception"
    extractor = Extractor.create(features, inception_weights)  # every rank fails early on a bad choice
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "ref_stats"
    device = select_device(device, ctx)  # "cuda" → this rank's own GPU
    pipe = load_pipeline(pipeline).to(device)
    conditioning = conditioning_for(pipe, prompts, negative_prompt)
    for spec in specs:
        conditioning.check_guidance(spec.guidance_scale)
    pipe_id = pipeline_id(pipeline)
    evaluator = FIDEvaluator(extractor, reference, cache_dir) if ctx.is_main else None
    results: list[RunResult] = []
    for spec in progress_bars.bar(specs, desc="runs", unit="run", enabled=progress and ctx.is_main):
        result = evaluate_run(pipe, pipe_id, spec, num_samples, out_dir, evaluator, ctx, device, progress,
                              conditioning=conditioning)
        if result is not None:
            results.append(result)
            if progress:
                guided = "" if spec.guidance_scale is None else f" w={spec.guidance_scale:g}"
                progress_bars.write(f"{spec.scheduler} steps={spec.steps}{guided} seed={spec.seed} NFE={result.nfe}: "
                           f"FID {result.fid:.3f} ({result.seconds:.0f}s, {result.shards_generated} shards new)")
    return results
