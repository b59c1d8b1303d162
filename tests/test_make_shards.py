"""ImageFolder -> shards (qatdist.data.shards) and the scripts/make_shards.py command line."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qatdist import data
from qatdist.config import DataConfig
from qatdist.data import demo
from qatdist.data.shards import ShardError, make_image_folder_shards
from qatdist.tasks.classification import Classification

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_shards.py"
COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".tga": "TGA"}


def _load_script():
    spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_shards = _load_script()


def write_tree(root: Path, per_class: int, suffixes=(".png", ".jpg", ".bmp", ".tga")) -> None:
    """Class folders of solid-colour 20x12 images (colour identifies the class)."""
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            suffix = suffixes[i % len(suffixes)]
            Image.new("RGB", (20, 12), colour).save(
                root / name / f"img.{i}{suffix}", FORMATS[suffix]
            )


def read_back(pattern: str) -> list[tuple[int, tuple[float, float, float]]]:
    """(label, mean normalised RGB) of every sample, via the data layer's val path."""
    cfg = DataConfig(train_shards=pattern, val_shards=pattern, image_size=16, num_classes=3)
    out = []
    for batch in data.val_batches(cfg, Classification(cfg), batch_size=8, rank=0, world_size=1):
        for image, label in zip(batch.images, batch.target):
            out.append((int(label), tuple(image.mean(dim=(1, 2)).tolist())))
    return out


def assert_labels_match_colours(samples) -> None:
    """Each label's images have its class colour: the brightest channel is the label's."""
    for label, mean in samples:
        assert int(np.argmax(mean)) == label


def test_image_folder_split_by_fraction(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree", per_class=10)
    (tmp_path / "tree" / "dog" / "notes.txt").write_text("not an image")
    summary = make_image_folder_shards(
        tmp_path / "tree", tmp_path / "out", shard_size=7, val_fraction=0.2, seed=1
    )
    assert summary.classes == {"cat": 0, "dog": 1, "emu": 2}
    assert (summary.train_count, summary.val_count) == (24, 6)
    assert summary.ignored_files == [str(tmp_path / "tree" / "dog" / "notes.txt")]
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == summary.classes
    assert summary.train_pattern == str(tmp_path / "out" / "train-{000000..000003}.tar")
    assert data.count_samples(summary.train_pattern, ("cls",)) == 24
    assert data.count_samples(summary.val_pattern, ("cls",)) == 6
    train, val = read_back(summary.train_pattern), read_back(summary.val_pattern)
    assert sorted(label for label, _ in val) == [0, 0, 1, 1, 2, 2]
    assert sorted(label for label, _ in train) == [0] * 8 + [1] * 8 + [2] * 8
    assert_labels_match_colours(train + val)
    # Original bytes and extension are kept where the reader knows it; TGA is re-encoded.
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        exts = {Path(n).suffix for n in tar.getnames()}
    assert exts <= {".png", ".jpg", ".bmp", ".cls"} and ".cls" in exts
    # The split is deterministic in the seed.
    again = make_image_folder_shards(
        tmp_path / "tree", tmp_path / "out2", shard_size=7, val_fraction=0.2, seed=1
    )
    assert read_back(again.val_pattern) == read_back(summary.val_pattern)


def test_image_folder_keeps_train_val_subtrees(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree" / "train", per_class=4, suffixes=(".png",))
    write_tree(tmp_path / "tree" / "val", per_class=2, suffixes=(".jpg",))
    summary = make_image_folder_shards(tmp_path / "tree", tmp_path / "out", shard_size=100)
    assert (summary.train_count, summary.val_count) == (12, 6)
    assert summary.val_pattern == str(tmp_path / "out" / "val-000000.tar")
    val = read_back(summary.val_pattern)
    assert sorted(label for label, _ in val) == [0, 0, 1, 1, 2, 2]
    assert_labels_match_colours(val + read_back(summary.train_pattern))


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="not found"):
        make_image_folder_shards(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no class sub-folders"):
        make_image_folder_shards(tmp_path / "empty", tmp_path / "out")
    write_tree(tmp_path / "tree", per_class=2, suffixes=(".png",))
    broken = tmp_path / "tree" / "dog" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ShardError, match="broken.jpg"):
        make_image_folder_shards(tmp_path / "tree", tmp_path / "out")


def test_cli_image_folder_prints_patterns(tmp_path: Path, capsys) -> None:
    write_tree(tmp_path / "tree", per_class=3, suffixes=(".png",))
    out = tmp_path / "out"
    assert make_shards.main(["--image-folder", str(tmp_path / "tree"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f'data.train_shards = "{out}/train-000000.tar"' in printed
    assert f'data.val_shards = "{out}/val-000000.tar"' in printed
    assert "0  cat" in printed and "2  emu" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image-folder", "{tmp}/missing", "--out", "{tmp}/o"], "image folder not found"),
        (["--image-folder", "{tmp}", "--out", "{tmp}/o", "--image-size", "32"], "only apply"),
        (["--demo", "--out", "{tmp}/o", "--val-fraction", "0.2"], "--val-fraction"),
        (["--out", "{tmp}/o"], "one of the arguments"),
    ],
)
def test_cli_errors_exit_2(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        make_shards.main([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_demo_and_help(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    args = ["--demo", "--out", str(out), "--train-per-class", "3", "--val-per-class", "1"]
    assert make_shards.main([*args, "--image-size", "16", "--shard-size", "10"]) == 0
    printed = capsys.readouterr().out
    assert f'data.train_shards = "{out}/train-{{000000..000002}}.tar"' in printed
    assert data.count_samples(str(out / "train-*.tar"), ("cls",)) == 30
    assert json.loads((out / "classes.json").read_text())["disk-stripes"] == 0
    val = str(out / "val-000000.tar")
    cfg = DataConfig(train_shards=val, val_shards=val, image_size=16)
    labels = torch.cat(
        [
            b.target
            for b in data.val_batches(cfg, Classification(cfg), batch_size=4, rank=0, world_size=1)
        ]
    )
    assert sorted(labels.tolist()) == list(range(demo.NUM_CLASSES))
    with pytest.raises(SystemExit) as exit_info:
        make_shards.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--image-folder", "--demo", "--out", "--shard-size", "--val-fraction", "--seed",
                 "--train-per-class", "--val-per-class", "--image-size"):  # fmt: skip
        assert flag in help_text
