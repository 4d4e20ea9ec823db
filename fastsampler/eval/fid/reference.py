"""Reference images and their cached statistics: the real-feature states of the metric, computed once per
(extractor, reference, convention) and validated when read back."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from fastsampler.eval.fid.files import atomic_save_safetensors, file_sha256, images_sha256
from fastsampler.eval.fid.sampling import to_uint8
from fastsampler.eval.fid.extractor import Extractor


DIGITS_REFERENCES = ("digits-train", "digits-test", "digits-all")
STATS_VERSION = 1  # bump when the way reference statistics are computed changes


def load_reference_images(reference: str) -> torch.Tensor:
    """Reference images as uint8 NCHW: ``digits-train|test|all``, a tensor file (.pt/.safetensors/.npz; uint8
    or float in [−1, 1]) or a directory of image files."""
    if reference in DIGITS_REFERENCES:
        from fastsampler.models.digits import digits_dataset

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
        from fastsampler.models import digits

        return {"digits": reference, "split_seed": digits.SPLIT_SEED, "test_fraction": digits.TEST_FRACTION,
                "size": digits.IMAGE_SIZE}
    path = Path(reference)
    if path.is_dir():
        return {"dir": str(path.resolve()), "files": sorted((p.name, p.stat().st_size, int(p.stat().st_mtime))
                                                            for p in path.iterdir() if p.is_file())}
    return {"file_sha256": file_sha256(path)}


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
    atomic_save_safetensors(states, path, {"key": key_json, "sha256": _states_sha256(states)})
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
