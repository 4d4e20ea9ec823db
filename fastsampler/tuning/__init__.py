"""Fitting a scheduler to the user's model: ``fastsampler.tune`` (``api``) and its searches."""

#: ``fastsampler.tune``'s method when none is named: the lowest geometric-mean error ratio to the best diffusers
#: built-in over the cells of ``benchmarks/tune_bench.py`` (``benchmarks/results/tune_bench.md``).
DEFAULT_METHOD = "coefficients"
