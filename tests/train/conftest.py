"""Small, fast training fixtures: digits subsets for a few steps of tiny models at 32 px."""
from __future__ import annotations

import pytest

from visionzoo.train.data import load_data


@pytest.fixture
def digits_small():
    """96 training and 40 validation digits (10 classes, grey 8x8)."""
    return load_data("digits", limit_train=96, limit_val=40)
