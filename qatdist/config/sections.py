"""The typed sections of a run configuration, one dataclass per concern.

Every field has a one-line help text (`metadata["help"]`) that `python -m qatdist.train
--help` prints; loading and overrides are in `qatdist.config.load`, value checks in
`qatdist.config.checks`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.toml"

# The built-in demo's own shard patterns, per data key (configs/default.toml uses them). With
# data.generate_demo they are written on first use; no other pattern is ever written to.
DEMO_DIR = Path("data/demo")
DEMO_SHARDS = {
    "train_shards": f"{DEMO_DIR}/train-{{000000..000007}}.tar",
    "val_shards": f"{DEMO_DIR}/val-{{000000..000001}}.tar",
}


def is_demo_pattern(key: str, pattern: str) -> bool:
    """True when `pattern` is the built-in demo's own pattern for data key `key`
    ('train_shards' or 'val_shards'), the only patterns the demo generator writes to."""
    return DEMO_SHARDS[key] == pattern


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an invalid value."""


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class RunConfig:
    out_dir: str = _f("runs/default", "Run directory: checkpoints, reports, TensorBoard logs.")


@dataclass
class ModelConfig:
    name: str = _f(
        "resnet18",
        "torchvision classification model name, or a factory 'package.module:function' or "
        "'path/to/file.py:function' (relative to the working directory), called with "
        "num_classes when it takes that argument, else with none (its output width must then "
        "be data.num_classes).",
    )
    weights: str = _f(
        "",
        "Optional local weights file loaded strictly before capture: a state dict (torch.save "
        "or .safetensors), plain or under 'state_dict'/'model'/'model_state_dict'/'ema', "
        "names may carry a 'module.' (DDP) or '_orig_mod.' (torch.compile) prefix.",
    )


BUILTIN_TASKS = ("classification", "segmentation")


@dataclass
class TaskConfig:
    name: str = _f(
        "classification",
        "What the model predicts: a built-in task (" + ", ".join(BUILTIN_TASKS) + ") or a "
        "function 'package.module:function' or 'path/to/file.py:function' called as "
        "function(task_cfg, data_cfg) that returns a qatdist.tasks.Task (docs/tasks.md).",
    )
    # Segmentation (task.name = "segmentation"): the label maps, the joint transforms, the loss.
    ignore_index: int = _f(
        255,
        "Segmentation: label value of unlabelled pixels, ignored by the loss and the metric "
        "(CamVid: 11).",
    )
    class_weighting: str = _f(
        "none",
        "Segmentation: cross-entropy class weights computed from the train shards' label maps: "
        "'none', 'median_frequency' (median freq / class freq) or 'inverse_log' "
        "(1 / ln(1.02 + class share)).",
    )
    aux_weight: float = _f(
        0.5,
        "Segmentation: weight of the auxiliary head's loss where the model has one "
        "(torchvision's fcn/deeplabv3 built with aux_loss); 0 builds them without it.",
    )
    crop_size: list[int] = _f(
        [],
        "Segmentation: [height, width] of the random train crop cut from the scaled frame "
        "(label padded with ignore_index where the frame is smaller); [] = the frame's size.",
    )
    scale_range: list[float] = _f(
        [0.5, 2.0], "Segmentation: range of the random train scale of the frame, [low, high]."
    )
    eval_size: list[int] = _f(
        [],
        "Segmentation: [height, width] frames and label maps are resized to for evaluation "
        "(labels nearest); [] = the full frame.",
    )
    class_names: list[str] = _f(
        [],
        "Segmentation: class names, data.num_classes of them, naming the per-class IoU keys "
        "(iou_<name>); [] = iou_<index>.",
    )


SEGMENTATION_CLASS_WEIGHTING = ("none", "median_frequency", "inverse_log")


@dataclass
class DataConfig:
    train_shards: str = _f("", "Train shards: webdataset brace pattern or glob of .tar files.")
    val_shards: str = _f("", "Validation shards: brace pattern or glob of .tar files.")
    image_size: int = _f(64, "Square input size in pixels after transforms.")
    num_classes: int = _f(10, "Number of classes (labels are 0..num_classes-1).")
    num_workers: int = _f(1, "DataLoader worker processes per rank (0 = load in the rank).")
    shuffle_buffer: int = _f(512, "Samples held in each worker's shuffle buffer.")
    on_error: str = _f(
        "raise", "Bad sample policy: 'raise' stops naming shard and key; 'skip' counts it."
    )
    allow_pipe: bool = _f(False, "Allow 'pipe:' shard URLs, which run a shell command.")
    generate_demo: bool = _f(
        False, "Write the built-in demo shards to the shard paths when they are missing."
    )
    demo_train_per_class: int = _f(400, "Demo generator: train images per class.")
    demo_val_per_class: int = _f(100, "Demo generator: validation images per class.")
    hflip: float = _f(0.5, "Train transform: probability of a horizontal flip (0 = never).")
    crop_scale: list[float] = _f(
        [0.7, 1.0],
        "Train transform: RandomResizedCrop area range as fractions of the image; "
        "[1.0, 1.0] = resize only.",
    )
    mean: list[float] = _f(
        [0.485, 0.456, 0.406], "Normalisation mean per RGB channel (train and evaluation)."
    )
    std: list[float] = _f(
        [0.229, 0.224, 0.225], "Normalisation std per RGB channel (train and evaluation)."
    )
    transform: str = _f(
        "",
        "Optional factory 'package.module:function' or 'path/to/file.py:function' building the "
        "train transform; see docs/data.md ('' = the built-in crop, flip and normalisation).",
    )


