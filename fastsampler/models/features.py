"""A small digits CNN and its use as a torchmetrics FID feature extractor.

``DigitsCNN`` classifies 16x16 digits in [−1, 1] (``fastsampler.models.digits.preprocess``); its 64-d penultimate
layer (global-average-pooled conv features) plays the role Inception's pool3 plays for natural images.

``DigitsFeatureExtractor`` wraps it for ``torchmetrics.image.fid.FrechetInceptionDistance(feature=<module>)``.
torchmetrics hands a custom module the images *unchanged* (with ``normalize=True`` it does **not** convert to
uint8 — that happens only for its built-in Inception), so the wrapper accepts both conventions:

* floating point in [0, 1] (``normalize=True``, the convention used by ``fastsampler.eval.fid``);
* ``uint8`` in [0, 255] (``normalize=False``).

Any channel count (averaged to grey) and any spatial size (resized to 16x16, bilinear with antialiasing) are
accepted. The output is (B, 64) float32; the attribute ``num_features`` tells torchmetrics the width.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

NUM_FEATURES = 64
NUM_CLASSES = 10


class DigitsCNN(nn.Module):
    """conv(32)×2 → pool → conv(64)×2 → pool → conv(64) → global average pool (64 features) → linear(10).

    Every conv is 3x3 + BatchNorm + ReLU.
    """

    def __init__(self) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),        # 16 → 8
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),       # 8 → 4
            *block(64, NUM_FEATURES), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) in [−1, 1] → (B, 64) penultimate features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) in [−1, 1] → (B, 10) logits."""
        return self.head(self.dropout(self.features(x)))


def to_model_range(imgs: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Images as torchmetrics passes them → (B, 1, size, size) in [−1, 1].

    Accepts uint8 in [0, 255] or float in [0, 1], any channel count (averaged) and any spatial size (resized).
    """
    x = imgs.to(torch.float32) / 255.0 if imgs.dtype == torch.uint8 else imgs.to(torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x * 2.0 - 1.0


class DigitsFeatureExtractor(nn.Module):
    """The trained ``DigitsCNN`` as a frozen feature extractor for torchmetrics FID (``num_features = 64``)."""

    num_features: int = NUM_FEATURES

    def __init__(self, cnn: DigitsCNN) -> None:
        super().__init__()
        self.cnn = cnn.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | Path) -> "DigitsFeatureExtractor":
        """Load ``DigitsCNN`` weights from a safetensors file."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no digits classifier at {path}; train it with "
                                    "`python benchmarks/train_digits_classifier.py`")
        cnn = DigitsCNN()
        cnn.load_state_dict(load_file(str(path)))
        return cls(cnn)

    def train(self, mode: bool = True) -> "DigitsFeatureExtractor":
        """Always stays in eval mode (BatchNorm statistics are frozen), like torchmetrics' Inception."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Images as torchmetrics passes them → (B, 64) float32 features."""
        return self.cnn.features(to_model_range(imgs))
