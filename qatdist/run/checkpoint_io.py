"""Checkpoint folders on disk: the manifest, hashed files, and the read-only loader.

`qatdist.run.checkpoint` writes folders (and re-exports the reading functions below); anything that
only reads a checkpoint (resume, `export_final.py`, path validation) uses these functions, which
never write, rename or delete anything. See `qatdist.run.checkpoint` for the folder layout.

Every file is read back with `torch.load(weights_only=True)` after its size and sha256 are
checked against the manifest, so a checkpoint cannot run code on load and damage is named.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

MANIFEST = "manifest.json"
FORMAT = "qatdist-checkpoint/1"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or a checkpoint folder or file is missing, corrupt,
    unsafe or from an incompatible run. The message names the folder or file."""


def step_folder(root: Path, step: int) -> Path:
    """The folder of the checkpoint at `step` under the checkpoints root."""
    return Path(root) / f"step-{step}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


# --- finding ------------------------------------------------------------------------------


def complete_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-<N>` folder under `root` with a manifest, oldest first
    (not verified: see `latest`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / MANIFEST).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest(root: Path) -> Path | None:
    """The newest checkpoint under the checkpoints folder `root` whose files all match its
    manifest, or None. Corrupt or unreadable ones are skipped with a warning naming them."""
    for _, folder in reversed(complete_folders(root)):
        try:
            verify(folder)
        except CheckpointError as e:
            warnings.warn(
                f"qatdist.run.checkpoint: skipping checkpoint {folder}: {e}", stacklevel=2
            )
            continue
        return folder
    return None


def find_complete(root: Path, resume_from: str | Path | None = None) -> Path | None:
    """The checkpoint to read: `resume_from` when given (it must be a complete checkpoint whose
    files match its manifest, else CheckpointError), otherwise `latest(root)` (None: there is
    none). `root` is the run's checkpoints folder."""
    if not resume_from:
        return latest(root)
    folder = Path(resume_from)
    verify(folder)
    return folder


# --- reading ------------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict:
    """The validated manifest of `folder` (format, step, world_size, parts, files); the files
    themselves are not checked here (see `verify`)."""
    folder = Path(folder)
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
            and all(rng_file(r) in files for r in range(manifest["world_size"]))
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


def verify(folder: Path) -> dict:
    """Check that every file of `folder` matches its manifest; returns the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        _read_checked(folder / name, entry)
    return manifest


def read_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The model part of a checkpoint folder (hash-checked, loaded with weights_only=True): a
    plain state dict of the prepared model."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if "model" not in manifest["parts"]:
        raise CheckpointError(f"{folder}: the checkpoint has no model part")
    return _model_state(folder, _load_file(folder / "model.pt", manifest["files"]["model.pt"]))


def read_checkpoint(folder: Path, *, rank: int, world_size: int) -> dict[str, dict]:
    """Verify `folder` and load every part on the CPU with `weights_only=True`. Returns
    {part name: state} plus "rng": rank `rank`'s RNG states. Raises CheckpointError naming the
    folder or file on any problem, including a checkpoint written by another number of ranks."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["world_size"] != world_size:
        raise CheckpointError(
            f"{folder}: checkpoint written by {manifest['world_size']} ranks, this run has "
            f"{world_size}; resuming with a different world size is not supported "
            "(RNG states and data positions are per rank)"
        )
    wanted = {f"{p}.pt" for p in manifest["parts"]} | {rng_file(rank)}
    loaded = {}
    for name, entry in manifest["files"].items():
        if name in wanted:
            loaded[name] = _load_file(folder / name, entry)
        else:  # other ranks' RNG files: verified, not loaded
            _read_checked(folder / name, entry)
    result = {part: loaded[f"{part}.pt"] for part in manifest["parts"]}
    if "model" in result:
        _model_state(folder, result["model"])
    result["rng"] = loaded[rng_file(rank)]
    return result


def _model_state(folder: Path, state: dict) -> dict[str, torch.Tensor]:
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{folder / 'model.pt'}: not a dict of str -> Tensor")
    return state


def _read_checked(path: Path, entry: dict) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path}: corrupt (size or sha256 differs from the manifest)")
    return data


def _load_file(path: Path, entry: dict) -> dict:
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


# --- writing primitives (used by qatdist.run.checkpoint) ---------------------------------------


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_file(obj, path: Path) -> dict:
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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
