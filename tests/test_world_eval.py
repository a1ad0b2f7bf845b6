"""The digits world comparison (rglcd-fast eval and sweep) at a reduced size: the Fréchet distance, the
diversity measure, the judge on real digits, and the whole commands (short trainings of every row over two
seeds, reuse only of runs with the same settings, the reward-vs-Fréchet plot)."""

import math
import os
import re

import numpy as np
import pytest
import torch

from rglcd_fast.world.evaluate import Judge, frechet_distance, mean_pairwise_distance


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, shifted) == pytest.approx(5.0, rel=1e-6)
    # N(0, I) vs N(0, 4I) in 3-d: Tr(I + 4I - 2·2I) = 3
    assert frechet_distance(a, 2 * rng.normal(size=(200000, 3))) == pytest.approx(3.0, rel=0.02)


def test_mean_pairwise_distance_per_group():
    features = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    # group a: one pair at distance 5; group b: distances 1, 3, 2 -> mean 2
    assert mean_pairwise_distance(features, ["a", "a", "b", "b", "b"]) == pytest.approx((5 + 2) / 2)


def test_the_judge_recognises_real_digits():
    from rglcd_fast.world import DigitsDataset
    from rglcd_fast.world.digits import prompt_for

    judge = Judge()
    data = DigitsDataset()
    images = (data.images[:300] + 1) / 2
    prompts = [data[i]["caption"] for i in range(300)]
    real = judge(images, prompts)
    assert real["accuracy"] > 0.95 and real["reward"] > 0
    # paraphrased captions split a class into several prompts; per class the spread is the real one
    by_class = judge(images, [prompt_for(int(label)) for label in data.labels[:300]])
    assert 0.85 < by_class["diversity"] < 1.15
    noise = judge(torch.rand(300, 3, 32, 32), prompts)
    assert real["frechet"] < 0.1 * noise["frechet"]  # real digits are close, noise is far
    copies = judge(images[:1].expand(300, -1, -1, -1), prompts)
    assert copies["diversity"] == pytest.approx(0.0, abs=1e-6)  # one image for every prompt: no diversity


def table_rows(path):
    rows = [line for line in path.read_text().splitlines() if line.startswith("| [")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def test_eval_command_end_to_end(work_dir, tmp_path):
    from rglcd_fast.cli import main
    from rglcd_fast.world.evaluate import VARIANTS

    out = tmp_path / "table.md"
    args = [
        "eval",
        "--work-dir",
        str(work_dir),
        "--seeds",
        "0,1",
        "--train-steps",
        "1",
        "--per-digit",
        "2",
        "--steps",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    rows = table_rows(out)
    assert [r[0].split("](")[0][1:] for r in rows] == ["Teacher (DDIM, CFG 7.5)", *VARIANTS]
    for cells in rows:
        grid = re.search(r"\]\((.*)\)", cells[0]).group(1)
        assert os.path.isfile(tmp_path / grid)
        means = [float(c.split(" ± ")[0]) for c in cells[2:]]
        assert all(math.isfinite(m) for m in means) and all(" ± " in c for c in cells[2:])  # two seeds
        assert 0.0 <= means[1] <= 1.0 and means[3] >= 0
    assert "commit" in out.read_text()
    for seed in (0, 1):
        assert os.path.isdir(work_dir / "rg-lcd-lrm-pre-trained-frozen" / f"seed-{seed}" / "pipeline")
    # the same command reuses every run; other settings in a folder are refused, never reused
    assert main(args) == 0
    with pytest.raises(ValueError, match="max_train_steps"):
        from rglcd_fast.world.evaluate import run_folder, train_runs

        train_runs({run_folder(str(work_dir), "LCD", 0): dict(reward_mode="none", max_train_steps=2, seed=0)})


def test_sweep_plots_reward_against_frechet(work_dir, tmp_path):
    from PIL import Image

    from rglcd_fast.cli import main

    out = tmp_path / "sweep.png"
    assert (
        main(
            [
                "sweep",
                "--work-dir",
                str(work_dir),
                "--seeds",
                "0",
                "--train-steps",
                "1",
                "--per-digit",
                "2",
                "--reward-scales",
                "0.1",
                "1",
                "--steps",
                "1",
                "--jobs",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert Image.open(out).size[0] > 300
    names = [r[0].split("](")[0][1:] for r in table_rows(tmp_path / "sweep.md")]
    assert names[:2] == ["Teacher (DDIM, CFG 7.5)", "LCD"] and len(names) == 2 + 4 * 2
    assert "RG-LCD (LRM, pre-trained) @ 0.1" in names
    assert os.path.isfile(work_dir / "rg-lcd-direct-rm" / "scale-1" / "seed-0.log")  # trained by a subprocess
