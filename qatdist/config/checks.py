"""Value checks of a run configuration that types alone cannot express, run by `qatdist.config.load`
before any process group starts; every error names the offending key. Only the standard
library is imported here: a bad config is refused in well under a second."""

from __future__ import annotations

import glob
import importlib.util
from pathlib import Path

from qatdist.config.factories import FORMS, factory_file, split_spec
from qatdist.config.sections import (
    BUILTIN_TASKS,
    GRAD_COMPRESSION,
    INT8_TARGETS,
    SEGMENTATION_CLASS_WEIGHTING,
    Config,
    ConfigError,
    DataConfig,
    QuantConfig,
    TaskConfig,
    is_demo_pattern,
)


def _require(cond: bool, key: str, expected: str, value) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express. Shard existence is checked here too,
    except for demo shards that the run will generate."""
    _check_run_and_model(cfg)
    _check_data(cfg.data)
    _check_segmentation(cfg.task, cfg.data.num_classes)
    _check_training(cfg)
    _check_quant(cfg.quant)
    _check_runtime(cfg)


def _check_run_and_model(cfg: Config) -> None:
    _require(bool(cfg.run.out_dir), "run.out_dir", "a non-empty path", cfg.run.out_dir)
    _require(bool(cfg.model.name), "model.name", "a model name", cfg.model.name)
    if ":" in cfg.model.name:
        _check_factory_spec("model.name", cfg.model.name)
    if ":" in cfg.task.name:
        _check_factory_spec("task.name", cfg.task.name)
    else:
        _require(
            cfg.task.name in BUILTIN_TASKS,
            "task.name",
            f"a built-in task ({', '.join(BUILTIN_TASKS)}) or {FORMS}",
            cfg.task.name,
        )
    if cfg.model.weights:
        _require(
            Path(cfg.model.weights).is_file(),
            "model.weights",
            "an existing local file",
            cfg.model.weights,
        )


def _check_factory_spec(key: str, spec: str) -> None:
    """The spec's form, and for the file form that the file exists (imports wait for the run)."""
    target, function_name = split_spec(spec)
    _require(bool(target and function_name), key, FORMS, spec)
    file = factory_file(spec)
    if file is not None:
        _require(file.is_file(), key, "an existing .py file before the ':'", spec)


def _check_segmentation(t: TaskConfig, num_classes: int) -> None:
    _require(0 <= t.ignore_index <= 255, "task.ignore_index", "0..255", t.ignore_index)
    _require(
        t.class_weighting in SEGMENTATION_CLASS_WEIGHTING,
        "task.class_weighting",
        " or ".join(map(repr, SEGMENTATION_CLASS_WEIGHTING)),
        t.class_weighting,
    )
    _require(t.aux_weight >= 0, "task.aux_weight", "a number >= 0", t.aux_weight)
    for key in ("crop_size", "eval_size"):
        size = getattr(t, key)
        _require(
            len(size) in (0, 2) and all(v >= 16 for v in size),
            f"task.{key}",
            "[] or [height, width], each >= 16",
            size,
        )
    _require(
        len(t.scale_range) == 2 and 0 < t.scale_range[0] <= t.scale_range[1],
        "task.scale_range",
        "[low, high] with 0 < low <= high",
        t.scale_range,
    )
    _require(
        len(t.class_names) in (0, num_classes),
        "task.class_names",
        f"[] or data.num_classes ({num_classes}) names",
        t.class_names,
    )


