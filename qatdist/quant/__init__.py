"""Quantization-aware training with PT2E on x86: the package's front door.

`QatModel` owns a model's QAT life (build, capture, prepare, phases, eval, sync, convert); the
modules behind it: `capture` (torch.export), `prepare` (X86InductorQuantizer, prepare_qat_pt2e),
`schedule` (QAT phases, train/eval switches), `sync` (cross-rank statistics), `convert` (int8,
Inductor compile, `load_int8` for a saved int8 program), `fake_quant_op` (which op runs the
fake quants: qatdist's C++ ops or torchao's).
"""

from qatdist.quant.capture import capture
from qatdist.quant.convert import (
    compile_for_inference,
    convert_to_int8,
    inductor_can_compile,
    load_int8,
)
from qatdist.quant.kernels.fast_fake_quant import fake_quant_op
from qatdist.quant.model import QatModel, state_sha256
from qatdist.quant.prepare import prepare_qat
from qatdist.quant.schedule import QatPhase, phase_at
from qatdist.quant.sync import SyncStats, sync_quant_stats

__all__ = [
    "QatModel",
    "QatPhase",
    "SyncStats",
    "capture",
    "compile_for_inference",
    "convert_to_int8",
    "inductor_can_compile",
    "fake_quant_op",
    "load_int8",
    "phase_at",
    "prepare_qat",
    "state_sha256",
    "sync_quant_stats",
]
