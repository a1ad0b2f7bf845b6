"""Crash-safe training checkpoints: "training never loses work".

A checkpoint is a folder ``<output_dir>/checkpoint-<step>``. :func:`save_checkpoint` writes everything
into a temporary folder ``<output_dir>/.tmp-checkpoint-<step>-<suffix>``, fsyncs every file, writes a
``COMPLETE`` marker, fsyncs the folder, then renames it into place with :func:`os.replace` (atomic on one
filesystem) and fsyncs ``output_dir``. A crash at any point leaves either the old set of checkpoints or
the old set plus the new complete one; never a half-written ``checkpoint-<step>``. Only after the rename
succeeded are older complete checkpoints beyond ``keep`` pruned (the new one is always kept) and leftover
``.tmp-checkpoint-*`` folders from crashed saves removed.

``state`` maps names to objects; the kind of each entry decides its file:

* ``torch.nn.Module`` -> ``<name>.safetensors`` (``safetensors.torch.save_file`` of the state_dict; tensors
  sharing storage are cloned, all made contiguous), restored with ``load_state_dict(strict=True)``;
* anything else with ``state_dict()`` / ``load_state_dict()`` (optimisers, LR schedulers, GradScaler,
  ``ResumableDataLoader``...) -> ``<name>.pt`` (``torch.save``), restored in place;
* plain JSON-able values (dict, list, str, int, float, bool) -> ``<name>.json``, returned by
  :func:`load_checkpoint`;
* the key ``"rng"`` -> ``rng_rank<r>.pt``, one file per rank. At save time its value is
  :func:`capture_rng_state` (python ``random``, numpy's global RNG, torch CPU, every CUDA device when
  available, and extra named ``torch.Generator`` / ``numpy.random.Generator`` objects); at load time pass
  the same ``capture_rng_state(generators)`` (or just the ``{name: generator}`` dict, or ``None``) and the
  global RNGs plus those generators are restored in place.

Distributed training: **every rank calls** :func:`save_checkpoint` and :func:`load_checkpoint` (no
``if is_main_process`` around them; that would deadlock on the barriers). Pass ``barrier=`` the
synchronisation callable of your launcher: ``accelerator.wait_for_everyone`` (accelerate) or
``torch.distributed.barrier``; ``barrier=None`` means a single process. ``rank`` / ``world_size`` default
to ``torch.distributed``'s when it is initialised (pass ``accelerator.process_index`` /
``accelerator.num_processes`` otherwise). Only rank 0 writes the model/optimiser/JSON files and renames
the folder; each rank writes its own ``rng_rank<r>.pt`` into the temporary folder, whose name is then
deterministic (``.tmp-checkpoint-<step>-dist``) so all ranks agree on it. ``output_dir`` must be on a
filesystem shared by all ranks. Sequence: rank 0 creates the temp folder / barrier / every rank writes /
barrier / rank 0 marks COMPLETE, renames, prunes / barrier. A write error on one rank is raised on that
rank only after it has passed all barriers (so the others do not hang), and rank 0 then skips the rename:
the checkpoint is not published.

Files are loaded with ``torch.load(weights_only=True)`` by default (pass ``weights_only=False`` to
:func:`load_checkpoint` for state dicts holding arbitrary Python objects, from trusted checkpoints only).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch

from ..files import write_file_atomic, write_folder, write_text

__all__ = [
    "GatheredState",
    "RngState",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "resolve_resume",
    "check_fresh_start",
    "start_from",
    "list_checkpoints",
    "write_folder",
    "write_file_atomic",
]

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"


# --------------------------------------------------------------------------------------------- RNG
class RngState:
    """Captured RNG state (``.state``, a dict) plus the named generators it belongs to (``.generators``)."""

    def __init__(self, state: Dict[str, Any], generators: Optional[Mapping[str, Any]] = None):
        self.state = state
        self.generators = dict(generators or {})

    def restore(self) -> None:
        restore_rng_state(self.state, self.generators)


def _np_global_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": [int(k) for k in keys],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def capture_rng_state(generators: Optional[Mapping[str, Any]] = None) -> RngState:
    """Snapshot python ``random``, numpy's global RNG, torch CPU, all CUDA devices (when available) and the
    named ``generators`` (``torch.Generator`` or ``numpy.random.Generator``)."""
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _np_global_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {},
    }
    for name, g in (generators or {}).items():
        if isinstance(g, torch.Generator):
            state["generators"][name] = {"kind": "torch", "state": g.get_state()}
        elif isinstance(g, np.random.Generator):
            state["generators"][name] = {"kind": "numpy", "state": json.dumps(g.bit_generator.state)}
        else:
            raise TypeError(
                f"generator {name!r}: expected torch.Generator or numpy.random.Generator, got {type(g).__name__}"
            )
    return RngState(state, generators)


def restore_rng_state(state, generators: Optional[Mapping[str, Any]] = None) -> None:
    """Restore what :func:`capture_rng_state` captured (an :class:`RngState` or its ``.state`` dict); named
    generators are restored in place into ``generators`` (defaults to the RngState's own)."""
    if isinstance(state, RngState):
        generators = state.generators if generators is None else generators
        state = state.state
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(  # noqa: B028 (the default stacklevel names this line)
                f"checkpoint has CUDA RNG states for {len(cuda)} devices, this process sees "
                f"{torch.cuda.device_count()}; restoring the common ones"
            )
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"generator {name!r} not in the saved RNG state (has {sorted(saved)})")
        entry = saved[name]
        if entry["kind"] == "torch":
            g.set_state(entry["state"])
        else:
            g.bit_generator.state = json.loads(entry["state"])


