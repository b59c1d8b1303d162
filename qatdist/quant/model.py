"""The QAT model's life in one object: seeded fp32 build, capture, prepare, QAT phase, train and
eval modes, statistics sync and int8 conversion.

The trainer, the export and the benchmarks hold a `QatModel`; nothing else chains `capture` and
`prepare_qat` or switches observers for an evaluation by hand.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator

import torch

from qatdist.config import ModelConfig, QuantConfig
from qatdist.models import build_fp32
from qatdist.models.weights import WeightsSource
from qatdist.quant import schedule
from qatdist.quant.convert import convert_to_int8
from qatdist.quant.fixes.training_only import (
    TrainingOnlyBranchError,
    capture_for_qat,
    eager_mismatch,
)
from qatdist.quant.prepare import prepare_qat
from qatdist.quant.ptq import float_weights
from qatdist.quant.schedule import QatPhase
from qatdist.quant.sync import SyncStats, sync_quant_stats
from qatdist.tasks.evaluate import preserved_rng


class QatModel:
    """A prepared QAT graph module and the fp32 model it was built from.

    `fp32_model` is the eager model as built (or loaded from `model.weights`), before capture;
    it shares no tensor with `prepared`, so training leaves it unchanged (a distillation
    teacher, the latency baseline); `weights_source` says where its weights came from (None
    without model.weights). `prepared` is the graph module that trains; `phase` is the
    QAT phase applied to it (fake quant, observer and BatchNorm freezes). It starts in train
    mode in `phase_at(0, quant_cfg)`.
    """

    def __init__(
        self, fp32_model: torch.nn.Module, prepared: torch.fx.GraphModule, quant_cfg: QuantConfig
    ):
        fp32_storage = {t.data_ptr() for t in fp32_model.state_dict().values() if t.numel()}
        if any(t.data_ptr() in fp32_storage for t in prepared.state_dict().values() if t.numel()):
            raise ValueError("QatModel: the prepared model shares tensors with the fp32 model")
        self.fp32_model = fp32_model
        self.weights_source: WeightsSource | None = None  # set by `build` from model.weights
        self.prepared = prepared
        self.quant_cfg = quant_cfg
        # Training-only random ops left out of the graph (`training_only.capture_for_qat`).
        self.training_only_ops: list[str] = []
        # Height and width dynamic in the capture (set by `from_fp32`); re-captures follow it.
        self.dynamic_spatial = False
        self.phase = schedule.phase_at(0, quant_cfg)
        self._applied = self.phase  # differs from `phase` inside `evaluating()`
        self._training = True
        schedule.apply_phase(prepared, self.phase)

    @classmethod
    def build(
        cls,
        model_cfg: ModelConfig,
        quant_cfg: QuantConfig,
        *,
        num_classes: int,
        image_size: int,
        seed: int,
        dense: bool = False,
        aux_loss: bool = False,
    ) -> QatModel:
        """Seed the torch RNG with `seed` (identical initial weights on every rank), build the
        fp32 model (loading `model_cfg.weights` if set, recorded in `weights_source`), capture
        and prepare it for QAT. `dense` (segmentation): a per-pixel model (with its auxiliary
        head when `aux_loss`), captured with dynamic height and width."""
        torch.manual_seed(seed)
        fp32_model, weights_source = build_fp32(
            model_cfg, num_classes, image_size=image_size, dense=dense, aux_loss=aux_loss
        )
        qat = cls.from_fp32(fp32_model, quant_cfg, image_size=image_size, dynamic_spatial=dense)
        qat.weights_source = weights_source
        # Before any training: the eval graph must compute what the eager model does in eval().
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, image_size, image_size, generator=generator)
        if mismatch := qat.eval_mismatch(images):
            raise TrainingOnlyBranchError(f"model.name: {model_cfg.name}: {mismatch}")
        return qat

    @classmethod
    def from_fp32(
        cls,
        fp32_model: torch.nn.Module,
        quant_cfg: QuantConfig,
        *,
        image_size: int,
        dynamic_spatial: bool = False,
    ) -> QatModel:
        """Capture (dynamic batch, `image_size` x `image_size` RGB input, height and width
        dynamic too with `dynamic_spatial`; in train mode unless the model has training-only
        branches, `training_only`) and prepare a copy of `fp32_model`; the copy because the
        captured graph would share its tensors."""
        example = torch.randn(2, 3, image_size, image_size)
        graph, training_only_ops = capture_for_qat(
            copy.deepcopy(fp32_model), example, dynamic_spatial=dynamic_spatial
        )
        qat = cls.from_captured(fp32_model, graph, quant_cfg)
        qat.training_only_ops = training_only_ops
        qat.dynamic_spatial = dynamic_spatial
        return qat

    @classmethod
    def from_captured(
        cls, fp32_model: torch.nn.Module, graph: torch.fx.GraphModule, quant_cfg: QuantConfig
    ) -> QatModel:
        """Prepare `graph`, a `capture` of a copy of `fp32_model` (for callers that time or
        inspect the capture on its own, like `scripts/coverage.py`)."""
        return cls(fp32_model, prepare_qat(graph, quant_cfg), quant_cfg)

    # --- phase and mode -------------------------------------------------------------------

    def set_phase(self, phase: QatPhase) -> None:
        """Switch fake quant, observers and the BatchNorm freeze as `phase` says."""
        schedule.apply_phase(self.prepared, phase)
        self.phase = self._applied = phase

    def train(self) -> None:
        """Train mode, keeping the phase's BatchNorm freeze."""
        schedule.to_train(self.prepared, self._applied)
        self._training = True

    @contextlib.contextmanager
    def evaluating(self, *, fake_quant: bool = True) -> Iterator[torch.fx.GraphModule]:
        """Eval mode with observers paused and the RNG states restored on exit, yielding the
        prepared model; on exit the phase and the mode before are back, so training continues
        unchanged. `fake_quant=True` evaluates as the phase says (fake-quantized once fake
        quant has started); `fake_quant=False` evaluates the same weights in float. Statistics
        are not synced here: call `sync()` first where ranks must agree."""
        before, was_training = self._applied, self._training
        paused = QatPhase(
            fake_quant_on=fake_quant and before.fake_quant_on,
            observers_frozen=True,
            bn_frozen=before.bn_frozen,
        )
        with preserved_rng():
            schedule.to_eval(self.prepared)
            self._training = False
            schedule.apply_phase(self.prepared, paused)
            self._applied = paused
            try:
                yield self.prepared
            finally:
                schedule.apply_phase(self.prepared, before)
                self._applied = before
                if was_training:
                    self.train()

    # --- statistics, conversion, state ----------------------------------------------------

    def sync(self, group=None) -> SyncStats:
        """Make observer, fake-quant and BatchNorm statistics identical on every rank of
        `group` (default: the world); collective."""
        return sync_quant_stats(self.prepared, group)

    def to_int8(self) -> torch.fx.GraphModule:
        """A converted int8 (quantize/dequantize pattern) copy in eval mode; this model is left
        as it was. Converted in the current mode: from train mode, the conv-BN fold also drops
        the BatchNorm tensors, which a conversion in eval mode leaves behind unused."""
        return convert_to_int8(self.prepared)

    def eval_mismatch(self, images: torch.Tensor) -> str | None:
        """None when the float eval graph is deterministic on `images` and matches the eager
        fp32 model holding the same weights in `eval()` (within float32 rounding); otherwise
        what differs, with the numbers. Runs on a copy: a forward with fake quant off still
        resizes per-channel scale buffers (torchao's fused op), which would change
        `state_sha256()`."""
        probe = copy.deepcopy(self)
        eager = probe.fp32_model
        eager.load_state_dict(float_weights(probe.state_dict(), eager))
        with torch.no_grad(), probe.evaluating(fake_quant=False) as graph:
            first, second = _outputs(graph(images)), _outputs(graph(images))
        for name, a, b in zip(first, first.values(), second.values()):
            if not torch.equal(a, b):
                diff = (a - b).abs().max().item()
                return (
                    f"two evaluations of the same batch differ{name} (max |difference| {diff:.4g})"
                )
        with torch.no_grad():
            eager_out = _outputs(eager.eval()(images))
        for name, graph_out in first.items():
            if mismatch := eager_mismatch(graph_out, eager_out[name]):
                return f"eval graph vs eager model in eval(){name}: {mismatch}"
        return None

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.prepared.parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The prepared model's state: weights, BatchNorm and observer/fake-quant buffers."""
        return self.prepared.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a `state_dict()` (strict). The fake-quant and observer switches are buffers:
        `phase` becomes the one the state holds, with the BatchNorm freeze unchanged."""
        self.prepared.load_state_dict(state)
        self.phase = self._applied = schedule.current_phase(self.prepared)

    def state_sha256(self) -> str:
        """Hash of `state_dict()`: equal states, equal hashes (across ranks and runs)."""
        return state_sha256(self.state_dict())


def _outputs(out) -> dict[str, torch.Tensor]:
    """A model's outputs by name for messages: '' for a tensor, ' in "out"' for a dict's."""
    if isinstance(out, dict):
        return {f" in {key!r}": value for key, value in out.items()}
    return {"": out}


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of every tensor of a state dict, in key order: equal states, equal hashes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().contiguous().cpu()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # A copy: `.numpy()` marks the storage it views as not resizable, and the fake-quant
        # ops resize their scale/zero_point buffers in place.
        digest.update(tensor.reshape(-1).view(torch.uint8).clone().numpy().tobytes())
    return digest.hexdigest()
