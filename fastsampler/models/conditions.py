"""What a FID run conditions its samples on, and the model that draws them (``fastsampler.eval.fid``).

Three kinds of pipelines:

* ``"none"`` — an unconditional ``UNet2DModel`` (the embedded digits DDPM): the network is called as it is.
* ``"class"`` — a class-conditional ``UNet2DModel`` (``config.num_class_embeds = K + 1``, the last index being the
  null label, as the embedded ``digits-cond`` model). Class-balanced: the sample with global index ``j`` gets label
  ``j mod K``, so the labels (like the noises) do not depend on the number of processes, and over a run every class
  gets ``N / K`` samples (± 1).
* ``"text"`` — a text-to-image pipeline ``fastsampler.models.denoisers.from_pipeline`` supports (Stable Diffusion
  1.x/2.x, SD3): sample ``j`` gets prompt ``j mod P`` of the prompts file, every sample the same negative prompt;
  the prompts of a shard are encoded once per shard, and the latents are decoded with the pipeline's VAE.

Guidance (``w``, per run): ε_∅ + w (ε_c − ε_∅) in one batch, through ``from_pipeline``'s adapters (``UNetDenoiser``,
``TextUNetDenoiser``, ``SD3Denoiser``); ``w = 1`` is the conditional model alone (one network call per step). Unlike
diffusers' text pipelines, which skip guidance for ``w ≤ 1``, every ``w ≠ 1`` is applied (``w = 0``: unconditional).

``Conditioning.metadata`` is what a shard records about its conditions (``fid.CONDITION_KEYS``): the kind, the
guidance scale, the shard's class labels or a SHA-256 of the prompts, and the negative prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from torch import nn

KINDS = ("none", "class", "text")


class OptionError(ValueError):
    """A run option (named in the message: ``--prompts``, ``--guidance-scale``, ...) that does not fit the
    pipeline; the CLI reports it without a traceback."""


@dataclass(frozen=True)
class Conditioning:
    """The conditions of a run besides its noise: ``kind`` (``KINDS``), ``num_classes`` (K, for ``"class"``),
    ``prompts`` and ``negative_prompt`` (for ``"text"``)."""

    kind: str = "none"
    num_classes: int | None = None
    prompts: tuple[str, ...] = ()
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"conditioning kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "class" and not (self.num_classes and self.num_classes > 0):
            raise ValueError("class conditioning needs num_classes ≥ 1")
        if self.kind == "text" and not self.prompts:
            raise ValueError("text conditioning needs at least one prompt")

    @property
    def prompts_sha256(self) -> str:
        return prompts_sha256(self.prompts)

    def identity(self) -> dict[str, Any]:
        """What the run's images depend on besides the sampler (run keys, ``run.json``); ``{}`` when unconditional."""
        if self.kind == "class":
            return {"conditioning": "class-balanced", "num_classes": self.num_classes}
        if self.kind == "text":
            return {"conditioning": "prompts", "num_prompts": len(self.prompts),
                    "prompts_sha256": self.prompts_sha256, "negative_prompt": self.negative_prompt or ""}
        return {}

    def check_guidance(self, guidance_scale: float | None) -> None:
        """A guidance scale needs a conditional pipeline (``OptionError`` naming ``--guidance-scale`` otherwise)."""
        if guidance_scale is not None and self.kind == "none":
            raise OptionError(f"--guidance-scale {guidance_scale}: the pipeline is unconditional (guidance needs a "
                             "class-conditional UNet or a text-to-image pipeline)")

    def class_labels(self, start: int, count: int) -> torch.Tensor:
        """Labels of the samples ``start .. start + count − 1``: ``j mod K`` (int64)."""
        return torch.arange(start, start + count, dtype=torch.int64) % int(self.num_classes)

    def prompts_for(self, start: int, count: int) -> list[str]:
        """Prompts of the samples ``start .. start + count − 1``: prompt ``j mod P``."""
        return [self.prompts[j % len(self.prompts)] for j in range(start, start + count)]

    def metadata(self, guidance_scale: float | None, start: int, count: int) -> dict[str, str]:
        """What a shard of samples ``start .. start + count − 1`` records about its conditions (``{}``: none)."""
        if self.kind == "none":
            return {}
        meta = {"conditioning": self.identity()["conditioning"], "guidance_scale": guidance_text(guidance_scale)}
        if self.kind == "class":
            meta["class_labels"] = json.dumps(self.class_labels(start, count).tolist())
        else:
            meta["prompts_sha256"] = self.prompts_sha256
            meta["negative_prompt"] = self.negative_prompt or ""
        return meta


