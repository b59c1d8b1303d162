"""Tasks: what a model predicts, end to end (`base`: the Task, Metric and Agreement interfaces;
`classification`: the default task; `evaluate`: running a forward over batches into a task's
metric, across ranks). `build_task` is the front door: the task `task.name` names."""

from __future__ import annotations

from qatdist.config import ConfigError, DataConfig, TaskConfig, describe_error, load_factory
from qatdist.tasks.base import Agreement, Metric, Task

__all__ = ["Agreement", "Metric", "Task", "build_task"]


def build_task(task_cfg: TaskConfig, data_cfg: DataConfig) -> Task:
    """The task `task_cfg.name` names: a built-in one, or a user's function
    ('package.module:function' or 'path/to/file.py:function') called as
    `function(task_cfg, data_cfg)`. ConfigError naming task.name when the function cannot be
    loaded, fails, or returns something that is not a Task."""
    if task_cfg.name == "classification":
        from qatdist.tasks import classification

        return classification.build(task_cfg, data_cfg)
    if task_cfg.name == "segmentation":
        from qatdist.tasks import segmentation

        return segmentation.build(task_cfg, data_cfg)
    if ":" not in task_cfg.name:
        raise ConfigError(
            f"task.name: {task_cfg.name!r} is neither a built-in task (classification) nor a "
            "'package.module:function' or 'path/to/file.py:function'"
        )
    factory = load_factory(task_cfg.name, "task.name")
    try:
        task = factory(task_cfg, data_cfg)
    except Exception as e:  # user code: any failure is a bad setting
        raise ConfigError(f"task.name: {task_cfg.name!r} raised {describe_error(e)}") from None
    if not isinstance(task, Task):
        raise ConfigError(
            f"task.name: {task_cfg.name!r} returned a {type(task).__name__}, not a "
            "qatdist.tasks.Task"
        )
    for attribute in ("name", "metric", "sample_extensions"):
        if not hasattr(task, attribute):
            raise ConfigError(
                f"task.name: the Task {task_cfg.name!r} returned has no {attribute!r} attribute"
            )
    return task
