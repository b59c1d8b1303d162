"""Write webdataset shards for qatdist from an ImageFolder tree, a folder of images beside a
folder of label maps (segmentation), or the built-in demo.

  python scripts/make_shards.py --image-folder ~/datasets/flowers --out data/flowers
  python scripts/make_shards.py --demo --out data/demo
  python scripts/make_shards.py --seg-images camvid/train/images --seg-labels \\
      camvid/train/labels --split train --num-classes 11 --ignore-index 11 --out data/camvid

Prints the patterns to pass as data.train_shards / data.val_shards and the class -> label map
(also written to <out>/classes.json); for segmentation, one split per call and the keys to set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qatdist.data import demo
from qatdist.data.label_maps import make_segmentation_shards
from qatdist.data.shards import ShardError, make_image_folder_shards

DEMO_FLAGS = ("train_per_class", "val_per_class", "image_size")
SEGMENTATION_FLAGS = ("seg_labels", "split", "num_classes", "ignore_index")


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
    source.add_argument(
        "--seg-images",
        type=Path,
        metavar="DIR",
        help="Segmentation: folder of images, each paired by file stem with a label map in "
        "--seg-labels; writes <split>-NNNNNN.tar shards of <key>.<image ext> + <key>.seg.png.",
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
    parser.add_argument(
        "--seg-labels",
        type=Path,
        default=None,
        metavar="DIR",
        help="Segmentation: folder of label maps (single-channel PNG, one class index per "
        "pixel), file stems equal to the images'.",
    )
    parser.add_argument(
        "--split",
        default=None,
        metavar="NAME",
        help="Segmentation: shard name prefix, e.g. train or val; 'train' shuffles the frames "
        "across shards (by --seed), any other keeps the sorted order.",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        metavar="N",
        help="Segmentation: classes 0..N-1 (data.num_classes).",
    )
    parser.add_argument(
        "--ignore-index",
        type=int,
        default=None,
        metavar="K",
        help="Segmentation: the label value of unlabelled pixels (task.ignore_index; 255).",
    )
    return parser


def _segmentation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.seg_labels is None or args.split is None or args.num_classes is None:
        parser.error("--seg-images needs --seg-labels, --split and --num-classes")
    if args.val_fraction is not None:
        parser.error("--val-fraction applies to --image-folder, not --seg-images")
    ignore_index = 255 if args.ignore_index is None else args.ignore_index
    try:
        summary = make_segmentation_shards(
            args.seg_images,
            args.seg_labels,
            args.out,
            split=args.split,
            num_classes=args.num_classes,
            ignore_index=ignore_index,
            shard_size=args.shard_size,
            shuffle=args.split == "train",
            seed=args.seed,
        )
    except ShardError as e:
        parser.error(str(e))
    if summary.ignored_files:
        print(
            f"ignored {len(summary.ignored_files)} non-image file(s), e.g. "
            f"{summary.ignored_files[0]}",
            file=sys.stderr,
        )
    key = "train_shards" if args.split == "train" else "val_shards"
    print(f"wrote {summary.count} {args.split} samples (image + label map) to {args.out}")
    print(f'data.{key} = "{summary.pattern}"')
    print(f"data.num_classes = {args.num_classes}")
    print(f"task.ignore_index = {ignore_index}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.seg_images is not None:
        given = [f"--{f.replace('_', '-')}" for f in DEMO_FLAGS if getattr(args, f) is not None]
        if given:
            parser.error(f"{', '.join(given)} only apply to --demo")
        return _segmentation(parser, args)
    given = [f"--{f.replace('_', '-')}" for f in SEGMENTATION_FLAGS if getattr(args, f) is not None]
    if given:
        parser.error(f"{', '.join(given)} only apply to --seg-images")
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
