"""Checkpoints: a dict of state parts written atomically by rank 0 into `step-<N>` folders.

Layout under `<run.out_dir>/checkpoints/`:

    step-<N>/
        model.pt            plain state dict of the prepared model (dict[str, Tensor])
        optimizer.pt        one `<part>.pt` per entry of the `parts` given to `save`
        scheduler.pt
        train_state.pt
        rng-rank<R>.pt      torch / numpy / python RNG states of rank R, one file per rank
        manifest.json       written last: step, world size, part names, sha256 of every file
    .tmp-step-<N>-<pid>/    a write in progress (or a killed one): never read; removed by
                            `Checkpointer.remove_leftovers()`, which the trainer calls at start

A folder is written under a temporary name in the same parent, every file flushed and fsynced,
the manifest last, then renamed to `step-<N>` and the parent directory fsynced: a `step-<N>`
folder exists only once complete. Every file is a `torch.save` of tensors and plain Python values
and is read back with `torch.load(weights_only=True)`, so a checkpoint cannot run code on load.

Every rank's RNG states are gathered to rank 0, which writes them all: nodes need not share a
filesystem to save. Resuming does assume a shared filesystem (or the folder copied to every
node): each rank reads the parts and its own `rng-rank<R>.pt` from the same folder.

Reading lives in `qatdist.run.checkpoint_io` and is re-exported here: `find_complete(root,
resume_from)` returns the requested folder or the newest one whose files all match the manifest's
hashes (a corrupt or unreadable one is reported with a warning naming it and skipped, so a run
resumes from the previous checkpoint rather than failing or loading damaged state);
`read_checkpoint` and `read_model_state` load verified parts. None of them writes anything.
"""

from __future__ import annotations

import json
import os
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
from qatdist.run.checkpoint_io import (
    FORMAT,
    MANIFEST,
    TMP_PREFIX,
    CheckpointError,
    complete_folders,
    find_complete,
    fsync_dir,
    latest,
    read_checkpoint,
    read_manifest,
    read_model_state,
    rng_file,
    save_file,
    step_folder,
    verify,
    write_synced,
)
from qatdist.run.folder import RunFolder

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "capture_rng_state",
    "find_complete",
    "latest",
    "read_checkpoint",
    "read_manifest",
    "read_model_state",
    "restore_rng_state",
    "verify",
]

_PART_NAME = re.compile(r"[A-Za-z0-9_]+")
_RESERVED_PARTS = {"rng", "manifest"}
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
    """Saves checkpoints of one run. Rank 0 writes; every rank can load.

    `out_dir` is the run directory (checkpoints go to its `checkpoints/`). With
    `world_size > 1`, `save` is a collective over the initialised process group; with
    `world_size == 1` no process group is needed. Constructing one touches nothing on disk.
    Only one run may write into a run directory at a time: its rank 0 calls
    `remove_leftovers()` at start.
    """

    def __init__(self, out_dir: Path, cfg: CheckpointConfig, *, rank: int, world_size: int):
        if cfg.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last: expected >= 1, got {cfg.keep_last}")
        self.root = RunFolder(out_dir).checkpoints
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size

    def remove_leftovers(self) -> None:
        """Delete temporary folders of killed writes and deletions (rank 0 only; a no-op on
        other ranks). Call once at the start of the one run writing into this folder."""
        if self.rank == 0 and self.root.is_dir():
            for leftover in self.root.glob(TMP_PREFIX + "*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest intact checkpoint of this run, or None (see `checkpoint_io.latest`)."""
        return latest(self.root)

    def load(self, folder: Path) -> dict[str, dict]:
        """This rank's view of a checkpoint folder (see `read_checkpoint`)."""
        return read_checkpoint(folder, rank=self.rank, world_size=self.world_size)

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
        final = step_folder(self.root, step)
        if (final / MANIFEST).is_file():
            try:
                verify(final)
                return final
            except CheckpointError as e:  # e.g. the corrupt newest one a resume skipped
                warnings.warn(f"qatdist.run.checkpoint: replacing {final}: {e}", stacklevel=2)
        self._make_root()
        if final.exists():  # incomplete, corrupt, or not written by this module
            self._remove(final)

        tmp = self.root / f"{TMP_PREFIX}step-{step}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {}
        for name, part in parts.items():
            files[f"{name}.pt"] = save_file(part, tmp / f"{name}.pt")
        for r, state in enumerate(rng_states):
            files[rng_file(r)] = save_file(state, tmp / rng_file(r))
        manifest = {
            "format": FORMAT,
            "step": step,
            "world_size": len(rng_states),
            "parts": list(parts),
            "files": files,
            "torch_version": torch.__version__,
        }
        write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(self.root)
        self._prune(keep=final)
        return final

    def _make_root(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root.parent)

    def _remove(self, folder: Path) -> None:
        """Delete a folder by first renaming it to a temporary name: a deletion cut short
        leaves a folder that is cleaned up at the next start, not a half `step-<N>`."""
        doomed = self.root / f"{TMP_PREFIX}delete-{folder.name}-{os.getpid()}"
        os.rename(folder, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        """Keep the newest `keep_last` complete folders, always including `keep`."""
        complete = [f for _, f in complete_folders(self.root)]
        excess = len(complete) - self.cfg.keep_last
        for folder in complete:
            if excess <= 0:
                break
            if folder != keep:
                self._remove(folder)
                excess -= 1


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
