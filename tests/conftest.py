"""Test configuration: run Triton kernels through its interpreter when there is no GPU.

The variable must be set before triton is first imported, which is why it lives here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def cpp():
    """The C++ backend module; skips the test when it is unavailable (not built, no compiler)."""
    from lsr_fused.backends import cpp_backend

    if not cpp_backend.is_available():
        pytest.skip(f"C++ backend unavailable: {cpp_backend.unavailable_reason()}")
    return cpp_backend
