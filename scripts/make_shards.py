"""Write webdataset train/val shards for qatdist from an ImageFolder tree or the built-in demo.

  python scripts/make_shards.py --image-folder ~/datasets/flowers --out data/flowers
  python scripts/make_shards.py --demo --out data/demo

Prints the patterns to pass as data.train_shards / data.val_shards and the class -> label map
(also written to <out>/classes.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qatdist.data import demo
from qatdist.data.shards import ShardError, make_image_folder_shards

DEMO_FLAGS = ("train_per_class", "val_per_class", "image_size")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write train-NNNNNN.tar / val-NNNNNN.tar webdataset shards "
        "(<key>.<image ext> + <key>.cls) for qatdist.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--image-folder",
        type=Path,
        metavar="DIR",
        help="ImageFolder tree: one sub-folder per class (sorted names -> labels 0..C-1), or "
        "train/ and val/ sub-trees of such folders, whose split is kept.",
    )
    source.add_argument(
        "--demo", action="store_true", help="Write the built-in 10-class procedural dataset."
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="Folder the shards go to."
    )
    parser.add_argument(
        "--shard-size", type=int, default=500, metavar="N", help="Samples per shard (500)."
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        metavar="F",
        help="Image folder without train/ and val/: fraction of each class used for "
        "validation, chosen deterministically from --seed (0.1).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the val split, shard order and demo (0)."
    )
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=None,
        metavar="N",
        help="Demo: train images per class (400).",
    )
    parser.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        metavar="N",
        help="Demo: val images per class (100).",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, metavar="S", help="Demo: image side in pixels (64)."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.demo:
        if args.val_fraction is not None:
            parser.error("--val-fraction applies to --image-folder, not --demo")
        train_per_class = 400 if args.train_per_class is None else args.train_per_class
        val_per_class = 100 if args.val_per_class is None else args.val_per_class
        image_size = 64 if args.image_size is None else args.image_size
        if train_per_class < 1 or val_per_class < 1 or image_size < 16:
            parser.error("--train-per-class and --val-per-class must be >= 1, --image-size >= 16")
        train, val = demo.write_demo_shards(
            args.out, train_per_class, val_per_class, args.seed, image_size, args.shard_size
        )
        classes = {name: i for i, name in enumerate(demo.CLASS_NAMES)}
        (args.out / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
        counts = (train_per_class * demo.NUM_CLASSES, val_per_class * demo.NUM_CLASSES)
    else:
        given = [f"--{f.replace('_', '-')}" for f in DEMO_FLAGS if getattr(args, f) is not None]
        if given:
            parser.error(f"{', '.join(given)} only apply to --demo")
        try:
            summary = make_image_folder_shards(
                args.image_folder,
                args.out,
                shard_size=args.shard_size,
                val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
                seed=args.seed,
            )
        except ShardError as e:
            parser.error(str(e))
        train, val, classes = summary.train_pattern, summary.val_pattern, summary.classes
        counts = (summary.train_count, summary.val_count)
        if summary.ignored_files:
            print(
                f"ignored {len(summary.ignored_files)} non-image file(s), e.g. "
                f"{summary.ignored_files[0]}",
                file=sys.stderr,
            )
    print(f"wrote {counts[0]} train and {counts[1]} val samples to {args.out}")
    print(f'data.train_shards = "{train}"')
    print(f'data.val_shards = "{val}"')
    print(f"data.num_classes = {len(classes)}")
    print("classes (name -> label):")
    for name, label in classes.items():
        print(f"  {label:4d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
