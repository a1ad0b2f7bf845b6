"""Image-caption data for distillation training (Pillow + torch only).

Every sample is ``{"pixel_values": float32 [3, R, R] in [-1, 1], "caption": str}``. Sources, chosen by
:meth:`ImageCaptionDataset.from_path` from what the path is:

* a folder of images (png/jpg/jpeg/webp, searched recursively) with ``name.txt`` caption sidecars;
* a JSONL manifest (``{"file_name": ..., "text": ...}`` per line, paths relative to the manifest), given
  as the ``.jsonl`` file or as a folder holding ``metadata.jsonl`` (a Hugging Face ``imagefolder``);
* a Hugging Face ``datasets`` data set on disk: a ``save_to_disk`` folder, or parquet files (a ``.parquet``
  file or a folder of them), with an image column and a caption column (``image_column`` /
  ``caption_column``; default: the first image feature and "text", "caption" or the first string column);
  needs the ``datasets`` package (``pip install "rglcd_fast[datasets]"``);
* webdataset tar shards: one ``.tar``, a brace pattern (``shard-{00000..00009}.tar``), a list of
  them, or a folder of ``.tar`` files. Members are grouped by webdataset key (path up to the first dot
  of the basename); a sample needs an image member (jpg/jpeg/png/webp) and a ``txt`` or ``caption``
  member (or a ``json`` one holding "caption" or "text"). Shards are indexed once at construction (one pass over the
  tar headers, seeking over the data) and members are then read by offset, so tar data is a map-style
  data set that shuffles across shards and resumes exactly like the others. Only uncompressed tars.

Remote data (``pipe:``, http(s), s3 URLs) is not read: download it and pass the local path.

Bad data never stops a run: images without captions (found at construction) and unreadable images or
captions (found at load time) are skipped, counted in ``dataset.skipped`` (and, with worker processes,
in ``ResumableDataLoader.skipped``), with one warning per data set.

Order is owned by :class:`ResumableSampler`: an epoch-seeded permutation (``torch.Generator`` seeded with
``seed + epoch``), sharded over ranks by striding (rank r takes positions r, r + W, ... of the
permutation). With ``drop_last=False`` (default) the permutation is padded by wrapping around to its
start so every rank gets ``ceil(N / W)`` samples; with ``drop_last=True`` the tail is dropped, every rank
gets ``floor(N / W)``. :class:`ResumableDataLoader` records (epoch, position within the epoch) of what it
has handed out; a loader rebuilt from its ``state_dict()`` yields exactly what an uninterrupted one would.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
from typing import Iterable, Iterator, Sequence

import torch
from PIL import Image

from ..prompts import fixed_time_ids

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
REMOTE_SCHEMES = ("pipe", "http", "https", "s3", "gs", "hf")
_INTERP = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

__all__ = [
    "ImageCaptionDataset",
    "ResumableSampler",
    "ResumableDataLoader",
    "collate_image_caption",
    "make_dataloader",
    "preprocess_image",
    "sdxl_time_ids",
    "braceexpand",
    "IMAGE_EXTS",
]


# ----------------------------------------------------------------------------------------- helpers
def check_data_settings(config) -> None:
    """A config's data settings, checked before anything is read: local data, a known resize filter."""
    check_local(config.data)
    if config.interpolation not in _INTERP:
        raise ValueError(f"interpolation: expected one of {', '.join(_INTERP)}, got {config.interpolation!r}")


def check_local(path) -> None:
    """Remote data is not read: a clear error naming the setting."""
    if path is not None and str(path).split(":")[0] in REMOTE_SCHEMES:
        raise ValueError(
            f"data: {str(path)!r} is remote; rglcd_fast reads local data only: download it and pass "
            "its local path or brace pattern (e.g. /data/laion/{00000..01210}.tar)"
        )


