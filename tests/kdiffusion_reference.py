"""k-diffusion's own samplers as a reference (k-diffusion 0.1.1.post1, installed with ``--no-deps``).

Its package ``__init__`` imports every submodule (models, evaluation, …) and ``utils`` imports
``torchvision.transforms.functional``, which has no registry build for our CPU torch. The samplers need neither:
``k_diffusion.sampling`` is loaded on its own (a bare parent package, and a stand-in for torchvision's image
functions, which no sampler calls, while it imports). Where k-diffusion imports normally, it is used as is.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

import pytest


def k_sampling():
    """``k_diffusion.sampling``, or a pytest skip that says why it cannot be imported here."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    for needed in ("torchsde", "torchdiffeq"):
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"k-diffusion's sampling module needs {needed}")
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:
        pass  # torchvision (or another of the package's extras) missing: load the sampling module alone
    for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
        del sys.modules[name]
    parent = types.ModuleType("k_diffusion")
    parent.__path__ = list(spec.submodule_search_locations)
    parent.__spec__ = importlib.machinery.ModuleSpec("k_diffusion", None, is_package=True)
    parent.__spec__.submodule_search_locations = parent.__path__
    stand_ins = {name: types.ModuleType(name) for name in
                 ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")}
    stand_ins["torchvision"].transforms = stand_ins["torchvision.transforms"]
    stand_ins["torchvision.transforms"].functional = stand_ins["torchvision.transforms.functional"]
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules["k_diffusion"] = parent
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("k_diffusion.sampling")
    finally:  # other importers must not see the stand-ins (importlib.util.find_spec would fail on them)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
