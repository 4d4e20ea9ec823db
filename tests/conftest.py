"""Test-session setup: Triton kernels run on CPU tensors through Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, ahead of every test module.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))


VERSIONED = ("torch", "diffusers", "transformers", "triton", "torchmetrics", "optuna", "numpy", "k-diffusion")


def installed_versions() -> str:
    """``name version`` of the packages the results depend on (without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    def one(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} (not installed)"

    return ", ".join(one(n) for n in VERSIONED)


def pytest_sessionstart(session) -> None:
    """The versions tested against, first in the log even under ``-q`` (which hides the report header)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"fastsampler tests with python {sys.version.split()[0]}, {installed_versions()}")
