"""setup.py states a tested range (lower and upper bound) for every dependency, and the environment fits it."""

from __future__ import annotations

from importlib.metadata import requires, version

import pytest
from packaging.requirements import Requirement


def requirements() -> list[Requirement]:
    return [Requirement(r) for r in requires("fastsampler") or []]


def test_every_dependency_has_a_lower_and_an_upper_bound():
    unbounded = [str(r) for r in requirements()
                 if not ({s.operator for s in r.specifier} & {">=", ">", "=="}
                         and {s.operator for s in r.specifier} & {"<", "<=", "=="})]
    assert requirements() and not unbounded, f"state the tested range of {unbounded} in setup.py"


@pytest.mark.parametrize("name", ["diffusers", "torch", "numpy", "scipy", "tqdm"])
def test_the_installed_release_is_inside_its_range(name):
    (req,) = [r for r in requirements() if r.name == name and r.marker is None]
    assert req.specifier.contains(version(name), prereleases=True), f"{name} {version(name)} outside {req}"
