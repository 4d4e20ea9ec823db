"""Train the embedded class-conditional 16x16 digits DDPM (classifier-free guidance) on the CPU, single-threaded.

The unconditional model's recipe (``benchmarks/train_digits_ddpm.py``, whose helpers this script imports): the same
``UNet2DModel`` plus diffusers' class embedding with ``num_class_embeds = 11`` — labels 0..9 and ``NULL_LABEL = 10``
for "no label" — ε-prediction, 1000 steps, linear betas 1e-4..0.02, AdamW with warm-up + cosine decay, EMA.

Label dropout: each training label is replaced by ``NULL_LABEL`` with probability ``--label-dropout`` (drawn from
the run's generator), so the one network learns both ε(x, t, c) and ε(x, t, ∅) — what classifier-free guidance
ε_∅ + w (ε_c − ε_∅) needs (``fastsampler.models.digits_pipeline.DigitsConditionalPipeline``).

Checkpoints to ``--ckpt`` every ``--ckpt-every`` steps and resumes from it when restarted with the same settings.
At the end the EMA weights are saved as a ``DigitsConditionalPipeline`` folder (safetensors) and the settings,
CPU time and losses go to ``benchmarks/results/digits_cond_ddpm_train.json`` (key ``"eps"``).

    python benchmarks/train_digits_cond_ddpm.py            # → fastsampler/assets/digits_cond_ddpm
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from fastsampler.models.digits_pipeline import DigitsConditionalPipeline
import harness
from fastsampler.models.digits import COND_PIPELINE_DIR, IMAGE_SIZE, NULL_LABEL, NUM_CLASS_EMBEDS, assets_dir, \
    digits_dataset
from train_digits_ddpm import REPO, build_scheduler, build_unet, diffusion_loss, held_out_loss, merge_result, \
    train_with_ema, training_record

RESULTS = REPO / "benchmarks" / "results" / "digits_cond_ddpm_train.json"


def drop_labels(labels: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """``labels`` with each entry replaced by ``NULL_LABEL`` with probability ``p`` (one uniform draw per entry)."""
    return torch.where(torch.rand(labels.shape, generator=gen) < p, torch.full_like(labels, NULL_LABEL), labels)


@harness.command(out=None)
@click.option("--width", default=16, show_default=True, help="channels of the first UNet level (then 2w, 4w)")
@click.option("--steps", default=4800, show_default=True, help="optimiser steps")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=2e-3, show_default=True, help="peak learning rate")
@click.option("--warmup", default=100, show_default=True)
@click.option("--ema-decay", default=0.999, show_default=True)
@click.option("--label-dropout", default=0.15, show_default=True, help="probability of training on the null label")
@click.option("--seed", default=0, show_default=True)
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="checkpoint file [default: .cache/digits_cond_ddpm_eps.ckpt.pt]")
@click.option("--ckpt-every", default=200, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="pipeline dir [default: the asset dir]")
def main(width: int, steps: int, batch_size: int, lr: float, warmup: int, ema_decay: float, label_dropout: float,
         seed: int, ckpt: Path | None, ckpt_every: int, out: Path | None) -> None:
    """Train the class-conditional digits DDPM and save it as a ``DigitsConditionalPipeline``."""
    ckpt = ckpt or REPO / ".cache" / "digits_cond_ddpm_eps.ckpt.pt"
    out = out or assets_dir() / COND_PIPELINE_DIR
    settings = dict(prediction_type="epsilon", width=width, steps=steps, batch_size=batch_size, lr=lr,
                    warmup=warmup, ema_decay=ema_decay, label_dropout=label_dropout, num_class_embeds=NUM_CLASS_EMBEDS,
                    null_label=NULL_LABEL, seed=seed, optimizer="AdamW(wd=0)", image_size=IMAGE_SIZE,
                    num_train_timesteps=1000, beta_schedule="linear 1e-4..0.02", threads=torch.get_num_threads())

    train, train_labels = digits_dataset("train", with_labels=True)
    test, test_labels = digits_dataset("test", with_labels=True)
    torch.manual_seed(seed)
    unet = build_unet(width, num_class_embeds=NUM_CLASS_EMBEDS)
    sched = build_scheduler("epsilon")

    def batch_loss(net, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return diffusion_loss(net, sched, train[idx], gen, drop_labels(train_labels[idx], label_dropout, gen))

    ema, state = train_with_ema(
        unet, batch_loss, train.shape[0], settings=settings, steps=steps, batch_size=batch_size, lr=lr,
        warmup=warmup, ema_decay=ema_decay, seed=seed, ckpt=ckpt, ckpt_every=ckpt_every)

    DigitsConditionalPipeline(unet=ema, scheduler=sched).save_pretrained(str(out), safe_serialization=True)
    null_test = torch.full_like(test_labels, NULL_LABEL)
    record = training_record(
        settings, ema, state, train.shape[0], test.shape[0], out,
        ema_test_loss_cond=held_out_loss(ema, sched, test, class_labels=test_labels),
        ema_test_loss_uncond=held_out_loss(ema, sched, test, class_labels=null_test),
        ema_train_loss_cond=held_out_loss(ema, sched, train[:512], class_labels=train_labels[:512]))
    merge_result(RESULTS, "eps", record)


if __name__ == "__main__":
    main()
