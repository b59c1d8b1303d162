"""Launches that tests wait on by progress, not by wall-clock deadlines sized for an idle machine.

A busy machine (a newcomer's laptop, a CI runner sharing its cores) makes a tiny 2-rank run
take several times as long as on an idle one, but it keeps making progress: its logs grow or
its processes use CPU. A wait here fails when the job died, when it showed no sign of life for
`STALL_S` seconds, or at an outer limit far above the idle time; the failure says which and
shows the end of the job's output.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

# No new output and under `STALL_CPU_S` of CPU used by the job's processes for this long: stuck.
# (A hung gloo collective sleeps in a socket wait; a slow compile keeps a core busy.)
STALL_S = 300
STALL_CPU_S = 1.0
LIMIT_S = 1800  # outer bound for one wait: tens of times a tiny run's idle time
# How often a wait looks for signs of life. Each look scans /proc for the job's processes
# (about 4 ms of CPU): done every 20 ms with the condition, it took 15% of a core from the job.
LIFE_CHECK_S = 1.0


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment with the checkout importable and torch's thread count
    left to qatdist's placement (an inherited OMP_NUM_THREADS would override it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}
    env.pop("OMP_NUM_THREADS", None)
    return env


class Job:
    """A process (torchrun, or one plain process) with its output in files. `close()` kills
    whatever of it is still alive."""

    def __init__(
        self, command: list[str], log_dir: Path, *, cwd: Path = ROOT, env: dict | None = None
    ):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                command, cwd=cwd, env=env or launch_env(), stdout=out, stderr=err
            )
        self.started = time.monotonic()
        self.seconds: float | None = None
        self._last_life: tuple[int, float] = (-1, 0.0)
        self._last_life_at = self.started

    def workers(self) -> dict[int, psutil.Process]:
        """The rank processes (torchrun's direct children), by RANK."""
        found = {}
        for child in psutil.Process(self.proc.pid).children():
            with contextlib.suppress(psutil.Error):
                rank = child.environ().get("RANK")
                if rank is not None:
                    found[int(rank)] = child
        return found

    def _descendants_cpu_s(self) -> float:
        """CPU seconds used so far by the processes under the launcher (not the launcher: its
        monitoring loop uses a little CPU even while every worker is stuck)."""
        total = 0.0
        with contextlib.suppress(psutil.Error):
            for process in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += times.user + times.system
        return total

    def stalled_for(self) -> float:
        """Seconds since the job last wrote output or used `STALL_CPU_S` of CPU."""
        now = time.monotonic()
        output = self.stdout_path.stat().st_size + self.stderr_path.stat().st_size
        cpu = self._descendants_cpu_s()
        last_output, last_cpu = self._last_life
        if output != last_output or cpu - last_cpu >= STALL_CPU_S:
            self._last_life, self._last_life_at = (output, cpu), now
        return now - self._last_life_at

    def wait_until(
        self,
        condition: Callable[[], bool],
        what: str,
        *,
        stall_s: float = STALL_S,
        limit_s: float = LIMIT_S,
        ended_ok: bool = False,
    ) -> float:
        """Poll `condition()` every 20 ms until true and return the time; fail if the job ends
        first (unless `ended_ok`), stalls for `stall_s`, or `limit_s` passes (both looked at
        every `LIFE_CHECK_S`)."""
        deadline = time.monotonic() + limit_s
        next_check = time.monotonic()
        while not condition():
            if self.proc.poll() is not None and not ended_ok:
                pytest.fail(
                    f"job ended (rc {self.proc.returncode}) before {what}:\n{self.output()}"
                )
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + LIFE_CHECK_S
                stalled = self.stalled_for()
                if stalled > stall_s or time.monotonic() > deadline:
                    self.close()
                    why = (
                        f"no output and no CPU use for {stalled:.0f} s"
                        if stalled > stall_s
                        else f"still going after the outer limit of {limit_s:.0f} s"
                    )
                    pytest.fail(f"waiting for {what}: {why}; the job was doing:\n{self.output()}")
            time.sleep(0.02)
        return time.monotonic()

    def wait(self, *, stall_s: float = STALL_S, limit_s: float = LIMIT_S) -> int:
        """The exit code, once the job ends (progress-based limits as in `wait_until`)."""
        self.wait_until(
            lambda: self.proc.poll() is not None,
            "the job to end",
            stall_s=stall_s,
            limit_s=limit_s,
            ended_ok=True,
        )
        self.seconds = time.monotonic() - self.started
        return self.proc.returncode

    def close(self) -> None:
        """SIGKILL the launcher and everything under it (torchrun gives each worker a session
        of its own, so killing a process group would not reach them)."""
        try:
            launcher = psutil.Process(self.proc.pid)
            tree = [launcher, *launcher.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(tree, timeout=30)
        self.proc.wait(timeout=30)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def output(self, chars: int = 6000) -> str:
        return f"--- stdout\n{self.stdout[-chars:]}\n--- stderr\n{self.stderr[-chars:]}"


def torchrun_command(args: list[str], *, nproc: int = 2, max_restarts: int = 0) -> list[str]:
    """`torchrun --standalone` (rendezvous on a free loopback port) running `qatdist.train`,
    or a driver script when `args[0]` is a `.py` file; `nproc=0` runs one plain process."""
    launcher = (
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}",
        ]
        if nproc
        else []
    )
    entry = args if args and args[0].endswith(".py") else ["-m", "qatdist.train", *args]
    return [sys.executable, *launcher, *entry]


def run_to_end(command: list[str], log_dir: Path, **job_kw) -> Job:
    """Start `command`, wait for it by progress, and return the finished Job."""
    job = Job(command, log_dir, **job_kw)
    try:
        job.wait()
    finally:
        job.close()
    return job
