"""`fastsampler <command>`: the command-line entry point (click group; subcommands live in their modules)."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """fastsampler: fast training-free samplers for diffusion models."""


def _register() -> None:
    # Subcommands are imported lazily-ish here so `fastsampler --help` stays cheap.
    from fastsampler.eval import bench_cli  # noqa: F401  (registers `bench`)

    main.add_command(bench_cli.bench)
    from fastsampler.eval import fid_cli
    from fastsampler.tuning import cli as tune_cli

    main.add_command(fid_cli.fid)
    main.add_command(tune_cli.tune)


_register()

if __name__ == "__main__":
    main()
