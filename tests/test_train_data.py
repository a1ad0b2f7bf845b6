"""Image-caption data for training: sources, preprocessing, skipping, determinism, resume, sharding."""

import io
import json
import os
import tarfile
import warnings

import pytest
import torch
from PIL import Image, ImageDraw

from rglcd_fast.train import (
    ImageCaptionDataset,
    ResumableDataLoader,
    ResumableSampler,
    braceexpand,
    collate_image_caption,
    make_dataloader,
    preprocess_image,
    sdxl_time_ids,
)

R = 16


def _image(i, size=(24, 20)):
    img = Image.new("RGB", size, (10 * i % 256, 40, 200))
    ImageDraw.Draw(img).rectangle([2, 2, 2 + i % 10, 8], fill=(255, 255, 0))
    return img


def _png_bytes(i, fmt="PNG", size=(24, 20)):
    buf = io.BytesIO()
    _image(i, size).save(buf, format=fmt)
    return buf.getvalue()


def _folder(tmp_path, n=6, exts=("png", "jpg", "webp")):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i in range(n):
        ext = exts[i % len(exts)]
        where = d / "sub" if i % 2 else d
        (where / f"im{i:02d}.{ext}").write_bytes(_png_bytes(i, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]))
        (where / f"im{i:02d}.txt").write_text(f"caption {i}\n")
    return d


def _tar(path, items):
    """items: list of (member name, bytes)."""
    with tarfile.open(path, "w") as tf:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _shards(tmp_path, n_shards=3, per=4):
    d = tmp_path / "shards"
    d.mkdir()
    k = 0
    for s in range(n_shards):
        items = []
        for _ in range(per):
            key = f"{k:06d}"
            items.append((f"{key}.jpg", _png_bytes(k, "JPEG")))
            if k % 2:
                items.append((f"{key}.json", json.dumps({"caption": f"caption {k}"}).encode()))
            else:
                items.append((f"{key}.txt", f"caption {k}".encode()))
            k += 1
        _tar(d / f"shard-{s:05d}.tar", items)
    return d


def _all(ds):
    return [ds[i] for i in range(len(ds))]


# ------------------------------------------------------------------------------------------ sources
def test_folder_with_sidecars(tmp_path):
    d = _folder(tmp_path)
    ds = ImageCaptionDataset.from_path(d, R)
    assert len(ds) == 6 and ds.skipped == 0
    items = _all(ds)
    assert sorted(it["caption"] for it in items) == [f"caption {i}" for i in range(6)]
    for it in items:
        assert it["pixel_values"].shape == (3, R, R) and it["pixel_values"].dtype == torch.float32


