"""Run configuration: the typed sections (`sections`), loading from a TOML file and the command
line (`load`), value checks (`checks`) and the user code a config names (`factories`).

Import order follows the dependencies, which run one way: sections <- factories <- checks <-
load.
"""

from qatdist.config.checks import expand_shards, validate
from qatdist.config.factories import FORMS, describe_error, load_factory
from qatdist.config.load import (
    from_dict,
    help_text,
    load,
    load_from_argv,
    parse_overrides,
    to_toml,
)
from qatdist.config.sections import (
    BUILTIN_TASKS,
    DEFAULT_CONFIG,
    DEMO_DIR,
    DEMO_SHARDS,
    GRAD_COMPRESSION,
    INT8_TARGETS,
    SCHEDULE_FRACTIONS,
    SEGMENTATION_CLASS_WEIGHTING,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    QuantConfig,
    RunConfig,
    RuntimeConfig,
    TaskConfig,
    TrainConfig,
    is_demo_pattern,
    with_schedule_steps,
)

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_CONFIG",
    "DEMO_DIR",
    "DEMO_SHARDS",
    "FORMS",
    "GRAD_COMPRESSION",
    "INT8_TARGETS",
    "SCHEDULE_FRACTIONS",
    "SEGMENTATION_CLASS_WEIGHTING",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "QuantConfig",
    "RunConfig",
    "RuntimeConfig",
    "TaskConfig",
    "TrainConfig",
    "describe_error",
    "expand_shards",
    "from_dict",
    "help_text",
    "is_demo_pattern",
    "load",
    "load_factory",
    "load_from_argv",
    "parse_overrides",
    "to_toml",
    "validate",
    "with_schedule_steps",
]
