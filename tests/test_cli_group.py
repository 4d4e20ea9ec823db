"""The ``fastsampler`` command group: ``--help`` and ``--version`` import no subcommand (nor torch), the listed
summaries are the commands' own, and a misspelt command gets a clean usage error with a suggestion."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

import fastsampler
from fastsampler.cli import COMMANDS, main
from test_light_import import HEAVY, fresh


def test_help_and_version_import_nothing_heavy():
    loaded = fresh(f"""
import json, sys
from click.testing import CliRunner
from fastsampler.cli import main
runner = CliRunner()
codes = [runner.invoke(main, ["--help"]).exit_code, runner.invoke(main, ["--version"]).exit_code]
heavy = [m for m in {HEAVY + ("torch", "diffusers", "fastsampler.adapters")!r} if m in sys.modules]
print(json.dumps({{"codes": codes, "heavy": heavy}}))
""")
    assert loaded == {"codes": [0, 0], "heavy": []}


def test_listed_summaries_are_the_commands_first_sentences():
    for name, (_, _, summary) in COMMANDS.items():
        command = main.get_command(None, name)
        first = re.split(r"(?<=\.)\s", " ".join(command.help.split()), maxsplit=1)[0]
        assert summary == first, name
    listed = CliRunner().invoke(main, ["--help"]).output
    assert all(f"  {name} " in listed for name in COMMANDS)


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fastsampler {fastsampler.__version__}"


@pytest.mark.parametrize("typo, hint", [("tunee", "Did you mean 'tune'?"), ("benhc", "Did you mean 'bench'?"),
                                        ("xyz", "Commands: bench, fid, tune.")])
def test_unknown_command_is_a_usage_error_with_a_suggestion(typo, hint):
    result = CliRunner().invoke(main, [typo])
    assert result.exit_code == 2
    assert f"No such command '{typo}'. {hint}" in result.output
    assert "Traceback" not in result.output
