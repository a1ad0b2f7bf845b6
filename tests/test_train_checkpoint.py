"""Crash-safe checkpoints: exact resume, crash mid-save, pruning, resolve_resume, 2-process gloo."""

import os
import random

import numpy as np
import pytest
import torch

import rglcd_fast.train.checkpoint as ckpt
from rglcd_fast.files import write_file_atomic, write_folder
from rglcd_fast.train import capture_rng_state, latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _make(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    gen = torch.Generator().manual_seed(seed + 1)
    return model, opt, sched, gen


def _train(model, opt, sched, gen, steps):
    for _ in range(steps):
        x = torch.randn(8, 4) + torch.from_numpy(np.random.randn(8, 4).astype(np.float32))
        x = x * random.random() + torch.randn(8, 4, generator=gen)
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _draws(gen):
    return (torch.randn(5), np.random.randn(5), [random.random() for _ in range(5)], torch.randn(5, generator=gen))


def _state(model, opt, sched, gen, **extra):
    return {"model": model, "optimizer": opt, "scheduler": sched, "rng": capture_rng_state({"data": gen}), **extra}


def _assert_opt_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for n, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][n]), (k, n)


def test_exact_resume(tmp_path):
    N, K = 10, 4
    _seed_all(0)
    ref = _make(0)
    _train(*ref, N)
    ref_draws = _draws(ref[3])

    _seed_all(0)
    first = _make(0)
    _train(*first, K)
    path = save_checkpoint(tmp_path, K, _state(*first, meta={"step": K, "data": {"epoch": 0, "pos": 32}}))
    assert os.path.basename(path) == f"checkpoint-{K}"
    assert sorted(os.listdir(path)) == [
        "COMPLETE",
        "manifest.json",
        "meta.json",
        "model.safetensors",
        "optimizer.pt",
        "rng_rank0.pt",
        "scheduler.pt",
    ]

    _seed_all(123)  # scramble everything, fresh objects with a different init
    fresh = _make(7)
    _train(*fresh, 1)
    out = load_checkpoint(latest_checkpoint(tmp_path), _state(*fresh, meta=None))
    assert out == {"meta": {"step": K, "data": {"epoch": 0, "pos": 32}}, "step": K}
    _train(*fresh, N - K)
    for p, q in zip(ref[0].parameters(), fresh[0].parameters()):
        assert torch.equal(p, q)
    _assert_opt_equal(ref[1], fresh[1])
    assert ref[2].state_dict() == fresh[2].state_dict()
    got = _draws(fresh[3])
    assert torch.equal(ref_draws[0], got[0]) and np.array_equal(ref_draws[1], got[1])
    assert ref_draws[2] == got[2] and torch.equal(ref_draws[3], got[3])


def test_shared_tensors_and_numpy_generator(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight
            self.register_buffer("t", torch.arange(6.0).reshape(2, 3).t())  # non-contiguous

    m = Tied()
    ng = np.random.default_rng(5)
    save_checkpoint(tmp_path, 1, {"model": m, "rng": capture_rng_state({"np": ng})})
    expected = ng.random(3)
    m2, ng2 = Tied(), np.random.default_rng(99)
    load_checkpoint(tmp_path / "checkpoint-1", {"model": m2, "rng": {"np": ng2}})
    assert torch.equal(m2.a.weight, m.a.weight) and torch.equal(m2.b.weight, m.a.weight)
    assert torch.equal(m2.t, m.t)
    assert np.array_equal(ng2.random(3), expected)


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    m = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, {"model": m, "meta": {"i": 1}})
    save_checkpoint(tmp_path, 2, {"model": m, "meta": {"i": 2}})

    def boom(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(ckpt, "_rename_dir", boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 3, {"model": m, "meta": {"i": 3}}, keep=1)
    monkeypatch.undo()
    # a crash while writing a file
    monkeypatch.setattr(ckpt, "_fsync_file", lambda p: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 4, {"model": m}, keep=1)
    monkeypatch.undo()

    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if not n.startswith(".")] == [
        "checkpoint-1",
        "checkpoint-2",
    ]  # keep=1 pruned nothing: the save failed
    assert len([n for n in names if n.startswith(".tmp-checkpoint-")]) == 2
    assert latest_checkpoint(tmp_path) == os.path.join(tmp_path, "checkpoint-2")
    assert load_checkpoint(latest_checkpoint(tmp_path), {"meta": None})["meta"] == {"i": 2}
    os.makedirs(tmp_path / "checkpoint-9")  # no COMPLETE marker: skipped, with a warning
    with pytest.warns(RuntimeWarning, match="checkpoint-9: no COMPLETE marker"):
        assert latest_checkpoint(tmp_path) == os.path.join(tmp_path, "checkpoint-2")

    save_checkpoint(tmp_path, 3, {"model": m, "meta": {"i": 3}}, keep=5)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-9"]
    assert latest_checkpoint(tmp_path) == os.path.join(tmp_path, "checkpoint-3")


