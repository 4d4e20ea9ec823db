"""Shipped assets by name: the embedded models, tuned scheduler folders and DC ratio / CPR files.

    pipe = DiffusionPipeline.from_pretrained(fastsampler.assets("digits-ddpm"))
    pipe.scheduler = UniPCScheduler.from_pretrained(fastsampler.assets("digits-s3"))   # searched plans, NFE 4–10

Everything lives in the installed package (``fastsampler/assets/``), so it works offline.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

#: name → path inside fastsampler/assets (folders for pipelines and schedulers, files for DC ratios / CPR)
ASSETS = {
    "digits-ddpm": "digits_ddpm",
    "digits-ddpm-v": "digits_ddpm_v",
    "digits-cond": "digits_cond_ddpm",
    "digits-classifier": "digits_classifier.safetensors",
    "digits-s3": "s3/digits_ddpm",  # searched for the error against a 200-step teacher
    "digits-s3-fid": "s3/digits_ddpm_fid",  # searched for FID (the released S³ criterion), NFE 4–10
    "digits-cond-s3-g1.5": "s3/digits_cond_g1.5",
    "digits-cond-s3-g4": "s3/digits_cond_g4",
    "digits-cond-s3-g1.5-fid": "s3/digits_cond_g1.5_fid",  # searched for FID at guidance 1.5, NFE 5 and 6
    "digits-dc-ratios": "dc/digits_ddpm_unipc-bh2-2.json",
    "digits-dc-ratios-bh1-3": "dc/digits_ddpm_unipc-bh1-3.json",
    "digits-cond-dc-ratios": "dc/digits_cond_unipc-bh2-2.json",
    "digits-cond-dc-cpr": "dc/digits_cond_unipc-bh2-2_cpr.json",
}


def assets_root() -> Path:
    return Path(str(importlib.resources.files("fastsampler") / "assets"))


def asset(name: str) -> Path:
    """The path of a shipped asset (see ``ASSETS``); a clear error for unknown or missing ones."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; shipped: {', '.join(sorted(ASSETS))}")
    path = assets_root() / ASSETS[name]
    if not path.exists():
        raise FileNotFoundError(f"asset {name!r} is not built in this checkout ({path}); the benchmarks/ scripts "
                                "fit_dc_digits.py and fit_s3_digits.py write the tuned ones")
    return path
