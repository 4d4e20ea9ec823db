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
    try:
        from fastsampler.eval import fid_cli

        main.add_command(fid_cli.fid)
    except ImportError:  # fid_cli not written yet / optional deps missing
        pass


_register()

if __name__ == "__main__":
    main()
