"""The model a sampler is tuned to: ``model(x, t)`` → the output in the scheduler's ``prediction_type`` at the
timestep a pipeline would pass, for a fixed batch of conditions (one per noise).

Adapters build one from what users have:

* ``UNetDenoiser`` — a diffusers ``UNet2DModel`` (unconditional, or class-conditional with classifier-free
  guidance through a null label, e.g. the embedded digits model);
* ``TextUNetDenoiser`` — a ``UNet2DConditionModel`` with prompt embeddings encoded once (Stable Diffusion style,
  guidance with a negative prompt);
* ``SD3Denoiser`` — an SD3 ``SD3Transformer2DModel`` with its pooled and sequence embeddings;
* ``MixtureDenoiserModel`` — the exact Gaussian-mixture model of ``fastsampler.eval.gmm`` (tests, bench);
* ``from_pipeline(pipe, …)`` picks one for a diffusers pipeline.

Guidance is ε_∅ + w (ε_c − ε_∅) with both halves in one batch, as the pipelines do. Every adapter has a
``cache_key()``: a digest of the weights and the conditions, so teacher trajectories cached on disk are reused
only for the same model and conditions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from torch import nn


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor: ...

    def cache_key(self) -> str: ...

    def subset(self, start: int, stop: int) -> "Denoiser":
        """The same model for samples [start, stop) of its batch (its per-sample conditions sliced)."""


def _sliced(value, start: int, stop: int):
    return value[start:stop] if isinstance(value, torch.Tensor) else value


def subset(model, start: int, stop: int):
    """``model.subset(start, stop)`` where the model has per-sample conditions; the model itself otherwise."""
    return model.subset(start, stop) if hasattr(model, "subset") else model


def module_digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def search_key(plan, model, noise: torch.Tensor, target: torch.Tensor, search: Any, **extra: Any) -> str:
    """A short digest of what a search's checkpoint depends on: the starting plan, the model, the noises, the
    teacher's targets, the search settings (a dataclass) and ``extra``."""
    from dataclasses import asdict

    model_key = model.cache_key() if hasattr(model, "cache_key") else repr(model)
    payload = json.dumps({"plan": plan.fingerprint(), "model": model_key, "noise": tensor_digest(noise),
                          "target": tensor_digest(target), "search": asdict(search), **extra}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _timestep_batch(t: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A (B,) timestep tensor (scalars broadcast; per-sample times kept)."""
    t = torch.as_tensor(t, device=device)
    return t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ε_∅ + w (ε_c − ε_∅)."""
    return uncond + scale * (cond - uncond)


@dataclass
class UNetDenoiser:
    """A ``UNet2DModel``; with ``class_labels`` (one per sample) it is class-conditional, and with
    ``guidance_scale`` ≠ 1 guided through the null label (the last class index, as the embedded digits model)."""

    unet: nn.Module
    class_labels: torch.Tensor | None = None
    guidance_scale: float | None = None
    null_label: int | None = None
    _digest: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.guidance_scale is not None and self.class_labels is None:
            raise ValueError("`guidance_scale` needs `class_labels` (classifier-free guidance is conditional)")
        if self.class_labels is not None and self.null_label is None:
            embeds = getattr(self.unet.config, "num_class_embeds", None)
            if embeds is None:
                raise ValueError("`class_labels` need a class-conditional UNet (config.num_class_embeds)")
            self.null_label = int(embeds) - 1

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        tb = _timestep_batch(t, x.shape[0], x.device)
        if self.class_labels is None:
            return self.unet(x, tb).sample
        labels = self.class_labels.to(x.device)
        if self.guidance_scale is None or self.guidance_scale == 1.0:
            return self.unet(x, tb, class_labels=labels).sample
        null = torch.full_like(labels, self.null_label)
        out = self.unet(torch.cat([x, x]), torch.cat([tb, tb]), class_labels=torch.cat([labels, null])).sample
        cond, uncond = out.chunk(2)
        return guide(uncond, cond, self.guidance_scale)

    def cache_key(self) -> str:
        if self._digest is None:
            self._digest = module_digest(self.unet)
        return f"unet2d:{self._digest}:{tensor_digest(self.class_labels)}:{self.guidance_scale}:{self.null_label}"

    def subset(self, start: int, stop: int) -> "UNetDenoiser":
        out = UNetDenoiser(self.unet, _sliced(self.class_labels, start, stop), self.guidance_scale, self.null_label)
        out._digest = self._digest
        return out


@dataclass
class TextUNetDenoiser:
    """A ``UNet2DConditionModel`` with prompt embeddings computed once: ``prompt_embeds`` (B, L, D) and, for
    guidance, ``negative_embeds``; ``added_cond_kwargs`` for SDXL-style extra conditions (per half batch)."""

    unet: nn.Module
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None = None
    guidance_scale: float = 1.0
    added_cond_kwargs: dict[str, Any] | None = None
    negative_added_cond_kwargs: dict[str, Any] | None = None
    _digest: str | None = field(default=None, init=False, repr=False)

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        tb = _timestep_batch(t, x.shape[0], x.device)
        if self.guidance_scale == 1.0 or self.negative_embeds is None:
            return self.unet(x, tb, encoder_hidden_states=self.prompt_embeds,
                             added_cond_kwargs=self.added_cond_kwargs).sample
        added = None
        if self.added_cond_kwargs is not None:
            neg = self.negative_added_cond_kwargs or self.added_cond_kwargs
            added = {k: torch.cat([neg[k], v]) for k, v in self.added_cond_kwargs.items()}
        out = self.unet(torch.cat([x, x]), torch.cat([tb, tb]),
                        encoder_hidden_states=torch.cat([self.negative_embeds, self.prompt_embeds]),
                        added_cond_kwargs=added).sample
        uncond, cond = out.chunk(2)
        return guide(uncond, cond, self.guidance_scale)

    def cache_key(self) -> str:
        if self._digest is None:
            self._digest = module_digest(self.unet)
        extra = [v for d in (self.added_cond_kwargs or {}, self.negative_added_cond_kwargs or {}) for v in d.values()]
        return (f"unet2dcond:{self._digest}:{tensor_digest(self.prompt_embeds, self.negative_embeds, *extra)}:"
                f"{self.guidance_scale}")

    def subset(self, start: int, stop: int) -> "TextUNetDenoiser":
        def part(d):
            return None if d is None else {k: _sliced(v, start, stop) for k, v in d.items()}

        out = TextUNetDenoiser(self.unet, self.prompt_embeds[start:stop], _sliced(self.negative_embeds, start, stop),
                               self.guidance_scale, part(self.added_cond_kwargs), part(self.negative_added_cond_kwargs))
        out._digest = self._digest
        return out


@dataclass
class SD3Denoiser:
    """An SD3 transformer (flow prediction) with sequence and pooled prompt embeddings computed once."""

    transformer: nn.Module
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None = None
    negative_pooled_embeds: torch.Tensor | None = None
    guidance_scale: float = 1.0
    _digest: str | None = field(default=None, init=False, repr=False)

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        tb = _timestep_batch(t, x.shape[0], x.device)
        if self.guidance_scale == 1.0 or self.negative_embeds is None:
            return self.transformer(hidden_states=x, timestep=tb, encoder_hidden_states=self.prompt_embeds,
                                    pooled_projections=self.pooled_embeds).sample
        out = self.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([tb, tb]),
                               encoder_hidden_states=torch.cat([self.negative_embeds, self.prompt_embeds]),
                               pooled_projections=torch.cat([self.negative_pooled_embeds, self.pooled_embeds])).sample
        uncond, cond = out.chunk(2)
        return guide(uncond, cond, self.guidance_scale)

    def cache_key(self) -> str:
        if self._digest is None:
            self._digest = module_digest(self.transformer)
        return (f"sd3:{self._digest}:{tensor_digest(self.prompt_embeds, self.pooled_embeds, self.negative_embeds, self.negative_pooled_embeds)}:"
                f"{self.guidance_scale}")

    def subset(self, start: int, stop: int) -> "SD3Denoiser":
        out = SD3Denoiser(self.transformer, self.prompt_embeds[start:stop], self.pooled_embeds[start:stop],
                          _sliced(self.negative_embeds, start, stop), _sliced(self.negative_pooled_embeds, start, stop),
                          self.guidance_scale)
        out._digest = self._digest
        return out


@dataclass
class MixtureDenoiserModel:
    """The exact model of a Gaussian mixture (``fastsampler.eval.gmm.MixtureModel``) as a tuning model."""

    model: Any  # gmm.MixtureModel

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        return self.model(x, t)

    def subset(self, start: int, stop: int) -> "MixtureDenoiserModel":
        from dataclasses import replace

        d = self.model.denoiser
        if d.classes is None:
            return self
        return MixtureDenoiserModel(replace(self.model, denoiser=replace(d, classes=d.classes[start:stop])))

    def cache_key(self) -> str:
        d = self.model.denoiser
        mix = d.mixture
        return (f"gmm:{tensor_digest(mix.means, mix.weights, mix.labels, d.classes)}:{mix.tau}:{d.guidance_scale}:"
                f"{type(self.model.time).__name__}:{self.model.prediction_type}")


def _repeat(items: Sequence[str] | str | None, batch: int) -> list[str] | None:
    if items is None:
        return None
    items = [items] if isinstance(items, str) else list(items)
    if batch % len(items):
        raise ValueError(f"{len(items)} prompts do not divide a batch of {batch} noises")
    return [p for p in items for _ in range(batch // len(items))]


def from_pipeline(pipe, batch_size: int, *, prompt: str | Sequence[str] | None = None,
                  negative_prompt: str | Sequence[str] | None = None, guidance_scale: float | None = None,
                  class_labels: Sequence[int] | torch.Tensor | None = None) -> Denoiser:
    """The denoiser of a diffusers pipeline for ``batch_size`` noises: prompts (repeated to the batch) are encoded
    once; class labels for class-conditional UNets; guidance as the pipeline applies it."""
    unet = getattr(pipe, "unet", None)
    if unet is not None and type(unet).__name__ == "UNet2DModel":
        labels = None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.int64).reshape(-1)
            if len(labels) != batch_size:  # cycled to the batch (a balanced list stays balanced)
                labels = labels.repeat(-(-batch_size // len(labels)))[:batch_size]
        return UNetDenoiser(unet, labels, guidance_scale if labels is not None else None)
    prompts = _repeat(prompt, batch_size)
    negatives = _repeat(negative_prompt if negative_prompt is not None else "", batch_size)
    scale = 1.0 if guidance_scale is None else float(guidance_scale)
    guided = scale != 1.0
    if prompts is None:
        raise ValueError(f"{type(pipe).__name__} is text-conditional: pass `prompt`")
    with torch.no_grad():
        if unet is not None and hasattr(pipe, "encode_prompt") and type(pipe).__name__.startswith("StableDiffusion") \
                and "XL" not in type(pipe).__name__:
            cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, guided, negatives)
            return TextUNetDenoiser(unet, cond, uncond, scale)
        if getattr(pipe, "transformer", None) is not None and type(pipe).__name__.startswith("StableDiffusion3"):
            cond, uncond, pooled, neg_pooled = pipe.encode_prompt(prompts, prompts, prompts, device=pipe.device,
                                                                  do_classifier_free_guidance=guided,
                                                                  negative_prompt=negatives,
                                                                  negative_prompt_2=negatives,
                                                                  negative_prompt_3=negatives)
            return SD3Denoiser(pipe.transformer, cond, pooled, uncond, neg_pooled, scale)
    raise ValueError(f"no tuning adapter for {type(pipe).__name__} yet: supported are UNet2DModel pipelines "
                     "(unconditional or class-conditional), Stable Diffusion 1.x/2.x and SD3; or pass your own "
                     "`model(x, t)` callable")
