"""The embedded digits benchmark: sklearn's 8x8 digits as 16x16 images in [-1, 1], and the trained models.

Everything here works offline: the images ship with scikit-learn (``sklearn.datasets.load_digits``) and the
trained DDPM pipelines and classifier live in ``fastsampler/assets/`` (written by ``benchmarks/train_digits_ddpm.py``,
``benchmarks/train_digits_cond_ddpm.py`` — the class-conditional model for classifier-free guidance — and
``benchmarks/train_digits_classifier.py``).

Preprocessing (the single definition every script uses): pixel values 0..16 → ``x / 8 − 1`` ∈ [−1, 1], then a
bilinear upsample 8x8 → 16x16 (``align_corners=False``), one channel. The split is a fixed, seeded permutation:
``TEST_FRACTION`` of the 1797 images (stratification is not needed at this size) go to ``"test"``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
SPLIT_SEED = 0
TEST_FRACTION = 0.2
PIPELINE_DIRS = {"eps": "digits_ddpm", "v": "digits_ddpm_v"}
COND_PIPELINE_DIR = "digits_cond_ddpm"
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES          # the conditional model's "no label" class (classifier-free guidance)
NUM_CLASS_EMBEDS = NUM_CLASSES + 1
CLASSIFIER_FILE = "digits_classifier.safetensors"

Split = Literal["train", "test", "all"]


def assets_dir() -> Path:
    """The package's ``assets`` directory (found through ``importlib.resources``, so installs work too)."""
    return Path(str(importlib.resources.files("fastsampler") / "assets"))


def preprocess(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 64) or (B, 8, 8) digit pixels in 0..16 → (B, 1, 16, 16) float32 in [−1, 1] (bilinear upsample)."""
    x = pixels.reshape(-1, 1, 8, 8).to(torch.float32) / 8.0 - 1.0
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


def _split_indices(n: int) -> dict[str, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(TEST_FRACTION * n))
    return {"test": perm[:n_test].sort().values, "train": perm[n_test:].sort().values, "all": torch.arange(n)}


def digits_dataset(split: Split = "train", with_labels: bool = False):
    """The preprocessed digits of ``split`` as a (N, 1, 16, 16) float32 tensor in [−1, 1].

    ``split``: ``"train"`` (80 %, 1438 images), ``"test"`` (20 %, 359 images) or ``"all"``; the split is fixed
    (seed ``SPLIT_SEED``). With ``with_labels=True`` returns ``(images, labels)`` (labels int64 0..9).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits  # local import: sklearn is only needed for the digits benchmark

    data = load_digits()
    idx = _split_indices(len(data.target))[split]
    images = preprocess(torch.as_tensor(data.data))[idx]
    if with_labels:
        return images, torch.as_tensor(data.target, dtype=torch.int64)[idx]
    return images


def pipeline_dir(variant: str = "eps") -> Path:
    """The asset directory of the trained digits DDPM pipeline (``variant`` ``"eps"`` or ``"v"``)."""
    if variant not in PIPELINE_DIRS:
        raise ValueError(f"variant must be one of {sorted(PIPELINE_DIRS)}, got {variant!r}")
    return assets_dir() / PIPELINE_DIRS[variant]


def load_digits_pipeline(variant: str = "eps"):
    """The trained 16x16 digits ``DDPMPipeline`` (ε-prediction, or ``variant="v"`` for v-prediction), offline."""
    from diffusers import DDPMPipeline

    path = pipeline_dir(variant)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no digits pipeline at {path}; train it with `python benchmarks/train_digits_ddpm.py`"
                                + (" --prediction-type v_prediction" if variant == "v" else ""))
    return DDPMPipeline.from_pretrained(str(path), local_files_only=True)


def load_digits_cond_pipeline():
    """The trained class-conditional 16x16 digits pipeline (ε-prediction, ``DDPMScheduler``), offline.

    A ``fastsampler.models.digits_pipeline.DigitsConditionalPipeline``: ``pipe(class_labels, guidance_scale=w, ...)``
    with labels 0..9 (``NULL_LABEL`` = 10 is the unconditional label).
    """
    from fastsampler.models.digits_pipeline import DigitsConditionalPipeline

    path = assets_dir() / COND_PIPELINE_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no class-conditional digits pipeline at {path}; train it with "
                                "`python benchmarks/train_digits_cond_ddpm.py`")
    return DigitsConditionalPipeline.from_pretrained(str(path), local_files_only=True)


@torch.no_grad()
def class_predictions(images: torch.Tensor, classifier=None) -> torch.Tensor:
    """The trained digits classifier's labels (int64, CPU) for (B, 1, 16, 16) images in [−1, 1]."""
    classifier = classifier if classifier is not None else load_digits_feature_extractor()
    return classifier.cnn(images.to(torch.float32).cpu()).argmax(dim=1)


@torch.no_grad()
def conditional_class_accuracy(pipe, guidance_scale: float, num_inference_steps: int = 25, num_samples: int = 100,
                               seed: int = 0, classifier=None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """How often samples of a class-conditional digits pipeline are classified as the class they were asked for.

    Samples ``num_samples`` images with ``pipe``'s current scheduler, labels cycling 0, 1, ..., 9, 0, ... and the
    initial noise from ``torch.Generator().manual_seed(seed)``. Returns ``(accuracy, requested, predicted)``.
    """
    labels = torch.arange(num_samples) % NUM_CLASSES
    images = pipe(labels, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    predicted = class_predictions(images, classifier)
    return float((predicted == labels).to(torch.float32).mean()), labels, predicted


def load_digits_feature_extractor():
    """The trained digits classifier as a torchmetrics FID feature extractor (see ``fastsampler.models.features``)."""
    from fastsampler.models.features import DigitsFeatureExtractor

    return DigitsFeatureExtractor.from_file(assets_dir() / CLASSIFIER_FILE)
