import os
import sys
import warnings

import pytest
import torch

# torch registers its forward-AD decompositions with torch.jit.script the first time jvp runs,
# which warns that torch.jit.script is deprecated; import them once here, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: E402,F401

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
