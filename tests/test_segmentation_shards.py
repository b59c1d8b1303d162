"""Segmentation shards: a folder of images beside a folder of label maps -> shards of (image,
`.seg.png` label map) pairs (`qatdist.data.label_maps`, `scripts/make_shards.py --seg-images`),
every bad input refused before anything is written, and the reader's errors naming shard and
key."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CAMVID_CLASSES, CAMVID_IGNORE
from PIL import Image

from qatdist.data.label_maps import (
    LABEL_MAP_EXTENSION,
    decode_segmentation_sample,
    make_segmentation_shards,
)
from qatdist.data.shards import DataError, ShardError, count_shard, read_shard

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_shards.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_shards_seg", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_shards = _load_script()


def labels_of(index: int, size=(10, 6)) -> np.ndarray:
    """A label map whose values identify the frame: column c holds (c + index) % 4, the last
    row the ignore index 9."""
    w, h = size
    labels = np.tile((np.arange(w) + index) % 4, (h, 1)).astype(np.uint8)
    labels[-1] = 9
    return labels


def write_pairs(root: Path, count: int = 3, size=(10, 6)) -> tuple[Path, Path]:
    """`count` pairs frame<i>.png / frame<i>.png (RGB image whose red channel is i * 40)."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", size, (i * 40, 0, 0)).save(images / f"frame{i}.png")
        Image.fromarray(labels_of(i, size), "L").save(labels / f"frame{i}.png")
    return images, labels


def make(root: Path, **overrides):
    args = dict(split="val", num_classes=4, ignore_index=9, shard_size=2)
    args.update(overrides)
    return make_segmentation_shards(root / "images", root / "labels", root / "out", **args)


def samples(pattern_dir: Path, split: str = "val") -> list:
    out = []
    for shard in sorted(pattern_dir.glob(f"{split}-*.tar")):
        out.extend(read_shard(str(shard), raise_errors=True))
    return out


def test_pairs_written_by_stem_and_read_back_losslessly(tmp_path: Path) -> None:
    write_pairs(tmp_path, count=3)
    (tmp_path / "labels" / "README.txt").write_text("class list")
    summary = make(tmp_path)
    assert summary.count == 3
    assert summary.pattern == str(tmp_path / "out" / "val-{000000..000001}.tar")
    assert summary.ignored_files == [str(tmp_path / "labels" / "README.txt")]
    raws = samples(tmp_path / "out")
    assert [r.key for r in raws] == ["val000000_frame0", "val000001_frame1", "val000002_frame2"]
    for i, raw in enumerate(raws):
        assert set(raw.files) == {"png", LABEL_MAP_EXTENSION}
        image, labels = decode_segmentation_sample(raw, num_classes=4, ignore_index=9)
        assert image.getpixel((0, 0)) == (i * 40, 0, 0)
        assert labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, labels_of(i))
    # Counted by the task's members: the label map is never taken for the image.
    counts = [
        count_shard(str(p), (LABEL_MAP_EXTENSION,))
        for p in sorted((tmp_path / "out").glob("*.tar"))
    ]
    assert counts == [1, 2]  # spread evenly
    assert count_shard(str(tmp_path / "out" / "val-000000.tar"), ("cls",)) == 0  # no .cls


def test_train_split_shuffles_by_seed(tmp_path: Path) -> None:
    write_pairs(tmp_path, count=6)
    keys = {}
    for seed in (0, 1):
        make(tmp_path, split="train", shuffle=True, seed=seed, shard_size=6)
        keys[seed] = [r.key.split("_", 1)[1] for r in samples(tmp_path / "out", "train")]
    assert sorted(keys[0]) == [f"frame{i}" for i in range(6)]
    assert keys[0] != keys[1] and sorted(keys[0]) == sorted(keys[1])


def _break(root: Path, case: str) -> str:
    """Spoil one input of a good folder pair; the file the error must name."""
    images, labels = root / "images", root / "labels"
    if case == "image without label":
        (labels / "frame1.png").unlink()
        return str(images / "frame1.png")
    if case == "label without image":
        (images / "frame2.png").unlink()
        return str(labels / "frame2.png")
    if case == "sizes differ":
        Image.fromarray(labels_of(0, (10, 7)), "L").save(labels / "frame0.png")
        return str(labels / "frame0.png")
    if case == "bad label value":
        bad = labels_of(1)
        bad[0, 0] = 7  # neither a class (0..3) nor the ignore index (9)
        Image.fromarray(bad, "L").save(labels / "frame1.png")
        return str(labels / "frame1.png")
    if case == "unreadable image":
        (images / "frame2.png").write_bytes(b"\x89PNG not really")
        return str(images / "frame2.png")
    if case == "unreadable label":
        (labels / "frame0.png").write_bytes(b"garbage")
        return str(labels / "frame0.png")
    if case == "colour label":
        Image.new("RGB", (10, 6), (1, 2, 3)).save(labels / "frame0.png")
        return str(labels / "frame0.png")
    raise AssertionError(case)


