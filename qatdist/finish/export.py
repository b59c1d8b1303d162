"""Export a finished (or interrupted) run's checkpoint as int8 artifacts, from its run directory.

`scripts/export_final.py` is the command line. The QAT model is rebuilt from the run's
`resolved_config.toml` exactly as the trainer builds it (`QatModel.build`), the checkpoint's
model state (read through `qatdist.run.checkpoint`) is loaded into it, and
`qatdist.finish.finalize.finalize` (the trainer's own end-of-run step) converts, compiles,
measures and writes the artifacts. Layers the trainer's accuracy budget kept in fp32 (its
report of the same step lists them) stay in fp32 here too; the fine-tuning the search may
have run after each change (`quant.fallback_finetune_steps`) is not in the checkpoint and is
not repeated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tomllib
from pathlib import Path

from qatdist import config, data
from qatdist.finish import openvino_ir
from qatdist.finish.accuracy_budget import with_fp32_layers
from qatdist.finish.finalize import FinalCheckFailed, QuantizationIncomplete, finalize
from qatdist.quant import QatModel
from qatdist.run.checkpoint import CheckpointError, find_complete, read_manifest, read_model_state
from qatdist.run.folder import RunFolder
from qatdist.run.report import metric_key
from qatdist.tasks import Task, build_task
from qatdist.tasks.evaluate import accumulate

log = logging.getLogger(__name__)


class ExportError(Exception):
    """The run directory or checkpoint cannot be exported; the message says what is wrong."""


@dataclasses.dataclass
class LoadedRun:
    cfg: config.Config
    task: Task
    qat: QatModel  # holding the checkpoint's model state (and the phase that state holds)
    checkpoint: Path
    step: int
    world_size: int


def load_config(run_dir: Path) -> config.Config:
    """The run's resolved config. Only value types and names are checked: train shards and a
    `model.weights` file are not needed to export, the checkpoint holds every weight."""
    run = RunFolder(run_dir)
    if not run.root.is_dir():
        raise ExportError(f"run directory {run.root} does not exist")
    path = run.resolved_config
    if not path.is_file():
        raise ExportError(f"{path}: missing; {run.root} is not a qatdist run directory")
    try:
        return config.from_dict(tomllib.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, config.ConfigError) as e:
        raise ExportError(f"{path}: unreadable or invalid ({e})") from e


def find_checkpoint(run_dir: Path, checkpoint: Path | None) -> Path:
    """`checkpoint` when given (it must be complete and match its manifest), else the newest
    complete checkpoint of the run (corrupt ones are skipped with a warning). Reads only."""
    root = RunFolder(run_dir).checkpoints
    try:
        folder = find_complete(root, checkpoint)
    except CheckpointError as e:
        raise ExportError(f"checkpoint: {e}") from e
    if folder is None:
        raise ExportError(
            f"{root}: no complete, intact checkpoint (none written, or every one is "
            "incomplete or corrupt; see the warnings above)"
        )
    return folder


def load_run(run_dir: Path, checkpoint: Path | None = None) -> LoadedRun:
    """Rebuild the run's QAT model and load a checkpoint's model state into it.

    Raises ExportError naming what is missing or corrupt."""
    cfg = load_config(run_dir)
    try:
        task = build_task(cfg.task, cfg.data)
    except config.ConfigError as e:
        raise ExportError(f"{RunFolder(run_dir).resolved_config}: {e}") from e
    folder = find_checkpoint(run_dir, checkpoint)
    try:
        manifest = read_manifest(folder)
        state = read_model_state(folder)
    except CheckpointError as e:
        raise ExportError(f"checkpoint: {e}") from e
    log.info("rebuilding the prepared %s model for %s", cfg.model.name, folder)
    try:
        qat = QatModel.build(
            dataclasses.replace(cfg.model, weights=""),  # the checkpoint holds every weight
            cfg.quant,
            num_classes=cfg.data.num_classes,
            image_size=cfg.data.image_size,
            seed=cfg.train.seed,
            dense=task.dense_outputs,
            aux_loss=task.aux_head,
        )
    except config.ConfigError as e:
        raise ExportError(f"{RunFolder(run_dir).resolved_config}: {e}") from e
    try:
        qat.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(
            f"{folder / 'model.pt'}: does not fit the model built from "
            f"{RunFolder(run_dir).resolved_config.name} ({e})"
        ) from e
    return LoadedRun(cfg, task, qat, folder, manifest["step"], manifest["world_size"])


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
    formats: tuple[str, ...] | list[str] = ("pt2", "aoti"),
) -> dict:
    """Export `checkpoint` (default: the newest intact one) of the run in `run_dir` into
    `out_dir` (default `<run_dir>/final`); `latency_iters` defaults to the run's
    `runtime.latency_iters`. `formats`: "pt2" (model_int8.pt2, always written), "aoti" (the
    AOTInductor package), "openvino" (the OpenVINO IR, `qatdist.finish.openvino_ir`). Returns the
    report. Raises ExportError before writing anything when the run directory, its config, its
    data or the checkpoint are missing or corrupt, or a format's package is not installed."""
    if "openvino" in formats and (why := openvino_ir.missing()):
        raise ExportError(f"{why}; nothing was written")
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else RunFolder(run_dir).final
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a folder")
    run = load_run(run_dir, checkpoint)
    cfg, task = run.cfg, run.task
    try:  # names missing val shards now, before anything is built
        val = data.full_val_batches(cfg.data, task)
    except config.ConfigError as e:
        raise ExportError(f"{RunFolder(run_dir).resolved_config}: {e}") from e
    report = training_fields(RunFolder(run_dir).final_report, run.step)
    qat = with_budget_layers(run, report.get("fp32_fallback_layers") or [])
    try:
        log.info("evaluating the weights in float")
        with qat.evaluating(fake_quant=False) as model:
            fp32 = accumulate(task, model, val(max(batch_sizes))).compute()[task.metric]
        with qat.evaluating() as model:  # observers stay paused through finalize
            log.info("evaluating the fake-quant model")
            fake_quant = accumulate(task, model, val(max(batch_sizes))).compute()[task.metric]
    except data.DataError as e:
        raise ExportError(f"validation data: {e}") from e
    with qat.evaluating() as model:
        report |= {
            "model": cfg.model.name,
            "world_size": run.world_size,
            "global_batch_size": cfg.train.batch_size * run.world_size,
            "steps": run.step,
            "checkpoint": str(run.checkpoint),
            "run_dir": str(run_dir),
            "produced_by": "scripts/export_final.py",
            "formats": ["pt2", *(f for f in ("aoti", "openvino") if f in formats)],
            metric_key("fp32_fake_quant", task.metric): fake_quant,
            metric_key("fp32", task.metric): fp32,
        }
        try:
            return finalize(
                model,
                qat.fp32_model,
                task,
                val,
                image_size=cfg.data.image_size,
                input_size=task.input_size(cfg.data.image_size),
                batch_sizes=batch_sizes,
                latency_iters=latency_iters or cfg.runtime.latency_iters,
                out_dir=out_dir,
                report=report,
                require_full_quantization=cfg.runtime.require_full_quantization,
                eval_mismatch=qat.eval_mismatch,
                aoti="aoti" in formats,
                openvino="openvino" in formats,
            )
        except (config.ConfigError, data.DataError) as e:  # shards gone or damaged meanwhile
            raise ExportError(f"validation data: {e}; nothing was written to {out_dir}") from e
        except (QuantizationIncomplete, FinalCheckFailed) as e:
            raise ExportError(str(e)) from e


def with_budget_layers(run: LoadedRun, layers: list[str]) -> QatModel:
    """The run's QAT model with `layers` (the trainer report's `fp32_fallback_layers` for this
    step: the accuracy budget's choice) kept in fp32 as the trainer's final model had them;
    the loaded model itself when there are none."""
    if not layers:
        return run.qat
    log.info("keeping the accuracy budget's layers in fp32: %s", ", ".join(layers))
    try:
        return with_fp32_layers(run.qat, layers, image_size=run.cfg.data.image_size)
    except ValueError as e:
        raise ExportError(f"fp32_fallback_layers of the trainer's report: {e}") from e
