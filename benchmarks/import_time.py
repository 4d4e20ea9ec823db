"""Import cost of a scheduler: ``import fastsampler`` + one ``UniPCScheduler()`` next to diffusers' own.

Protocol: each statement runs in a fresh ``python -c`` process (nothing imported, the OS file cache warm after a
discarded first round); the processes alternate ours / diffusers' so load drifts hit both alike. The time is the
process's own wall clock around the statement (``time.perf_counter`` before and after), so interpreter start-up is
left out. Reported: the median over ``--repeats`` rounds and the ratio ours / diffusers; the goal is ≤ 1.1×. Also
``fastsampler --help`` (the command group and its help text, interpreter start-up left out likewise): goal ≤ 1 s.
``--before DIR`` adds a third column: the same statement against another checkout of fastsampler (put first on
``PYTHONPATH``), e.g. a worktree of the commit before the light import.

    python benchmarks/import_time.py [--repeats 7] [--before /tmp/fastsampler-before] [--out benchmarks/results]

Writes import_time.json and import_time.md with the machine and the date.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

import harness

STATEMENTS = {
    "fastsampler": "import fastsampler; fastsampler.UniPCScheduler()",
    "diffusers": "from diffusers import DPMSolverMultistepScheduler; DPMSolverMultistepScheduler()",
    # the CLI's --help: what a user waits for above the interpreter's own start (`python -c pass`); goal ≤ 1 s
    "fastsampler --help": "from fastsampler.cli import main; main(['--help'], standalone_mode=False)",
}
CLI_GOAL_S = 1.0
TIMER = "import time; _t = time.perf_counter(); {statement}; print(time.perf_counter() - _t)"


ROOT = Path(__file__).resolve().parent.parent


def seconds(statement: str, checkout: Path = ROOT) -> float:
    """Wall seconds of ``statement`` in a fresh interpreter that imports fastsampler from ``checkout``.

    The process runs in an empty folder: ``python -c`` puts its working folder first on ``sys.path``, ahead of
    ``PYTHONPATH``, so running it from a checkout would import that checkout whatever ``checkout`` says.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(checkout), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as empty:
        done = subprocess.run([sys.executable, "-c", TIMER.format(statement=statement)], capture_output=True,
                              text=True, env=env, cwd=empty, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def measure(repeats: int, before: Path | None) -> dict[str, list[float]]:
    runs = {label: (STATEMENTS[label], ROOT) for label in ("fastsampler", "diffusers", "fastsampler --help")}
    if before:
        runs["fastsampler (before)"] = (STATEMENTS["fastsampler"], before)
    for statement, path in runs.values():  # warm the file cache; not recorded
        seconds(statement, path)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for label, (statement, path) in runs.items():
            times[label].append(seconds(statement, path))
    return times


def commit_of(checkout: Path) -> str:
    """The checkout's git commit (short), or ``"?"`` outside git."""
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def markdown(result: dict) -> str:
    med = result["median_s"]
    lines = [f"# Import time ({result['date']}, {result['machine']})", "",
             f"torch {result['versions']['torch']}, diffusers {result['versions']['diffusers']}; median of "
             f"{result['repeats']} fresh processes each, alternating.", "",
             f"fastsampler at commit {result['commits']['fastsampler']}"
             + (f", before: commit {result['commits']['before']}" if "before" in result["commits"] else "") + ".", "",
             "| statement | median s | ratio to diffusers |", "|---|---|---|"]
    for label, s in med.items():
        statement = STATEMENTS[label.removesuffix(" (before)")]
        lines.append(f"| {label}: `{statement}` | {s:.3f} | {s / med['diffusers']:.2f} |")
    lines += ["", f"Goal: fastsampler / diffusers ≤ 1.1 → {'met' if result['ratio'] <= 1.1 else 'not met'} "
              f"({result['ratio']:.2f}×). `fastsampler --help` ≤ {CLI_GOAL_S:g} s → "
              f"{'met' if med['fastsampler --help'] <= CLI_GOAL_S else 'not met'} ({med['fastsampler --help']:.3f} s)."]
    return "\n".join(lines) + "\n"


@harness.command(out=harness.RESULTS, threads=None)
@click.option("--repeats", type=click.IntRange(min=1), default=7, show_default=True)
@click.option("--before", type=click.Path(path_type=Path),
              help="another fastsampler checkout to time the same statement against")
def main(args) -> None:
    import diffusers
    import torch

    times = measure(args.repeats, args.before)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {**harness.run_stamp(threads=f"{os.cpu_count()} cores"), "repeats": args.repeats,
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
              "commits": {"fastsampler": commit_of(ROOT), **({"before": commit_of(args.before)} if args.before else {})},
              "times_s": times, "median_s": med, "ratio": med["fastsampler"] / med["diffusers"]}
    harness.write_results(args.out, "import_time", result, text := markdown(result))
    print(text)
    return 0


if __name__ == "__main__":
    main()
