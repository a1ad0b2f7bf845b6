"""Every test starts from the same global random state, so its random inputs (torch.randn without a
generator) are the same in every run and in any test order: CI results are reproducible. `world`: the
trainer tests' tiny SD teacher and captioned images."""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_random_state():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base SD folder and 12 captioned 16×16 images (captions name a digit, for the digits expert)."""
    from tiny_pipeline import save_tiny_world

    return save_tiny_world(tmp_path_factory.mktemp("world"))
