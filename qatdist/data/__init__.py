"""Data: webdataset shards in (`shards`), reproducible per-rank batches out (`loader`), the image
transforms (`transforms`) and the built-in demo dataset (`demo`)."""

from qatdist.data.loader import (
    Batch,
    check_shards,
    count_samples,
    full_val_batches,
    train_batches,
    val_batches,
)
from qatdist.data.shards import DataError

__all__ = [
    "Batch",
    "DataError",
    "check_shards",
    "count_samples",
    "full_val_batches",
    "train_batches",
    "val_batches",
]
