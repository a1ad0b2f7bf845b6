"""The digits world comparison (rglcd-fast eval) at a reduced size: the Fréchet distance, the judge on
real digits, and the whole command (three short trainings, every row of the table)."""
import math
import os
import re

import numpy as np
import pytest
import torch

from rglcd_fast.world.evaluate import Judge, frechet_distance


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, shifted) == pytest.approx(5.0, rel=1e-6)
    # N(0, I) vs N(0, 4I) in 3-d: Tr(I + 4I - 2·2I) = 3
    assert frechet_distance(a, 2 * rng.normal(size=(200000, 3))) == pytest.approx(3.0, rel=0.02)


def test_the_judge_recognises_real_digits():
    from rglcd_fast.world import DigitsDataset

    judge = Judge()
    data = DigitsDataset()
    images = (data.images[:300] + 1) / 2
    prompts = [data[i]["caption"] for i in range(300)]
    reward, accuracy, frechet = judge(images, prompts)
    assert accuracy > 0.95 and reward > 0
    assert frechet < 0.1 * judge(torch.rand(300, 3, 32, 32), prompts)[2]  # real digits are close, noise is far


def test_eval_command_end_to_end(tmp_path):
    from rglcd_fast.cli import main

    out = tmp_path / "table.md"
    assert main(["eval", "--work-dir", str(tmp_path / "runs"), "--train-steps", "2", "--per-digit", "2",
                 "--steps", "1", "--out", str(out), "--quiet"]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| [")]
    assert len(rows) == 4  # the teacher + three students at 1 step
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        grid = re.search(r"\]\((.*)\)", cells[0]).group(1)
        assert os.path.isfile(tmp_path / grid)
        assert all(math.isfinite(float(c)) for c in cells[2:])
        assert 0.0 <= float(cells[3]) <= 1.0
    for mode in ("none", "direct", "lrm"):
        assert os.path.isdir(tmp_path / "runs" / mode / "pipeline")
