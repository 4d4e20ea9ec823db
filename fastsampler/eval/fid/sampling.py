"""Scheduler resolution and the sampling loop of a FID run: any diffusers-contract scheduler by name (or a saved
folder), run as a plain diffusers loop around a network or a guided denoiser ``model(x, t)``."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Callable

import torch


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
        from fastsampler.adapters.registry import scheduler_class

        cls = scheduler_class(class_name) or resolve_scheduler_class(class_name)
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
    (``fastsampler.models.denoisers``). Schedulers without ``scale_model_input`` / ``init_noise_sigma`` (flow matching)
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
