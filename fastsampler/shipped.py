"""Shipped assets by name: the embedded models, tuned scheduler folders and DC ratio / CPR files.

    pipe = DiffusionPipeline.from_pretrained(fastsampler.assets("digits"))
    pipe.scheduler = UniPCScheduler.from_pretrained(fastsampler.assets("digits-s3"))   # searched plans, NFE 4–10

Everything lives in the installed package (``fastsampler/assets/``), so it works offline. The embedded pipelines
have one name everywhere — ``fastsampler.assets``, ``--pipeline`` of every subcommand, the README: ``digits`` (the
ε DDPM), ``digits-v`` (its v-prediction twin), ``digits-cond`` (class-conditional); the older ``digits-ddpm`` /
``digits-ddpm-v`` still work as aliases.
"""

from __future__ import annotations

import difflib
import importlib.resources
from pathlib import Path

#: name → path inside fastsampler/assets (folders for pipelines and schedulers, files for DC ratios / CPR)
ASSETS = {
    "digits": "digits_ddpm",
    "digits-v": "digits_ddpm_v",
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


#: the pipelines shipped with the package, by the one name every entry point takes
EMBEDDED_PIPELINES = ("digits", "digits-v", "digits-cond")
ALIASES = {"digits-ddpm": "digits", "digits-ddpm-v": "digits-v"}  # earlier names, still accepted


def canonical(name: str) -> str:
    """An asset's name, aliases resolved."""
    return ALIASES.get(name, name)


def assets_root() -> Path:
    return Path(str(importlib.resources.files("fastsampler") / "assets"))


def asset(name: str) -> Path:
    """The path of a shipped asset (see ``ASSETS``; aliases accepted); a clear error for unknown or missing ones."""
    name = canonical(name)
    if name not in ASSETS:
        close = difflib.get_close_matches(name, list(ASSETS), n=1)
        raise ValueError(f"unknown asset {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; shipped: "
                         f"{', '.join(sorted(ASSETS))}")
    path = assets_root() / ASSETS[name]
    if not path.exists():
        raise FileNotFoundError(f"asset {name!r} is not built in this checkout ({path}); the benchmarks/ scripts "
                                "fit_dc_digits.py and fit_s3_digits.py write the tuned ones")
    return path


def pipeline_folder(name_or_path: str | Path) -> Path:
    """The folder of an embedded pipeline by name (``EMBEDDED_PIPELINES``, aliases accepted) or a local pipeline
    folder; a ``ValueError`` naming both kinds (with a "did you mean") for anything else."""
    name = canonical(str(name_or_path))
    if name in EMBEDDED_PIPELINES:
        return asset(name)
    if Path(name).is_dir():
        return Path(name)
    close = difflib.get_close_matches(name, list(EMBEDDED_PIPELINES), n=1)
    raise ValueError(f"{str(name_or_path)!r} is neither an embedded pipeline ({', '.join(EMBEDDED_PIPELINES)})"
                     f"{f' — did you mean {close[0]!r}?' if close else ''} nor a local pipeline folder")
