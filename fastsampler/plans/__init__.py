"""The plan format shared by the plan builders (``fastsampler.samplers``) and the kernels (``fastsampler.kernels``)."""

from fastsampler.plans.format import Plan, RowView

__all__ = ["Plan", "RowView"]
