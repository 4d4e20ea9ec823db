"""Train the embedded 16x16 digits DDPM (a small diffusers ``UNet2DModel``) on the CPU, single-threaded.

Data: ``fastsampler.models.digits.digits_dataset("train")`` (sklearn digits, [-1, 1], bilinear 8x8 → 16x16).
Diffusion: 1000 training steps, linear betas 1e-4..0.02 (``DDPMScheduler``), ε- or v-prediction, plain MSE.
Optimiser: AdamW, linear warm-up then cosine decay; an EMA of the weights is what gets saved.

The run checkpoints to ``--ckpt`` every ``--ckpt-every`` steps and resumes from it when restarted with the same
settings. At the end the EMA weights are saved as a ``DDPMPipeline`` (safetensors) and the settings, CPU time and
losses are merged into ``benchmarks/results/digits_ddpm_train.json`` under the prediction type.

    python benchmarks/train_digits_ddpm.py                                   # ε-prediction → assets/digits_ddpm
    python benchmarks/train_digits_ddpm.py --prediction-type v_prediction    # → assets/digits_ddpm_v

The helpers (``build_unet``, ``diffusion_loss``, ``train_with_ema``, ``training_record``, ...) are shared with
``benchmarks/train_digits_cond_ddpm.py`` (the class-conditional model), which imports them from here.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import platform
import time
from pathlib import Path
from typing import Callable

import click
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from fastsampler.models.digits import IMAGE_SIZE, PIPELINE_DIRS, assets_dir, digits_dataset
import harness

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "digits_ddpm_train.json"
VARIANT = {"epsilon": "eps", "v_prediction": "v"}


def build_unet(width: int, num_class_embeds: int | None = None) -> UNet2DModel:
    """A 3-level ResNet UNet (16→8→4, channels w, 2w, 4w, one block per level, no attention).

    ``num_class_embeds``: add diffusers' class embedding (a learned vector per label, added to the time embedding);
    the forward pass then needs ``class_labels``.
    """
    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(width, 2 * width, 4 * width), norm_num_groups=8,
        down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
        num_class_embeds=num_class_embeds,
    )


def build_scheduler(prediction_type: str) -> DDPMScheduler:
    """The training noise schedule (also the pipeline's default scheduler; ``trailing`` spacing, so that a few-step
    sampler built with ``from_config`` starts at t = 999 like every table and shipped tuned folder)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         prediction_type=prediction_type, clip_sample=False, timestep_spacing="trailing")


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 5 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def diffusion_loss(unet: UNet2DModel, sched: DDPMScheduler, x0: torch.Tensor, gen: torch.Generator,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the network output and the ε or v target at uniformly drawn timesteps.

    ``class_labels`` (a class-conditional UNet only) are passed to the network as they are.
    """
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    xt = sched.add_noise(x0, noise, t)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    return (unet(xt, t, class_labels=class_labels).sample - target).pow(2).mean()


@torch.no_grad()
def held_out_loss(unet: UNet2DModel, sched: DDPMScheduler, x0: torch.Tensor, repeats: int = 4,
                  class_labels: torch.Tensor | None = None) -> float:
    """Deterministic diffusion loss on ``x0`` (fixed noise and timesteps), for comparing runs."""
    gen = torch.Generator().manual_seed(1234)
    return float(sum(diffusion_loss(unet, sched, x0, gen, class_labels) for _ in range(repeats)) / repeats)


BatchLoss = Callable[[UNet2DModel, torch.Tensor, torch.Generator], torch.Tensor]


def train_with_ema(unet: UNet2DModel, batch_loss: BatchLoss, n: int, *, settings: dict, steps: int,
                   batch_size: int, lr: float, warmup: int, ema_decay: float, seed: int, ckpt: Path,
                   ckpt_every: int) -> tuple[UNet2DModel, dict]:
    """The training loop: AdamW (lr schedule ``lr_at``, grad-norm clip 1), EMA of the weights, checkpoints.

    ``batch_loss(unet, idx, gen)`` is the loss of the training examples ``idx`` (a shuffled, epoch-wise walk over
    ``range(n)``); ``gen`` is the run's generator (for noise, timesteps, label dropout...). Every ``ckpt_every``
    steps, and at the end, the model, EMA, optimiser, generator and data order go to ``ckpt``; a run started with
    the same ``settings`` resumes from it exactly. Returns ``(ema in eval mode, state)``, ``state`` holding
    ``step``, ``cpu_s``, ``wall_s`` and the per-step ``losses``.
    """
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    state = dict(step=0, cpu_s=0.0, wall_s=0.0, losses=[])
    order = None
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        if saved["settings"] != settings:
            raise click.UsageError(f"{ckpt} was written with other settings; delete it or pass --ckpt")
        unet.load_state_dict(saved["unet"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
        state = saved["state"]
        order = saved.get("order")
        click.echo(f"resumed from {ckpt} at step {state['step']}")

    perm, pos = order if order is not None else (torch.randperm(n, generator=gen), 0)

    def save_ckpt() -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save(dict(settings=settings, unet=unet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                        gen=gen.get_state(), state=state, order=(perm, pos)), tmp)
        tmp.replace(ckpt)

    cpu0, wall0 = time.process_time() - state["cpu_s"], time.time() - state["wall_s"]
    unet.train()
    while state["step"] < steps:
        step = state["step"]
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = batch_loss(unet, idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # EMA warm-up
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1.0 - decay)
        state["losses"].append(loss.item())
        state["step"] = step + 1
        state["cpu_s"], state["wall_s"] = time.process_time() - cpu0, time.time() - wall0
        if state["step"] % 100 == 0:
            recent = sum(state["losses"][-100:]) / 100
            click.echo(f"step {state['step']:5d}  loss(avg100) {recent:.4f}  cpu {state['cpu_s']:.0f}s", err=True)
        if state["step"] % ckpt_every == 0 or state["step"] == steps:
            save_ckpt()
    return ema.eval(), state


def training_record(settings: dict, model: UNet2DModel, state: dict, n_train: int, n_test: int, out: Path,
                    **held_out: float) -> dict:
    """The JSON record of a finished run (``held_out``: named held-out losses, rounded to 5 digits)."""
    losses = state["losses"]
    return dict(
        settings=settings,
        parameters=sum(p.numel() for p in model.parameters()),
        train_images=int(n_train), test_images=int(n_test),
        cpu_seconds=round(state["cpu_s"], 1), wall_seconds=round(state["wall_s"], 1),
        final_train_loss_avg100=round(sum(losses[-100:]) / min(100, len(losses)), 5),
        **{k: round(v, 5) for k, v in held_out.items()},
        loss_curve_avg100=[round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 5)
                           for i in range(0, len(losses), 100)],
        pipeline_dir=str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out),
        machine=f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        date=datetime.date.today().isoformat(),
    )


def merge_result(path: Path, key: str, record: dict) -> None:
    """Store ``record`` under ``key`` in the JSON file ``path`` (other keys kept) and echo it (sans loss curve)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = record
    path.write_text(json.dumps(results, indent=2) + "\n")
    click.echo(json.dumps({k: v for k, v in record.items() if k != "loss_curve_avg100"}, indent=2))


@harness.command(out=None)
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default="epsilon")
@click.option("--width", default=16, show_default=True, help="channels of the first UNet level (then 2w, 4w)")
@click.option("--steps", default=2400, show_default=True, help="optimiser steps")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=2e-3, show_default=True, help="peak learning rate")
@click.option("--warmup", default=100, show_default=True)
@click.option("--ema-decay", default=0.999, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="checkpoint file [default: .cache/digits_ddpm_<variant>.ckpt.pt]")
@click.option("--ckpt-every", default=200, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="pipeline dir [default: the asset dir]")
def main(prediction_type: str, width: int, steps: int, batch_size: int, lr: float, warmup: int, ema_decay: float,
         seed: int, ckpt: Path | None, ckpt_every: int, out: Path | None) -> None:
    """Train the digits DDPM and save it as a diffusers pipeline."""
    variant = VARIANT[prediction_type]
    ckpt = ckpt or REPO / ".cache" / f"digits_ddpm_{variant}.ckpt.pt"
    out = out or assets_dir() / PIPELINE_DIRS[variant]
    settings = dict(prediction_type=prediction_type, width=width, steps=steps, batch_size=batch_size, lr=lr,
                    warmup=warmup, ema_decay=ema_decay, seed=seed, optimizer="AdamW(wd=0)", image_size=IMAGE_SIZE,
                    num_train_timesteps=1000, beta_schedule="linear 1e-4..0.02", threads=torch.get_num_threads())

    train = digits_dataset("train")
    test = digits_dataset("test")
    torch.manual_seed(seed)
    unet = build_unet(width)
    sched = build_scheduler(prediction_type)
    ema, state = train_with_ema(
        unet, lambda net, idx, gen: diffusion_loss(net, sched, train[idx], gen), train.shape[0],
        settings=settings, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
        seed=seed, ckpt=ckpt, ckpt_every=ckpt_every)

    DDPMPipeline(unet=ema, scheduler=sched).save_pretrained(str(out), safe_serialization=True)
    record = training_record(settings, ema, state, train.shape[0], test.shape[0], out,
                             ema_test_loss=held_out_loss(ema, sched, test),
                             ema_train_loss=held_out_loss(ema, sched, train[:512]))
    merge_result(RESULTS, variant, record)


if __name__ == "__main__":
    main()
