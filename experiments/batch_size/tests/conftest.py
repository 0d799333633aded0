import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch seed (as the library's tests/conftest.py does)."""
    torch.manual_seed(0)
    yield