# ------------------------------------------------------------------------------------- file helpers
def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename_dir(src: str, dst: str) -> None:
    """The publishing rename (a module attribute so tests can simulate a crash)."""
    os.replace(src, dst)


class GatheredState:
    """A checkpoint entry spread over the ranks (rglcd_fast.train.fsdp: an FSDP2-sharded module, its
    optimiser). ``state_dict()`` gathers the whole onto rank 0 (a collective: :func:`save_checkpoint` calls it
    on every rank, rank 0 writes it); ``load_state_dict(whole)`` keeps each rank's part (:func:`load_checkpoint`
    reads the file on every rank). ``kind``: "module" (written as safetensors, the same file an unsharded
    module makes) or "stateful" (``torch.save``)."""

    kind = "stateful"


def _state_tensors(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, v in state_dict.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.device) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        out[k] = v.contiguous()
    return out


def _kind(name: str, obj: Any) -> str:
    if name == "rng":
        return "rng"
    if isinstance(obj, GatheredState):
        return obj.kind
    if isinstance(obj, torch.nn.Module):
        return "module"
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return "stateful"
    if isinstance(obj, (dict, list, str, int, float, bool)):
        return "json"
    raise TypeError(
        f"checkpoint entry {name!r}: don't know how to save {type(obj).__name__} "
        "(expected nn.Module, an object with state_dict(), a JSON-able value, or 'rng')"
    )


def _filename(name: str, kind: str, rank: int = 0) -> str:
    return {
        "module": f"{name}.safetensors",
        "stateful": f"{name}.pt",
        "json": f"{name}.json",
        "rng": f"rng_rank{rank}.pt",
    }[kind]


def _write_entry(folder: str, name: str, obj: Any, kind: str) -> None:
    """obj: the entry, or for a GatheredState its gathered state dict."""
    path = os.path.join(folder, _filename(name, kind))
    state = obj if isinstance(obj, dict) or kind == "json" else obj.state_dict()
    if kind == "module":
        from safetensors.torch import save_file

        save_file(_state_tensors(state), path)
        _fsync_file(path)
    elif kind == "stateful":
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    elif kind == "json":
        try:
            text = json.dumps(obj)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint entry {name!r} is not JSON-serialisable: {e}") from e
        write_text(path, text)


def _write_rng(folder: str, rng: Any, rank: int) -> None:
    if not isinstance(rng, (RngState, dict)):
        raise TypeError("checkpoint entry 'rng' must come from capture_rng_state()")
    state = rng.state if isinstance(rng, RngState) else rng
    path = os.path.join(folder, f"rng_rank{rank}.pt")
    # written aside then renamed: rank 0 checks the files exist, so a rank failing mid-write must not
    # leave a truncated rng_rank<r>.pt behind
    with open(path + ".part", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)


