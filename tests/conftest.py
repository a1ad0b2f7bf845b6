"""Every test starts from the same global random state, so its random inputs (torch.randn without a
generator) are the same in every run and in any test order: CI results are reproducible."""
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_random_state():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
