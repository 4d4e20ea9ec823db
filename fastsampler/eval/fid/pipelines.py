"""The pipeline a FID run samples from: one of the embedded ones by name, or a local diffusers folder, and its
identity for cache keys."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


from fastsampler.models.conditions import OptionError, SampleSource
# the embedded pipelines by the one name every entry point takes: the digits DDPM (ε; the default), its
# v-prediction twin, and the class-conditional digits model (classifier-free guidance)
from fastsampler.shipped import EMBEDDED_PIPELINES, canonical


def embedded_pipeline_dir(name: str) -> Path:
    """The asset folder of an embedded pipeline (``EMBEDDED_PIPELINES``)."""
    from fastsampler.models import digits

    if name == "digits-cond":
        return digits.assets_dir() / digits.COND_PIPELINE_DIR
    return digits.pipeline_dir("v" if name == "digits-v" else "eps")


def _load_embedded(name: str):
    from fastsampler.models import digits

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

        import fastsampler.models.digits_pipeline  # noqa: F401  (lets diffusers resolve DigitsConditionalPipeline)

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
