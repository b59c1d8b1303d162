"""Shared fixtures. The expensive 2-rank training run (with its final compile) runs once per
session and every test that needs it reads its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from jobs import launch_env, run_to_end, torchrun_command

ROOT = Path(__file__).resolve().parent.parent

# CI (`.ci/run`, CI=true) runs where `make install` has installed everything the suite needs.
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


def require(condition: bool, reason: str) -> None:
    """For a test (or fixture) that needs something a machine may lack (root and network
    namespaces, the shared data beside the checkout, an optional package): without it, skip
    with `reason` on a developer's machine, and fail under CI=true, where it must be there."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true, yet {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_terminal_summary(terminalreporter) -> None:
    """How many numeric int8 comparisons (compiled against the converted reference) ran, on
    which CPU: they run on every x86 CPU, so the count shows none was skipped."""
    from qatdist.topology import cpu_int8_capabilities

    outcome_of: dict[str, str] = {}  # a test's setup, call and teardown each report
    for outcome in ("passed", "skipped", "failed"):  # a later outcome overrides
        for report in terminalreporter.stats.get(outcome, []):
            if "int8_numeric" in report.keywords and (report.when == "call" or outcome != "passed"):
                outcome_of[report.nodeid] = outcome
    outcomes = {
        name: list(outcome_of.values()).count(name) for name in ("passed", "failed", "skipped")
    }
    caps = cpu_int8_capabilities()
    flags = [name for name, present in caps.items() if present is True]
    terminalreporter.write_line(
        f"int8 numeric comparisons: {outcomes['passed']} passed, {outcomes['failed']} failed, "
        f"{outcomes['skipped']} skipped (CPU int8 features: {', '.join(flags) or 'none'})"
    )


def torchrun(args: list[str], *, nproc: int = 2, cwd: Path, env=None):
    """Run `torchrun --standalone` (rendezvous on a free loopback port) with `args`, waiting
    on its progress (`tests/jobs.py`); the result as `subprocess.run` would return it."""
    command = torchrun_command(args, nproc=nproc)
    job = run_to_end(
        command, Path(tempfile.mkdtemp(prefix="torchrun-logs-")), cwd=cwd, env=launch_env(env)
    )
    return subprocess.CompletedProcess(command, job.proc.returncode, job.stdout, job.stderr)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> dict[str, str]:
    """Small demo shards (32x32, 10 classes): 4 train shards, 2 val shards."""
    from qatdist.data.demo import write_demo_shards

    out = tmp_path_factory.mktemp("shards")
    train, val = write_demo_shards(
        out, train_per_class=16, val_per_class=4, seed=1, image_size=32, shard_size=40
    )
    return {"train_shards": train, "val_shards": val}


def tiny_run_args(shards: dict[str, str], out_dir: Path, *extra: str) -> list[str]:
    """Overrides for a short resnet18 QAT run on the tiny shards."""
    return [
        f"--run.out_dir={out_dir}",
        f"--data.train_shards={shards['train_shards']}",
        f"--data.val_shards={shards['val_shards']}",
        "--data.generate_demo=false",
        "--data.image_size=32",
        "--data.num_workers=1",
        "--train.batch_size=8",
        "--train.epochs=2",
        "--train.steps_per_epoch=4",
        "--train.lr=0.02",
        "--train.log_every_steps=2",
        "--quant.sync_every_steps=3",
        # each QAT switch lands between two log steps (2, 4, 6, 8), so TensorBoard shows it
        "--quant.fake_quant_start_step=2",
        "--quant.observer_freeze_step=4",
        "--quant.bn_freeze_step=6",
        "--train.eval_every_epochs=2",  # one evaluation (at the end) writes the eval/ tags
        "--runtime.latency_batch_size=8",
        "--runtime.latency_iters=3",
        "--quant.ptq_calibration_batches=4",  # the PTQ baseline, cheaply
        *extra,
    ]


@pytest.fixture(scope="session")
def two_rank_run(tiny_shards, tmp_path_factory) -> dict:
    """One real 2-rank gloo training run with the final convert/compile, shared by tests."""
    out_dir = tmp_path_factory.mktemp("run2")
    # Distillation on: the shared run also covers the teacher (tests/test_step.py).
    result = torchrun(tiny_run_args(tiny_shards, out_dir, "--train.distill_weight=0.3"), cwd=ROOT)
    report_path = out_dir / "final" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return {"result": result, "out_dir": out_dir, "report": report}


SHARED = ROOT.parent / "shared"
CAMVID = SHARED / "data" / "camvid"
CAMVID_CLASSES, CAMVID_IGNORE = 11, 11


def require_shared(path: Path) -> None:
    """`require` the shared data at `path` (beside the checkout)."""
    require(path.is_dir(), f"needs the shared data {path} (../shared beside the checkout)")


def downscale_camvid(split: str, count: int, size: tuple[int, int], out: Path) -> None:
    """The first `count` frames of a CamVid split at `size` (width, height) into
    out/images (bilinear) and out/labels (nearest: a label map is never interpolated)."""
    from PIL import Image

    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir(parents=True)
    for image_path in sorted((CAMVID / split / "images").glob("*.jpg"))[:count]:
        label_path = CAMVID / split / "labels" / f"{image_path.stem}.png"
        with Image.open(image_path) as img:
            img.convert("RGB").resize(size, Image.Resampling.BILINEAR).save(
                out / "images" / image_path.name, quality=95
            )
        with Image.open(label_path) as label:
            label.resize(size, Image.Resampling.NEAREST).save(out / "labels" / label_path.name)


@pytest.fixture(scope="session")
def camvid_tiny(tmp_path_factory) -> dict:
    """A downscaled slice of CamVid (8 train, 4 val frames at 64x48) through the segmentation
    mode of scripts/make_shards.py: 2 train shards (one per rank), 1 val shard."""
    from qatdist.data.label_maps import make_segmentation_shards

    require_shared(CAMVID)
    root = tmp_path_factory.mktemp("camvid_tiny")
    patterns = {}
    for split, count, shard_size in (("train", 8, 4), ("val", 4, 4)):
        downscale_camvid(split, count, (64, 48), root / "folders" / split)
        summary = make_segmentation_shards(
            root / "folders" / split / "images",
            root / "folders" / split / "labels",
            root / "shards",
            split=split,
            num_classes=CAMVID_CLASSES,
            ignore_index=CAMVID_IGNORE,
            shard_size=shard_size,
            shuffle=split == "train",
        )
        assert summary.count == count
        patterns[split] = summary.pattern
    return {"train_shards": patterns["train"], "val_shards": patterns["val"], "root": root}
