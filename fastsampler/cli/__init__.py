"""`fastsampler <command>`: the command-line entry point.

Each subcommand lives in its own module and is imported only when it runs (or when its own ``--help`` is asked
for), so ``fastsampler --help`` and ``fastsampler --version`` cost an interpreter and click, not torch: the group
lists the commands from :data:`COMMANDS`, whose one-line summaries a test keeps equal to the commands' own.
"""

from __future__ import annotations

import difflib
import importlib

import click

#: command name → (module, attribute, summary shown by ``fastsampler --help``: the first sentence of its help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "bench": ("fastsampler.cli.bench", "bench",
              "RMSE vs the exact ODE solution, per solver and NFE, on the digits Gaussian mixture."),
    "fid": ("fastsampler.cli.fid", "fid", "Generate NUM_SAMPLES images per (scheduler, steps, guidance scale, seed) in resumable shards "
            "and report FID vs NFE."),
    "tune": ("fastsampler.cli.tune", "tune",
             "Fit a fastsampler scheduler to a pipeline's model (solver coefficients and time points, DC-Solver "
             "ratios, an S3 schedule or time points alone) and write a scheduler folder."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0] not in COMMANDS and not args[0].startswith("-"):
            close = difflib.get_close_matches(args[0], list(COMMANDS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Commands: {', '.join(sorted(COMMANDS))}."
            ctx.fail(f"No such command {args[0]!r}.{hint}")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):  # summaries from the table: listing them imports nothing
            formatter.write_dl([(name, COMMANDS[name][2]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup)
@click.version_option(package_name="fastsampler", message="fastsampler %(version)s")
def main() -> None:
    """fastsampler: fast training-free samplers for diffusion models."""


if __name__ == "__main__":
    main()
