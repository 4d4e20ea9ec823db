"""Test-session setup: Triton kernels run on CPU tensors through Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, ahead of every test module.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
