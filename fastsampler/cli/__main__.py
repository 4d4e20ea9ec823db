"""``python -m fastsampler.cli`` (and ``torchrun … -m fastsampler.cli``) runs the ``fastsampler`` command."""

from fastsampler.cli import main

main()