def test_a_damaged_checkpoint_is_skipped_by_latest_with_a_warning(tmp_path):
    m = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model": m, "meta": {"i": step}}, keep=None)
    newest = tmp_path / "checkpoint-3"
    (weights,) = [f for f in os.listdir(newest) if f.startswith("model")]
    with open(newest / weights, "r+b") as f:  # truncated after the save (a full disk, a bad copy)
        f.truncate(10)
    with pytest.warns(RuntimeWarning, match=f"checkpoint-3: {weights} has 10 bytes, the save wrote"):
        assert latest_checkpoint(tmp_path) == os.path.join(tmp_path, "checkpoint-2")
    os.remove(tmp_path / "checkpoint-2" / "COMPLETE")
    with pytest.warns(RuntimeWarning, match="checkpoint-2: no COMPLETE marker"):
        assert latest_checkpoint(tmp_path) == os.path.join(tmp_path, "checkpoint-1")
    with pytest.raises(ValueError, match="resume checkpoint .*checkpoint-3: .* has 10 bytes"):
        resolve_resume(str(newest), str(tmp_path))
    assert load_checkpoint(latest_checkpoint(tmp_path), {"meta": None})["meta"] == {"i": 1}


def test_pruning(tmp_path, monkeypatch):
    m = torch.nn.Linear(2, 2)
    for s in range(1, 5):
        save_checkpoint(tmp_path, s * 10, {"model": m}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-30", "checkpoint-40"]
    # the new checkpoint is never pruned, even if older by step than the kept ones
    save_checkpoint(tmp_path, 5, {"model": m}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-40", "checkpoint-5"]

    # pruning happens only after the new one is in place
    seen = []
    real_prune = ckpt._prune

    def spy(output_dir, new, keep):
        seen.append((os.path.isfile(os.path.join(new, "COMPLETE")), sorted(os.listdir(output_dir))))
        real_prune(output_dir, new, keep)

    monkeypatch.setattr(ckpt, "_prune", spy)
    save_checkpoint(tmp_path, 50, {"model": m}, keep=1)
    assert seen == [(True, ["checkpoint-40", "checkpoint-5", "checkpoint-50"])]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-50"]
    save_checkpoint(tmp_path, 60, {"model": m}, keep=None)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-50", "checkpoint-60"]
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 70, {"model": m}, keep=0)


def test_a_half_pruned_checkpoint_is_removed_by_the_next_save(tmp_path):
    """A crash inside pruning leaves an older checkpoint with files missing: skipped by latest, then removed
    by the next successful save (a damaged folder newer than the save is left alone)."""
    m = torch.nn.Linear(2, 2)
    for step in (1, 2, 9):
        save_checkpoint(tmp_path, step, {"model": m, "meta": {"i": step}}, keep=None)
    os.remove(tmp_path / "checkpoint-1" / "model.safetensors")
    os.remove(tmp_path / "checkpoint-9" / "COMPLETE")
    save_checkpoint(tmp_path, 3, {"model": m}, keep=None)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3", "checkpoint-9"]


def test_write_file_atomic_keeps_the_old_text_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    write_file_atomic(str(path), "old")
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_file_atomic(str(path), "new")
    assert path.read_text() == "old"


def test_write_folder_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "outputs"

    def write(files):
        def into(folder):
            os.makedirs(folder)
            for name in files:
                with open(os.path.join(folder, name), "w") as f:
                    f.write(name)

        return into

    write_folder(str(out), write(["a"]))
    write_folder(str(out), write(["b"]))
    assert sorted(os.listdir(out)) == ["b"]  # replaced as a whole

    def crash(folder):
        write(["half"])(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder(str(out), crash)
    assert sorted(os.listdir(out)) == ["b"] and sorted(os.listdir(tmp_path)) == ["outputs"]


def test_resolve_resume_and_overwrite(tmp_path):
    assert resolve_resume("latest", tmp_path) is None
    assert resolve_resume(None, tmp_path) is None
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=missing):
        resolve_resume(missing, tmp_path)
    bad = tmp_path / "checkpoint-3"
    bad.mkdir()
    with pytest.raises(ValueError, match=str(bad)):
        resolve_resume(str(bad), tmp_path)
    assert resolve_resume("latest", tmp_path) is None

    m = torch.nn.Linear(2, 2)
    p = save_checkpoint(tmp_path, 7, {"model": m, "meta": {"v": 1}})
    assert resolve_resume("latest", tmp_path) == p == resolve_resume(p, tmp_path)
    with pytest.raises(FileExistsError, match="checkpoint-7"):
        save_checkpoint(tmp_path, 7, {"model": m, "meta": {"v": 2}})
    assert load_checkpoint(p, {"meta": None})["meta"] == {"v": 1}
    save_checkpoint(tmp_path, 7, {"model": m, "meta": {"v": 2}}, overwrite=True)
    assert load_checkpoint(p, {"meta": None})["meta"] == {"v": 2}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 8, {"meta": {"x": object()}})
    assert latest_checkpoint(tmp_path) == p