@dataclass
class QuantConfig:
    fake_quant_start_step: int = _f(0, "Step at which fake quantization turns on (fp32 before).")
    observer_freeze_step: int = _f(-1, "Step at which observers freeze (-1: never).")
    bn_freeze_step: int = _f(-1, "Step at which BatchNorm statistics freeze (-1: never).")
    fake_quant_start_at: float = _f(
        -1.0,
        "fake_quant_start_step as a fraction of the run's steps, e.g. 0.1; given, it wins "
        "over the step (-1: use the step).",
    )
    observer_freeze_at: float = _f(
        -1.0,
        "observer_freeze_step as a fraction of the run's steps, e.g. 0.9; given, it wins over "
        "the step (-1: use the step).",
    )
    bn_freeze_at: float = _f(
        -1.0,
        "bn_freeze_step as a fraction of the run's steps, e.g. 0.75; given, it wins over the "
        "step (-1: use the step).",
    )
    sync_every_steps: int = _f(
        50, "Cross-rank observer/BatchNorm statistics sync interval in steps."
    )
    fp32_module_names: list[str] = _f(
        [], "Module paths kept in fp32, e.g. ['conv1', 'fc'] (quantizer module-name config)."
    )
    fp32_module_types: list[str] = _f(
        [], "Module types kept in fp32, e.g. ['torch.nn.Linear'] (quantizer module-type config)."
    )
    fast_fake_quant: bool = _f(
        True,
        "Run fake-quant modules with qatdist's C++ ops (built on first use), bitwise the same "
        "results as torchao's op (false: torchao's FusedMovingAvgObsFakeQuantize forward).",
    )
    fused_weight_scaling: bool = _f(
        True,
        "With fast_fake_quant: compute the conv-BN QAT weight scaling (weight * gamma/sigma) "
        "and the division of the conv output by it inside the weight fake-quant kernels "
        "(false: as the separate mul and div torchao inserts).",
    )
    ptq_calibration_batches: int = _f(
        32,
        "Train batches (split across ranks) that calibrate the post-training-quantization "
        "baseline (0: no PTQ baseline).",
    )
    max_accuracy_drop: float = _f(
        -1.0,
        "Accuracy budget: largest drop of the task's primary metric from fp32 to int8 accepted "
        "(classification: fp32 - int8 top-1); above it layers are kept in fp32 by "
        "sensitivity until it is met (-1: off).",
    )
    fallback_finetune_steps: int = _f(
        0, "Accuracy budget: QAT steps after each layer moved to fp32 (0: none)."
    )
    sensitivity_candidates: int = _f(
        8, "Accuracy budget: most-sensitive layers whose metric gain in fp32 is measured."
    )
    target: str = _f(
        "auto",
        "CPU the int8 model is built for: 'vnni' (int8 dot products: avx512_vnni, avx_vnni or "
        "amx_int8), 'avx2' (none: weights quantized to -64..63 so oneDNN's int16 pair sums "
        "cannot saturate), 'auto' (the CPUs that train; 'avx2' if any rank lacks them).",
    )


@dataclass
class OptimConfig:
    name: str = _f("sgd", "Optimizer: 'sgd' (momentum, nesterov) or 'adamw'.")
    momentum: float = _f(0.9, "SGD momentum.")
    weight_decay: float = _f(5e-5, "Weight decay.")
    warmup_steps: int = _f(20, "Linear LR warm-up steps before the cosine decay.")
    warmup_at: float = _f(
        -1.0,
        "warmup_steps as a fraction of the run's steps, e.g. 0.05; given, it wins over the "
        "steps (-1: use the steps).",
    )
    min_lr_ratio: float = _f(0.01, "Final LR as a fraction of train.lr.")


