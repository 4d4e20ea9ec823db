"""Progress in a log that is not a terminal: a line every LOG_INTERVAL_S at most, not one per update."""

from __future__ import annotations

import io
import time

from click.testing import CliRunner

from fastsampler import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drive(stream: io.StringIO, seconds: float = 0.6, updates: int = 300) -> int:
    """Update a bar ``updates`` times over ``seconds``; the number of status lines it printed."""
    bar = progress.bar(range(updates), file=stream, desc="work")
    for _ in bar:
        time.sleep(seconds / updates)
    return stream.getvalue().count("\r")


def test_a_log_gets_a_few_lines_and_a_terminal_a_live_bar():
    in_log = drive(io.StringIO())
    on_terminal = drive(Terminal())
    # log: the first draw and the final one (interval 10 s); terminal: tqdm's 0.1 s refresh
    assert in_log <= 3, in_log
    assert on_terminal >= 4, on_terminal


def test_the_log_bar_is_plain_and_ends_complete():
    stream = io.StringIO()
    drive(stream, seconds=0.0, updates=50)
    text = stream.getvalue()
    assert "50/50" in text and text.isascii()


def test_disabled_prints_nothing():
    stream = io.StringIO()
    for _ in progress.bar(range(10), file=stream, enabled=False):
        pass
    assert stream.getvalue() == ""


def test_every_command_takes_quiet():
    from fastsampler.cli import main

    for command in ("bench", "fid", "tune"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "--quiet" in result.output and "--no-progress" in result.output


def test_every_bar_in_the_package_goes_through_progress_bar():
    """A direct ``tqdm(...)`` would print one line per update in a log again."""
    import ast
    from pathlib import Path

    import fastsampler

    root = Path(fastsampler.__file__).parent
    direct = []
    for path in root.rglob("*.py"):
        if path.name == "progress.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(n == "tqdm" or n.startswith("tqdm.") for n in names):
                    direct.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not direct, f"import tqdm through fastsampler.progress instead: {direct}"
