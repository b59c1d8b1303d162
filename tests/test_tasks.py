"""The task seam's generic parts: evaluation sums a metric's totals over ranks with one
collective, padded batches and dict outputs, the default collate, and the classification
task's sample decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from qatdist.config import DataConfig, TaskConfig
from qatdist.data import DataError
from qatdist.data.shards import RawSample
from qatdist.tasks import build_task
from qatdist.tasks import evaluate as evaluation
from qatdist.tasks.classification import Classification

TASK = Classification(DataConfig(num_classes=3, image_size=16))


def _batches():
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0], [0, 3.0, 0]])
    labels = torch.tensor([0, 1, 0, 0, 2])  # 3 of 5 right
    return [(logits[:3], labels[:3], 0), (logits[3:], labels[3:], 0)]


def test_evaluate_sums_the_totals_over_ranks_with_one_all_reduce(monkeypatch):
    calls = []

    def two_equal_ranks(values):  # as if a second rank had seen the same batches
        calls.append(list(values))
        return [2 * v for v in values]

    monkeypatch.setattr(evaluation, "all_reduce_sum", two_equal_ranks)
    result = evaluation.evaluate(TASK, lambda logits: logits, _batches())
    assert calls == [[3.0, 5.0]]  # one collective: this rank's [correct, seen]
    assert result == {"top1": pytest.approx(0.6)}


def test_padded_batches_are_scored_on_their_own_samples_only():
    seen = []

    def forward(inputs):
        seen.append(inputs.shape[0])
        return inputs  # the padding rows are zeros: argmax 0, which label 0 would count

    metric = evaluation.accumulate(TASK, forward, _batches(), pad_to=4)
    assert seen == [4, 4] and metric.totals.tolist() == [3.0, 5.0]


def test_dict_outputs_are_cut_to_the_batch_entry_by_entry():
    outputs = {"out": torch.arange(8).view(4, 2), "aux": torch.arange(4)}
    cut = evaluation.first(outputs, 3)
    assert cut["out"].shape == (3, 2) and cut["aux"].tolist() == [0, 1, 2]


def test_default_collate_stacks_inputs_and_labels():
    inputs = [np.full((3, 2, 2), i, np.float32) for i in range(3)]
    images, labels = TASK.collate(inputs, [2, 0, 1])
    assert images.shape == (3, 3, 2, 2) and images.is_contiguous()
    assert labels.dtype == torch.int64 and labels.tolist() == [2, 0, 1]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "files, message",
    [
        ({"cls": b"1"}, "no image member"),
        ({"png": b"x", "cls": b"1"}, "cannot decode .png image"),
        ({"png": None}, "missing label (.cls member)"),
        ({"png": None, "cls": b"one"}, "is not an integer"),
        ({"png": None, "cls": b"7"}, "label 7 outside [0, 3)"),
    ],
)
def test_classification_decode_errors_name_shard_and_key(files, message):
    files = {ext: _png() if data is None else data for ext, data in files.items()}
    with pytest.raises(DataError, match=r"^shard s\.tar, sample key 'k1'") as err:
        TASK.decode(RawSample("s.tar", "k1", files))
    assert message in str(err.value)


def test_classification_decodes_an_image_and_its_label():
    image, label = TASK.decode(RawSample("s.tar", "k1", {"png": _png(), "cls": b" 2\n"}))
    assert label == 2 and image.mode == "RGB" and image.size == (20, 20)
    assert build_task(TaskConfig(), DataConfig()).metric == "top1"
