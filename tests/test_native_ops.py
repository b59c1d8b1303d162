"""qatdist's C++ ops beyond their arithmetic (which tests/test_fast_fake_quant.py checks): a
machine without a C++ compiler trains on torchao's op with one warning and says so in the
report; the build cache is reused by a later process; a prepared model calling the ops can be
torch.compile'd and torch.export'ed."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT, tiny_run_args, torchrun
from torch._inductor.utils import run_and_get_code

from qatdist.config import QuantConfig
from qatdist.quant import capture, fake_quant_op, prepare_qat, schedule
from qatdist.quant.kernels import native_ops

# Executables that compile C++ (plain or target-prefixed, e.g. x86_64-linux-gnu-g++-12).
_COMPILER_NAME = re.compile(r"(^|-)(c\+\+|g\+\+|gcc|cc|clang|clang\+\+)(-[0-9.]+)?$")


def _path_without_compilers(folder: Path) -> str:
    """A PATH of one folder holding links to every executable of this PATH but the C++ (and
    C) compilers."""
    folder.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in sorted(Path(directory).iterdir()):
            link = folder / entry.name
            if _COMPILER_NAME.search(entry.name) or link.exists():
                continue
            if entry.is_file() and os.access(entry, os.X_OK):
                link.symlink_to(entry)
    path = str(folder)
    assert not any(shutil.which(name, path=path) for name in native_ops._COMPILERS)
    return path


def test_without_a_compiler_training_runs_on_torchaos_op_with_one_warning(tiny_shards, tmp_path):
    """A 2-rank tiny training run with no C++ compiler on PATH (and CXX unset), as configured
    by default: it completes, fake quant runs on torchao's op, the final int8 model is measured
    uncompiled (Inductor compiles C++ too), the run's log holds each warning once (naming the
    cost and the fix), and the report records the op and that nothing was compiled."""
    assert "CXX" not in os.environ  # a CXX would be used (and fail) rather than fall back
    env = {
        "PATH": _path_without_compilers(tmp_path / "bin"),
        "QATDIST_CACHE_DIR": str(tmp_path / "cache"),  # no cached build to fall back on either
    }
    out_dir = tmp_path / "run"
    args = tiny_run_args(tiny_shards, out_dir)
    result = torchrun(args, cwd=ROOT, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert log.count("no C++ compiler found") == 1, log[-6000:]
    warning = next(line for line in log.splitlines() if "no C++ compiler found" in line)
    assert "WARNING" in warning and "[rank0]" in warning
    assert "1.49x resnet18" in warning and "apt-get install g++" in warning
    report = json.loads((out_dir / "final" / "report.json").read_text())
    assert report["fake_quant_op"] == "torchao"
    assert report["compiled"] is False
    assert log.count("Inductor cannot compile the final int8 model") == 1, log[-6000:]
    assert not list((tmp_path / "cache").rglob("*.so"))


class _Net(nn.Module):
    """A conv-BN-ReLU block and a linear layer: activation, per-channel weight and conv-BN
    scaled-weight fake quants."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _qatdist_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("qatdist")]


@pytest.fixture
def no_compiler(monkeypatch):
    """This process as on a machine without a C++ compiler (nothing loaded yet)."""
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    native_ops.load.cache_clear()
    native_ops.available.cache_clear()
    yield
    native_ops.load.cache_clear()
    native_ops.available.cache_clear()


