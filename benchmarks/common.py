"""What every figure builds the same way: qatdist's seeded QAT model, synthetic batches, the
trainer's train step bound to a model, calibration forwards and a timed compile."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from qatdist.config import Config, ModelConfig, QuantConfig
from qatdist.optim import build_optimizer
from qatdist.quant import QatModel
from qatdist.step import train_step
from qatdist.tasks.classification import Classification

NUM_CLASSES = 10


def qat_model(
    name: str,
    seed: int,
    image_size: int,
    fast_fake_quant: bool = True,
    fused_weight_scaling: bool = True,
) -> QatModel:
    """qatdist's QAT model (`QatModel.build`), in the default schedule's phase at step 0: fake
    quant on, observers on, BatchNorm not frozen. Its `fp32_model` is the same seeded model
    before capture (the fp32 baseline). `fast_fake_quant=False` keeps torchao's fake-quant op
    (the reference the fast kernels are measured against); `fused_weight_scaling=False` keeps
    the conv-BN weight scaling as torchao's separate `mul`."""
    return QatModel.build(
        ModelConfig(name=name),
        QuantConfig(fast_fake_quant=fast_fake_quant, fused_weight_scaling=fused_weight_scaling),
        num_classes=NUM_CLASSES,
        image_size=image_size,
        seed=seed,
    )


def synthetic_batch(
    batch_size: int, image_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random images and labels."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    return images, labels


def calibration_batches(n: int, batch_size: int, image_size: int, seed: int) -> list:
    return [synthetic_batch(batch_size, image_size, seed + 100 + i)[0] for i in range(n)]


def bound_train_step(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """qatdist's `train_step` (forward, loss, backward, SGD step, LR step) bound to `model`,
    so the benchmark times exactly the code a training run executes."""
    cfg = Config()
    optimizer = build_optimizer(model.parameters(), cfg.optim, lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return functools.partial(train_step, model, optimizer, scheduler, Classification(cfg.data))


def calibrate(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Training-mode forwards (observers on) so every observer has a range."""
    with torch.no_grad():
        for images in batches:
            model(images)


def compile_and_warm(
    model: torch.nn.Module, example: torch.Tensor, compile_fn: Callable
) -> tuple[Callable, float]:
    """(`compile_fn(model)` after one forward on `example`, seconds that took): the first
    forward is where Inductor compiles."""
    start = time.perf_counter()
    compiled = compile_fn(model)
    with torch.no_grad():
        compiled(example)
    return compiled, time.perf_counter() - start