def test_jsonl_manifest(tmp_path):
    d = tmp_path / "m"
    (d / "img").mkdir(parents=True)
    lines = []
    for i in range(4):
        (d / "img" / f"{i}.png").write_bytes(_png_bytes(i))
        lines.append(json.dumps({"file_name": f"img/{i}.png", "text": f"a photo {i}"}))
    lines.append("{not json")
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(RuntimeWarning):
        ds = ImageCaptionDataset.from_path(d / "train.jsonl", R)
    assert len(ds) == 4 and ds.skipped == 1
    assert [it["caption"] for it in _all(ds)] == [f"a photo {i}" for i in range(4)]
    # a folder holding metadata.jsonl reads the manifest
    os.rename(d / "train.jsonl", d / "metadata.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(ImageCaptionDataset.from_path(d, R)) == 4


def test_tar_shards_folder_single_and_brace(tmp_path):
    d = _shards(tmp_path)
    ds = ImageCaptionDataset.from_path(d, R)
    assert len(ds) == 12 and ds.skipped == 0
    assert [it["caption"] for it in _all(ds)] == [f"caption {k}" for k in range(12)]
    brace = ImageCaptionDataset.from_path(str(d / "shard-{00000..00002}.tar"), R)
    assert len(brace) == 12
    assert torch.equal(brace[5]["pixel_values"], ds[5]["pixel_values"])
    one = ImageCaptionDataset.from_path(d / "shard-00001.tar", R)
    assert [it["caption"] for it in _all(one)] == [f"caption {k}" for k in range(4, 8)]
    listed = ImageCaptionDataset.from_path([str(d / "shard-00002.tar"), str(d / "shard-00000.tar")], R)
    assert listed[0]["caption"] == "caption 8"
    # a data set that has opened shards still pickles (spawned DataLoader workers)
    import pickle

    again = pickle.loads(pickle.dumps(ds))
    assert again[3]["caption"] == "caption 3"


def _hf_table(n=5):
    """A Hugging Face data set of images and two text columns."""
    import datasets

    return datasets.Dataset.from_dict(
        {
            "img": [_image(i) for i in range(n)],
            "prompt": [f"prompt {i}" for i in range(n)],
            "text": [f"caption {i}" for i in range(n)],
        },
        features=datasets.Features(
            {"img": datasets.Image(), "prompt": datasets.Value("string"), "text": datasets.Value("string")}
        ),
    )


def test_hugging_face_data_sets_on_disk(tmp_path):
    table = _hf_table()
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "parquet").mkdir()
    table.select(range(3)).to_parquet(str(tmp_path / "parquet" / "part-0.parquet"))
    table.select(range(3, 5)).to_parquet(str(tmp_path / "parquet" / "part-1.parquet"))
    expected = [preprocess_image(_image(i), R) for i in range(5)]
    for path in (tmp_path / "saved", tmp_path / "parquet", tmp_path / "parquet" / "part-0.parquet"):
        items = _all(ImageCaptionDataset.from_path(path, R))  # the image column found, "text" as captions
        assert [it["caption"] for it in items] == [f"caption {i}" for i in range(len(items))]
        for item, pixels in zip(items, expected):
            assert torch.equal(item["pixel_values"], pixels)
    prompts = ImageCaptionDataset.from_path(tmp_path / "saved", R, image_column="img", caption_column="prompt")
    assert prompts[4]["caption"] == "prompt 4"
    with pytest.raises(ValueError, match="caption_column: 'caption' is not a column of .*img, prompt, text"):
        ImageCaptionDataset.from_path(tmp_path / "saved", R, caption_column="caption")
    with pytest.raises(ValueError, match="image_column: 'pixels'"):
        ImageCaptionDataset.from_path(tmp_path / "saved", R, image_column="pixels")


def test_imagefolder_metadata_caption_column_and_webdataset_member_keys(tmp_path):
    d = tmp_path / "imagefolder"
    d.mkdir()
    with open(d / "metadata.jsonl", "w") as f:
        for i in range(3):
            (d / f"{i}.png").write_bytes(_png_bytes(i))
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"caption {i}", "prompt": f"prompt {i}"}) + "\n")
    assert ImageCaptionDataset.from_path(d, R, caption_column="prompt")[2]["caption"] == "prompt 2"
    _tar(
        tmp_path / "keys.tar",
        [
            ("a.webp", _png_bytes(0, "WEBP")),
            ("a.caption", b"from .caption"),
            ("b.png", _png_bytes(1)),
            ("b.txt", b"from .txt"),
        ],
    )
    assert [it["caption"] for it in _all(ImageCaptionDataset.from_path(tmp_path / "keys.tar", R))] == [
        "from .caption",
        "from .txt",
    ]


@pytest.mark.parametrize("url", ["pipe:aws s3 cp s3://b/{0..9}.tar -", "https://h.co/d/{0..9}.tar", "s3://b/x.tar"])
def test_remote_data_is_a_clear_error(url):
    with pytest.raises(ValueError, match="data: .* is remote; rglcd_fast reads local data only"):
        ImageCaptionDataset.from_path(url, R)


