"""Checkpoints: a dict of state parts written atomically by rank 0 into `step-<N>` folders.

Layout under `<run.out_dir>/checkpoints/`:

    step-<N>/
        model.pt            plain state dict of the prepared model (dict[str, Tensor])
        optimizer.pt        one `<part>.pt` per entry of the `parts` given to `save`
        scheduler.pt
        train_state.pt
        rng-rank<R>.pt      torch / numpy / python RNG states of rank R, one file per rank
        manifest.json       written last: step, world size, part names, sha256 of every file
    .tmp-step-<N>-<pid>/    a write in progress (or a killed one): never read, removed at start

A folder is written under a temporary name in the same parent, every file flushed and fsynced,
the manifest last, then renamed to `step-<N>` and the parent directory fsynced: a `step-<N>`
folder exists only once complete. Every file is a `torch.save` of tensors and plain Python values
and is read back with `torch.load(weights_only=True)`, so a checkpoint cannot run code on load.

Every rank's RNG states are gathered to rank 0, which writes them all: nodes need not share a
filesystem to save. Resuming does assume a shared filesystem (or the folder copied to every
node): each rank reads the parts and its own `rng-rank<R>.pt` from the same folder.

`latest()` returns the newest folder whose files all match the manifest's hashes; a corrupt or
unreadable one is reported with a warning naming it and skipped, so a run resumes from the
previous checkpoint rather than failing or loading damaged state.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from qatdist.config import CheckpointConfig
from qatdist.distributed import all_gather_object, broadcast_object

MANIFEST = "manifest.json"
FORMAT = "qatdist-checkpoint/1"
_STEP_DIR = re.compile(r"step-(\d+)")
_PART_NAME = re.compile(r"[A-Za-z0-9_]+")
_RESERVED_PARTS = {"rng", "manifest"}
_TMP_PREFIX = ".tmp-"
_PLAIN_LEAVES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.dtype,
    torch.device,
    torch.Size,
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or a checkpoint folder or file is missing, corrupt,
    unsafe or from an incompatible run. The message names the folder or file."""


