"""Non-finite loss or gradients: the guard's decisions, and real 2-rank runs set to diverge."""

import math
import re

import pytest
import torch
from conftest import ROOT, tiny_run_args, torchrun

from qatdist.guards import NonFiniteError, NonFiniteGuard
from qatdist.run.checkpoint import verify

# A learning rate that blows the weights up in the first update: step 2's loss is not finite.
DIVERGE = ["--train.lr=1e12", "--optim.warmup_steps=0", "--quant.fake_quant_start_step=0"]


def _params(grad_value: float) -> list[torch.nn.Parameter]:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), grad_value)
    return [p]


def _ask(guard: NonFiniteGuard, loss: float, grad: float = 0.5, step: int = 7) -> bool:
    return guard.should_step(
        step=step, loss=loss, lr=0.1, params=_params(grad), last_checkpoint=lambda: "ckpt/step-6"
    )


def test_finite_steps_pass():
    guard = NonFiniteGuard("stop", 3)
    assert _ask(guard, 1.25) and guard.skipped_steps == 0


@pytest.mark.parametrize("loss, grad", [(math.nan, 0.5), (math.inf, 0.5), (1.0, math.nan)])
def test_stop_names_step_loss_lr_and_checkpoint(loss, grad):
    with pytest.raises(NonFiniteError) as error:
        _ask(NonFiniteGuard("stop", 3), loss, grad)
    message = str(error.value)
    assert "step 7" in message and "lr 0.1" in message and "ckpt/step-6" in message
    assert str(loss) in message


def test_skip_counts_and_stops_after_consecutive_skips():
    guard = NonFiniteGuard("skip", 3)
    assert not _ask(guard, math.nan, step=1)
    assert not _ask(guard, math.nan, step=2)
    assert _ask(guard, 0.5, step=3)  # a finite step resets the run of skips
    assert not _ask(guard, math.nan, step=4) and not _ask(guard, math.nan, step=5)
    assert guard.skipped_steps == 4
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps up to step 6"):
        _ask(guard, math.nan, step=6)


def test_diverging_run_stops_at_the_first_nonfinite_step(tiny_shards, tmp_path):
    args = tiny_run_args(tiny_shards, tmp_path, *DIVERGE, "--checkpoint.every_steps=1")
    result = torchrun(args, cwd=ROOT)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    errors = re.findall(
        r"\[rank(\d)\].*training diverged: non-finite loss or gradient at step (\d+)", log
    )
    assert sorted(rank for rank, _ in errors) == ["0", "1"], log[-3000:]
    step = int(errors[0][1])
    assert all(int(s) == step for _, s in errors)  # every rank stopped at the same step
    assert f"last complete checkpoint: {tmp_path / 'checkpoints' / f'step-{step - 1}'}" in log
    # The checkpoints written before the failing step are complete and unchanged (each file
    # matches the sha256 its manifest recorded when it was written); none after it.
    folders = sorted((tmp_path / "checkpoints").iterdir())
    assert [f.name for f in folders] == [f"step-{n}" for n in range(max(1, step - 2), step)]
    for folder in folders:
        verify(folder)
    assert not (tmp_path / "final").exists()


def test_skip_run_counts_the_same_steps_on_both_ranks(tiny_shards, tmp_path):
    extra = ["--train.on_nonfinite=skip", "--train.max_nonfinite_steps=3"]
    result = torchrun(tiny_run_args(tiny_shards, tmp_path, *DIVERGE, *extra), cwd=ROOT)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]  # 3 skips in a row: the run stops
    skips = {
        rank: re.findall(rf"\[rank{rank}\].*at step (\d+).*update skipped \((\d+) skipped", log)
        for rank in (0, 1)
    }
    assert skips[0] and skips[0] == skips[1], log[-3000:]
    assert [int(count) for _, count in skips[0]] == [1, 2, 3]
    assert "3 consecutive non-finite steps" in log
    assert not (tmp_path / "final").exists()


def test_skipped_step_puts_back_the_statistics_its_forward_changed():
    from qatdist.config import QuantConfig
    from qatdist.quant import QatModel
    from qatdist.quant.sync import quant_buffers

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten()
    )
    qat = QatModel.from_fp32(net, QuantConfig(), image_size=16)
    qat.prepared(torch.randn(4, 3, 16, 16))  # observers and BatchNorm have seen data
    before = {k: v.clone() for k, v in quant_buffers(qat.prepared).items()}
    guard = NonFiniteGuard("skip", 3)
    guard.before_step(qat.prepared)
    loss = qat.prepared(torch.full((4, 3, 16, 16), math.nan)).sum()
    changed = quant_buffers(qat.prepared)
    assert any(not torch.equal(before[k], changed[k]) for k in before)  # NaN got in
    assert not _ask(guard, loss.item())
    after = quant_buffers(qat.prepared)
    assert all(torch.equal(before[k], after[k]) for k in before)
