"""Write the plain fp32 weights of a qatdist run's checkpoint, for `model.weights`.

  python scripts/fp32_weights.py --run-dir runs/ft-fp32 --out weights/resnet18-demo.pt
  python scripts/fp32_weights.py --run-dir runs/r18 --checkpoint runs/r18/checkpoints/step-400 \
      --out r18-400.pt

A checkpoint's model.pt is the prepared QAT model's state dict (the model's own parameters and
buffers plus observer state). This keeps the model's own entries, under the torchvision module
names, checks that they load strictly into the fp32 model built from the run's
resolved_config.toml, and saves them with `torch.save`: the file `model.weights` loads (see
configs/finetune.toml). A missing or corrupt run directory or checkpoint exits with status 2 and
leaves --out untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Extract the fp32 state dict (torchvision module names, no observer state) "
        "of a qatdist run's checkpoint into a file that model.weights can load.",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="Run directory of a qatdist training run (holds resolved_config.toml, which names "
        "the model, and checkpoints/).",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="Checkpoint folder (checkpoints/step-N) to read; default: the newest complete, "
        "intact one in the run directory.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE.pt",
        help="File to write the state dict to (replaced if it exists; its folder is created).",
    )
    return parser


def fp32_state(run_dir: Path, checkpoint: Path | None = None) -> tuple[dict, Path]:
    """The fp32 model's state dict held by `checkpoint` (default: the run's newest complete
    one), checked to load strictly into the model built from the run's config, and the
    checkpoint folder read. Raises ExportError naming what is missing, corrupt or mismatched."""
    from qatdist.config import ConfigError
    from qatdist.finish.export import ExportError, find_checkpoint, load_config
    from qatdist.models import build_model
    from qatdist.quant.ptq import float_weights
    from qatdist.run.checkpoint import CheckpointError, read_model_state
    from qatdist.run.folder import RunFolder
    from qatdist.tasks import build_task

    cfg = load_config(run_dir)
    folder = find_checkpoint(run_dir, checkpoint)
    try:
        prepared_state = read_model_state(folder)
    except CheckpointError as e:
        raise ExportError(f"checkpoint: {e}") from e
    resolved = RunFolder(run_dir).resolved_config
    try:
        task = build_task(cfg.task, cfg.data)  # the model's kind: per pixel, with an aux head
        # the run's own model.weights (if any) is not needed: the checkpoint holds every weight
        model = build_model(
            dataclasses.replace(cfg.model, weights=""),
            cfg.data.num_classes,
            image_size=cfg.data.image_size,
            dense=task.dense_outputs,
            aux_loss=task.aux_head,
        )
    except ConfigError as e:
        raise ExportError(f"{resolved}: {e}") from e
    try:
        state = float_weights(prepared_state, model)
        model.load_state_dict(state)  # strict: exactly the fp32 model's entries and shapes
    except (KeyError, RuntimeError) as e:
        raise ExportError(
            f"{folder / 'model.pt'}: does not fit the {cfg.model.name} model of "
            f"{resolved.name} ({e})"
        ) from e
    return state, folder


def save(state: dict, out: Path) -> None:
    """Write `state` to `out` through a temporary file, so `out` is whole or untouched."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    torch.save(state, tmp)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.is_dir():
        print(f"fp32_weights.py: error: --out {args.out} is a directory", file=sys.stderr)
        return 2
    from qatdist.finish.export import ExportError  # heavy imports after argument checks

    try:
        state, folder = fp32_state(args.run_dir, args.checkpoint)
    except ExportError as e:
        print(f"fp32_weights.py: error: {e}", file=sys.stderr)
        return 2
    save(state, args.out)
    print(f"{len(state)} fp32 tensors of {folder} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
