"""The fine-tuning path on real inputs: the published CIFAR-10 ResNet-20 (its own resnet.py and
DataParallel checkpoint) on a slice of the shared CIFAR-10 shards, 2 ranks over gloo. The
loaded model scores what a plain eager evaluation of the same weights scores; PTQ and QAT int8
land within 2 points of it. Skips when ../shared (beside the checkout) is absent."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, require, torchrun
from PIL import Image

from qatdist.config.factories import load_factory

SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "data" / "cifar10"
RESNET20 = SHARED / "models" / "resnet20_cifar10"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(autouse=True)
def _shared_data():
    require(
        CIFAR.is_dir() and RESNET20.is_dir(),
        f"needs the shared CIFAR-10 shards and ResNet-20 in {SHARED} (beside the checkout)",
    )


def _samples(shard: Path, every: int) -> list[tuple[str, bytes, int]]:
    """Every `every`-th (key, jpeg bytes, label) of a shard (the shards are in class order)."""
    files: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            files.setdefault(key, {})[ext] = tar.extractfile(member).read()
    keys = sorted(files)[::every]
    return [(k, files[k]["jpg"], int(files[k]["cls"])) for k in keys]


def _write_shards(samples: list, folder: Path, prefix: str, count: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        with tarfile.open(folder / f"{prefix}-{index:06d}.tar", "w") as tar:
            for key, jpeg, label in samples[index::count]:
                for ext, data in (("jpg", jpeg), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{prefix}-{{{0:06d}..{count - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def cifar_slice(tmp_path_factory) -> dict:
    """2,000 train images (every 25th) and 1,000 test images (every 10th: all classes), as 2
    shards each, one per rank."""
    folder = tmp_path_factory.mktemp("cifar_slice")
    train = [s for i in range(10) for s in _samples(CIFAR / f"train-{i:06d}.tar.gz", 25)]
    val = [s for i in range(2) for s in _samples(CIFAR / f"val-{i:06d}.tar.gz", 10)]
    assert (len(train), len(val)) == (2000, 1000)
    assert len({label for _, _, label in val}) == 10
    return {
        "train": _write_shards(train, folder, "train", 2),
        "val": _write_shards(val, folder, "val", 2),
        "val_samples": val,
    }


def _eager_top1(samples: list) -> float:
    """The published model and checkpoint evaluated the plain way: PIL decode, /255, ImageNet
    mean/std, the author's module with the `module.` prefix removed by hand."""
    model = load_factory(f"{RESNET20 / 'resnet.py'}:resnet20", "model.name")()
    checkpoint = torch.load(RESNET20 / "resnet20-12fca82f.th", map_location="cpu")
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    model.load_state_dict(state)
    model.eval()
    pixels = [np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for _, jpeg, _ in samples]
    images = (np.stack(pixels) / 255 - MEAN) / STD
    batch = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))
    labels = torch.tensor([label for _, _, label in samples])
    with torch.no_grad():
        return (model(batch).argmax(1) == labels).float().mean().item()


@pytest.fixture(scope="module")
def finetuned(cifar_slice, tmp_path_factory) -> dict:
    """One epoch (15 steps of 2 x 64) of QAT fine-tuning, 2 ranks, from the published weights."""
    out_dir = tmp_path_factory.mktemp("cifar_run")
    result = torchrun(
        [
            "--config=configs/finetune_cifar10.toml",
            f"--run.out_dir={out_dir}",
            f"--data.train_shards={cifar_slice['train']}",
            f"--data.val_shards={cifar_slice['val']}",
            "--train.epochs=1",
            "--quant.ptq_calibration_batches=8",
            "--quant.sync_every_steps=5",
            "--runtime.compile_final=false",
            "--runtime.latency_iters=2",
            "--log.tensorboard=false",
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out_dir / "final" / "report.json").read_text())
    return {"report": report, "stderr": result.stderr}


def test_loaded_model_scores_what_a_plain_eager_evaluation_scores(cifar_slice, finetuned):
    report = finetuned["report"]
    assert report["start_fp32_top1"] == pytest.approx(_eager_top1(cifar_slice["val_samples"]))
    assert report["start_fp32_top1"] > 0.6  # a trained model on real data, not chance (0.1)
    source = report["weights_source"]
    assert (source["nesting_key"], source["prefix_stripped"]) == ("state_dict", "module.")
    assert source["sha256"].startswith("12fca82f")


def test_ptq_and_qat_int8_land_within_two_points_of_the_loaded_model(finetuned):
    report = finetuned["report"]
    assert abs(report["ptq_int8_top1"] - report["start_fp32_top1"]) <= 0.02, report
    assert abs(report["int8_top1"] - report["start_fp32_top1"]) <= 0.02, report
    assert report["world_size"] == 2
    assert report["rank_state_sha256"][0] == report["rank_state_sha256"][1]
    assert report["observer_sync_max_divergence_after"] == 0
