"""Checkpoints: round trips, atomic writes under SIGKILL, pruning, corruption and unsafe files,
world-size checks, and a real 2-rank gloo save."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qatdist.config import CheckpointConfig
from qatdist.run.checkpoint import (
    Checkpointer,
    CheckpointError,
    capture_rng_state,
    find_complete,
    read_checkpoint,
    read_model_state,
    restore_rng_state,
)

ROOT = Path(__file__).resolve().parent.parent


def _lr_lambda(step: int, *, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup)


def tiny_training(seed: int):
    """A small model, SGD with momentum and a LambdaLR, each stepped twice."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(_lr_lambda, warmup=5)
    )
    for _ in range(2):
        train_step(model, optimizer, scheduler)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> None:
    """One step on a batch drawn from the torch RNG, plus numpy and python draws, so every
    generator's state shows in the result."""
    x = torch.randn(5, 4) * float(np.random.rand() + random.random())
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def parts_of(model, optimizer, scheduler, step: int) -> dict[str, dict]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "train_state": {
            "step": step,
            "epoch": 0,
            "phase": {"fake_quant_on": True, "observers_frozen": False, "bn_frozen": False},
            "data_position": step * 5,
            "config": {"train": {"lr": 0.1, "seed": 0}, "quant": {"fp32_module_names": []}},
        },
    }


def checkpointer(out_dir: Path, keep_last: int = 2, **kw) -> Checkpointer:
    ranks = {"rank": 0, "world_size": 1} | kw
    return Checkpointer(out_dir, CheckpointConfig(keep_last=keep_last), **ranks)


def save_tiny(ck: Checkpointer, step: int, seed: int = 0) -> Path:
    return ck.save(step, parts_of(*tiny_training(seed), step=step))


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def rewrite_with_manifest(folder: Path, name: str, data: bytes) -> None:
    """Replace one file and update the manifest to match, as an attacker could."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    np.random.seed(1)
    random.seed(1)
    model, optimizer, scheduler = tiny_training(seed=1)
    folder = checkpointer(tmp_path).save(2, parts_of(model, optimizer, scheduler, step=2))
    assert folder == tmp_path / "checkpoints" / "step-2"
    train_step(model, optimizer, scheduler)
    expected_state = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draws = draws()

    model2, optimizer2, scheduler2 = tiny_training(seed=7)  # different weights, RNG, lr step
    np.random.seed(7)
    random.seed(7)
    loaded = checkpointer(tmp_path).load(folder)
    assert set(loaded) == {"model", "optimizer", "scheduler", "train_state", "rng"}
    model2.load_state_dict(loaded["model"])
    optimizer2.load_state_dict(loaded["optimizer"])
    scheduler2.load_state_dict(loaded["scheduler"])
    restore_rng_state(loaded["rng"])
    assert loaded["train_state"]["step"] == 2
    assert loaded["train_state"]["phase"]["fake_quant_on"] is True

    train_step(model2, optimizer2, scheduler2)
    for key, value in model2.state_dict().items():
        torch.testing.assert_close(value, expected_state[key], rtol=0, atol=0)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert draws() == expected_draws


def test_rng_state_round_trip():
    state = capture_rng_state()
    first = draws()
    restore_rng_state(state)
    assert draws() == first
    with pytest.raises(CheckpointError, match="malformed RNG state"):
        restore_rng_state({"torch": torch.zeros(3)})


def test_every_file_is_plain_and_weights_only(tmp_path):
    folder = save_tiny(checkpointer(tmp_path), 3)
    model_state = torch.load(folder / "model.pt", weights_only=True)
    assert type(model_state) in (dict, type(torch.nn.Linear(1, 1).state_dict()))
    assert model_state and all(
        isinstance(k, str) and type(v) is torch.Tensor for k, v in model_state.items()
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 1
    names = {"model.pt", "optimizer.pt", "scheduler.pt", "train_state.pt", "rng-rank0.pt"}
    assert set(manifest["files"]) == names
    assert {p.name for p in folder.iterdir()} == names | {"manifest.json"}
    for name in names:
        assert isinstance(torch.load(folder / name, weights_only=True), dict)


def test_unstorable_value_is_refused_at_save(tmp_path):
    ck = checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"train_state\['when'\]"):
        ck.save(1, {"train_state": {"when": Path("x")}})
    assert ck.latest() is None
    assert not (tmp_path / "checkpoints" / "step-1").exists()


def test_keep_last_prunes_oldest_and_existing_step_is_a_no_op(tmp_path):
    ck = checkpointer(tmp_path, keep_last=2)
    for step in range(1, 5):
        save_tiny(ck, step, seed=step)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-4"]
    assert ck.latest() == root / "step-4"

    before = (root / "step-4" / "model.pt").read_bytes()
    assert save_tiny(ck, 4, seed=99) == root / "step-4"
    assert (root / "step-4" / "model.pt").read_bytes() == before


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    from qatdist.run.checkpoint import Checkpointer
    from qatdist.config import CheckpointConfig

    out_dir, kill_at = Path(sys.argv[1]), sys.argv[2]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "after_first_file":
        real_save = torch.save

        def save_then_die(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            f.flush()
            die()

        torch.save = save_then_die
    else:
        os.rename = die
    ck = Checkpointer(out_dir, CheckpointConfig(keep_last=2), rank=0, world_size=1)
    big = {f"layer{i}.weight": torch.randn(256, 256) for i in range(4)}
    ck.save(2, {"model": big, "optimizer": {"state": {}, "param_groups": []}})
    print("save returned", flush=True)
    """
)


