"""Class accuracy of the class-conditional digits model under classifier-free guidance.

Samples ``--num-samples`` images (labels cycling 0..9) from ``fastsampler/assets/digits_cond_ddpm`` with
``DDIMScheduler`` (η = 0, from the pipeline's scheduler config) at each guidance scale, classifies them with the
trained digits CNN (``fastsampler/assets/digits_classifier.safetensors``) and records the fraction classified as the
requested class (overall and per class) in ``benchmarks/results/digits_cond_ddpm_accuracy.json``.

    python benchmarks/cond_digits_accuracy.py                      # scales 1, 2, 4; 25 DDIM steps; 200 samples
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import click
import torch
from diffusers import DDIMScheduler

from fastsampler.models.digits import NUM_CLASSES, conditional_class_accuracy, load_digits_cond_pipeline, \
    load_digits_feature_extractor
import harness

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "digits_cond_ddpm_accuracy.json"


@harness.command(out=None)
@click.option("--scales", default="1,2,4", show_default=True, help="comma-separated guidance scales")
@click.option("--steps", default=25, show_default=True, help="DDIM steps")
@click.option("--num-samples", default=200, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--save/--no-save", default=True, show_default=True, help="write the results JSON")
def main(scales: str, steps: int, num_samples: int, seed: int, save: bool) -> None:
    """Measure the class accuracy of guided samples."""
    pipe = load_digits_cond_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_digits_feature_extractor()
    rows = []
    for w in (float(s) for s in scales.split(",")):
        t0 = time.process_time()
        acc, labels, pred = conditional_class_accuracy(pipe, w, steps, num_samples, seed, classifier)
        per_class = [round(float((pred[labels == c] == c).to(torch.float32).mean()), 3) for c in range(NUM_CLASSES)]
        rows.append(dict(guidance_scale=w, accuracy=round(acc, 4), per_class=per_class,
                         cpu_seconds=round(time.process_time() - t0, 1)))
        click.echo(f"w={w:g}: accuracy {acc:.3f}  per class {per_class}")
    if save:
        record = dict(scheduler="DDIMScheduler (eta=0)", steps=steps, num_samples=num_samples, seed=seed,
                      labels="i % 10", results=rows, date=datetime.date.today().isoformat())
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
