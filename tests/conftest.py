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
    from PIL import Image

    from tiny_pipeline import save_tiny_pipeline

    root = tmp_path_factory.mktemp("world")
    teacher = save_tiny_pipeline(str(root / "teacher"), lcm=False)
    data = root / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a digit {('zero', 'one', 'two', 'three')[i % 4]}")
    return teacher, str(data)
