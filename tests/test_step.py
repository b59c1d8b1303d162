"""The training step: distillation from a frozen teacher, and a skipped update."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from qatdist import config
from qatdist.config import ConfigError
from qatdist.step import Distillation, build_teacher, train_step
from qatdist.tasks.classification import Classification

TASK = Classification(config.DataConfig())


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def _setup(seed: int = 0):
    student = _net(seed)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    gen = torch.Generator().manual_seed(3)
    return student, optimizer, scheduler, torch.randn(16, 6, generator=gen), torch.arange(16) % 4


def test_distillation_loss_is_the_blend_of_cross_entropy_and_tempered_kl():
    teacher, student = _net(1), _net(2)
    images, labels = torch.randn(8, 6), torch.arange(8) % 4
    logits = student(images)
    ce = F.cross_entropy(logits, labels)
    distill = Distillation(teacher, weight=0.25, temperature=3.0)
    p_teacher = torch.softmax(teacher(images) / 3.0, dim=1)
    log_p_student = torch.log_softmax(logits / 3.0, dim=1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(dim=1).mean()
    expected = 0.75 * ce + 0.25 * 9.0 * kl
    torch.testing.assert_close(distill.loss(TASK, logits, images, ce), expected)
    assert distill.seconds > 0


def test_teacher_gets_no_gradient_no_optimizer_state_and_stays_unchanged():
    student, optimizer, scheduler, images, labels = _setup()
    teacher = _net(1)
    before = copy.deepcopy(teacher.state_dict())
    distill = Distillation(teacher, weight=0.5, temperature=2.0)
    student_before = copy.deepcopy(student.state_dict())
    for _ in range(3):
        train_step(student, optimizer, scheduler, TASK, images, labels, distillation=distill)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in optimizer.state}
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(student_before["0.weight"], student.state_dict()["0.weight"])
    assert not teacher.training


def test_distillation_changes_the_update():
    results = []
    for distill in (None, Distillation(_net(1), weight=0.9, temperature=2.0)):
        student, optimizer, scheduler, images, labels = _setup()
        train_step(student, optimizer, scheduler, TASK, images, labels, distillation=distill)
        results.append(student.state_dict()["0.weight"])
    assert not torch.equal(*results)


def test_refused_update_skips_the_optimizer_but_advances_the_schedule():
    student, optimizer, scheduler, images, labels = _setup()
    before = copy.deepcopy(student.state_dict())
    seen = []
    loss, outputs = train_step(
        student,
        optimizer,
        scheduler,
        TASK,
        images,
        labels,
        may_update=lambda v: seen.append(v) or False,
    )
    assert seen == [pytest.approx(loss)] and outputs.shape == (16, 4)
    assert not outputs.requires_grad
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert scheduler.last_epoch == 1 and not optimizer.state


@pytest.mark.parametrize("weight", [0.0, 1.5])
def test_distillation_weight_out_of_range_is_refused(weight):
    with pytest.raises(ValueError, match="train.distill_weight"):
        Distillation(_net(1), weight=weight, temperature=2.0)


def _teacher(weights: str, student: torch.nn.Module):
    model = config.ModelConfig(name="resnet18")
    return build_teacher(model, weights, student, num_classes=10, image_size=32)


def test_teacher_is_the_starting_model_unless_teacher_weights_are_given(tmp_path):
    student = torch.nn.Linear(2, 2)
    assert _teacher("", student) == (student, None)

    torch.manual_seed(5)
    trained = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "teacher.pt"
    # a DDP-style checkpoint: the same layouts as model.weights are read
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)
    teacher, source = _teacher(str(path), student)
    assert teacher is not student
    for name, value in trained.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name
    assert (source.nesting_key, source.prefix_stripped) == ("state_dict", "module.")


def test_teacher_weights_of_another_architecture_name_the_key(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ConfigError, match="^train.distill_teacher_weights: "):
        _teacher(str(path), torch.nn.Linear(2, 2))
