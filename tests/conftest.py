"""pytest configuration for the aggnets test suite.

References (expected values) live in tests/references.py (NumPy, float64, loops; no aggnets);
builders of inputs and heads live in tests/helpers.py.
"""

import random

import numpy as np
import pytest
import torch
from hypothesis import settings

# No example database on disk (keeps the checkout clean); deterministic example generation.
settings.register_profile("aggnets", database=None, derandomize=True)
settings.load_profile("aggnets")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped when torch.cuda.is_available() is False)")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
