"""scripts/fp32_weights.py on the shared 2-rank run: the written file is what model.weights
loads, equal to the checkpoint's tensors; bad inputs exit 2 naming them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qatdist.config import ModelConfig
from qatdist.models import build_model
from qatdist.run.checkpoint import read_model_state
from qatdist.run.folder import RunFolder

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "fp32_weights.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def run_dir(two_rank_run) -> Path:
    result = two_rank_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return two_rank_run["out_dir"]


def check_written(out: Path, checkpoint: Path) -> None:
    """`out` loads strictly through model.weights and equals the checkpoint's fp32 entries."""
    model = build_model(
        ModelConfig(name="resnet18", weights=str(out)), num_classes=10, image_size=32
    )
    written = torch.load(out, map_location="cpu", weights_only=True)
    prepared = read_model_state(checkpoint)
    assert set(written) == set(model.state_dict())
    assert len(prepared) > len(written)  # the observer/fake-quant state was left out
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, prepared[name]), name
        assert torch.equal(written[name], prepared[name]), name


def test_newest_checkpoint_by_default(run_dir, tmp_path):
    out = tmp_path / "sub" / "weights.pt"
    result = run_script("--run-dir", str(run_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    newest = RunFolder(run_dir).checkpoints / "step-8"
    assert str(newest) in result.stdout
    check_written(out, newest)


def test_given_checkpoint(run_dir, tmp_path):
    checkpoints = RunFolder(run_dir).checkpoints
    out = tmp_path / "weights-4.pt"
    result = run_script(
        "--run-dir", str(run_dir), "--checkpoint", str(checkpoints / "step-4"), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    check_written(out, checkpoints / "step-4")
    # trained between step 4 and step 8: the two files must differ, or the flag was ignored
    newest = read_model_state(checkpoints / "step-8")
    written = torch.load(out, map_location="cpu", weights_only=True)
    assert not torch.equal(written["conv1.weight"], newest["conv1.weight"])


def test_help_explains_each_flag():
    result = run_script("--help")
    assert result.returncode == 0
    for flag in ("--run-dir", "--checkpoint", "--out"):
        assert flag in result.stdout


def test_bad_inputs_exit_2_and_write_nothing(run_dir, tmp_path):
    out = tmp_path / "weights.pt"
    missing = tmp_path / "no-such-run"
    result = run_script("--run-dir", str(missing), "--out", str(out))
    assert result.returncode == 2 and str(missing) in result.stderr

    no_checkpoints = tmp_path / "config-only"
    no_checkpoints.mkdir()
    shutil.copy(RunFolder(run_dir).resolved_config, RunFolder(no_checkpoints).resolved_config)
    result = run_script("--run-dir", str(no_checkpoints), "--out", str(out))
    assert result.returncode == 2 and "no complete" in result.stderr

    bad_checkpoint = tmp_path / "step-3"
    result = run_script(
        "--run-dir", str(run_dir), "--checkpoint", str(bad_checkpoint), "--out", str(out)
    )
    assert result.returncode == 2 and str(bad_checkpoint) in result.stderr

    result = run_script("--run-dir", str(run_dir), "--out", str(tmp_path))
    assert result.returncode == 2 and "--out" in result.stderr

    result = run_script("--run-dir", str(run_dir))
    assert result.returncode == 2 and "--out" in result.stderr
    assert not out.exists()
