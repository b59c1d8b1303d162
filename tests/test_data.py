"""Data layer: shard reading, exact per-rank batch counts, determinism, resume, bad input, demo."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from qatdist import config, data
from qatdist.config import ConfigError, DataConfig
from qatdist.data import DataError, demo
from qatdist.tasks.classification import Classification

SIZE = 16
# Labels are unique sample ids so that a batch's labels say exactly which samples it holds.
NUM_IDS = 100_000


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, ids, bad: dict[int, str] | None = None) -> Path:
    """A shard with one sample per id (label = id); `bad` maps an id to 'image' (undecodable
    bytes), 'label' (no .cls member) or 'pickle' (an extra .pyd member that must stay unread)."""
    bad = bad or {}
    with wds.TarWriter(str(path)) as sink:
        for i in ids:
            sample = {"__key__": f"s{i:06d}", "png": _png(i), "cls": str(i)}
            if bad.get(i) == "image":
                sample["png"] = b"definitely not a png"
            elif bad.get(i) == "label":
                del sample["cls"]
            elif bad.get(i) == "pickle":
                sample["pyd"] = pickle.dumps(_Exploding())
            sink.write(sample)
    return path


class _Exploding:
    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise AssertionError("a shard member was unpickled")


def write_shards(folder: Path, sizes: list[int], prefix: str = "train") -> str:
    start = 0
    for i, n in enumerate(sizes):
        write_shard(folder / f"{prefix}-{i:06d}.tar", range(start, start + n))
        start += n
    return str(folder / f"{prefix}-{{000000..{len(sizes) - 1:06d}}}.tar")


def make_cfg(train: str, val: str = "", **kw) -> DataConfig:
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 8)
    return DataConfig(
        train_shards=train, val_shards=val or train, image_size=SIZE, num_classes=NUM_IDS, **kw
    )


def run(cfg: DataConfig, rank: int = 0, world_size: int = 1, **kw) -> list[data.Batch]:
    args = {"batch_size": 4, "steps": 10, "seed": 3, "epoch": 0} | kw
    return list(
        data.train_batches(cfg, Classification(cfg), rank=rank, world_size=world_size, **args)
    )


def assert_same(a: list[data.Batch], b: list[data.Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.target, y.target)
        assert x.skipped == y.skipped


@pytest.fixture()
def uneven(tmp_path: Path) -> str:
    return write_shards(tmp_path, [3, 17, 40])


def test_count_samples_brace_and_glob(uneven: str, tmp_path: Path) -> None:
    assert data.count_samples(uneven, ("cls",)) == 60
    assert data.count_samples(str(tmp_path / "train-*.tar"), ("cls",)) == 60
    with pytest.raises(ConfigError, match="matches no shard files"):
        data.count_samples(str(tmp_path / "nothing-*.tar"), ("cls",))


def test_exact_batches_on_every_rank_for_uneven_shards(uneven: str) -> None:
    cfg = make_cfg(uneven)
    per_rank = [run(cfg, rank=r, world_size=2, steps=9, batch_size=8) for r in range(2)]
    for batches in per_rank:
        assert len(batches) == 9
        for b in batches:
            assert b.images.shape == (8, 3, SIZE, SIZE) and b.images.dtype == torch.float32
            assert b.images.is_contiguous() and b.target.dtype == torch.int64
            assert b.skipped == 0
    ids = [set(torch.cat([b.target for b in batches]).tolist()) for batches in per_rank]
    assert not ids[0] & ids[1], "ranks must read disjoint shards"
    assert ids[0] | ids[1] <= set(range(60))
    # The rank holding fewer samples than 9 * 8 cycled over its shards.
    assert min(len(s) for s in ids) < 72


def test_train_batches_length_and_zero_steps(uneven: str) -> None:
    cfg = make_cfg(uneven)
    assert (
        len(
            data.train_batches(
                cfg,
                Classification(cfg),
                batch_size=2,
                steps=5,
                rank=0,
                world_size=1,
                seed=0,
                epoch=0,
            )
        )
        == 5
    )
    assert run(cfg, steps=4, start_step=4) == []


def test_deterministic_and_resume_equals_tail(uneven: str) -> None:
    cfg = make_cfg(uneven)
    full = run(cfg, steps=12)
    assert_same(full, run(cfg, steps=12))
    for k in (1, 5, 11):
        assert_same(run(cfg, steps=12, start_step=k), full[k:])
    other_epoch = run(cfg, steps=12, epoch=1)
    assert not all(torch.equal(a.target, b.target) for a, b in zip(full, other_epoch))
    # Augmentation is random: the same sample is transformed differently in another epoch.
    assert not torch.equal(full[0].images, other_epoch[0].images)


def test_workers_keep_order_and_resume(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, [9, 14, 5, 12])
    cfg = make_cfg(pattern, num_workers=2)
    full = run(cfg, steps=7)
    assert_same(full, run(cfg, steps=7))
    assert_same(run(cfg, steps=7, start_step=3), full[3:])
    assert [b.images.shape[0] for b in full] == [4] * 7


def test_worker_init_fn_is_passed(uneven: str) -> None:
    cfg = make_cfg(uneven, num_workers=2)
    with pytest.raises(RuntimeError, match="worker init ran"):
        run(cfg, steps=2, worker_init_fn=_failing_init)


def _failing_init(worker_id: int) -> None:
    raise RuntimeError(f"worker init ran for worker {worker_id}")


def test_val_covers_every_sample_once(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, [5, 6, 2], prefix="val")
    cfg = make_cfg(pattern)
    seen = []
    for rank in range(3):
        batches = list(
            data.val_batches(cfg, Classification(cfg), batch_size=2, rank=rank, world_size=3)
        )
        assert all(b.images.shape[1:] == (3, SIZE, SIZE) for b in batches)
        seen += torch.cat([b.target for b in batches]).tolist()
    assert sorted(seen) == list(range(13))
    # More ranks than samples: some ranks get nothing, the rest one small batch.
    counts = [
        sum(
            len(b.target)
            for b in data.val_batches(cfg, Classification(cfg), batch_size=4, rank=r, world_size=20)
        )
        for r in range(20)
    ]
    assert counts == [1] * 13 + [0] * 7
    # Val is deterministic: same images on every call.
    a = next(iter(data.val_batches(cfg, Classification(cfg), batch_size=4, rank=0, world_size=1)))
    b = next(iter(data.val_batches(cfg, Classification(cfg), batch_size=4, rank=0, world_size=1)))
    assert torch.equal(a.images, b.images)


@pytest.fixture()
def bad_shards(tmp_path: Path) -> tuple[str, dict[str, Path]]:
    """Four shards: one with an undecodable image (id 12), one with a missing label (id 25),
    one truncated inside sample id 33, one good."""
    write_shard(tmp_path / "t-0.tar", range(0, 10))
    image = write_shard(tmp_path / "t-1.tar", range(10, 20), bad={12: "image"})
    label = write_shard(tmp_path / "t-2.tar", range(20, 30), bad={25: "label"})
    trunc = write_shard(tmp_path / "t-3.tar", range(30, 40))
    with tarfile.open(trunc) as tar:
        member = tar.getmember("s000033.png")
    trunc.write_bytes(trunc.read_bytes()[: member.offset_data + member.size // 2])
    return str(tmp_path / "t-{0..3}.tar"), {"s000012": image, "s000025": label, "s000033": trunc}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_raise_naming_shard_and_key(bad_shards, num_workers: int) -> None:
    pattern, bad = bad_shards
    for key, path in bad.items():
        cfg = make_cfg(pattern.replace("{0..3}", path.stem[-1]), num_workers=0)
        with pytest.raises(DataError) as err:
            run(cfg, steps=5, batch_size=4)
        assert str(path) in str(err.value) and key in str(err.value)
    if num_workers:
        # Errors in loader worker processes reach the rank with their message.
        cfg = make_cfg(pattern, num_workers=num_workers)
        with pytest.raises(DataError, match=r"shard .*t-\d\.tar.*s0000(12|25|33)"):
            run(cfg, steps=20)


class _StuckDecode(Classification):
    """Classification whose decode never returns: a loader worker that deadlocked."""

    def decode(self, raw):
        threading.Event().wait()


def test_a_stuck_loader_worker_stops_the_rank_with_its_stacks(uneven: str, capfd) -> None:
    cfg = make_cfg(uneven, num_workers=1)
    batches = data.train_batches(
        cfg,
        _StuckDecode(cfg),
        batch_size=4,
        steps=3,
        rank=1,
        world_size=2,
        seed=0,
        epoch=0,
        stall_timeout_s=2.0,
    )
    with pytest.raises(
        DataError,
        match=r"rank 1: the train loader's worker\(s\) \[\d+\] "
        r"delivered no batch for 2 s",
    ):
        next(iter(batches))
    stacks = capfd.readouterr().err
    # The worker's own stack, down to the line where it waits.
    assert "in decode" in stacks and "test_data.py" in stacks, stacks


def test_bad_samples_skipped_and_counted(bad_shards, caplog) -> None:
    pattern, bad = bad_shards
    cfg = make_cfg(pattern, on_error="skip")
    per_rank = [run(cfg, rank=r, world_size=2, steps=12, batch_size=4) for r in range(2)]
    assert [len(b) for b in per_rank] == [12, 12]
    labels = set(torch.cat([b.target for batches in per_rank for b in batches]).tolist())
    assert not labels & {12, 25, 33}
    assert sum(b.skipped for batches in per_rank for b in batches) >= 3
    for key, path in bad.items():
        assert any(str(path) in r.message and key in r.message for r in caplog.records)
    # Resume under 'skip' consumes the same samples as the uninterrupted run.
    for rank in range(2):
        assert_same(run(cfg, rank=rank, world_size=2, steps=12, start_step=5), per_rank[rank][5:])
    val = list(data.val_batches(cfg, Classification(cfg), batch_size=8, rank=0, world_size=1))
    assert sum(len(b.target) for b in val) == 10 + 9 + 9 + 3  # t-3 breaks inside id 33
    assert sum(b.skipped for b in val) == 3


def test_truncated_at_member_boundary_is_detected(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "cut.tar", range(6))
    with tarfile.open(path) as tar:
        member = tar.getmember("s000003.png")  # the last member of sample s000003
    # Cut right after its data blocks: tarfile alone takes this for a complete archive.
    cut = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    path.write_bytes(path.read_bytes()[:cut])
    cfg = make_cfg(str(path))
    with pytest.raises(DataError, match=r"cut\.tar: no end-of-archive block after .*s000003"):
        list(data.val_batches(cfg, Classification(cfg), batch_size=4, rank=0, world_size=1))
    assert data.count_samples(str(path), ("cls",)) == 4


def test_members_are_never_unpickled(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "p.tar", range(4), bad={1: "pickle"})
    cfg = make_cfg(str(path))
    batches = list(data.val_batches(cfg, Classification(cfg), batch_size=4, rank=0, world_size=1))
    assert batches[0].target.tolist() == [0, 1, 2, 3]


def test_pipe_refused_unless_allowed(tmp_path: Path) -> None:
    write_shards(tmp_path, [3, 4])
    pipe = f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar"
    with pytest.raises(ConfigError, match="data.train_shards.*allow_pipe"):
        data.check_shards(make_cfg(pipe, str(tmp_path / "train-000000.tar")), world_size=1)
    with pytest.raises(ConfigError, match="allow_pipe"):
        run(make_cfg(pipe))
    with pytest.raises(ConfigError, match="allow_pipe"):
        data.count_samples(pipe, ("cls",))
    cfg = make_cfg(pipe, allow_pipe=True)
    val = list(data.val_batches(cfg, Classification(cfg), batch_size=8, rank=0, world_size=1))
    assert sorted(torch.cat([b.target for b in val]).tolist()) == list(range(7))


def test_check_shards_errors_name_key_pattern_and_counts(uneven: str, tmp_path: Path) -> None:
    data.check_shards(make_cfg(uneven, num_workers=1), world_size=3)
    with pytest.raises(ConfigError, match=r"data.train_shards: .*train-.* matches 3 shard.*= 4"):
        data.check_shards(make_cfg(uneven, num_workers=2), world_size=2)
    with pytest.raises(ConfigError, match="data.train_shards"):
        run(make_cfg(uneven, num_workers=2), world_size=2)
    missing = str(tmp_path / "val-{0..3}.tar")
    with pytest.raises(ConfigError, match=r"data.val_shards: .*val-\{0\.\.3\}.* matches no"):
        data.check_shards(make_cfg(uneven, missing), world_size=1)


def test_demo_is_deterministic_with_ten_classes() -> None:
    a = list(demo.generate(3, seed=1, image_size=32))
    b = list(demo.generate(3, seed=1, image_size=32))
    c = list(demo.generate(3, seed=2, image_size=32))
    val = list(demo.generate(3, seed=1, image_size=32, split="val"))
    assert len(a) == 30 and sorted({label for _, label in a}) == list(range(10))
    assert all(img.mode == "RGB" and img.size == (32, 32) for img, _ in a)
    assert [np.asarray(i).tobytes() for i, _ in a] == [np.asarray(i).tobytes() for i, _ in b]
    assert np.asarray(a[0][0]).tobytes() != np.asarray(c[0][0]).tobytes()
    assert np.asarray(a[0][0]).tobytes() != np.asarray(val[0][0]).tobytes()


def test_demo_mean_colour_does_not_identify_the_class() -> None:
    images = list(demo.generate(30, seed=0, image_size=32))
    means = np.array([np.asarray(img, np.float32).mean(axis=(0, 1)) for img, _ in images])
    labels = np.array([label for _, label in images])
    class_means = np.array([means[labels == c].mean(axis=0) for c in range(10)])
    # Class-average colours sit close together compared with the spread between images.
    assert class_means.std(axis=0).max() < 0.35 * means.std(axis=0).min()


def demo_cfg(**kw) -> DataConfig:
    """The demo's own patterns (relative to the working directory), small and fast."""
    args = {
        "train_shards": demo.DEMO_SHARDS["train_shards"],
        "val_shards": demo.DEMO_SHARDS["val_shards"],
        "image_size": SIZE,
        "generate_demo": True,
        "demo_train_per_class": 2,
        "demo_val_per_class": 1,
    }
    return DataConfig(**(args | kw))