def prompts_sha256(prompts: Sequence[str]) -> str:
    """SHA-256 of prompts (as a JSON list, in order)."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def guidance_text(guidance_scale: float | None) -> str:
    """The guidance scale as recorded (``"1.0"`` when none is given: the conditional model)."""
    return repr(float(1.0 if guidance_scale is None else guidance_scale))


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """The prompts of a text file, one per line (blank lines skipped); ``OptionError`` naming ``--prompts``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise OptionError(f"--prompts {path}: cannot read it ({err.strerror or err})") from None
    prompts = tuple(line.strip() for line in lines if line.strip())
    if not prompts:
        raise OptionError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def network(pipe: Any) -> nn.Module:
    """The denoising network of a pipeline: its ``unet`` or ``transformer``."""
    net = getattr(pipe, "unet", None)
    net = net if net is not None else getattr(pipe, "transformer", None)
    if net is None:
        raise OptionError(f"--pipeline: {type(pipe).__name__} has no `unet` or `transformer` component")
    return net


def pipeline_kind(pipe: Any) -> str:
    """``"text"`` (a text encoder), ``"class"`` (``num_class_embeds`` set) or ``"none"``."""
    if getattr(pipe, "text_encoder", None) is not None:
        return "text"
    return "class" if getattr(network(pipe).config, "num_class_embeds", None) else "none"


def conditioning_for(pipe: Any, prompts: Sequence[str] | None = None,
                     negative_prompt: str | None = None) -> Conditioning:
    """The conditioning of a run of ``pipe``; ``OptionError`` naming the option when it does not fit the pipeline."""
    kind, name = pipeline_kind(pipe), type(pipe).__name__
    if kind != "text" and prompts is not None:
        raise OptionError(f"--prompts: {name} is not a text-to-image pipeline")
    if kind != "text" and negative_prompt is not None:
        raise OptionError(f"--negative-prompt: {name} is not a text-to-image pipeline")
    if kind == "text" and not prompts:
        raise OptionError(f"--prompts FILE is required: {name} is a text-to-image pipeline")
    if kind == "class":
        return Conditioning("class", num_classes=int(network(pipe).config.num_class_embeds) - 1)
    if kind == "text":
        return Conditioning("text", prompts=tuple(prompts), negative_prompt=negative_prompt)
    return Conditioning()


def _spatial(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclass
class SampleSource:
    """What a FID run samples: a pipeline (``unet``/``transformer``, and ``vae`` for latent models) with its
    conditioning. ``denoiser`` gives the model of one shard, ``decode`` turns its output into images in [−1, 1]."""

    pipe: Any
    conditioning: Conditioning = Conditioning()

    @classmethod
    def wrap(cls, model: "nn.Module | SampleSource") -> "SampleSource":
        """A source as it is, or a bare (unconditional) network as the source of an unconditional run."""
        return model if isinstance(model, SampleSource) else cls(SimpleNamespace(unet=model))

    @property
    def network(self) -> nn.Module:
        return network(self.pipe)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the network's input (latents for latent models)."""
        cfg = self.network.config
        return (cfg.in_channels, *_spatial(cfg.sample_size))

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the stored images (after the VAE for latent models)."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return self.noise_shape
        factor = getattr(self.pipe, "vae_scale_factor", None) or 2 ** (len(vae.config.block_out_channels) - 1)
        return (vae.config.out_channels, *(s * factor for s in self.noise_shape[1:]))

    def denoiser(self, guidance_scale: float | None, start: int, count: int) -> Callable:
        """``model(x, t)`` for the samples ``start .. start + count − 1`` (``from_pipeline``; the bare network when
        unconditional)."""
        from fastsampler.models.denoisers import from_pipeline

        self.conditioning.check_guidance(guidance_scale)
        cond = self.conditioning
        if cond.kind == "none":
            return self.network
        if cond.kind == "class":
            return from_pipeline(self.pipe, count, class_labels=cond.class_labels(start, count),
                                 guidance_scale=1.0 if guidance_scale is None else guidance_scale)
        return from_pipeline(self.pipe, count, prompt=cond.prompts_for(start, count),
                             negative_prompt=cond.negative_prompt, guidance_scale=guidance_scale)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler output → images in [−1, 1] (latents through the VAE: ``z / scaling_factor + shift_factor``)."""
        vae = getattr(self.pipe, "vae", None)
        if vae is not None:
            z = x.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
            x = vae.decode(z, return_dict=False)[0]
        return x.clamp(-1.0, 1.0)
