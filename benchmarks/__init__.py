"""Benchmark figures of qatdist, each a ratio of two timings measured side by side in one run.

Every figure times its two sides interleaved (A, B, A, B, ...) in the same process or, for DDP
scaling, alternates the two configurations, so that noise from other work on the machine hits
both sides alike. Absolute timings are for context only; the ratios are the result.

This package sits outside `qatdist/` and uses only qatdist's public APIs (`QatModel`,
`train_step`, `build_optimizer`, `qatdist.tasks.evaluate`, `qatdist.topology`, `qatdist.data`,
`qatdist.distributed`). `scripts/bench.py` is the command line and owns the targets table;
the tests call the functions here with tiny settings.

- `common`: the seeded QAT model, synthetic batches, the bound train step, compile and warm.
- `figures`: `qat_step_ratio` (QAT vs fp32 train step), `int8_speedup` (compiled latency).
- `ddp`: `ddp_scaling_ratio` (N ranks x 1 thread vs 1 rank x N threads, real gloo processes).
- `data_wait`: `data_wait_fraction` (time blocked on the loader, trainer placement).
- `hand_flow`: `final_model_vs_hand_flow` and `same_weights_int8_pair` (the plain PT2E recipe).
- `machine`: `machine_info` (CPU, ISA flags, versions, load) printed beside the figures.
- `peers`: `peer_latency`, qatdist's int8 against OpenVINO + NNCF and ONNX Runtime int8 (and
  Inductor / OpenVINO fp32), run by `scripts/bench.py --peers`; the peers are optional packages
  and imported only there.
- `dynamic_activations`: static vs dynamic activation int8 of one model (a measurement behind
  docs/coverage.md, run as `python -m benchmarks.dynamic_activations`; not a target figure).
"""

from benchmarks.data_wait import data_wait_fraction
from benchmarks.ddp import ddp_scaling_ratio
from benchmarks.figures import int8_speedup, qat_step_ratio
from benchmarks.hand_flow import final_model_vs_hand_flow, same_weights_int8_pair
from benchmarks.machine import machine_info

__all__ = [
    "data_wait_fraction",
    "ddp_scaling_ratio",
    "final_model_vs_hand_flow",
    "int8_speedup",
    "machine_info",
    "qat_step_ratio",
    "same_weights_int8_pair",
]
