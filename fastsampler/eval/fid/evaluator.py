"""FID of image batches against cached reference statistics, and the small-sample scorer S³ takes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from fastsampler.models.conditions import SampleSource
from fastsampler.eval.fid.sampling import to_uint8
from fastsampler.eval.fid.extractor import Extractor
from fastsampler.eval.fid.reference import DIGITS_REFERENCES, reference_id, reference_stats


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
    from fastsampler.runtime.cache import default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "ref_stats"
    evaluator = FIDEvaluator(Extractor.create(features, inception_weights), reference, cache)
    source = SampleSource(pipe)

    def score(x: torch.Tensor) -> float:
        return evaluator([to_uint8(source.decode(x[i:i + batch_size]).cpu()) for i in range(0, x.shape[0], batch_size)])

    score.key = json.dumps({"fid": reference_id(reference), **evaluator.extractor.identity()}, sort_keys=True)
    return score