def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)  # same on every rank
        _seed_all(1000 + rank)  # per-rank RNG streams
        gen = torch.Generator().manual_seed(50 + rank)
        path = save_checkpoint(
            out_dir,
            1,
            {"model": model, "rng": capture_rng_state({"g": gen}), "meta": {"w": world}},
            barrier=dist.barrier,
        )
        for r in range(world):
            assert os.path.isfile(os.path.join(path, f"rng_rank{r}.pt"))
        expected = _draws(gen)
        _seed_all(7)
        gen2 = torch.Generator().manual_seed(7)
        with torch.no_grad():
            model.weight.zero_()
        out = load_checkpoint(path, {"model": model, "rng": {"g": gen2}, "meta": None})
        assert out["meta"] == {"w": world}
        torch.manual_seed(0)
        assert torch.equal(model.weight, torch.nn.Linear(3, 2).weight)
        _seed_all(7)
        load_checkpoint(path, {"rng": {"g": gen2}})
        got = _draws(gen2)
        assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
        assert expected[2] == got[2] and torch.equal(expected[3], got[3])
        # a second save with pruning, all ranks participating
        save_checkpoint(
            out_dir, 2, {"model": model, "rng": capture_rng_state({"g": gen})}, keep=1, barrier=dist.barrier
        )
        dist.barrier()
        assert sorted(os.listdir(out_dir)) == ["checkpoint-2"]
        torch.save(got, os.path.join(out_dir, "..", f"draws{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo(tmp_path):
    out = tmp_path / "out"
    torch.multiprocessing.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    d0, d1 = (
        torch.load(tmp_path / "draws0.pt", weights_only=False),
        torch.load(tmp_path / "draws1.pt", weights_only=False),
    )
    assert not torch.equal(d0[0], d1[0]) and not torch.equal(d0[3], d1[3])  # per-rank states differ