def braceexpand(pattern: str) -> list[str]:
    """Expand shell-style braces: ``{00000..00009}`` (zero padding kept) and ``{a,b,c}``, nested."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.lstrip("-").startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    out = []
    for it in items:
        out.extend(braceexpand(head + it + tail))
    return out


def _ext(path: str) -> str:
    return os.path.splitext(path)[1][1:].lower()


def _wds_split(name: str):
    """webdataset's base_plus_ext: key = path up to the first dot of the basename, ext = the rest."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not m:
        return None, None
    return m.group(1), m.group(2).lower()


def preprocess_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
    interpolation: str = "bicubic",
    return_crop: bool = False,
):
    """RGB, resize the short side to ``resolution`` (antialiased), crop to square (centre, or random
    with ``generator``), optional horizontal flip (p = 0.5), to float32 [3, R, R] in [-1, 1].
    return_crop: also the crop's (top, left) in the resized image (SDXL's crop coordinates; a flip comes
    after the crop and leaves them)."""
    R = int(resolution)
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode in ("P", "LA", "PA") else image.convert("RGB")
    w, h = image.size
    scale = R / min(w, h)
    nw, nh = max(R, round(w * scale)), max(R, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), resample=_INTERP[interpolation], reducing_gap=None)
    if center_crop:
        left, top = int(round((nw - R) / 2.0)), int(round((nh - R) / 2.0))
    else:
        g = generator
        left = int(torch.randint(0, nw - R + 1, (1,), generator=g)) if nw > R else 0
        top = int(torch.randint(0, nh - R + 1, (1,), generator=g)) if nh > R else 0
    image = image.crop((left, top, left + R, top + R))
    if random_flip and float(torch.rand((), generator=generator)) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(R, R, 3)
    pixels = t.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()
    return (pixels, (top, left)) if return_crop else pixels


def sdxl_time_ids(batch: dict, resolution: int, use_fix_crop_and_size: bool = False) -> torch.Tensor:
    """SDXL's micro-conditioning of a batch, [B, 6] float32: original (height, width), crop (top, left),
    target (R, R), as the SDXL scripts build it; use_fix_crop_and_size: (R, R), (0, 0), (R, R) for every
    sample (their --use_fix_crop_and_size)."""
    B, R = len(batch["caption"]), int(resolution)
    if use_fix_crop_and_size:
        return fixed_time_ids(B, R, R)
    target = torch.tensor([[R, R]], dtype=torch.long).expand(B, 2)
    return torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).float()


