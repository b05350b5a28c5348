"""Test setup: the Triton interpreter when there is no GPU, seeds, device/dtype fixtures, GPU marker.

TRITON_INTERPRET must be set before anything imports triton, so this runs first (pytest imports
conftest before the test modules).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=[torch.float32] + ([torch.float16, torch.bfloat16] if HAS_CUDA else []),
                ids=lambda d: str(d).replace("torch.", ""))
def float_dtype(request):
    """Float dtypes the kernels support; bf16/fp16 only on GPU (the interpreter's bf16 is wrong)."""
    return request.param
