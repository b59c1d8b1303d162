"""Worker of tests/test_segmentation_task.py (under torchrun, gloo): each rank fills a confusion
matrix from its own random frames, the matrices are summed over ranks with one collective, and
the rank writes its local matrix, the summed one and the metric values to <out>/rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from qatdist.distributed import all_reduce_sum
from qatdist.tasks.segmentation import ConfusionMatrix

CLASSES, IGNORE = 11, 11


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    metric = ConfusionMatrix(CLASSES, IGNORE, [])
    for _ in range(3):
        target = torch.randint(0, CLASSES + 1, (2, 12, 16), generator=g)
        metric.update(torch.randn(2, CLASSES, 12, 16, generator=g), target)
    local = metric.totals.clone()
    metric.totals = torch.tensor(all_reduce_sum(metric.totals.tolist()), dtype=torch.float64)
    record = {
        "local": local.tolist(),
        "summed": metric.totals.tolist(),
        "values": metric.compute(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
