"""Fault tolerance, for real: 2-rank gloo runs killed, stopped, terminated or fed bad files must
end in a clean recovery (bitwise the uninterrupted model) or a clear error, in bounded time.

Every run trains `tests.tiny_model:tiny_cnn` on the session's tiny shards for 3 epochs x 6
steps with a checkpoint every 2 steps and no final Inductor compile. Every launch is waited on
by its progress (`tests/jobs.py`) and whatever is left of it is killed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import tarfile
import textwrap
import time
import warnings
from pathlib import Path

import psutil
import pytest
from conftest import tiny_run_args
from jobs import Job, run_to_end, torchrun_command

from qatdist.config import CheckpointConfig
from qatdist.run.checkpoint import Checkpointer

STEPS = 18  # 3 epochs x 6 steps


def run_args(shards: dict[str, str], out_dir: Path, *extra: str) -> list[str]:
    return tiny_run_args(
        shards,
        out_dir,
        "--model.name=tests.tiny_model:tiny_cnn",
        "--train.epochs=3",
        "--train.steps_per_epoch=6",
        "--checkpoint.every_steps=2",
        "--train.eval_every_epochs=0",  # the final evaluation is enough here
        "--runtime.compile_final=false",
        "--log.tensorboard=false",
        *extra,
    )


def start_job(args: list[str], log_dir: Path, *, nproc: int = 2, max_restarts: int = 0) -> Job:
    return Job(torchrun_command(args, nproc=nproc, max_restarts=max_restarts), log_dir)


def run_job(args: list[str], log_dir: Path, *, nproc: int = 2) -> Job:
    return run_to_end(torchrun_command(args, nproc=nproc), log_dir)


def steps_written(out_dir: Path) -> list[int]:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-"))


def report_of(out_dir: Path) -> dict:
    return json.loads((out_dir / "final" / "report.json").read_text())


def assert_finished_like(reference: dict, job: Job, out_dir: Path) -> dict:
    assert job.proc.returncode == 0, job.output()
    report = report_of(out_dir)
    assert report["steps"] == STEPS
    assert report["rank_state_sha256"][0] == report["rank_state_sha256"][1]
    assert report["final_state_sha256"] == reference["final_state_sha256"]
    return report


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory, stopped_rank) -> dict:
    """The uninterrupted run every recovery is compared with. (`stopped_rank` starts first and
    runs beside it.)"""
    out_dir = tmp_path_factory.mktemp("reference")
    job = run_job(run_args(tiny_shards, out_dir), out_dir / "logs")
    assert job.proc.returncode == 0, job.output()
    report = report_of(out_dir)
    assert report["steps"] == STEPS and report["resumed_from_step"] is None
    return {**report, "out_dir": out_dir, "seconds": job.seconds}


KILL_MID_WRITE = textwrap.dedent(
    """
    # qatdist.train, except that rank 0 of restart attempt <attempt> SIGKILLs itself once the
    # first file of checkpoint step-<step> is written: a real kill inside a write, at a known
    # point. Usage: kill_mid_write.py <step> <attempt> [train args].
    import os, signal, sys
    from qatdist import train
    from qatdist.run import checkpoint

    step, attempt = sys.argv[1:3]
    if os.environ["RANK"] == "0" and os.environ["TORCHELASTIC_RESTART_COUNT"] == attempt:
        original = checkpoint.save_file

        def save_then_die(obj, path):
            entry = original(obj, path)
            if path.parent.name.startswith(f".tmp-step-{step}-"):
                os.kill(os.getpid(), signal.SIGKILL)
            return entry

        checkpoint.save_file = save_then_die
    sys.exit(train.main(sys.argv[3:]))
    """
)


@pytest.fixture(scope="module")
def killed_run(tiny_shards, tmp_path_factory) -> dict:
    """One launch under `torchrun --max-restarts=2`, killed twice: attempt 0 loses rank 1 to a
    SIGKILL from outside once checkpoint step-2 exists; attempt 1 loses rank 0 to a SIGKILL
    inside the write of checkpoint step-10; attempt 2 must resume and finish."""
    tmp = tmp_path_factory.mktemp("killed")
    out_dir, root = tmp / "run", tmp / "run" / "checkpoints"
    driver = tmp / "kill_mid_write.py"
    driver.write_text(KILL_MID_WRITE)
    args = [str(driver), "10", "1", *run_args(tiny_shards, out_dir)]
    job = start_job(args, tmp / "logs", max_restarts=2)
    try:
        job.wait_until(lambda: steps_written(out_dir), "checkpoint step-2")
        victim = job.workers()[1]
        attempt = victim.environ()["TORCHELASTIC_RESTART_COUNT"]
        victim.send_signal(signal.SIGKILL)
        killed_at = max(steps_written(out_dir))
        # torchrun logs each failure before it restarts; attempt 2 needs seconds to start, so
        # the folder rank 0 was writing is still there to be seen.
        job.wait_until(lambda: job.stderr.count("exitcode: -9") == 2, "the second kill")
        after_write_kill = {p.name: sorted(f.name for f in p.iterdir()) for p in root.iterdir()}
        job.wait()
    finally:
        job.close()
    return {
        "job": job,
        "out_dir": out_dir,
        "first_kill": (attempt, killed_at),
        "after_write_kill": after_write_kill,
    }


@pytest.mark.slow
def test_sigkilled_workers_restart_and_end_bitwise_equal(reference, killed_run):
    job, out_dir = killed_run["job"], killed_run["out_dir"]
    report = assert_finished_like(reference, job, out_dir)
    attempt, killed_at = killed_run["first_kill"]
    assert attempt == "0" and killed_at < 10  # the outside kill landed mid-run, in attempt 0
    assert job.stderr.count("exitcode: -9") == 2  # rank 1, then rank 0
    resumed = [line for line in job.stderr.splitlines() if "INFO resumed from" in line]
    assert len(resumed) == 2, resumed  # each restart resumed from a checkpoint
    assert report["resumed_from_step"] == 8


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint_resumes_from_the_previous(killed_run):
    job, root = killed_run["job"], killed_run["out_dir"] / "checkpoints"
    folders = killed_run["after_write_kill"]
    partial = [name for name in folders if name.startswith(".tmp-step-10-")]
    assert len(partial) == 1 and folders[partial[0]] == ["model.pt"], folders
    assert "step-10" not in folders and "step-8" in folders
    assert "manifest.json" in folders["step-8"]
    # The next start resumes from the previous complete checkpoint and clears the partial one.
    assert f"resumed from {root / 'step-8'} at step 8" in job.stderr
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_reported_and_the_previous_used(
    reference, tiny_shards, tmp_path
):
    out_dir = tmp_path / "run"
    shutil.copytree(reference["out_dir"] / "checkpoints", out_dir / "checkpoints")
    assert steps_written(out_dir) == [16, 18]
    model_file = out_dir / "checkpoints" / "step-18" / "model.pt"
    data = bytearray(model_file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    model_file.write_bytes(bytes(data))

    job = run_job(run_args(tiny_shards, out_dir), tmp_path / "logs")
    report = assert_finished_like(reference, job, out_dir)
    assert report["resumed_from_step"] == 16
    # Throughput counts the 2 steps this run trained, not all 18 (which read 9x too high).
    assert report["train_images"] == 2 * report["global_batch_size"]
    assert reference["train_images"] == STEPS * reference["global_batch_size"]
    step18 = out_dir / "checkpoints" / "step-18"
    assert f"skipping checkpoint {step18}" in job.stderr
    assert "model.pt: corrupt" in job.stderr
    # The step-18 checkpoint written by this run replaces the corrupt one.
    assert f"replacing {step18}" in job.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt folder would warn
        ck = Checkpointer(out_dir, CheckpointConfig(), rank=0, world_size=1)
        assert ck.latest() == step18


STOP_TIMEOUT_S = 20  # runtime.timeout_s of the run with a stopped rank


def stopped_rank_scenario(shards: dict[str, str], tmp_path: Path) -> dict:
    """SIGSTOP rank 1 after the first checkpoint; time how long rank 0 and torchrun take to
    end. Rank 1 stays stopped: torchrun's SIGTERM waits (30 s) before its SIGKILL."""
    out_dir = tmp_path / "run"
    args = run_args(shards, out_dir, f"--runtime.timeout_s={STOP_TIMEOUT_S}")
    job = start_job(args, tmp_path / "logs")
    try:
        job.wait_until(lambda: steps_written(out_dir), "a first checkpoint")
        workers = job.workers()
        workers[1].suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
        stopped = time.monotonic()
        psutil.wait_procs([workers[0]], timeout=STOP_TIMEOUT_S + 60)
        rank0_s = time.monotonic() - stopped
        rc = job.wait()
        job_s = time.monotonic() - stopped
    finally:
        job.close()
    return {"rc": rc, "rank0_s": rank0_s, "job_s": job_s, "job": job}