def _check_data(d: DataConfig) -> None:
    _require(d.image_size >= 16, "data.image_size", "an integer >= 16", d.image_size)
    _require(d.num_classes >= 2, "data.num_classes", "an integer >= 2", d.num_classes)
    _require(d.num_workers >= 0, "data.num_workers", "an integer >= 0", d.num_workers)
    _require(d.shuffle_buffer >= 1, "data.shuffle_buffer", "an integer >= 1", d.shuffle_buffer)
    _require(d.on_error in ("raise", "skip"), "data.on_error", "'raise' or 'skip'", d.on_error)
    _require(
        d.demo_train_per_class >= 1, "data.demo_train_per_class", ">= 1", d.demo_train_per_class
    )
    _require(d.demo_val_per_class >= 1, "data.demo_val_per_class", ">= 1", d.demo_val_per_class)
    _require(0 <= d.hflip <= 1, "data.hflip", "a probability in [0, 1]", d.hflip)
    _require(
        len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
        "data.crop_scale",
        "[low, high] with 0 < low <= high <= 1",
        d.crop_scale,
    )
    _require(len(d.mean) == 3, "data.mean", "3 numbers (R, G, B)", d.mean)
    _require(len(d.std) == 3 and all(v > 0 for v in d.std), "data.std", "3 positive numbers", d.std)
    if d.transform:
        _check_factory_spec("data.transform", d.transform)
    for key in ("train_shards", "val_shards"):
        pattern = getattr(d, key)
        _require(bool(pattern), f"data.{key}", "a shard pattern", pattern)
        if pattern.startswith("pipe:"):
            _require(d.allow_pipe, f"data.{key}", "no 'pipe:' URL unless data.allow_pipe", pattern)
        elif not pattern.startswith(("http://", "https://")):
            # Only the built-in demo's own pattern may match nothing: the run writes it then.
            is_demo = is_demo_pattern(key, pattern)
            if not (is_demo and d.generate_demo):
                hint = " (data.generate_demo=true writes the demo there)" if is_demo else ""
                _require(
                    bool(expand_shards(pattern)),
                    f"data.{key}",
                    f"a pattern matching shard files{hint}",
                    pattern,
                )


def _check_training(cfg: Config) -> None:
    t, o = cfg.train, cfg.optim
    _require(t.epochs >= 1, "train.epochs", "an integer >= 1", t.epochs)
    _require(t.steps_per_epoch >= 0, "train.steps_per_epoch", "an integer >= 0", t.steps_per_epoch)
    _require(t.batch_size >= 1, "train.batch_size", "an integer >= 1", t.batch_size)
    _require(t.lr > 0, "train.lr", "a positive number", t.lr)
    _require(t.eval_every_epochs >= 0, "train.eval_every_epochs", ">= 0", t.eval_every_epochs)
    _require(t.log_every_steps >= 1, "train.log_every_steps", ">= 1", t.log_every_steps)
    _require(cfg.log.val_frames >= 0, "log.val_frames", "an integer >= 0", cfg.log.val_frames)
    _require(
        t.on_nonfinite in ("stop", "skip"), "train.on_nonfinite", "'stop' or 'skip'", t.on_nonfinite
    )
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", ">= 1", t.max_nonfinite_steps)
    _require(
        0 <= t.distill_weight <= 1, "train.distill_weight", "a number in [0, 1]", t.distill_weight
    )
    _require(t.distill_temperature > 0, "train.distill_temperature", "> 0", t.distill_temperature)
    if t.distill_teacher_weights:
        _require(
            t.distill_weight > 0,
            "train.distill_teacher_weights",
            "to be used with train.distill_weight > 0 (distillation is off)",
            t.distill_teacher_weights,
        )
        _require(
            Path(t.distill_teacher_weights).is_file(),
            "train.distill_teacher_weights",
            "an existing weight file",
            t.distill_teacher_weights,
        )
    _require(o.name in ("sgd", "adamw"), "optim.name", "'sgd' or 'adamw'", o.name)
    _require(0 <= o.momentum < 1, "optim.momentum", "a number in [0, 1)", o.momentum)
    _require(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", o.warmup_steps)
    _check_fraction("optim", "warmup_at", o.warmup_at)
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "a number in [0, 1]", o.min_lr_ratio)


def _check_fraction(section: str, key: str, value: float) -> None:
    _require(value == -1 or 0 <= value <= 1, f"{section}.{key}", "-1 or a number in [0, 1]", value)