def _dist_info(rank, world_size):
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    return int(rank), int(world_size)


# ------------------------------------------------------------------------------------------ listing
def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def _damage(path: str) -> Optional[str]:
    """Why a checkpoint folder cannot be trusted (no COMPLETE marker; a file the marker lists missing or of
    another size: truncated after the save), or None. Markers of older saves list no files."""
    if not _is_complete(path):
        return f"no {COMPLETE} marker (an interrupted save or a damaged folder)"
    with open(os.path.join(path, COMPLETE)) as f:
        text = f.read()
    try:
        files = json.loads(text).get("files", {})
    except (ValueError, AttributeError):
        return None
    for name, size in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, the save wrote {size}"
    return None


def list_checkpoints(output_dir: str, warn: bool = False) -> list:
    """``[(step, path)]`` of the intact checkpoints in ``output_dir`` (COMPLETE, every file as saved), oldest
    first; ``warn``: a warning for each damaged one skipped."""
    out = []
    for step, path in _checkpoint_folders(output_dir):
        damage = _damage(path)
        if damage is None:
            out.append((step, path))
        elif warn:
            warnings.warn(f"skipping checkpoint {path}: {damage}", RuntimeWarning, stacklevel=3)
    return out


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """Path of the newest (by step) intact ``checkpoint-<step>``, damaged ones skipped with a warning;
    ``None`` if there is none."""
    ckpts = list_checkpoints(output_dir, warn=True)
    return ckpts[-1][1] if ckpts else None


def check_fresh_start(output_dir: str, resume: Optional[str], overwrite: bool) -> None:
    """A run that does not resume must not start beside an earlier run's checkpoints: it would overwrite some
    and leave the others, and a later ``latest`` would resume the earlier run. Refused with the ways out,
    unless ``overwrite`` (then :func:`start_from` clears them when the run starts)."""
    if resume or overwrite:
        return
    found = _checkpoint_folders(output_dir)
    if found:
        names = ", ".join(os.path.basename(path) for _, path in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(
            f"output_dir: {output_dir} holds checkpoints of an earlier run ({names}): continue it with "
            "--resume-from-checkpoint latest, start over with --overwrite-output-dir true (removes them), or "
            "pick another --output-dir"
        )


def start_from(resume: Optional[str], output_dir: str, overwrite: bool, main_process: bool = True) -> Optional[str]:
    """Where a run starts: :func:`resolve_resume`'s checkpoint, or None for a fresh run, which with ``overwrite``
    first removes every ``checkpoint-<step>`` folder in ``output_dir`` (the main process does)."""
    checkpoint = resolve_resume(resume, output_dir)
    if checkpoint is None and overwrite and main_process:
        for _, path in _checkpoint_folders(output_dir):
            shutil.rmtree(path)
    return checkpoint


def _checkpoint_folders(output_dir: str) -> list:
    """``[(step, path)]`` of every ``checkpoint-<step>`` folder in ``output_dir``, intact or not, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for entry in os.listdir(output_dir):
        match, path = _CKPT_RE.match(entry), os.path.join(output_dir, entry)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume: Optional[str], output_dir: str) -> Optional[str]:
    """``None``/"" -> None (start fresh); ``"latest"`` -> :func:`latest_checkpoint` (None if none);
    otherwise an explicit checkpoint path, which must exist and be COMPLETE."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    path = os.fspath(resume)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume checkpoint not found: {path}")
    damage = _damage(path)
    if damage is not None:
        raise ValueError(f"resume checkpoint {path}: {damage}")
    return path


