"""qatdist's C++ fake-quant ops (`csrc/fake_quant.cpp`), built on first use and cached.

`load()` compiles the source with the machine's C++ compiler (the one Inductor already needs)
against the installed torch, once per build fingerprint (`build_fingerprint`: source, torch
build and ABI, compiler, flags and CPU), and registers the ops as `torch.ops.qatdist.*` with
their fake (meta) implementations, so a model calling them can be `torch.compile`d and
`torch.export`ed. Ranks that start together build once: the first takes a file lock, the
others wait for it and load the cached library. The cache lives in `$QATDIST_CACHE_DIR`
(default `~/.cache/qatdist`); deleting it forces a rebuild.

`available()` is what training asks: on a machine without any C++ compiler it warns once and
answers False, and fake quant runs on torchao's op (slower, same results). A compiler that is
there but fails is an error (`NativeBuildError`), not a fallback.

No new dependency: the compile is a plain compiler call (no ninja, no setuptools build), with
torch's own include and library folders.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
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
LIBRARY_NAME = "qatdist_fake_quant.so"

# -O3 -march=native: vectorized loops for this CPU (the fingerprint holds the CPU's flags).
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
# Compilers looked for on PATH when CXX is unset, in order.
_COMPILERS = ("c++", "g++", "clang++")

# What a run without a compiler loses, measured (docs/performance.md, "Latest figures").
NO_COMPILER_WARNING = (
    "no C++ compiler found (CXX is unset and none of {compilers} is on PATH): fake quant runs "
    "on torchao's op instead of qatdist's C++ ops, same results but a slower QAT step (QAT "
    "step / fp32 step: 1.49x resnet18, 1.97x mobilenet_v3_large with torchao's op against "
    "1.09x / 1.16x with the C++ ops; AMD EPYC AVX2, 2026-12-07, docs/performance.md). Install "
    "a C++ compiler (e.g. `apt-get install g++`) or set CXX; quant.fast_fake_quant = false "
    "chooses torchao's op without this warning."
)


class NativeBuildError(RuntimeError):
    """The C++ ops could not be compiled; the message holds the command and its output."""


class NoCompilerError(NativeBuildError):
    """No C++ compiler on this machine (CXX unset, none on PATH): the ops cannot be built."""


def find_compiler() -> str:
    """The compiler's executable: `$CXX` (which must exist), else the first of c++, g++,
    clang++ on PATH. Raises NoCompilerError when CXX is unset and none is found."""
    if cxx := os.environ.get("CXX"):
        found = shutil.which(cxx)
        if found is None:
            raise NativeBuildError(
                f"CXX={cxx!r} names no executable; set CXX to a C++ compiler, or unset it to "
                f"use the first of {', '.join(_COMPILERS)} on PATH"
            )
        return found
    for name in _COMPILERS:
        if found := shutil.which(name):
            return found
    raise NoCompilerError(NO_COMPILER_WARNING.format(compilers=", ".join(_COMPILERS)))


def _cpu_flags() -> str:
    """The CPU's model and ISA flags: a library built with -march=native runs only there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _torch_dir() -> Path:
    return Path(torch.__file__).resolve().parent


def _include_dirs() -> list[Path]:
    # What torch.utils.cpp_extension.include_paths() returns for a CPU build, without importing
    # that module: on a CUDA build of torch without a CUDA runtime (this project's machines) its
    # import logs "No CUDA runtime is found, using CUDA_HOME=..." while it looks for nvcc, which
    # a CPU-only library never uses.
    include = _torch_dir() / "include"
    return [include, include / "torch" / "csrc" / "api" / "include"]


def _library_dir() -> Path:
    return _torch_dir() / "lib"  # torch.utils.cpp_extension.library_paths() on a CPU build


def build_fingerprint(compiler: str) -> dict[str, str]:
    """Everything that makes a built library incompatible, as text: the source, torch's version,
    commit, CUDA build, install folder (the library's rpath) and C++ ABI, the compiler (path and
    `--version` output), the compile flags and the CPU (-march=native)."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    return {
        "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        "torch_version": torch.__version__,
        "torch_git_version": torch.version.git_version,
        "torch_cuda": str(torch.version.cuda),
        "torch_dir": str(_torch_dir()),
        "cxx11_abi": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "compiler": compiler,
        "compiler_version": version,
        "flags": " ".join(_FLAGS),
        "cpu": _cpu_flags(),
    }


def _cache_key(fingerprint: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _command(compiler: str, abi: str, output: Path) -> list[str]:
    lib_dir = _library_dir()
    return [
        compiler,
        *_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *[f"-I{p}" for p in _include_dirs()],
        str(SOURCE),
        "-o",
        str(output),
        f"-L{lib_dir}",
        f"-Wl,-rpath,{lib_dir}",
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
    ]


def cache_dir() -> Path:
    return Path(os.environ.get("QATDIST_CACHE_DIR") or Path.home() / ".cache" / "qatdist")


def _build(library: Path, fingerprint: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = Path(tmp) / library.name
        command = _command(fingerprint["compiler"], fingerprint["cxx11_abi"], partial)
        start = time.perf_counter()
        log.info("building qatdist's C++ fake-quant ops (once per machine and torch build)")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NativeBuildError(
                f"compiling {SOURCE.name} failed (exit {done.returncode}); set "
                "quant.fast_fake_quant = false to train with torchao's op instead.\n"
                f"command: {shlex.join(command)}\n{done.stdout}{done.stderr}"
            )
        (library.parent / "build.json").write_text(json.dumps(fingerprint, indent=1))
        os.replace(partial, library)  # complete or absent, never half written
        log.info("built %s in %.0f s", library, time.perf_counter() - start)


@functools.cache
def load() -> None:
    """Make `torch.ops.qatdist.fake_quantize` and `scaled_fake_quantize` available in this
    process (building the library first if no cached build matches). Raises
    NoCompilerError without a compiler, NativeBuildError when the compiler fails."""
    fingerprint = build_fingerprint(find_compiler())
    folder = cache_dir() / "ops" / _cache_key(fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    library = folder / LIBRARY_NAME
    if not library.exists():
        with open(folder / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other ranks wait here, then find it built
            if not library.exists():
                _build(library, fingerprint)
    torch.ops.load_library(str(library))
    from qatdist.quant.kernels import fake_impls  # noqa: F401  (registers on import)


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@functools.cache
def available() -> bool:
    """Whether qatdist's C++ ops are loaded (`load`). Without a C++ compiler: False, with one
    warning per run (rank 0 logs it) naming the cost and the fix. Other build failures raise."""
    try:
        load()
    except NoCompilerError as e:
        # One line per run, not per rank: the other ranks log it at INFO, which they hide.
        log.log(logging.WARNING if _is_rank_zero() else logging.INFO, "%s", e)
        return False
    return True
