"""Test setup: Triton kernels run on CPU tensors through the interpreter where no GPU is.

TRITON_INTERPRET must be set before the kernels are first imported (triton.jit reads it when
it decorates), so it is set here, before any test module imports fastgpt's kernels. On a
machine with CUDA the same tests run the compiled kernels on the GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton_interp  # noqa: E402

    triton_interp.install()

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