@dataclass
class TrainConfig:
    epochs: int = _f(3, "Number of epochs.")
    steps_per_epoch: int = _f(
        0, "Optimizer steps per epoch, the same on every rank (0: train samples // global batch)."
    )
    batch_size: int = _f(32, "Per-rank batch size.")
    lr: float = _f(0.05, "Peak learning rate.")
    seed: int = _f(0, "Seed for weights, augmentation and data order.")
    eval_every_epochs: int = _f(0, "Evaluate every N epochs during training (0: only at the end).")
    log_every_steps: int = _f(10, "Console progress interval in steps.")
    on_nonfinite: str = _f(
        "stop",
        "Non-finite loss or gradient: 'stop' ends the run with an error; 'skip' skips the "
        "optimizer step on every rank and counts it.",
    )
    max_nonfinite_steps: int = _f(
        10, "With on_nonfinite='skip': consecutive skipped steps after which the run stops."
    )
    distill_weight: float = _f(
        0.0, "Weight of the distillation loss from the frozen fp32 teacher (0: off)."
    )
    distill_temperature: float = _f(2.0, "Distillation softmax temperature.")
    distill_teacher_weights: str = _f(
        "",
        "Weight file of the distillation teacher, the model.name architecture loaded as "
        "model.weights is ('': the model as built, with model.weights, before any training).",
    )


@dataclass
class CheckpointConfig:
    enabled: bool = _f(True, "Write checkpoints under run.out_dir/checkpoints.")
    every_steps: int = _f(0, "Also checkpoint every N steps (0: only at epoch ends).")
    keep_last: int = _f(2, "Complete checkpoints kept.")
    resume_from: str = _f("", "Checkpoint folder to resume from ('' = newest in run.out_dir).")


@dataclass
class LogConfig:
    tensorboard: bool = _f(True, "Write TensorBoard events to run.out_dir/tb.")
    quant_every_steps: int = _f(0, "Quant summaries interval (0: at each statistics sync).")
    val_frames: int = _f(
        4,
        "The first N validation frames shown in TensorBoard with the fp32 and int8 models' "
        "predictions at each evaluation and at the end, for a task that draws them "
        "(segmentation: colour masks); 0 = none.",
    )


@dataclass
class RuntimeConfig:
    pinning: str = _f("auto", "'auto': pin each rank to its NUMA node's cores; 'off': don't.")
    use_smt: bool = _f(False, "Also use SMT sibling threads.")
    cores: str = _f("", "Explicit per-rank CPU lists, ';'-separated, e.g. '0-27;28-55'.")
    threads: int = _f(0, "Torch intra-op threads per rank (0: one per pinned core).")
    loader_cores: int = _f(1, "Cores of the rank's set given to its loader workers.")
    timeout_s: int = _f(
        300,
        "Collective timeout in seconds: a hung rank ends the job. A rank whose loader workers "
        "deliver no batch for 0.9x this stops first, printing the workers' stacks.",
    )
    grad_compression: str = _f(
        "none", "Gradient all-reduce dtype: 'none' (fp32), 'bf16' or 'fp16' (a DDP comm hook)."
    )
    latency_batch_size: int = _f(32, "Batch size of the final int8/fp32 latency comparison.")
    latency_batch_sizes: list[int] = _f(
        [],
        "Smaller batch sizes also timed at the end (each compiled once more), as extra rows of "
        "the report's `latency`; e.g. [1] for a segmenter's frame-by-frame latency.",
    )
    latency_iters: int = _f(20, "Timed iterations of the final latency comparison.")
    compile_final: bool = _f(True, "Compile the final int8 model with Inductor (freezing).")
    final_openvino: bool = _f(
        False,
        "Also write the OpenVINO IR (model_int8_openvino.xml/.bin) into final/, measured beside "
        "Inductor's int8; needs the openvino package (pip install -e '.[peers]').",
    )
    require_full_quantization: bool = _f(
        False,
        "Fail the run when the compiled model holds fewer quantized convolutions/linears than "
        "the quantizer annotated (default: report it and warn).",
    )


GRAD_COMPRESSION = ("none", "bf16", "fp16")
INT8_TARGETS = ("auto", "vnni", "avx2")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# (section, fraction key, step key): schedule points a config can give either way.
SCHEDULE_FRACTIONS = (
    ("quant", "fake_quant_start_at", "fake_quant_start_step"),
    ("quant", "observer_freeze_at", "observer_freeze_step"),
    ("quant", "bn_freeze_at", "bn_freeze_step"),
    ("optim", "warmup_at", "warmup_steps"),
)


def with_schedule_steps(cfg: Config, total_steps: int) -> Config:
    """`cfg` with every schedule point given as a fraction of the run (`*_at`) turned into its
    step key (round(fraction x total_steps)) and the fraction reset to -1, so the resolved
    config holds steps only. A fraction given takes precedence over its step key."""
    sections = {name: getattr(cfg, name) for name, _, _ in SCHEDULE_FRACTIONS}
    for section, fraction_key, step_key in SCHEDULE_FRACTIONS:
        part = sections[section]
        fraction = getattr(part, fraction_key)
        if fraction < 0:
            continue
        step = round(fraction * total_steps)
        sections[section] = dataclasses.replace(part, **{step_key: step, fraction_key: -1.0})
    return dataclasses.replace(cfg, **sections)