# --------------------------------------------------------------------------------------------- save
def save_checkpoint(
    output_dir: str,
    step: int,
    state: Mapping[str, Any],
    keep: Optional[int] = 3,
    *,
    overwrite: bool = False,
    barrier: Optional[Callable[[], Any]] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> str:
    """Atomically write ``state`` to ``<output_dir>/checkpoint-<step>`` and return that path.

    Call on **every** rank, with ``barrier=accelerator.wait_for_everyone`` or
    ``torch.distributed.barrier`` when ``world_size > 1``. ``keep``: how many complete checkpoints to
    keep, the new one included (``None`` keeps all). An existing ``checkpoint-<step>`` is refused with
    :class:`FileExistsError` unless ``overwrite=True`` (then it is replaced after the new one is complete;
    the old one is moved aside, the new one renamed in, then the old one deleted; a crash between the two
    renames leaves neither under ``checkpoint-<step>``, the old one in a ``.tmp-checkpoint-<step>-old-*``
    folder that the next successful save removes).

    ``latest_checkpoint`` orders by step: after resuming from an older checkpoint, newer ones of the
    abandoned run still count as "latest" until pruned or removed."""
    step = int(step)
    rank, world_size = _dist_info(rank, world_size)
    if world_size > 1 and barrier is None:
        raise ValueError(
            "save_checkpoint with world_size > 1 needs barrier= (accelerator.wait_for_everyone "
            "or torch.distributed.barrier)"
        )
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    sync = barrier if barrier is not None else (lambda: None)
    kinds = {name: _kind(name, obj) for name, obj in state.items()}
    # entries spread over the ranks, gathered onto rank 0 by every rank (collectives) before anything is written
    gathered = {name: obj.state_dict() for name, obj in state.items() if isinstance(obj, GatheredState)}
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if os.path.exists(final) and not overwrite:  # checked by every rank before any barrier: no deadlock
        raise FileExistsError(f"checkpoint already exists: {final} (pass overwrite=True to replace it)")
    suffix = "dist" if world_size > 1 else uuid.uuid4().hex[:8]
    tmp = os.path.join(output_dir, f"{_TMP_PREFIX}{step}-{suffix}")

    error: Optional[BaseException] = None
    if rank == 0:
        try:
            os.makedirs(output_dir, exist_ok=True)
            if os.path.exists(tmp):  # stale folder of a crashed distributed save of this step
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        except BaseException as e:  # noqa: BLE001 - re-raised after the barriers
            error = e
    sync()
    # every rank: its rng file; rank 0: everything else
    if error is None:
        try:
            if not os.path.isdir(tmp):
                raise FileNotFoundError(
                    f"temporary checkpoint folder {tmp} missing (rank 0 failed to "
                    "create it, or output_dir is not on a shared filesystem)"
                )
            if "rng" in state:
                _write_rng(tmp, state["rng"], rank)
            if rank == 0:
                for name, obj in state.items():
                    if kinds[name] != "rng":
                        _write_entry(tmp, name, gathered.get(name, obj), kinds[name])
                manifest = {
                    "step": step,
                    "world_size": world_size,
                    "entries": {n: {"kind": k, "file": _filename(n, k)} for n, k in kinds.items() if k != "rng"},
                    "rng": "rng" in state,
                }
                write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
        except BaseException as e:  # noqa: BLE001
            error = e
    sync()
    if rank == 0 and error is None:
        try:
            if world_size > 1 and "rng" in state:
                missing = [r for r in range(world_size) if not os.path.isfile(os.path.join(tmp, f"rng_rank{r}.pt"))]
                if missing:
                    raise RuntimeError(f"RNG files of ranks {missing} missing from {tmp}; checkpoint not published")
            # the marker lists every file with its size: a later truncation is caught by latest_checkpoint
            files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
            write_text(os.path.join(tmp, COMPLETE), json.dumps({"step": step, "files": files}))
            _fsync_dir(tmp)
            old = None
            if os.path.exists(final):  # overwrite=True: move the old one aside, publish, then delete it
                old = os.path.join(output_dir, f"{_TMP_PREFIX}{step}-old-{uuid.uuid4().hex[:8]}")
                _rename_dir(final, old)
            _rename_dir(tmp, final)
            _fsync_dir(output_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            _prune(output_dir, final, keep)
        except BaseException as e:  # noqa: BLE001
            error = e
    sync()
    if error is not None:
        raise error
    return final


def _prune(output_dir: str, new: str, keep: Optional[int]) -> None:
    """After a successful save: drop leftover temp folders, damaged checkpoints older than the new one (a
    crash inside an earlier prune leaves a half-deleted one) and complete checkpoints beyond ``keep``."""
    new, new_step = os.path.abspath(new), int(_CKPT_RE.match(os.path.basename(new)).group(1))
    others = []  # the intact checkpoints besides the new one, (step, path)
    for entry in os.listdir(output_dir):
        path, match = os.path.join(output_dir, entry), _CKPT_RE.match(entry)
        if entry.startswith(_TMP_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif match and os.path.isdir(path) and os.path.abspath(path) != new:
            if _damage(path) is None:
                others.append((int(match.group(1)), path))
            elif int(match.group(1)) < new_step:
                shutil.rmtree(path, ignore_errors=True)
    if keep is None:
        return
    others.sort()
    for _, path in others[: max(0, len(others) - (keep - 1))]:  # oldest first
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------- load
@contextlib.contextmanager
def _named_misfit(path: str, name: str):
    """A saved state that does not fit what it is loaded into (other LoRA / embedding / LRM sizes, a LoRA
    checkpoint for a full student): one line naming the entry instead of torch's list of every key."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as error:
        text = " ".join(str(error).split()) or type(error).__name__
        text = text if len(text) <= 200 else text[:200] + "..."
        raise ValueError(
            f"checkpoint {path}: its {name!r} does not fit this run's ({text}): it was saved by a run with "
            "other settings (LoRA, its rank, time_cond_proj_dim, the LRM's sizes); resume with those"
        ) from error


def load_checkpoint(
    path: str, state: Mapping[str, Any], map_location="cpu", *, rank: Optional[int] = None, weights_only: bool = True
) -> Dict[str, Any]:
    """Restore ``state`` in place from the checkpoint folder ``path``; call on every rank.

    Modules: ``load_state_dict(strict=True)``; objects with ``load_state_dict``: restored from their
    ``.pt``; ``"rng"``: this rank's ``rng_rank<r>.pt`` restored into the global RNGs and the named
    generators (value: ``capture_rng_state(generators)``, a ``{name: generator}`` dict or ``None``).
    JSON entries (value: anything, e.g. ``None``) are returned. The returned dict also holds ``"step"``
    (from the manifest) unless a JSON entry of that name was requested."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not _is_complete(path):
        raise ValueError(f"checkpoint {path} has no {COMPLETE} marker")
    rank, _ = _dist_info(rank, None)
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    entries = manifest["entries"]
    device = "cpu"
    if isinstance(map_location, (str, torch.device)):
        map_location = torch.device(map_location)
        if map_location.type == "cpu":  # safetensors names the CPU "cpu", never "cpu:0"
            map_location = torch.device("cpu")
        device = str(map_location)
    out: Dict[str, Any] = {}
    for name, obj in state.items():
        if name == "rng":
            rng_path = os.path.join(path, f"rng_rank{rank}.pt")
            if not os.path.isfile(rng_path):
                warnings.warn(  # noqa: B028
                    f"{rng_path} missing (saved with world_size={manifest.get('world_size')}); "
                    "RNG state of this rank not restored"
                )
                continue
            saved = torch.load(rng_path, map_location="cpu", weights_only=weights_only)
            if isinstance(obj, RngState):
                restore_rng_state(saved, obj.generators)
            else:
                restore_rng_state(saved, obj)
            continue
        if name not in entries:
            raise ValueError(
                f"checkpoint {path} has no {name!r} (it has {', '.join(sorted(entries))}): it was saved by a run "
                "with other settings; resume with those"
            )
        kind, file = entries[name]["kind"], os.path.join(path, entries[name]["file"])
        if kind == "module":
            if not isinstance(obj, (torch.nn.Module, GatheredState)):
                raise TypeError(f"entry {name!r} was saved from an nn.Module; got {type(obj).__name__}")
            from safetensors.torch import load_file

            tensors = load_file(file, device=device)
            with _named_misfit(path, name):
                if isinstance(obj, GatheredState):
                    obj.load_state_dict(tensors)
                else:
                    obj.load_state_dict(tensors, strict=True)
        elif kind == "stateful":
            # on the CPU: Optimizer.load_state_dict moves each state to its parameter's device itself and
            # keeps "step" on the CPU as a fresh optimiser does (unless capturable / fused)
            with _named_misfit(path, name):
                obj.load_state_dict(torch.load(file, map_location="cpu", weights_only=weights_only))
        else:
            with open(file) as f:
                out[name] = json.load(f)
    out.setdefault("step", manifest["step"])
    return out