@pytest.mark.parametrize("kill_at", ["after_first_file", "before_rename"])
def test_writer_killed_mid_save_leaves_previous_checkpoint(tmp_path, kill_at):
    ck = checkpointer(tmp_path)
    first = save_tiny(ck, 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path), kill_at],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    root = tmp_path / "checkpoints"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp-step-2-")]
    assert len(leftovers) == 1 and any((root / leftovers[0]).iterdir())
    assert not (root / "step-2").exists()
    assert ck.latest() == first

    restarted = checkpointer(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == sorted(["step-1", *leftovers])  # untouched
    checkpointer(tmp_path, rank=1, world_size=2).remove_leftovers()  # not rank 0: a no-op
    assert sorted(p.name for p in root.iterdir()) == sorted(["step-1", *leftovers])
    restarted.remove_leftovers()  # a new run's rank 0 cleans the killed writer's folder
    assert [p.name for p in root.iterdir()] == ["step-1"]
    assert save_tiny(restarted, 2) == root / "step-2"
    assert restarted.latest() == root / "step-2"


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "delete_file"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage):
    ck = checkpointer(tmp_path, keep_last=3)
    first = save_tiny(ck, 1)
    newest = save_tiny(ck, 2)
    model_file = newest / "model.pt"
    data = bytearray(model_file.read_bytes())
    if damage == "flip_bytes":
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
        model_file.write_bytes(bytes(data))
    elif damage == "truncate":
        model_file.write_bytes(bytes(data[:100]))
    else:
        model_file.unlink()

    with pytest.warns(UserWarning, match="step-2"):
        assert ck.latest() == first
    with pytest.raises(CheckpointError, match=r"step-2/model\.pt"):
        ck.load(newest)
    with pytest.raises(CheckpointError, match=r"step-2/model\.pt"):
        find_complete(ck.root, str(newest))
    with pytest.raises(CheckpointError, match=r"step-2/model\.pt"):
        read_model_state(newest)
    assert read_model_state(first).keys() == ck.load(first)["model"].keys()
    assert set(ck.load(first)) >= {"model", "rng"}


def test_folder_without_manifest_does_not_count(tmp_path):
    ck = checkpointer(tmp_path)
    first = save_tiny(ck, 1)
    newest = save_tiny(ck, 2)
    (newest / "manifest.json").unlink()
    assert ck.latest() == first
    with pytest.raises(CheckpointError, match=r"step-2/manifest\.json: missing"):
        ck.load(newest)