def test_the_runs_data_settings_reach_the_data_set(tmp_path):
    from rglcd_fast.train.config import make_config
    from rglcd_fast.train.data import training_dataset

    _hf_table().save_to_disk(str(tmp_path / "saved"))
    config = make_config(
        teacher="/sd",
        data=str(tmp_path / "saved"),
        caption_column="prompt",
        center_crop=False,
        random_flip=True,
        interpolation="bilinear",
        seed=5,
    )
    data = training_dataset(config, R)
    assert (data.center_crop, data.random_flip, data.interpolation, data.seed) == (False, True, "bilinear", 5)
    assert data[0]["caption"] == "prompt 0"
    shards = _shards(tmp_path, n_shards=2, per=2)  # tar shards and brace patterns take the same settings
    pattern = make_config(teacher="/sd", data=str(shards / "shard-{00000..00001}.tar"), random_flip=True)
    assert len(training_dataset(pattern, R)) == 4 and training_dataset(pattern, R).random_flip
    with pytest.raises(ValueError, match="interpolation: expected one of bilinear, bicubic, lanczos"):
        make_config(teacher="/sd", interpolation="nearest")


def test_braceexpand():
    assert braceexpand("s-{00000..00002}.tar") == ["s-00000.tar", "s-00001.tar", "s-00002.tar"]
    assert braceexpand("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert braceexpand("plain.tar") == ["plain.tar"]
    assert braceexpand("x{8..10}") == ["x8", "x9", "x10"]


# ------------------------------------------------------------------------------------ preprocessing
def test_preprocess_shape_range_non_square_center_crop():
    # wide image: left third red, middle green, right third blue -> centre crop is all green
    img = Image.new("RGB", (96, 32), (0, 255, 0))
    ImageDraw.Draw(img).rectangle([0, 0, 31, 31], fill=(255, 0, 0))
    ImageDraw.Draw(img).rectangle([64, 0, 95, 31], fill=(0, 0, 255))
    x = preprocess_image(img, R)
    assert x.shape == (3, R, R) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    centre = x[:, 2:-2, 3:-3]
    assert torch.allclose(centre[1], torch.ones_like(centre[1]), atol=0.02)
    assert torch.allclose(centre[0], -torch.ones_like(centre[0]), atol=0.02)
    # tall grayscale / RGBA inputs become RGB
    assert preprocess_image(Image.new("L", (20, 50), 128), R).shape == (3, R, R)
    assert preprocess_image(Image.new("RGBA", (17, 16)), R).shape == (3, R, R)
    # black and white map to -1 and 1
    assert torch.all(preprocess_image(Image.new("RGB", (40, 40), (255,) * 3), R) == 1)
    assert torch.all(preprocess_image(Image.new("RGB", (40, 40)), R) == -1)


def test_batches_carry_sdxl_sizes_and_crops(tmp_path):
    """Each sample's original (height, width) and crop (top, left) in the resized image: SDXL's time ids
    with the target size, or the fixed (R, R, 0, 0, R, R) of --use-fix-crop-and-size."""
    wide = Image.new("RGB", (40, 20))  # resized to 32 x 16: a centre crop starts at left 8
    pixels, crop = preprocess_image(wide, R, return_crop=True)
    assert pixels.shape == (3, R, R) and crop == (0, 8)
    g = torch.Generator().manual_seed(0)
    crops = {preprocess_image(wide, R, center_crop=False, generator=g, return_crop=True)[1] for _ in range(20)}
    assert len(crops) > 1 and all(top == 0 and 0 <= left <= 16 for top, left in crops)
    wide.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a wide one")
    Image.new("RGB", (20, 30)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a tall one")
    batch = next(iter(make_dataloader(ImageCaptionDataset.from_path(tmp_path, R), 2, shuffle=False)))
    assert batch["original_size"].tolist() == [[20, 40], [30, 20]]
    assert batch["crop_top_left"].tolist() == [[0, 8], [4, 0]]  # the tall one: 16 x 24, centre top 4
    assert sdxl_time_ids(batch, R).tolist() == [[20, 40, 0, 8, R, R], [30, 20, 4, 0, R, R]]
    assert sdxl_time_ids(batch, R, use_fix_crop_and_size=True).tolist() == [[R, R, 0, 0, R, R]] * 2


def test_random_crop_and_flip_seeded(tmp_path):
    d = _folder(tmp_path, n=2, exts=("png",))
    a = ImageCaptionDataset.from_path(d, R, center_crop=False, random_flip=True, seed=3)
    b = ImageCaptionDataset.from_path(d, R, center_crop=False, random_flip=True, seed=3)
    assert torch.equal(a[(0, 1)]["pixel_values"], b[(0, 1)]["pixel_values"])
    # over epochs, random crops/flips of a wide image differ at least once
    outs = [a[(0, e)]["pixel_values"] for e in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


# ------------------------------------------------------------------------------------ bad data
def test_corrupt_and_missing_caption_are_skipped_and_counted(tmp_path):
    d = _folder(tmp_path, n=4, exts=("png",))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (d / "broken.txt").write_text("broken")
    (d / "nocap.png").write_bytes(_png_bytes(9))
    with pytest.warns(RuntimeWarning, match="skipped"):
        ds = ImageCaptionDataset.from_path(d, R)
    assert len(ds) == 5 and ds.skipped == 1  # nocap.png dropped at construction
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning was given once already
        items = _all(ds)
    assert sum(it is None for it in items) == 1 and ds.skipped == 2
    loader = make_dataloader(ds, 2, shuffle=False)
    batches = list(loader)
    assert sum(len(b["caption"]) for b in batches) == 4 and loader.skipped == 1
    assert all(b["pixel_values"].shape[1:] == (3, R, R) for b in batches)

    # tar: corrupt image member, and an image with no caption member
    items = [
        ("a.jpg", _png_bytes(1, "JPEG")),
        ("a.txt", b"ok"),
        ("b.jpg", b"garbage"),
        ("b.txt", b"bad"),
        ("c.png", _png_bytes(2)),
        ("d.png", _png_bytes(3)),
        ("d.json", b'{"text": "from json"}'),
    ]
    _tar(tmp_path / "x.tar", items)
    with pytest.warns(RuntimeWarning):
        tds = ImageCaptionDataset.from_path(tmp_path / "x.tar", R)
    assert len(tds) == 3 and tds.skipped == 1
    got = [it["caption"] if it else None for it in _all(tds)]
    assert got == ["ok", None, "from json"] and tds.skipped == 2


def test_a_shard_that_turns_unreadable_mid_run_is_skipped_and_counted(tmp_path):
    d = _shards(tmp_path, n_shards=2, per=4)
    ds = ImageCaptionDataset.from_path(d, R)
    assert len(ds) == 8 and ds[0] is not None
    with open(d / "shard-00001.tar", "r+b") as f:  # the second shard loses its data after indexing
        f.truncate(512)
    with pytest.warns(RuntimeWarning, match="skipped unreadable sample"):
        items = _all(ds)
    assert sum(item is None for item in items) == 4 and ds.skipped == 4
    assert [it["caption"] for it in items[:4]] == [f"caption {k}" for k in range(4)]


def test_bad_paths_raise_naming_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageCaptionDataset.from_path(missing, R)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageCaptionDataset.from_path(empty, R)
    with pytest.raises(FileNotFoundError, match="gone-00001"):
        ImageCaptionDataset.from_path(str(tmp_path / "gone-{00000..00001}.tar"), R)
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="blank.jsonl"):
        ImageCaptionDataset.from_path(tmp_path / "blank.jsonl", R)


# --------------------------------------------------------------------- order, resume, sharding
def test_same_seed_same_order_and_epochs_differ():
    a, b = ResumableSampler(50, seed=7), ResumableSampler(50, seed=7)
    assert list(a) == list(b)
    assert sorted(a) == list(range(50))
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == list(range(50))
    assert list(ResumableSampler(50, seed=8)) != list(b)
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def _captions(batches):
    return [b["caption"] for b in batches]


def test_resume_yields_the_rest_exactly(tmp_path):
    ds = ImageCaptionDataset.from_path(_shards(tmp_path, n_shards=2, per=5), R, random_flip=True, center_crop=False)
    full = make_dataloader(ds, 3, seed=11)
    it = full.infinite()
    uninterrupted = [next(it) for _ in range(10)]  # 4 batches per epoch -> crosses 2 epochs

    for k in (0, 2, 4, 6):
        run = make_dataloader(ds, 3, seed=11)
        it = run.infinite()
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(run.state_dict()))  # checkpoints survive serialisation
        resumed = make_dataloader(
            ImageCaptionDataset.from_path(tmp_path / "shards", R, random_flip=True, center_crop=False), 3, seed=11
        )
        resumed.load_state_dict(state)
        it2 = resumed.infinite()
        tail = [next(it2) for _ in range(10 - k)]
        got = head + tail
        assert _captions(got) == _captions(uninterrupted)
        for g, u in zip(got, uninterrupted):
            assert torch.equal(g["pixel_values"], u["pixel_values"])
    assert full.state_dict()["epoch"] == 2 and full.state_dict()["index"] == 6


def test_resume_with_plain_iteration_epoch_boundaries():
    ds = list(range(7))
    loader = ResumableDataLoader(ds, 2, seed=1, collate_fn=lambda xs: xs)
    epoch0, epoch1 = list(loader), list(loader)
    assert len(epoch0) == len(loader) == 4 and sorted(sum(epoch0, [])) == ds
    assert epoch0 != epoch1
    again = ResumableDataLoader(ds, 2, seed=1, collate_fn=lambda xs: xs)
    first = []
    for i, b in enumerate(again):
        first.append(b)
        if i == 1:
            break
    state = again.state_dict()
    assert (state["epoch"], state["index"]) == (0, 4)
    fresh = ResumableDataLoader(ds, 2, seed=1, collate_fn=lambda xs: xs)
    fresh.load_state_dict(state)
    assert first + list(fresh) == epoch0 and list(fresh) == epoch1


@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (5, 2)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_sharding_disjoint_and_covering(n, world, drop_last):
    for epoch in (0, 3):
        parts = []
        for r in range(world):
            s = ResumableSampler(n, seed=5, rank=r, world_size=world, drop_last=drop_last)
            s.set_epoch(epoch)
            parts.append(list(s))
        lens = {len(p) for p in parts}
        assert len(lens) == 1  # equal lengths on every rank
        flat = sum(parts, [])
        if drop_last:
            assert len(flat) == len(set(flat)) == (n // world) * world  # disjoint, tail dropped
        else:
            assert set(flat) == set(range(n))  # covering
            assert len(flat) - len(set(flat)) == (-n) % world  # only the wrapped pad repeats
            if n % world == 0:
                assert len(flat) == len(set(flat))  # disjoint


def test_rank_loaders_partition_a_dataset(tmp_path):
    ds = ImageCaptionDataset.from_path(_folder(tmp_path, n=6), R)
    seen = []
    for r in range(2):
        loader = make_dataloader(ds, 2, seed=0, rank=r, world_size=2)
        seen += [c for b in loader for c in b["caption"]]
    assert sorted(seen) == sorted(f"caption {i}" for i in range(6))


def test_collate_and_workers(tmp_path):
    ds = ImageCaptionDataset.from_path(_folder(tmp_path, n=4), R)
    batch = collate_image_caption([ds[0], None, ds[1]])
    assert batch["pixel_values"].shape == (2, 3, R, R) and len(batch["caption"]) == 2
    assert batch["skipped"] == 1
    a = [b["caption"] for b in make_dataloader(ds, 2, seed=4)]
    b = [b["caption"] for b in make_dataloader(ds, 2, seed=4, num_workers=2)]
    assert a == b
