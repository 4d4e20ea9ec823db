"""Train the digits CNN whose penultimate layer is the FID feature space of the embedded digits benchmark.

Same preprocessing as the DDPM (``fastsampler.models.digits.digits_dataset``: [-1, 1], 16x16), trained on the
``"train"`` split with ±1-pixel random shifts, evaluated on ``"test"``. Writes the weights to
``fastsampler/assets/digits_classifier.safetensors`` and the accuracy/settings to
``fastsampler/assets/digits_classifier.json`` (and a copy in ``benchmarks/results/``).

    python benchmarks/train_digits_classifier.py
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fastsampler.models.digits import CLASSIFIER_FILE, assets_dir, digits_dataset
import harness
from fastsampler.models.features import DigitsCNN

REPO = Path(__file__).resolve().parents[1]


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (padding with the background value −1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def accuracy(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on (x, y)."""
    model.eval()
    return float((model(x).argmax(dim=1) == y).to(torch.float32).mean())


@harness.command(out=None)
@click.option("--epochs", default=30, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """Train the digits classifier and save it next to the DDPM pipeline."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = digits_dataset("train", with_labels=True)
    x_test, y_test = digits_dataset("test", with_labels=True)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-x_train.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    cpu0, wall0 = time.process_time(), time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(x_train.shape[0], generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(random_shift(x_train[idx], gen)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0:
            click.echo(f"epoch {epoch + 1:3d}  loss {total / len(perm):.4f}  "
                       f"test acc {accuracy(model, x_test, y_test):.4f}", err=True)
    model.eval()
    out = assets_dir() / CLASSIFIER_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    record = dict(
        test_accuracy=round(accuracy(model, x_test, y_test), 4),
        train_accuracy=round(accuracy(model, x_train, y_train), 4),
        train_images=int(x_train.shape[0]), test_images=int(x_test.shape[0]),
        settings=dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, optimizer="AdamW(wd=1e-4)+OneCycle",
                      augmentation="random shift ±1 px", label_smoothing=0.05, threads=torch.get_num_threads()),
        num_features=64, feature_layer="global-average-pooled last conv block (penultimate)",
        cpu_seconds=round(time.process_time() - cpu0, 1), wall_seconds=round(time.time() - wall0, 1),
        date=datetime.date.today().isoformat(),
    )
    text = json.dumps(record, indent=2) + "\n"
    out.with_suffix(".json").write_text(text)
    results = REPO / "benchmarks" / "results" / "digits_classifier.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    click.echo(text)


if __name__ == "__main__":
    main()