CASES = {
    "image without label": "has no label map",
    "label without image": "has no image",
    "sizes differ": "is 10x7 but its image",
    "bad label value": "label value(s) 7 are neither a class (0..3) nor the ignore index (9)",
    "unreadable image": "unreadable image",
    "unreadable label": "unreadable label map",
    "colour label": "got mode RGB",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_named_error_and_writes_nothing(tmp_path: Path, case: str) -> None:
    write_pairs(tmp_path, count=3)
    culprit = _break(tmp_path, case)
    with pytest.raises(ShardError) as error:
        make(tmp_path)
    assert CASES[case] in str(error.value)
    assert culprit in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["image without label", "bad label value"])
def test_cli_bad_input_exits_2_naming_the_file(tmp_path: Path, capsys, case: str) -> None:
    write_pairs(tmp_path, count=3)
    culprit = _break(tmp_path, case)
    argv = [
        "--seg-images", str(tmp_path / "images"), "--seg-labels", str(tmp_path / "labels"),
        "--split", "val", "--num-classes", "4", "--ignore-index", "9",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        make_shards.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert culprit in err and CASES[case] in err
    assert not (tmp_path / "out").exists()


def test_cli_segmentation_prints_the_keys(tmp_path: Path, capsys) -> None:
    write_pairs(tmp_path, count=2)
    argv = [
        "--seg-images", str(tmp_path / "images"), "--seg-labels", str(tmp_path / "labels"),
        "--split", "train", "--num-classes", "4", "--ignore-index", "9",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert make_shards.main(argv) == 0
    printed = capsys.readouterr().out
    assert f'data.train_shards = "{tmp_path / "out" / "train-000000.tar"}"' in printed
    assert "data.num_classes = 4" in printed and "task.ignore_index = 9" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seg-images", "{tmp}", "--out", "{tmp}/o"], "needs --seg-labels"),
        (["--demo", "--out", "{tmp}/o", "--split", "val"], "only apply to --seg-images"),
        (
            [
                "--seg-images",
                "{tmp}",
                "--seg-labels",
                "{tmp}",
                "--split",
                "v",
                "--num-classes",
                "3",
                "--image-size",
                "8",
                "--out",
                "{tmp}/o",
            ],
            "only apply to --demo",
        ),  # fmt: skip
    ],
)
def test_cli_segmentation_flag_errors(tmp_path: Path, capsys, args, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        make_shards.main([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _shard_with(path: Path, members: dict[str, bytes], key: str = "k0") -> str:
    with tarfile.open(path, "w") as tar:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"jpg": "image"}, "missing label map (.seg.png member)"),
        ({"seg.png": "labels"}, "no image member"),
        ({"png": "image", "seg.png": b"junk"}, "cannot read .seg.png label map"),
        ({"png": "image", "seg.png": "small labels"}, "label map is 10x5, image is 10x6"),
        ({"png": "image", "seg.png": "bad labels"}, "label value(s) 200 are neither"),
        ({"png": b"junk", "seg.png": "labels"}, "cannot decode .png image"),
    ],
)
def test_reader_errors_name_shard_and_key(tmp_path: Path, members: dict, message: str) -> None:
    bad = labels_of(0)
    bad[2, 3] = 200
    made = {
        "image": _png(np.zeros((6, 10, 3), np.uint8), "RGB"),
        "labels": _png(labels_of(0), "L"),
        "small labels": _png(labels_of(0, (10, 5)), "L"),
        "bad labels": _png(bad, "L"),
    }
    members = {ext: made.get(v, v) if isinstance(v, str) else v for ext, v in members.items()}
    members = {"jpg" if ext == "jpg" else ext: v for ext, v in members.items()}
    shard = _shard_with(tmp_path / "s.tar", members)
    raw = next(read_shard(shard, raise_errors=True))
    with pytest.raises(DataError) as error:
        decode_segmentation_sample(raw, num_classes=4, ignore_index=9)
    assert message in str(error.value)
    assert shard in str(error.value) and "'k0'" in str(error.value)


def test_camvid_slice_through_make_shards(camvid_tiny: dict) -> None:
    """The shared CamVid slice: every frame's pair decodes at the downscaled size, with values
    among the 11 classes and the ignore index."""
    shards = sorted(Path(camvid_tiny["root"], "shards").glob("*.tar"))
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert [count_shard(str(p), (LABEL_MAP_EXTENSION,)) for p in shards] == [4, 4, 4]
    seen = set()
    for shard in shards:
        for raw in read_shard(str(shard), raise_errors=True):
            image, labels = decode_segmentation_sample(raw, CAMVID_CLASSES, CAMVID_IGNORE)
            assert image.size == (64, 48) and labels.shape == (48, 64)
            seen |= set(np.unique(labels).tolist())
    assert seen <= set(range(12)) and len(seen) >= 6
