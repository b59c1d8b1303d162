"""qatdist's C++ fake-quant ops (`csrc/fake_quant.cpp`), built on first use and cached.

`load()` compiles the source with the machine's C++ compiler (the one Inductor already needs)
against the installed torch, once per source, torch version, compiler and CPU, and registers
the ops as `torch.ops.qatdist.*`. Ranks that start together build once: the first takes a file
lock, the others wait for it and load the cached library. The cache lives in
`$QATDIST_CACHE_DIR` (default `~/.cache/qatdist`); deleting it forces a rebuild.

No new dependency: the compile is a plain compiler call (no ninja, no setuptools build), with
torch's own include and library paths (`torch.utils.cpp_extension.include_paths()`).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "fake_quant.cpp"

# -O3 -march=native: vectorized loops for this CPU (the cache key holds the CPU's flags).
# -ffp-contract=off: no fused multiply-add, which would round differently from ATen's build.
_FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fopenmp",  # at::parallel_for runs on torch's OpenMP pool (its libgomp is already loaded)
    "-std=c++20",
    "-shared",
    "-fPIC",
    "-w",  # torch's headers warn under -Wall; nothing here is ours to fix
)


class NativeBuildError(RuntimeError):
    """The C++ ops could not be compiled; the message holds the command and its output."""


def _compiler() -> str:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"


def _cpu_flags() -> str:
    """The CPU's model and ISA flags: a library built with -march=native runs only there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _command(output: Path) -> list[str]:
    # Imported only to build: on a CUDA build of torch without a CUDA runtime (this project's
    # machines) the import logs "No CUDA runtime is found, using CUDA_HOME=..." while it looks
    # for nvcc, which a CPU-only library never uses; a run that finds the library cached never
    # imports it.
    import torch.utils.cpp_extension as cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    lib_dirs = cpp_extension.library_paths()
    return [
        _compiler(),
        *_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *includes,
        str(SOURCE),
        "-o",
        str(output),
        *[f"-L{p}" for p in lib_dirs],
        *[f"-Wl,-rpath,{p}" for p in lib_dirs],
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
    ]


def _cache_key() -> str:
    compiler_version = subprocess.run(
        [_compiler(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    parts = [
        SOURCE.read_text(),
        torch.__version__,
        compiler_version,
        " ".join(_FLAGS),
        _cpu_flags(),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("QATDIST_CACHE_DIR") or Path.home() / ".cache" / "qatdist")


def _build(library: Path) -> None:
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = Path(tmp) / library.name
        command = _command(partial)
        start = time.perf_counter()
        log.info("building qatdist's C++ fake-quant ops (once per machine and torch version)")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NativeBuildError(
                f"compiling {SOURCE.name} failed (exit {done.returncode}); set "
                "quant.fast_fake_quant = false to train with torchao's op instead.\n"
                f"command: {shlex.join(command)}\n{done.stdout}{done.stderr}"
            )
        os.replace(partial, library)  # complete or absent, never half written
        log.info("built %s in %.0f s", library, time.perf_counter() - start)


@functools.cache
def load() -> None:
    """Make `torch.ops.qatdist.fake_quantize`, `scaled_fake_quantize` and `observe` available
    in this process (building the library first if no cached build matches). Raises
    NativeBuildError when the compiler fails."""
    folder = cache_dir() / "ops" / _cache_key()
    folder.mkdir(parents=True, exist_ok=True)
    library = folder / "qatdist_fake_quant.so"
    if not library.exists():
        with open(folder / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other ranks wait here, then find it built
            if not library.exists():
                _build(library)
    torch.ops.load_library(str(library))