def test_without_a_compiler_prepare_keeps_torchaos_op_and_warns_once(no_compiler, caplog):
    for _ in range(2):
        prepared = prepare_qat(capture(_Net(), torch.randn(2, 3, 8, 8)), QuantConfig())
        assert fake_quant_op(prepared) == "torchao"
    warnings = [r for r in caplog.records if "no C++ compiler found" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_torchaos_op_by_choice_builds_nothing_and_is_silent(no_compiler, caplog):
    """quant.fast_fake_quant = false: torchao's op, no compiler looked for, no warning."""
    graph = capture(_Net(), torch.randn(2, 3, 8, 8))
    prepared = prepare_qat(graph, QuantConfig(fast_fake_quant=False))
    assert fake_quant_op(prepared) == "torchao"
    assert not _qatdist_records(caplog)


def test_a_missing_cxx_is_an_error_naming_it(no_compiler, monkeypatch):
    """CXX set to what does not exist is a mistake to fix, not a reason to fall back."""
    monkeypatch.setenv("CXX", "g++-that-is-not-here")
    with pytest.raises(native_ops.NativeBuildError, match="CXX='g\\+\\+-that-is-not-here'"):
        native_ops.available()


_LOAD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
import torch
from qatdist.quant.kernels import native_ops
native_ops.load()
x, lo, hi = torch.tensor([0.3, -1.0, 2.0]), torch.tensor(float("inf")), torch.tensor(float("-inf"))
one, scale, zp = torch.ones(1, dtype=torch.long), torch.ones(1), torch.zeros(1, dtype=torch.int)
out = torch.ops.qatdist.fake_quantize(x, one, one, lo, hi, scale, zp, 0.01, 0, 255, False, False)
print("fake quant", out.tolist())
"""


def _load_in_new_process(cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "QATDIST_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, check=False
    )


def test_a_build_in_a_fresh_cache_is_loaded_by_the_next_process(tmp_path):
    """The first process builds into an empty QATDIST_CACHE_DIR (recording what the build
    depends on), the second loads that library without compiling; neither prints torch's
    "No CUDA runtime" line (qatdist does not import torch.utils.cpp_extension)."""
    first = _load_in_new_process(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "building qatdist's C++ fake-quant ops" in first.stdout
    [library] = tmp_path.rglob(native_ops.LIBRARY_NAME)
    built_at = library.stat().st_mtime_ns
    fingerprint = json.loads((library.parent / "build.json").read_text())
    assert fingerprint["torch_version"] == torch.__version__
    assert fingerprint["torch_git_version"] == torch.version.git_version
    assert fingerprint["torch_cuda"] == str(torch.version.cuda)
    assert fingerprint["cxx11_abi"] == str(int(torch._C._GLIBCXX_USE_CXX11_ABI))
    assert os.path.isabs(fingerprint["compiler"]) and fingerprint["compiler_version"]
    assert "-march=native" in fingerprint["flags"] and "flags" in fingerprint["cpu"]
    assert library.parent.name == native_ops._cache_key(fingerprint)

    second = _load_in_new_process(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "building" not in second.stdout
    assert library.stat().st_mtime_ns == built_at
    assert list(tmp_path.rglob("*.so")) == [library]
    # The op observed [-1, 2] and rounded to its 3/255 steps, the same in both processes.
    answer = second.stdout.splitlines()[-1]
    assert answer == first.stdout.splitlines()[-1]
    values = json.loads(answer.removeprefix("fake quant "))
    assert values[1:] == [-1.0, 2.0] and values[0] != 0.3 and abs(values[0] - 0.3) < 3 / 255
    for done in (first, second):
        assert "No CUDA runtime" not in done.stdout + done.stderr


@pytest.fixture
def observed():
    """A prepared _Net on qatdist's C++ ops after one training forward (per-channel observer
    buffers are sized by their first observation), and an input."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_qat(capture(_Net(), x), QuantConfig())
    assert fake_quant_op(prepared) == "qatdist_cpp"
    schedule.apply_phase(prepared, schedule.phase_at(0, QuantConfig()))
    prepared(x)
    return prepared, x


def test_a_prepared_model_on_the_cpp_ops_exports_and_follows_its_flags(observed):
    """torch.export keeps qatdist's ops in the graph (their fake implementations trace them);
    the exported program computes what the prepared model does, and reads the fake-quant
    switch at run time."""
    prepared, x = observed
    program = torch.export.export(prepared, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "qatdist.fake_quantize.default" in targets
    exported, eager = program.module(), copy.deepcopy(prepared)
    assert torch.equal(exported(x), eager(x))
    for model in (exported, eager):  # the exported module keeps the buffers, not the classes
        for name, buffer in model.named_buffers():
            if name.endswith("fake_quant_enabled"):
                buffer.fill_(0)
    assert torch.equal(exported(x), eager(x))
    assert not torch.equal(exported(x), prepared(x))  # fake quant off changed the output


def test_a_prepared_model_on_the_cpp_ops_compiles_and_trains_like_eager(observed):
    """torch.compile (Inductor) of a training step: the compiled code calls qatdist's forward
    and backward kernels, and its outputs, gradients and observer statistics match eager
    within rounding (the conv-BN weight scaling stays outside the kernel when traced)."""
    prepared, x = observed
    eager = copy.deepcopy(prepared)
    compiled = torch.compile(prepared)
    out, code = run_and_get_code(lambda: compiled(x).sum().backward() or compiled(x))
    generated = "\n".join(code)
    for kernel in ("fake_quantize_forward", "fake_quantize_backward"):
        assert f"qatdist.{kernel}" in generated, kernel
    eager(x).sum().backward()
    torch.testing.assert_close(out, eager(x), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(prepared.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(
            a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    for (name, a), b in zip(prepared.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
