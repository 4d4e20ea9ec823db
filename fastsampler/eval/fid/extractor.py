"""The feature space of a FID: the digits CNN (embedded) or InceptionV3 from a local weights file, as a torchmetrics
``FrechetInceptionDistance``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastsampler.eval.fid.files import file_sha256


INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


@dataclass(frozen=True)
class Extractor:
    """A feature space: ``name`` (``digits`` | ``inception``), and its weights file."""

    name: str
    weights: Path

    @classmethod
    def create(cls, name: str, inception_weights: str | Path | None = None) -> "Extractor":
        """Validate the choice early: InceptionV3 needs a local weights file (nothing is ever downloaded)."""
        if name == "digits":
            from fastsampler.models.digits import CLASSIFIER_FILE, assets_dir

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
        return {"extractor": self.name, "weights_sha256": file_sha256(self.weights)}

    def metric(self):
        """A fresh ``FrechetInceptionDistance`` (uint8 input, ``reset_real_features=False``).

        ``sync_on_compute=False``: only rank 0 scores (all shards, read from disk), so torchmetrics must not try to
        all-gather its states across the process group.
        """
        from torchmetrics.image.fid import FrechetInceptionDistance

        if self.name == "digits":
            from fastsampler.models.features import DigitsFeatureExtractor

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