def _check_quant(q: QuantConfig) -> None:
    _require(
        q.target in INT8_TARGETS,
        "quant.target",
        " or ".join(repr(name) for name in INT8_TARGETS),
        q.target,
    )
    for key in ("fake_quant_start_at", "observer_freeze_at", "bn_freeze_at"):
        _check_fraction("quant", key, getattr(q, key))
    _require(
        q.fake_quant_start_step >= 0, "quant.fake_quant_start_step", ">= 0", q.fake_quant_start_step
    )
    _require(
        q.observer_freeze_step >= -1, "quant.observer_freeze_step", ">= -1", q.observer_freeze_step
    )
    _require(q.bn_freeze_step >= -1, "quant.bn_freeze_step", ">= -1", q.bn_freeze_step)
    _require(
        q.sync_every_steps >= 1, "quant.sync_every_steps", "an integer >= 1", q.sync_every_steps
    )
    _require(
        q.ptq_calibration_batches >= 0,
        "quant.ptq_calibration_batches",
        "an integer >= 0",
        q.ptq_calibration_batches,
    )
    _require(
        q.max_accuracy_drop == -1 or 0 <= q.max_accuracy_drop <= 1,
        "quant.max_accuracy_drop",
        "-1 (off) or a number in [0, 1]",
        q.max_accuracy_drop,
    )
    _require(
        q.fallback_finetune_steps >= 0,
        "quant.fallback_finetune_steps",
        ">= 0",
        q.fallback_finetune_steps,
    )
    _require(
        q.sensitivity_candidates >= 1,
        "quant.sensitivity_candidates",
        ">= 1",
        q.sensitivity_candidates,
    )


def _check_runtime(cfg: Config) -> None:
    c, r = cfg.checkpoint, cfg.runtime
    _require(c.every_steps >= 0, "checkpoint.every_steps", "an integer >= 0", c.every_steps)
    _require(c.keep_last >= 1, "checkpoint.keep_last", "an integer >= 1", c.keep_last)
    if c.resume_from:
        _require(
            Path(c.resume_from).is_dir(),
            "checkpoint.resume_from",
            "an existing folder",
            c.resume_from,
        )
    _require(r.pinning in ("auto", "off"), "runtime.pinning", "'auto' or 'off'", r.pinning)
    _require(
        r.grad_compression in GRAD_COMPRESSION,
        "runtime.grad_compression",
        " or ".join(repr(name) for name in GRAD_COMPRESSION),
        r.grad_compression,
    )
    _require(r.threads >= 0, "runtime.threads", "an integer >= 0", r.threads)
    _require(r.loader_cores >= 0, "runtime.loader_cores", "an integer >= 0", r.loader_cores)
    _require(r.timeout_s >= 1, "runtime.timeout_s", "an integer >= 1", r.timeout_s)
    _require(r.latency_batch_size >= 1, "runtime.latency_batch_size", ">= 1", r.latency_batch_size)
    _require(r.latency_iters >= 1, "runtime.latency_iters", ">= 1", r.latency_iters)
    _require(
        all(1 <= b <= r.latency_batch_size for b in r.latency_batch_sizes),
        "runtime.latency_batch_sizes",
        "batch sizes from 1 to runtime.latency_batch_size (the headline batch, the largest)",
        r.latency_batch_sizes,
    )
    if r.final_openvino and importlib.util.find_spec("openvino") is None:
        raise ConfigError(
            "runtime.final_openvino: true needs the openvino package, which is not installed "
            "(pip install -e '.[peers]')"
        )


def expand_shards(pattern: str) -> list[str]:
    """Expand a brace pattern ('train-{000000..000003}.tar') and/or glob into sorted paths."""
    from braceexpand import braceexpand  # installed with webdataset

    paths: list[str] = []
    for part in braceexpand(pattern):
        if any(ch in part for ch in "*?["):
            paths.extend(sorted(glob.glob(part)))
        elif Path(part).exists():
            paths.append(part)
    return paths
