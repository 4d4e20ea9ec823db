"""What every benchmark script shares, so that a script holds only its experiment.

* ``@command()`` — the script's click command: its module docstring as the help, and the shared options ``--out``
  (the results folder, default ``benchmarks/results``) and ``--threads`` (torch threads, default 1: the recorded
  numbers are per core), applied before the body runs. A body with the one parameter ``args`` gets the options as
  a namespace (``args.nfe``), any other body gets them as keyword arguments, as click gives them.
* ``ints("4,5,6")`` — a comma-separated list of integers (NFEs, seeds), with an error naming the option.
* ``run_stamp()`` / ``machine()`` — when and where a run happened: the header of every recorded result (the
  short form, and the long one with CPU model and package versions for timing benchmarks).
* ``write_results(folder, name, payload, markdown)`` — ``name.json`` (stamped) and ``name.md`` side by side,
  each written atomically (a killed run never leaves half a file under a name a reader trusts).
* ``mixture(preset, guidance, batch, seed)`` — the exact digits Gaussian mixture as a ``model(x, t)`` for a bench
  preset's noise schedule, with its noises: the ground-truth model of the tuning benchmarks.
* ``ratio_tables`` (its own module) — RMSE next to the best diffusers scheduler, as ratios over held-out seeds.

The trained digits models load from ``fastsampler.models.digits``, the shipped tuned schedulers from
``fastsampler.assets``: nothing is downloaded.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import json
import os
import platform
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import click

RESULTS = Path(__file__).resolve().parent / "results"


def command(out: Path | None = RESULTS, threads: int | None = 1) -> Callable[[Callable], click.Command]:
    """Decorate a script's ``main`` (below its ``@click.option``s) as its command with ``--out`` (``out`` None:
    none) and ``--threads`` (``threads`` None: the script sets its own)."""

    def decorate(body: Callable) -> click.Command:
        as_namespace = list(inspect.signature(body).parameters) == ["args"]
        options = getattr(body, "__click_params__", [])

        @functools.wraps(body)
        def run(**kwargs: Any) -> Any:
            count = kwargs.pop("threads", None) if threads is not None else None
            if count is not None:
                import torch

                torch.set_num_threads(count)
            return body(SimpleNamespace(**kwargs)) if as_namespace else body(**kwargs)

        run.__click_params__ = list(options)
        if threads is not None:
            run = click.option("--threads", type=click.IntRange(min=1), default=threads, show_default=True,
                               help="torch threads (the recorded results use the default)")(run)
        if out is not None:
            run = click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=out,
                               show_default=True, help="results folder")(run)
        doc = _verbatim_blocks(sys.modules[body.__module__].__doc__ or "")
        return click.command(help=doc, context_settings={"max_content_width": 120})(run)

    return decorate


def _verbatim_blocks(doc: str) -> str:
    """The docstring with its indented paragraphs (command lines, tables) marked for click not to rewrap."""
    paragraphs = doc.strip("\n").split("\n\n")
    return "\n\n".join("\b\n" + p if p.startswith((" ", "\t")) or p.lstrip().startswith("|") else p
                       for p in paragraphs)


def held_out_protocol(fit_samples: int, validation_help: str) -> Callable[[Callable], Callable]:
    """The options of the tuning benchmarks on the exact mixture (fit on some noises, validate on others, score on
    held-out batches): ``--preset``, ``--fit-samples`` / ``--fit-seed``, ``--validation-samples`` /
    ``--validation-seed``, ``--batch-size`` and ``--eval-seeds`` (a list; the first seed gets the full table)."""
    options = [
        click.option("--preset", default="sd", show_default=True),
        click.option("--fit-samples", type=int, default=fit_samples, show_default=True),
        click.option("--fit-seed", type=int, default=1000, show_default=True),
        click.option("--validation-samples", type=int, default=128, show_default=True, help=validation_help),
        click.option("--validation-seed", type=int, default=2000, show_default=True),
        click.option("--batch-size", type=int, default=256, show_default=True),
        click.option("--eval-seeds", default="0,3000,4000,5000", show_default=True,
                     callback=lambda ctx, param, text: ints(text, "--eval-seeds"),
                     help="held-out batches (the first gets the full table)"),
    ]

    def decorate(body: Callable) -> Callable:
        for option in reversed(options):
            body = option(body)
        return body

    return decorate


def ints(text: str, option: str = "--nfe") -> list[int]:
    """``"4,5,6"`` → ``[4, 5, 6]``."""
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None


def run_stamp(threads: str = "torch threads 1") -> dict[str, str]:
    """``date`` (UTC, ISO 8601) and ``machine`` (processor or architecture, and the threading used)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {threads}"}


def machine() -> dict[str, str | int]:
    """The long stamp of timing benchmarks: CPU model, cores, torch threads, Python, platform, package versions."""
    import diffusers
    import torch

    import fastsampler

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count() or 0, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "fastsampler": fastsampler.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_results(folder: Path, name: str, payload: dict[str, Any], markdown: str | Sequence[str] | None = None,
                  indent: int = 1) -> Path:
    """``folder/name.json`` — ``payload``, after a run stamp unless it carries its own ``date`` — and, given,
    ``folder/name.md``; returns the JSON's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = payload if "date" in payload else {**run_stamp(), **payload}
    path = folder / f"{name}.json"
    _atomic_write(path, json.dumps(record, indent=indent, default=str) + "\n")
    if markdown is not None:
        text = markdown if isinstance(markdown, str) else "\n".join(markdown)
        _atomic_write(folder / f"{name}.md", text.rstrip("\n") + "\n")
    return path


def mixture(preset: str, guidance: float | None, batch: int, seed: int):
    """(model, noise): the exact digits mixture (guided with ``guidance``) for ``preset``'s schedule as a
    ``model(x, t)``, and ``batch`` float64 noises from ``seed``."""
    from fastsampler.eval import bench, gmm
    from fastsampler.models.denoisers import MixtureDenoiserModel

    setup = bench.BenchSetup(preset, None, guidance, batch, seed)
    model = gmm.MixtureModel.from_scheduler_config(setup.denoiser(), bench.preset_config(preset))
    return MixtureDenoiserModel(model), setup.noise().double()
