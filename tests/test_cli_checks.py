"""Every command checks its arguments before any work: a mistake gets a clean usage error (exit code 2, no
traceback) that names the option, and nothing is written."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from fastsampler.cli import main


def invoke(tmp_path, args: list[str]):
    """Run ``fastsampler ARGS`` inside ``tmp_path`` with the cache there too; returns (result, files written)."""
    (tmp_path / "a-file").write_text("x")
    before = set(tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(main, args, env={"FASTSAMPLER_CACHE": str(tmp_path / "cache")})
    finally:
        os.chdir(cwd)
    return result, sorted(str(p.relative_to(tmp_path)) for p in set(tmp_path.rglob("*")) - before)


MISTAKES = [
    (["bench", "--out", "/proc/fs_out", "--nfe", "3"], "--out", "not writable"),
    (["bench", "--out", "a-file/out", "--nfe", "3"], "--out", "is not a folder"),
    (["bench", "--nfe", "0"], "--nfe", "positive"),
    (["fid", "--scheduler", "UniPCSchedular", "--steps", "5", "-n", "8", "--out", "fid_out"], "--scheduler",
     "Did you mean 'UnCLIPScheduler', 'UniPCMultistepScheduler'"),
    (["fid", "--scheduler", "fastsampler.UniPCSchedular", "--steps", "5", "-n", "8", "--out", "fid_out"],
     "--scheduler", "Did you mean 'fastsampler.UniPCScheduler'"),
    (["fid", "--scheduler", "DDIMScheduler", "--steps", "5", "-n", "8", "--out", "/proc/fid_out"], "--out",
     "not writable"),
    (["tune", "--pipeline", "digits", "--steps", "0", "--out", "tuned"], "--steps", "positive integers"),
    (["tune", "--pipeline", "digits", "--steps", "5,x", "--out", "tuned"], "--steps", "positive integers"),
    (["tune", "--pipeline", "digits", "--steps", "5", "--scheduler", "UniPCSchedular", "--out", "tuned"],
     "--scheduler", "Did you mean 'UniPCScheduler'"),
    (["tune", "--pipeline", "digits", "--steps", "5", "--out", "a-file"], "--out", "is a file"),
    (["tune", "--pipeline", "digits", "--steps", "5", "--guidance-scale", "two", "--out", "tuned"],
     "--guidance-scale", "numbers"),
    (["tune", "--pipeline", "digits", "--steps", "5", "--guidance-scale", "2", "--out", "tuned"],
     "--guidance-scale", "unconditional"),
    (["tune", "--pipeline", "digts", "--steps", "5", "--out", "tuned"], "--pipeline", "did you mean 'digits'"),
    (["tune", "--pipeline", "digits", "--steps", "5", "--budget", "9", "--out", "tuned"], "--budget",
     "does not apply"),
]


@pytest.mark.parametrize("args, option, message", MISTAKES, ids=[" ".join(m[0][:3]) for m in MISTAKES])
def test_a_mistake_is_a_clean_usage_error_and_writes_nothing(tmp_path, args, option, message):
    result, written = invoke(tmp_path, args)
    assert result.exit_code == 2, result.output
    assert option in result.output and message in result.output, result.output
    assert "Traceback" not in result.output
    assert written == []