class _Payload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    ck = checkpointer(tmp_path)
    folder = save_tiny(ck, 1)
    marker = tmp_path / "pwned"
    payload = {"weight": _Payload(f"touch {marker}")}
    if writer == "torch.save":
        path = tmp_path / "evil.pt"
        torch.save(payload, path)
        data = path.read_bytes()
    else:
        data = pickle.dumps(payload, protocol=2)
    rewrite_with_manifest(folder, "model.pt", data)

    assert find_complete(ck.root, folder) == folder  # hashes match: it is not corruption
    with pytest.raises(CheckpointError, match=r"step-1/model\.pt: refused"):
        read_model_state(folder)
    with pytest.raises(CheckpointError, match=r"step-1/model\.pt: refused") as info:
        ck.load(folder)
    assert "posix.system" in str(info.value)
    assert not marker.exists()
    # The payload is real: an unrestricted load would have run it.
    if writer == "torch.save":
        torch.load(folder / "model.pt", weights_only=False)
    else:
        pickle.loads(data)
    assert marker.exists()


def test_world_size_mismatch_is_refused(tmp_path):
    folder = save_tiny(checkpointer(tmp_path), 1)
    two_ranks = checkpointer(tmp_path, rank=1, world_size=2)
    with pytest.raises(
        CheckpointError,
        match="checkpoint written by 1 ranks, this run has 2; resuming with a different "
        "world size is not supported",
    ):
        two_ranks.load(folder)


def test_find_complete(tmp_path):
    root = tmp_path / "checkpoints"
    assert find_complete(root) is None  # no folder yet
    ck = checkpointer(tmp_path)
    first = save_tiny(ck, 1)
    newest = save_tiny(ck, 2)
    assert find_complete(root) == newest
    assert find_complete(root, "") == newest
    assert find_complete(root, str(first)) == first
    with pytest.raises(CheckpointError, match="does not exist"):
        find_complete(root, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/manifest\.json: missing"):
        find_complete(root, tmp_path / "empty")


def test_reading_writes_nothing(tmp_path):
    """Constructing a Checkpointer and every read-only call leave the folder as it was, even
    a temporary folder that may belong to a run still writing."""
    ck = checkpointer(tmp_path)
    folder = save_tiny(ck, 1)
    root = tmp_path / "checkpoints"
    in_progress = root / ".tmp-step-2-12345"
    in_progress.mkdir()
    (in_progress / "model.pt").write_bytes(b"partial")
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    checkpointer(tmp_path)
    assert find_complete(root) == folder
    read_checkpoint(folder, rank=0, world_size=1)
    read_model_state(folder)
    after = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    assert after == before


def test_disabled_checkpointer_writes_nothing(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(enabled=False), rank=0, world_size=1)
    assert ck.save(1, {"train_state": {"step": 1}}) is None
    assert not (tmp_path / "checkpoints").exists()


def _two_rank_worker(rank: int, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)
        np.random.seed(100 + rank)
        random.seed(100 + rank)
        ck = Checkpointer(tmp_path / "run", CheckpointConfig(), rank=rank, world_size=2)
        model = torch.nn.Linear(3, 2)
        parts = {"model": model.state_dict(), "train_state": {"step": 3}}
        folder = ck.save(3, parts)
        after_save = draws()
        assert (folder is not None) == (rank == 0)
        assert ck.save(3, parts) == folder  # no-op on an existing step, on every rank
        with pytest.raises(CheckpointError, match="invalid checkpoint part name"):
            ck.save(4, {"bad/name": {}})  # rank 0's failure is raised on every rank too

        dist.barrier()
        loaded = ck.load(tmp_path / "run" / "checkpoints" / "step-3")
        restore_rng_state(loaded["rng"])
        assert draws() == after_save
    finally:
        dist.destroy_process_group()


def test_two_rank_save_writes_every_ranks_rng(tmp_path):
    mp.spawn(_two_rank_worker, args=(tmp_path,), nprocs=2, join=True)
    folder = tmp_path / "run" / "checkpoints" / "step-3"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    rng = [torch.load(folder / f"rng-rank{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert not torch.equal(rng[0]["numpy"]["keys"], rng[1]["numpy"]["keys"])
    assert not torch.equal(rng[0]["python"]["internal"], rng[1]["python"]["internal"])
    assert not (tmp_path / "run" / "checkpoints" / "step-4").exists()