@pytest.fixture(scope="module")
def stopped_rank(tiny_shards, tmp_path_factory):
    """The stopped-rank run, started in the background as soon as the reference run is: it
    spends most of its time waiting for timeouts."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool.submit(stopped_rank_scenario, tiny_shards, tmp_path_factory.mktemp("stopped"))


@pytest.mark.slow
def test_stopped_rank_ends_the_job_by_the_collective_timeout(stopped_rank):
    result = stopped_rank.result()  # the job's own waits bound this
    job = result["job"]
    assert result["rc"] != 0, job.output()
    # Rank 0 fails by gloo's timeout (plus its exit), not by anything else ...
    assert STOP_TIMEOUT_S - 1 < result["rank0_s"] < STOP_TIMEOUT_S + 30, job.output()
    assert f"Timed out waiting {STOP_TIMEOUT_S * 1000}ms" in job.stderr
    # ... and torchrun ends the job: SIGTERM, 30 s for the stopped rank, SIGKILL.
    assert result["job_s"] < STOP_TIMEOUT_S + 30 + 30, result
    print(f"rank 0 ended {result['rank0_s']:.1f} s, torchrun {result['job_s']:.1f} s after SIGSTOP")


@pytest.mark.slow
def test_sigterm_stops_workers_promptly_and_a_relaunch_resumes(reference, tiny_shards, tmp_path):
    out_dir = tmp_path / "run"
    job = start_job(run_args(tiny_shards, out_dir), tmp_path / "logs-1")
    try:
        job.wait_until(lambda: any(s >= 4 for s in steps_written(out_dir)), "step-4")
        processes = psutil.Process(job.proc.pid).children(recursive=True)
        assert len(job.workers()) == 2
        job.proc.send_signal(signal.SIGTERM)
        terminated = time.monotonic()
        rc = job.wait(limit_s=60)  # promptness is what this test checks
        _, alive = psutil.wait_procs(processes, timeout=30)
        stop_s = time.monotonic() - terminated
    finally:
        job.close()
    assert rc != 0 and not alive
    assert stop_s < 30, stop_s
    last = max(steps_written(out_dir))
    assert last < STEPS

    relaunch = run_job(run_args(tiny_shards, out_dir), tmp_path / "logs-2")
    report = assert_finished_like(reference, relaunch, out_dir)
    assert report["resumed_from_step"] == last
    print(f"all processes gone {stop_s:.1f} s after SIGTERM")


@pytest.fixture(scope="module")
def bad_shards(tiny_shards, tmp_path_factory) -> dict:
    """Copies of the 4 tiny train shards where every other image of shard 1 is not an image
    and shard 3 is cut inside a member; patterns for subsets of them."""
    folder = tmp_path_factory.mktemp("bad_shards")
    source = Path(tiny_shards["train_shards"]).parent
    names = [f"train-{i:06d}.tar" for i in range(4)]
    for name in names[:3:2]:
        shutil.copy(source / name, folder / name)
    bad_keys = []
    with tarfile.open(source / names[1]) as src, tarfile.open(folder / names[1], "w") as dst:
        for i, member in enumerate(m for m in src.getmembers()):
            data = src.extractfile(member).read()
            if member.name.endswith(".png") and i % 4 == 1:
                data = b"these bytes are not a PNG image"
                bad_keys.append(member.name.split(".")[0])
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    with tarfile.open(source / names[3]) as src:
        members = src.getmembers()
    cut = members[25]  # inside the data of the 26th member
    data = (source / names[3]).read_bytes()
    (folder / names[3]).write_bytes(data[: cut.offset_data + cut.size // 2])
    return {
        "folder": folder,
        "undecodable": str(folder / names[1]),
        "undecodable_keys": bad_keys,
        "truncated": str(folder / names[3]),
        "truncated_key": cut.name.split(".")[0],
        "val_shards": tiny_shards["val_shards"],
        "pattern": lambda ids: str(
            folder / ("train-{" + ",".join(f"{i:06d}" for i in ids) + "}.tar")
        ),
    }


def bad_run_args(bad: dict, out_dir: Path, ids: list[int], *extra: str) -> list[str]:
    shards = {"train_shards": bad["pattern"](ids), "val_shards": bad["val_shards"]}
    return run_args(shards, out_dir, *extra)


def test_undecodable_image_stops_the_run_naming_shard_and_key(bad_shards, tmp_path):
    job = run_job(bad_run_args(bad_shards, tmp_path / "run", [0, 1, 2]), tmp_path / "l", nproc=0)
    assert job.proc.returncode == 1, job.output()
    message = next(line for line in job.stderr.splitlines() if "data error" in line)
    assert f"shard {bad_shards['undecodable']}, sample key " in message
    assert any(f"'{key}'" in message for key in bad_shards["undecodable_keys"]), message
    assert "cannot decode .png image" in message
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_truncated_shard_stops_every_rank_naming_shard_and_key(bad_shards, tmp_path):
    job = run_job(bad_run_args(bad_shards, tmp_path / "run", [0, 2, 3]), tmp_path / "l")
    assert job.proc.returncode != 0, job.output()
    assert f"truncated or unreadable shard {bad_shards['truncated']}" in job.stderr
    assert f"in sample key '{bad_shards['truncated_key']}'" in job.stderr
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_bad_samples_skipped_counted_and_logged_on_request(bad_shards, tmp_path):
    out_dir = tmp_path / "run"
    args = bad_run_args(bad_shards, out_dir, [0, 1, 2, 3], "--data.on_error=skip")
    job = run_job(args, tmp_path / "l")
    assert job.proc.returncode == 0, job.output()
    report = report_of(out_dir)
    assert report["rank_steps"] == [STEPS, STEPS]  # no rank runs short
    assert report["rank_state_sha256"][0] == report["rank_state_sha256"][1]
    assert report["skipped_samples"] >= 2
    skips = [line for line in job.stderr.splitlines() if "skipping bad sample" in line]
    assert any(bad_shards["truncated"] in line for line in skips)
    assert any(bad_shards["undecodable"] in line for line in skips)


def expect_start_error(job: Job, message: str, exit_code: int = 2) -> None:
    assert job.proc.returncode == exit_code, job.output()
    assert message in job.stderr, job.output()
    assert "rank(s) x batch" not in job.stderr  # the trainer never started


def test_fewer_shards_than_ranks_x_loader_workers_is_refused_at_start(tiny_shards, tmp_path):
    args = run_args(tiny_shards, tmp_path / "run", "--data.num_workers=3")
    job = run_job(args, tmp_path / "l")
    # Every worker exits 2 before the process group; torchrun reports it and exits 1 itself.
    expect_start_error(job, "matches 4 shard(s), fewer than world_size (2) x", exit_code=1)
    assert "exitcode  : 2" in job.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--data.train_shards={folder}/nothing-*.tar", "data.train_shards: expected a pattern"),
        ("--data.train_shards=pipe:cat {folder}/train-000000.tar", "unless data.allow_pipe"),
        ("--checkpoint.resume_from={folder}", "checkpoint.resume_from: "),
    ],
    ids=["no-match", "pipe", "not-a-checkpoint"],
)
def test_bad_input_is_refused_at_start(tiny_shards, tmp_path, override, message):
    folder = Path(tiny_shards["train_shards"]).parent
    args = run_args(tiny_shards, tmp_path / "run", override.format(folder=folder))
    job = run_job(args, tmp_path / "l", nproc=0)
    expect_start_error(job, message)


def test_corrupt_resume_from_checkpoint_is_refused_at_start(reference, tiny_shards, tmp_path):
    folder = tmp_path / "step-18"
    shutil.copytree(reference["out_dir"] / "checkpoints" / "step-18", folder)
    with open(folder / "optimizer.pt", "r+b") as f:
        f.seek(40)
        f.write(b"\x00" * 16)
    args = run_args(tiny_shards, tmp_path / "run", f"--checkpoint.resume_from={folder}")
    job = run_job(args, tmp_path / "l", nproc=0)
    expect_start_error(job, f"checkpoint.resume_from: {folder / 'optimizer.pt'}: corrupt")


class _Payload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_checkpoint_is_refused_and_never_runs(reference, tiny_shards, tmp_path):
    folder = tmp_path / "step-18"
    shutil.copytree(reference["out_dir"] / "checkpoints" / "step-18", folder)
    marker = tmp_path / "pwned"
    data = pickle.dumps({"conv.weight": _Payload(f"touch {marker}")}, protocol=2)
    (folder / "model.pt").write_bytes(data)
    # Made to match, as an attacker would: the hashes are right, a one-rank checkpoint.
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["world_size"] = 1
    del manifest["files"]["rng-rank1.pt"]
    (folder / "manifest.json").write_text(json.dumps(manifest))

    args = run_args(tiny_shards, tmp_path / "run", f"--checkpoint.resume_from={folder}")
    job = run_job(args, tmp_path / "l", nproc=0)
    assert job.proc.returncode == 2, job.output()
    assert f"{folder / 'model.pt'}: refused" in job.stderr
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluating_every_epoch_leaves_training_unchanged(reference, tiny_shards, tmp_path):
    """Evaluation (fake-quant and int8 top-1, split across ranks) pauses observers and restores
    RNG states: a run that evaluates every epoch ends with the uninterrupted run's weights."""
    out_dir = tmp_path / "run"
    job = run_job(run_args(tiny_shards, out_dir, "--train.eval_every_epochs=1"), tmp_path / "logs")
    assert job.proc.returncode == 0, job.output()
    report = report_of(out_dir)
    assert [entry["epoch"] for entry in report["eval_history"]] == [0, 1, 2]
    assert all(0 <= entry["int8_top1"] <= 1 for entry in report["eval_history"])
    assert report["final_state_sha256"] == reference["final_state_sha256"]