def capture_rng_state() -> dict:
    """This process's torch, numpy and python RNG states as tensors, ints, floats and strings,
    which `torch.load(weights_only=True)` accepts. CPU generators only."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def restore_rng_state(state: dict) -> None:
    """Set the torch, numpy and python RNGs from a `capture_rng_state()` dict."""
    try:
        np_state = state["numpy"]
        py_state = state["python"]
        numpy_tuple = (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
        python_tuple = (
            py_state["version"],
            tuple(int(v) for v in py_state["internal"].tolist()),
            py_state["gauss_next"],
        )
        torch_state = state["torch"]
        if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8:
            raise TypeError("the torch state is not a uint8 tensor")
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_tuple)
        random.setstate(python_tuple)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"malformed RNG state: {e}") from e


class Checkpointer:
    """Saves and finds checkpoints of one run. Rank 0 writes; every rank can load.

    `out_dir` is the run directory (checkpoints go to `out_dir/checkpoints`). With
    `world_size > 1`, `save` is a collective over the initialised process group; with
    `world_size == 1` no process group is needed. Only one run may write into a run directory
    at a time: rank 0 removes leftover temporary folders when constructed.
    """

    def __init__(self, out_dir: Path, cfg: CheckpointConfig, *, rank: int, world_size: int):
        if cfg.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last: expected >= 1, got {cfg.keep_last}")
        self.root = Path(out_dir) / "checkpoints"
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        if rank == 0 and self.root.is_dir():
            for leftover in self.root.glob(_TMP_PREFIX + "*"):
                shutil.rmtree(leftover, ignore_errors=True)

    # --- writing --------------------------------------------------------------------------

    def save(self, step: int, parts: dict[str, dict]) -> Path | None:
        """Checkpoint `parts` (e.g. {"model": ..., "optimizer": ..., "scheduler": ...,
        "train_state": ...}, each a state dict of tensors and plain values) at `step`, with
        every rank's RNG states. Collective: call on every rank. Rank 0 writes and returns the
        folder; other ranks return None. A step that already has a complete folder whose files
        match its manifest is not rewritten (a corrupt one is replaced, with a warning). Nothing
        is written when checkpointing is disabled. A failure on rank 0 raises
        CheckpointError on every rank."""
        if not self.cfg.enabled:
            return None
        rng = capture_rng_state()
        rng_states = all_gather_object(rng) if self.world_size > 1 else [rng]
        folder, error, cause = None, None, None
        if self.rank == 0:
            try:
                folder = self._write(step, parts, rng_states)
            except Exception as e:  # reported on every rank below, not only here
                error, cause = f"checkpoint at step {step} not written: {e}", e
        if self.world_size > 1:
            error = broadcast_object(error)
        if error is not None:
            raise CheckpointError(error) from cause
        return folder

    def _write(self, step: int, parts: dict[str, dict], rng_states: list[dict]) -> Path:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        for name, part in parts.items():
            _check_part(name, part)
        final = self.root / f"step-{step}"
        if (final / MANIFEST).is_file():
            try:
                _verify(final)
                return final
            except CheckpointError as e:  # e.g. the corrupt newest one a resume skipped
                warnings.warn(f"qatdist.checkpoint: replacing {final}: {e}", stacklevel=2)
        self._make_root()
        if final.exists():  # incomplete, corrupt, or not written by this module
            self._remove(final)

        tmp = self.root / f"{_TMP_PREFIX}step-{step}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {}
        for name, part in parts.items():
            files[f"{name}.pt"] = _save_file(part, tmp / f"{name}.pt")
        for r, state in enumerate(rng_states):
            files[f"rng-rank{r}.pt"] = _save_file(state, tmp / f"rng-rank{r}.pt")
        manifest = {
            "format": FORMAT,
            "step": step,
            "world_size": len(rng_states),
            "parts": list(parts),
            "files": files,
            "torch_version": torch.__version__,
        }
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self._prune(keep=final)
        return final

    def _make_root(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.root.parent)

    def _remove(self, folder: Path) -> None:
        """Delete a folder by first renaming it to a temporary name: a deletion cut short
        leaves a folder that is cleaned up at the next start, not a half `step-<N>`."""
        doomed = self.root / f"{_TMP_PREFIX}delete-{folder.name}-{os.getpid()}"
        os.rename(folder, doomed)
        _fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        """Keep the newest `keep_last` complete folders, always including `keep`."""
        complete = [f for _, f in self._complete_folders()]
        excess = len(complete) - self.cfg.keep_last
        for folder in complete:
            if excess <= 0:
                break
            if folder != keep:
                self._remove(folder)
                excess -= 1

    # --- finding and reading --------------------------------------------------------------

    def _complete_folders(self) -> list[tuple[int, Path]]:
        """(step, folder) of every `step-<N>` folder with a manifest, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _STEP_DIR.fullmatch(entry.name)
            if match and (entry / MANIFEST).is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint whose files match its manifest, or None. Corrupt or
        unreadable ones are skipped with a warning naming them (falling back to older ones)."""
        for _, folder in reversed(self._complete_folders()):
            try:
                _verify(folder)
            except CheckpointError as e:
                warnings.warn(
                    f"qatdist.checkpoint: skipping checkpoint {folder}: {e}", stacklevel=2
                )
                continue
            return folder
        return None

    def resolve_resume(self, resume_from: str) -> Path | None:
        """The folder to resume from: `resume_from` when given (it must be a complete, valid
        checkpoint, else CheckpointError), otherwise `latest()` (None: start fresh)."""
        if not resume_from:
            return self.latest()
        folder = Path(resume_from)
        _verify(folder)
        return folder

    def load(self, folder: Path) -> dict[str, dict]:
        """Verify `folder` and load every part on the CPU with `weights_only=True`. Returns
        {part name: state} plus "rng": this rank's RNG states (see `restore_rng_state`).
        Raises CheckpointError naming the folder or file on any problem, including a checkpoint
        written by a different number of ranks."""
        folder = Path(folder)
        manifest = _read_manifest(folder)
        if manifest["world_size"] != self.world_size:
            raise CheckpointError(
                f"{folder}: checkpoint written by {manifest['world_size']} ranks, this run has "
                f"{self.world_size}; resuming with a different world size is not supported "
                "(RNG states and data positions are per rank)"
            )
        wanted = {f"{p}.pt" for p in manifest["parts"]} | {_rng_file(self.rank)}
        loaded = {}
        for name, entry in manifest["files"].items():
            if name in wanted:
                loaded[name] = _load_file(folder / name, entry)
            else:  # other ranks' RNG files: verified, not loaded
                _read_checked(folder / name, entry)
        result = {}
        for part in manifest["parts"]:
            state = loaded[f"{part}.pt"]
            if part == "model" and not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
            ):
                raise CheckpointError(f"{folder / 'model.pt'}: not a dict of str -> Tensor")
            result[part] = state
        result["rng"] = loaded[_rng_file(self.rank)]
        return result


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _check_part(name: str, part) -> None:
    if not _PART_NAME.fullmatch(name) or name in _RESERVED_PARTS or name.startswith("rng-rank"):
        raise ValueError(f"invalid checkpoint part name {name!r}")
    if not isinstance(part, dict):
        raise TypeError(f"checkpoint part {name!r} must be a dict, got {type(part).__name__}")
    if name == "model":
        for key, value in part.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"checkpoint part 'model' must map str to Tensor; {key!r} holds "
                    f"{type(value).__name__}"
                )
    _check_plain(part, name)


def _check_plain(obj, where: str) -> None:
    """Refuse values that `torch.load(weights_only=True)` would not read back, naming where."""
    kind = type(obj)
    if kind in _PLAIN_LEAVES or kind in (torch.Tensor, torch.nn.Parameter):
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint value {where} is a {kind.__module__}.{kind.__qualname__}; only tensors, "
        "numbers, strings, bools, None, dtypes and dicts/lists/tuples/sets of them are stored"
    )


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_file(obj, path: Path) -> dict:
    """torch.save `obj` to `path`, fsynced; returns its manifest entry (sha256 and size)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (does not exist)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        ok = (
            manifest["format"] == FORMAT
            and isinstance(manifest["step"], int)
            and isinstance(manifest["world_size"], int)
            and manifest["world_size"] >= 1
            and all(f"{p}.pt" in files for p in manifest["parts"])
            and all(_rng_file(r) in files for r in range(manifest["world_size"]))
            and all(
                "/" not in name and isinstance(e["sha256"], str) and isinstance(e["bytes"], int)
                for name, e in files.items()
            )
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e!r})") from e
    if not ok:
        raise CheckpointError(f"{path}: malformed manifest")
    return manifest


def _check_hash(path: Path, data: bytes, entry: dict) -> None:
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path}: corrupt (size or sha256 differs from the manifest)")


def _read_checked(path: Path, entry: dict) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    _check_hash(path, data, entry)
    return data


def _load_file(path: Path, entry: dict):
    """Load one verified file with weights_only=True; it must hold a dict."""
    data = _read_checked(path, entry)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False; keep the reason.
        reasons = [
            line.strip()
            for line in str(e).splitlines()
            if line.strip()
            and not line.startswith(("Weights only load failed", "Check the documentation"))
        ]
        detail = reasons[0] if reasons else type(e).__name__
        raise CheckpointError(
            f"{path}: refused, it holds objects that weights_only loading does not allow "
            f"(nothing in it was executed): {detail}"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded ({e!r})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _verify(folder: Path) -> dict:
    """Check that every file of `folder` matches its manifest; returns the manifest."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    for name, entry in manifest["files"].items():
        _read_checked(folder / name, entry)
    return manifest
