import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import normkit  # noqa: E402

# Backends every core case runs through: the plain autograd path, the composed-ATen kernel
# set, and whatever 'auto' picks on this machine (the compiled CPU kernels when available).
BACKENDS = ["reference", "aten", "auto"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with normkit.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
