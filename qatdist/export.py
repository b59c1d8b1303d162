"""Export a finished (or interrupted) run's checkpoint as int8 artifacts, from its run directory.

`scripts/export_final.py` is the command line. The prepared QAT graph is rebuilt from the run's
`resolved_config.toml` exactly as the trainer builds it (build_model, capture, prepare_qat), the
checkpoint's model state is loaded into it, and `qatdist.finalize.finalize` (the trainer's own
end-of-run step) converts, compiles, measures and writes the artifacts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import pickle
from pathlib import Path

import tomllib
import torch
from torchao.quantization.pt2e.fake_quantize import disable_observer

from qatdist import config, data
from qatdist.checkpoint import MANIFEST, Checkpointer, CheckpointError
from qatdist.evaluate import count_correct
from qatdist.finalize import finalize
from qatdist.models import build_model
from qatdist.quant import schedule
from qatdist.quant.capture import capture
from qatdist.quant.prepare import prepare_qat

RESOLVED_CONFIG = "resolved_config.toml"

log = logging.getLogger(__name__)


class ExportError(Exception):
    """The run directory or checkpoint cannot be exported; the message says what is wrong."""


@dataclasses.dataclass
class LoadedRun:
    cfg: config.Config
    prepared: torch.fx.GraphModule  # eval mode, observers off, the checkpoint's state
    fp32_model: torch.nn.Module
    checkpoint: Path
    step: int
    world_size: int


def load_config(run_dir: Path) -> config.Config:
    """The run's resolved config. Only value types and names are checked: train shards and a
    `model.weights` file are not needed to export, the checkpoint holds every weight."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    path = run_dir / RESOLVED_CONFIG
    if not path.is_file():
        raise ExportError(f"{path}: missing; {run_dir} is not a qatdist run directory")
    try:
        return config.from_dict(tomllib.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, config.ConfigError) as e:
        raise ExportError(f"{path}: unreadable or invalid ({e})") from e


def find_checkpoint(run_dir: Path, cfg: config.Config, checkpoint: Path | None) -> Path:
    """`checkpoint` when given (it must be complete and match its manifest), else the newest
    complete checkpoint of the run (corrupt ones are skipped with a warning)."""
    # A reader: rank 0 would delete temporary folders, which may belong to a run still writing.
    reader = Checkpointer(Path(run_dir), cfg.checkpoint, rank=1, world_size=2)
    try:
        folder = reader.resolve_resume(str(checkpoint) if checkpoint else "")
    except CheckpointError as e:
        raise ExportError(f"checkpoint: {e}") from e
    if folder is None:
        raise ExportError(
            f"{reader.root}: no complete, intact checkpoint (none written, or every one is "
            "incomplete or corrupt; see the warnings above)"
        )
    return folder


def read_model_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The model state of a checkpoint folder (hash-checked against the manifest, loaded with
    `weights_only=True`) and the manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entry = manifest["files"]["model.pt"]
        blob = (folder / "model.pt").read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{folder}: no readable model state ({e!r})") from e
    if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise ExportError(f"{folder / 'model.pt'}: corrupt (size or sha256 differs from manifest)")
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:
        raise ExportError(f"{folder / 'model.pt'}: cannot be loaded ({e})") from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ExportError(f"{folder / 'model.pt'}: not a dict of str -> Tensor")
    return state, manifest


def load_run(run_dir: Path, checkpoint: Path | None = None) -> LoadedRun:
    """Rebuild the run's prepared QAT model and load a checkpoint's model state into it.

    Raises ExportError naming what is missing or corrupt."""
    cfg = load_config(run_dir)
    folder = find_checkpoint(run_dir, cfg, checkpoint)
    state, manifest = read_model_state(folder)
    log.info("rebuilding the prepared %s model for %s", cfg.model.name, folder)

    torch.manual_seed(cfg.train.seed)
    try:
        fp32_model = build_model(dataclasses.replace(cfg.model, weights=""), cfg.data.num_classes)
    except config.ConfigError as e:
        raise ExportError(f"{run_dir / RESOLVED_CONFIG}: {e}") from e
    size = cfg.data.image_size
    prepared = prepare_qat(capture(fp32_model, torch.randn(2, 3, size, size)), cfg.quant)
    try:
        prepared.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(
            f"{folder / 'model.pt'}: does not fit the model built from {RESOLVED_CONFIG} ({e})"
        ) from e
    schedule.to_eval(prepared)
    prepared.apply(disable_observer)  # evaluation must not move the frozen statistics
    return LoadedRun(cfg, prepared, fp32_model, folder, manifest["step"], manifest["world_size"])


def training_fields(trainer_report: Path, step: int) -> dict:
    """The trainer's report of the same step (training throughput, eval history, sync
    statistics, state hashes), which an export cannot measure again; {} when there is none or
    it is about another step. Re-exporting into `<run_dir>/final` keeps these fields."""
    try:
        previous = json.loads(trainer_report.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(previous, dict) or previous.get("steps") != step:
        return {}
    return previous


def export_run(
    run_dir: Path,
    *,
    checkpoint: Path | None = None,
    out_dir: Path | None = None,
    batch_sizes: list[int],
    latency_iters: int | None = None,
) -> dict:
    """Export `checkpoint` (default: the newest intact one) of the run in `run_dir` into
    `out_dir` (default `<run_dir>/final`); `latency_iters` defaults to the run's
    `runtime.latency_iters`. Returns the report. Raises ExportError before writing anything
    when the run directory, its config, its data or the checkpoint are missing or corrupt."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "final"
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a folder")
    run = load_run(run_dir, checkpoint)
    cfg = run.cfg

    def val(batch_size: int):
        return data.val_batches(cfg.data, batch_size=batch_size, rank=0, world_size=1)

    try:
        val(1)  # names missing val shards now, before anything is built
    except config.ConfigError as e:
        raise ExportError(f"{run_dir / RESOLVED_CONFIG}: {e}") from e
    log.info("evaluating the fake-quant model")
    try:
        correct, seen = count_correct(run.prepared, val(max(batch_sizes)))
    except data.DataError as e:
        raise ExportError(f"validation data: {e}") from e
    report = training_fields(run_dir / "final" / "report.json", run.step)
    report |= {
        "model": cfg.model.name,
        "world_size": run.world_size,
        "global_batch_size": cfg.train.batch_size * run.world_size,
        "steps": run.step,
        "checkpoint": str(run.checkpoint),
        "run_dir": str(run_dir),
        "produced_by": "scripts/export_final.py",
        "fp32_fake_quant_top1": correct / seen if seen else 0.0,
    }
    try:
        return finalize(
            run.prepared,
            run.fp32_model,
            val,
            image_size=cfg.data.image_size,
            batch_sizes=batch_sizes,
            latency_iters=latency_iters or cfg.runtime.latency_iters,
            out_dir=out_dir,
            report=report,
        )
    except (config.ConfigError, data.DataError) as e:  # shards gone or damaged meanwhile
        raise ExportError(f"validation data: {e}; nothing was written to {out_dir}") from e
