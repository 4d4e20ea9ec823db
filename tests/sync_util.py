"""Forbid host reads of tensors inside ``step()`` (shared by the contract, plug-in and Time-Shift tests)."""

from __future__ import annotations

import torch

from fastsampler import PlanScheduler


def forbid_host_reads(monkeypatch, accelerator: bool) -> None:
    """Make every host read of a tensor fail: ``.item()``, ``.tolist()``, ``.nonzero()``, ``int()``, ``bool()``,
    ``float()`` (each is a device sync on an accelerator). With ``accelerator`` the scheduler's accelerator branch
    is forced (on CPU tensors) and nothing is allowed; without it the CPU finiteness check may ``float()`` one 0-d
    CPU tensor (no device to sync with)."""
    if accelerator:
        monkeypatch.setattr(PlanScheduler, "_on_accelerator", staticmethod(lambda device: True))

    def forbid(name, original=None):
        def fail(self, *args, **kwargs):
            if original is not None and not accelerator and self.ndim == 0 and self.device.type == "cpu":
                return original(self, *args, **kwargs)
            raise AssertionError(f"step() called Tensor.{name}")
        return fail

    for name in ("item", "tolist", "nonzero", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    monkeypatch.setattr(torch.Tensor, "__float__", forbid("__float__", torch.Tensor.__float__))