def test_ensure_demo_shards_writes_once_and_matches(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = demo_cfg()
    folder = tmp_path / "data" / "demo"
    assert demo.ensure_demo_shards(cfg, seed=0)
    assert data.count_samples(cfg.train_shards, ("cls",)) == 20
    assert data.count_samples(cfg.val_shards, ("cls",)) == 10
    assert len(list(folder.glob("train-*.tar"))) == 8 and len(list(folder.glob("val-*.tar"))) == 2
    assert not any(p.name.startswith(".") for p in folder.iterdir())
    assert not demo.ensure_demo_shards(cfg, seed=0)
    data.check_shards(cfg, world_size=2)
    labels = torch.cat(
        [
            b.target
            for b in data.val_batches(cfg, Classification(cfg), batch_size=4, rank=0, world_size=1)
        ]
    )
    assert sorted(labels.tolist()) == list(range(10))
    # Only the split with a missing file is rewritten.
    (folder / "val-000001.tar").unlink()
    train_mtime = (folder / "train-000000.tar").stat().st_mtime_ns
    assert demo.ensure_demo_shards(cfg, seed=0)
    assert data.count_samples(cfg.val_shards, ("cls",)) == 10
    assert (folder / "train-000000.tar").stat().st_mtime_ns == train_mtime
    for p in folder.glob("val-*.tar"):
        p.unlink()
    assert not demo.ensure_demo_shards(demo_cfg(generate_demo=False), seed=0)
    assert not list(folder.glob("val-*.tar"))


def test_demo_generator_never_writes_to_a_pattern_the_user_typed(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    typed = str(tmp_path / "mine" / "train-{000000..000007}.tar")
    relative_lookalike = "data/demo/train-{000000..000003}.tar"
    for pattern in (typed, relative_lookalike, "data/demo/train-*.tar"):
        cfg = demo_cfg(train_shards=pattern, val_shards=pattern.replace("train", "val"))
        assert not demo.ensure_demo_shards(cfg, seed=0)
        with pytest.raises(ConfigError, match="data.train_shards: .*matches no shard files"):
            data.check_shards(cfg, world_size=1)
    assert list(tmp_path.iterdir()) == []


def test_missing_shards_are_a_config_error_naming_the_pattern(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "nowhere" / "x-{000..003}.tar")
    with pytest.raises(ConfigError, match=r"data.train_shards: .*nowhere/x-\{000\.\.003\}"):
        config.load(None, {"data": {"train_shards": missing}})  # default config: generate_demo on
    config.load(None, {})  # the demo's own patterns may be missing: the run writes them
    with pytest.raises(ConfigError, match=r"data.train_shards: .*generate_demo=true writes"):
        config.load(None, {"data": {"generate_demo": False}})
    assert list(tmp_path.iterdir()) == []


def test_train_with_missing_shard_folder_fails_before_any_process_group(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    pattern = f"{missing}/x-{{000..003}}.tar"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qatdist.train",
            f"--data.train_shards={pattern}",
            f"--run.out_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert f"data.train_shards: expected a pattern matching shard files, got '{pattern}'" in (
        result.stderr
    )
    assert "process group" not in result.stderr.lower()
    assert list(tmp_path.iterdir()) == []  # no shard folder, no demo, no run folder
