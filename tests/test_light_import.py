"""``import fastsampler`` loads what schedulers need and nothing more; the rest loads on first use (PEP 562).

Each check runs in a fresh interpreter, since this test session has long since imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("transformers", "torchmetrics", "optuna", "matplotlib", "diffusers.pipelines", "fastsampler.eval",
         "fastsampler.tuning", "sklearn", "scipy.stats")


def fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON object as its last line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_scheduler_loads_no_pipeline_stack():
    loaded = fresh(f"""
import json, sys
import fastsampler
fastsampler.UniPCScheduler().set_timesteps(5)
fastsampler.DPMSolverPlusPlusScheduler(); fastsampler.DEISScheduler(); fastsampler.DCSolverScheduler()
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
""")
    assert loaded == [], f"`import fastsampler` + schedulers loaded {loaded}"


def test_pipelines_and_subpackages_load_on_first_use():
    """diffusers' generic loader still finds the digits pipeline class by name, and ``fastsampler.eval`` /
    ``fastsampler.tuning`` answer as attributes, each only once asked for."""
    got = fresh("""
import json, sys
import fastsampler
from diffusers import DiffusionPipeline
before = "fastsampler.models.digits_pipeline" in sys.modules
pipe = DiffusionPipeline.from_pretrained(fastsampler.assets("digits-cond"))
print(json.dumps({"before": before, "cls": type(pipe).__name__,
                  "same": type(pipe) is fastsampler.DigitsConditionalPipeline,
                  "tuning": fastsampler.tuning.__name__, "eval": fastsampler.eval.__name__}))
""")
    assert got == {"before": False, "cls": "DigitsConditionalPipeline", "same": True,
                   "tuning": "fastsampler.tuning", "eval": "fastsampler.eval"}


def test_the_pipeline_registers_even_after_an_availability_check_of_diffusers():
    """Libraries probe ``importlib.util.find_spec("diffusers")`` without importing it: the registration still
    happens at the real import."""
    got = fresh("""
import importlib.util, json
import fastsampler
assert importlib.util.find_spec("diffusers") is not None
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(fastsampler.assets("digits-cond"))
print(json.dumps(type(pipe).__name__))
""")
    assert got == "DigitsConditionalPipeline"


def test_an_unknown_attribute_is_an_attribute_error():
    import fastsampler

    with pytest.raises(AttributeError, match="no attribute 'NoSuchScheduler'"):
        fastsampler.NoSuchScheduler  # noqa: B018
    assert not hasattr(fastsampler, "NoSuchScheduler")