# ----------------------------------------------------------------------------------------- dataset
# A record is a small picklable tuple:
#   ("file", image_path, caption_or_None, caption_path_or_None)
#   ("tar", tar_path, img_offset, img_size, cap_offset, cap_size, cap_ext)
#   ("row", row_index): a row of the Hugging Face data set self.table
class ImageCaptionDataset(torch.utils.data.Dataset):
    """Map-style image-caption data set over records built by :meth:`from_path`.

    ``__getitem__`` takes an index or an ``(index, epoch)`` pair (what :class:`ResumableSampler` yields
    with ``yield_epoch=True``); random crop/flip draw from a generator seeded by (seed, epoch, index), so
    augmentations do not depend on worker count or on resuming. It returns ``None`` for an unreadable
    sample (counted in ``skipped``); :func:`collate_image_caption` drops those."""

    def __init__(
        self,
        records: Sequence[tuple],
        resolution: int,
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        interpolation: str = "bicubic",
        source: str = "",
        skipped: int = 0,
        table=None,
        columns: tuple = ("image", "text"),
    ):
        if interpolation not in _INTERP:
            raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {interpolation!r}")
        self.records = list(records)
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = int(seed)
        self.interpolation = interpolation
        self.source = source
        self.table, self.columns = table, columns  # "row" records: a datasets.Dataset, (image, caption) columns
        self.skipped = int(skipped)  # construction-time skips (missing captions) + load-time skips
        self.skipped_at_construction = int(skipped)
        self._warned = False
        self._files: dict = {}
        self._pid = None
        if skipped:
            self._warn(f"{skipped} sample(s) in {source} skipped at construction (missing caption or bad entry)")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_path(cls, path, resolution: int, **kwargs) -> "ImageCaptionDataset":
        """Folder of images + .txt sidecars, a folder with metadata.jsonl, a .jsonl manifest, a .tar
        shard, a brace pattern of shards, a list of shards, or a folder of .tar shards."""
        hf = {k: kwargs.pop(k) for k in ("image_column", "caption_column") if k in kwargs}  # HF data sets
        jsonl = {"caption_key": hf["caption_column"]} if hf.get("caption_column") else {}  # a manifest's key
        if isinstance(path, (list, tuple)):
            shards = []
            for p in path:
                shards.extend(braceexpand(os.fspath(p)))
            return cls.from_tar_shards(shards, resolution, **kwargs)
        path = os.fspath(path)
        check_local(path)
        if "{" in path and not os.path.exists(path):
            return cls.from_tar_shards(braceexpand(path), resolution, **kwargs)
        if not os.path.exists(path):
            raise FileNotFoundError(f"data path does not exist: {path}")
        if (
            path.endswith(".parquet")
            or os.path.isfile(os.path.join(path, "dataset_info.json"))
            or (os.path.isdir(path) and any(f.endswith(".parquet") for f in os.listdir(path)))
        ):
            return cls.from_hf_dataset(path, resolution, **hf, **kwargs)
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "metadata.jsonl")):
                return cls.from_jsonl(os.path.join(path, "metadata.jsonl"), resolution, **jsonl, **kwargs)
            tars = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))
            if tars:
                return cls.from_tar_shards(tars, resolution, **kwargs)
            return cls.from_folder(path, resolution, **kwargs)
        if path.endswith(".jsonl"):
            return cls.from_jsonl(path, resolution, **jsonl, **kwargs)
        if path.endswith(".tar"):
            return cls.from_tar_shards([path], resolution, **kwargs)
        raise ValueError(f"cannot tell what kind of data {path} is (expected a folder, .jsonl, .parquet or .tar)")

    @classmethod
    def from_folder(cls, folder, resolution: int, **kwargs):
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"image folder does not exist: {folder}")
        records, skipped = [], 0
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for f in sorted(files):
                if _ext(f) not in IMAGE_EXTS:
                    continue
                img = os.path.join(root, f)
                cap = os.path.splitext(img)[0] + ".txt"
                if os.path.isfile(cap):
                    records.append(("file", img, None, cap))
                else:
                    skipped += 1
        if not records:
            raise ValueError(f"no image-caption samples (image + .txt sidecar) found in {folder}")
        return cls(records, resolution, source=folder, skipped=skipped, **kwargs)

    @classmethod
    def from_jsonl(
        cls, manifest, resolution: int, *, image_key: str = "file_name", caption_key: str = "text", **kwargs
    ):
        manifest = os.fspath(manifest)
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"JSONL manifest does not exist: {manifest}")
        base = os.path.dirname(os.path.abspath(manifest))
        records, skipped = [], 0
        with open(manifest, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    entry = json.loads(line)
                    name, caption = entry[image_key], entry[caption_key]
                    if not isinstance(name, str) or not isinstance(caption, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    skipped += 1
                    continue
                records.append(("file", os.path.join(base, name), caption, None))
        if not records:
            raise ValueError(f"no usable entries ({image_key!r} + {caption_key!r}) in manifest {manifest}")
        return cls(records, resolution, source=manifest, skipped=skipped, **kwargs)

    @classmethod
    def from_hf_dataset(
        cls, path, resolution: int, *, image_column: str | None = None, caption_column: str | None = None, **kwargs
    ):
        """A Hugging Face data set on disk: a save_to_disk folder (load_from_disk) or parquet files."""
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(
                f"data: {path} is a Hugging Face data set; reading it needs the datasets package "
                '(pip install "rglcd_fast[datasets]")'
            ) from exc
        path = os.fspath(path)
        if os.path.isfile(os.path.join(path, "dataset_info.json")):
            table = datasets.load_from_disk(path)
        else:
            files = (
                [path]
                if path.endswith(".parquet")
                else sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
            )
            table = datasets.load_dataset("parquet", data_files=files, split="train")
        if isinstance(table, datasets.DatasetDict):
            table = table["train"] if "train" in table else next(iter(table.values()))
        features = table.features
        images = [n for n, f in features.items() if isinstance(f, datasets.Image)]
        texts = [n for n, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        image_column = image_column or (images[0] if images else None)
        caption_column = caption_column or next(
            (n for n in ("text", "caption") if n in texts), texts[0] if texts else None
        )
        for kind, name in (("image_column", image_column), ("caption_column", caption_column)):
            if name not in features:
                raise ValueError(f"{kind}: {name!r} is not a column of {path} (columns: {', '.join(features)})")
        records = [("row", i) for i in range(len(table))]
        if not records:
            raise ValueError(f"no rows in the data set {path}")
        return cls(records, resolution, source=path, table=table, columns=(image_column, caption_column), **kwargs)

    @classmethod
    def from_tar_shards(cls, shards: Iterable, resolution: int, **kwargs):
        shards = [os.fspath(s) for s in shards]
        if not shards:
            raise ValueError("no tar shards given")
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise FileNotFoundError(f"tar shard(s) do not exist: {', '.join(missing[:3])}{more}")
        records, skipped = [], 0
        for shard in shards:
            r, s = _index_tar(shard)
            records.extend(r)
            skipped += s
        source = shards[0] if len(shards) == 1 else f"{shards[0]} .. {shards[-1]} ({len(shards)} shards)"
        if not records:
            raise ValueError(f"no image-caption samples in tar shard(s) {source}")
        return cls(records, resolution, source=source, skipped=skipped, **kwargs)

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self):  # open shard handles do not travel to worker processes
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state

    def _warn(self, msg):
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"ImageCaptionDataset: {msg}; further skips are only counted (dataset.skipped)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _read(self, path, offset, size) -> bytes:
        if self._pid != os.getpid():  # file handles are not shared across fork
            self._files, self._pid = {}, os.getpid()
        fh = self._files.get(path)
        if fh is None:
            fh = self._files[path] = open(path, "rb")
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise OSError(f"short read from {path}")
        return data

    def _load(self, rec):
        if rec[0] == "row":
            row = self.table[rec[1]]
            image, caption = row[self.columns[0]], row[self.columns[1]]
            if isinstance(image, dict):  # an undecoded image: {"bytes", "path"}
                image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
            if not isinstance(caption, str):
                raise ValueError(f"caption column {self.columns[1]!r} holds {type(caption).__name__}, not text")
        elif rec[0] == "file":
            _, img_path, caption, cap_path = rec
            if caption is None:
                with open(cap_path, encoding="utf-8") as fh:
                    caption = fh.read().strip()
            image = Image.open(img_path)
        else:
            _, tar_path, io_, isz, co, csz, cext = rec
            raw = self._read(tar_path, co, csz).decode("utf-8")
            if cext == "json":
                meta = json.loads(raw)
                caption = meta.get("caption", meta.get("text"))
                if not isinstance(caption, str):
                    raise ValueError("json member has no 'caption'/'text' string")
            else:
                caption = raw.strip()
            image = Image.open(io.BytesIO(self._read(tar_path, io_, isz)))
        image.load()
        return image, caption

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rec = self.records[index]
        try:
            image, caption = self._load(rec)
            g = None
            if self.random_flip or not self.center_crop:
                g = torch.Generator().manual_seed(
                    (self.seed * 1_000_003 + int(epoch)) * 1_000_003 + int(index) & 0x7FFF_FFFF_FFFF_FFFF
                )
            original_size = (image.height, image.width)
            pixels, crop = preprocess_image(
                image, self.resolution, self.center_crop, self.random_flip, g, self.interpolation, return_crop=True
            )
        except Exception as exc:  # noqa: BLE001 -- any unreadable sample is skipped, never fatal
            self.skipped += 1
            self._warn(f"skipped unreadable sample {rec[1]} ({type(exc).__name__}: {exc})")
            return None
        return {"pixel_values": pixels, "caption": caption, "original_size": original_size, "crop_top_left": crop}


def _index_tar(shard: str):
    """One pass over a tar's headers: records for complete samples, count of incomplete ones."""
    groups: dict = {}
    order = []
    try:
        with tarfile.open(shard, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _wds_split(m.name)
                if key is None:
                    continue
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"cannot read tar shard {shard}: {exc}") from exc
    records, skipped = [], 0
    for key in order:
        g = groups[key]
        img = next((g[e] for e in IMAGE_EXTS if e in g), None)
        cext = next((e for e in ("txt", "caption", "json") if e in g), None)
        cap = g[cext] if cext else None
        if img is None and cap is None:
            continue  # not a sample (e.g. a stray metadata member)
        if img is None or cap is None:
            skipped += 1
            continue
        records.append(("tar", shard, img[0], img[1], cap[0], cap[1], cext))
    return records, skipped


# ----------------------------------------------------------------------------------------- sampler
class ResumableSampler(torch.utils.data.Sampler):
    """Deterministic, resumable, rank-sharded sampler.

    Epoch e's order is ``randperm(N, generator=Generator().manual_seed(seed + e))`` (identity without
    shuffle), padded by wrapping (``drop_last=False``) or truncated (``drop_last=True``) to a multiple of
    ``world_size``; rank r takes positions r, r + W, r + 2W, ... . Iteration starts at ``start_index``
    (position within this rank's slice). Yields ``(index, epoch)`` with ``yield_epoch=True`` (for
    :class:`ImageCaptionDataset`'s seeded augmentations), plain indices otherwise."""

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        yield_epoch: bool = False,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_samples < 1 or (drop_last and num_samples < world_size):
            raise ValueError(f"{num_samples} samples cannot be sharded over {world_size} ranks")
        self.num_samples = int(num_samples)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.rank, self.world_size = int(rank), int(world_size)
        self.yield_epoch = yield_epoch
        self.epoch = 0
        self.start_index = 0

    @property
    def per_rank(self) -> int:
        n, w = self.num_samples, self.world_size
        return n // w if self.drop_last else -(-n // w)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full index list for an epoch."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = self.num_samples
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            perm = list(range(n))
        total = self.per_rank * self.world_size
        if total > n:
            perm = (perm * (-(-total // n)))[:total]
        else:
            perm = perm[:total]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator:
        idx = self.indices()[self.start_index :]
        if self.yield_epoch:
            return iter([(i, self.epoch) for i in idx])
        return iter(idx)

    def __len__(self) -> int:
        return max(self.per_rank - self.start_index, 0)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.start_index,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "rank": self.rank,
        }

    def load_state_dict(self, state: dict) -> None:
        for k in ("num_samples", "world_size", "seed"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]} but this sampler has {getattr(self, k)}")
        self.epoch, self.start_index = int(state["epoch"]), int(state["index"])


# ----------------------------------------------------------------------------------------- loading
def collate_image_caption(items: list) -> dict:
    """Stack pixel_values, list captions, original sizes and crop corners ([B, 2] each: SDXL's time ids);
    drops skipped (None) items and reports how many."""
    good = [it for it in items if it is not None]
    out = {
        "pixel_values": torch.stack([it["pixel_values"] for it in good]) if good else torch.empty(0),
        "caption": [it["caption"] for it in good],
        "skipped": len(items) - len(good),
    }
    for key in ("original_size", "crop_top_left"):
        if all(key in it for it in good):
            out[key] = torch.tensor([it[key] for it in good], dtype=torch.long).reshape(len(good), 2)
    return out


class ResumableDataLoader:
    """Batches over a map-style data set in :class:`ResumableSampler` order, with exact resume.

    ``iter(loader)`` yields the rest of the current epoch (then the next ``iter`` starts the next epoch);
    :meth:`infinite` loops over epochs. ``state_dict()`` = {epoch, index (positions of this rank's epoch
    slice handed out so far), ...}, updated as each batch is yielded, so saving it after consuming k
    batches and loading it into a fresh loader resumes at batch k + 1. Batches whose samples were all
    unreadable are not yielded (their positions still count). ``skipped`` counts skipped samples seen
    through batches (what the trainer should log when ``num_workers > 0``; the dataset's own counter then
    lives in the workers)."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        drop_last_batch: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn=collate_image_caption,
        **dataloader_kwargs,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.drop_last_batch = drop_last_batch
        self.num_workers = num_workers
        self.sampler = ResumableSampler(
            len(dataset),
            shuffle=shuffle,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            yield_epoch=isinstance(dataset, ImageCaptionDataset),
        )
        self.collate_fn = collate_fn
        self.dataloader_kwargs = dict(pin_memory=pin_memory, **dataloader_kwargs)
        self.epoch = 0
        self.index = 0
        self.skipped = 0

    def __len__(self) -> int:
        """Batches in a full epoch on this rank."""
        n = self.sampler.per_rank
        return n // self.batch_size if self.drop_last_batch else -(-n // self.batch_size)

    def _normalise(self):
        n = self.sampler.per_rank
        usable = (n // self.batch_size) * self.batch_size if self.drop_last_batch else n
        if self.index >= usable:
            self.epoch, self.index = self.epoch + 1, 0

    def __iter__(self) -> Iterator[dict]:
        self._normalise()
        self.sampler.set_epoch(self.epoch)
        self.sampler.start_index = self.index
        # the loader's own generator, seeded per epoch: its workers' base seed is never drawn from (and never
        # moves) the global RNG, so a resumed run's global RNG follows the uninterrupted run's
        kwargs = {"generator": torch.Generator().manual_seed(self.sampler.seed + self.epoch), **self.dataloader_kwargs}
        dl = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            drop_last=self.drop_last_batch,
            **kwargs,
        )
        n = self.sampler.per_rank
        for batch in dl:
            self.index = min(self.index + self.batch_size, n)
            if isinstance(batch, dict) and "skipped" in batch:
                self.skipped += int(batch.pop("skipped"))
                if not batch["caption"]:
                    continue
            yield batch
        self.index = n
        self._normalise()

    def infinite(self) -> Iterator[dict]:
        while True:
            yield from self

    def state_dict(self) -> dict:
        s = self.sampler.state_dict()
        s.update(epoch=self.epoch, index=self.index, batch_size=self.batch_size, skipped=self.skipped)
        return s

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.skipped = int(state.get("skipped", 0))


def training_dataset(config, resolution: int):
    """The data set of a run (a TrainConfig or LRMPretrainConfig): config.data (see the module docstring) read
    with its image/caption columns, crop, flip and interpolation settings, or the digits world's images when
    the teacher is the digits world and no data is given."""
    if config.data is None:
        if config.teacher != "digits":
            raise ValueError(
                "data: a training set is needed for this teacher (an image folder with captions, "
                "a JSONL manifest, a Hugging Face data set on disk or tar shards)"
            )
        from ..world.digits import DigitsDataset

        return DigitsDataset(resolution=resolution)
    return ImageCaptionDataset.from_path(
        config.data,
        resolution,
        image_column=config.image_column,
        caption_column=config.caption_column,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        interpolation=config.interpolation,
        seed=config.seed,
    )


def make_dataloader(dataset, batch_size: int, **kwargs) -> ResumableDataLoader:
    """A resumable, rank-sharded loader (see :class:`ResumableDataLoader`); ``num_workers=0`` default.
    ``dataset`` may be an :class:`ImageCaptionDataset` or a path for :meth:`ImageCaptionDataset.from_path`
    (then ``resolution=`` is required and dataset options go in ``dataset_kwargs=``)."""
    if isinstance(dataset, (str, os.PathLike, list, tuple)):
        resolution = kwargs.pop("resolution")
        dataset = ImageCaptionDataset.from_path(dataset, resolution, **kwargs.pop("dataset_kwargs", {}))
    return ResumableDataLoader(dataset, batch_size, **kwargs)
