"""The QAT trainer: one loop for every world size.

Set-up (data, the QAT model, DDP, checkpoints, monitor), the training loop with the QAT
schedule and statistics sync, evaluation, and rank 0's final convert / compile / report.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time

import torch
import torchao

from qatdist import data, topology
from qatdist.config import Config, ConfigError, to_toml, with_schedule_steps
from qatdist.distributed import (
    DistEnv,
    all_gather_object,
    broadcast_object,
    wrap_ddp,
)
from qatdist.finish.accuracy_budget import AccuracyBudget
from qatdist.finish.baselines import Baselines
from qatdist.finish.finalize import finalize
from qatdist.guards import NonFiniteGuard
from qatdist.monitor import Monitor
from qatdist.optim import build_optimizer, build_scheduler
from qatdist.quant import (
    QatModel,
    QatPhase,
    SyncStats,
    fake_quant_op,
    inductor_can_compile,
    phase_at,
)
from qatdist.quant import target as quant_target
from qatdist.run.checkpoint import (
    Checkpointer,
    CheckpointError,
    find_complete,
    read_checkpoint,
    restore_rng_state,
)
from qatdist.run.folder import RunFolder
from qatdist.run.report import metric_field, metric_key, metric_label, report_fields
from qatdist.step import Distillation, build_teacher, train_step
from qatdist.tasks import Task
from qatdist.tasks.evaluate import evaluate

log = logging.getLogger("qatdist")


class Trainer:
    """Distributed PT2E QAT of one model. `train()` runs the schedule, `finish()` the end."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        placement: topology.AppliedPlacement,
        network: dict,
        task: Task,
    ):
        self.cfg, self.env = cfg, env
        self.run = RunFolder(cfg.run.out_dir)
        self.placement = placement
        self.network = network  # topology.gloo_network(): what this rank's gloo binds to
        self.loader_cpus = placement.placement.loader_cpus if placement.pinning else None
        self.task = task  # built once by qatdist.train (segmentation reads every label map)
        # CPU preflight: recorded in topology.json; rank 0 warns when int8 has no fast path.
        self.cpu_int8_capabilities = topology.cpu_int8_preflight() if env.is_rank0 else None
        self.compile_final = cfg.runtime.compile_final and self._inductor_available()

        global_batch = cfg.train.batch_size * env.world_size
        self.steps_per_epoch = cfg.train.steps_per_epoch or (
            data.count_samples(
                cfg.data.train_shards, self.task.sample_extensions, allow_pipe=cfg.data.allow_pipe
            )
            // global_batch
        )
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.steps_per_epoch: the train shards hold fewer samples than one global "
                f"batch ({global_batch}); set train.steps_per_epoch or a smaller train.batch_size"
            )
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        # Schedule points given as fractions of the run become steps (what resolved_config holds).
        self.cfg = cfg = with_schedule_steps(cfg, self.total_steps)
        # quant.target 'auto' becomes the target of the weakest CPU that trains, on every rank.
        if cfg.quant.target == "auto":
            target = quant_target.weakest(all_gather_object(quant_target.cpu_target()))
            self.cfg = cfg = dataclasses.replace(
                cfg, quant=dataclasses.replace(cfg.quant, target=target)
            )

        # The same seed on every rank: identical initial weights.
        self.qat = QatModel.build(
            cfg.model,
            cfg.quant,
            num_classes=cfg.data.num_classes,
            image_size=cfg.data.image_size,
            seed=cfg.train.seed,
            dense=self.task.dense_outputs,
            aux_loss=self.task.aux_head,
        )
        torch.manual_seed(cfg.train.seed + 1 + env.rank)  # per-rank dropout streams
        # Every validation sample in one process: the final measures and the accuracy budget.
        self.full_val_batches = data.full_val_batches(cfg.data, self.task)
        self.monitor = Monitor(
            self.run.root,
            cfg.log,
            self.task,
            enabled=env.is_rank0,
            total_steps=self.total_steps,
            log_every_steps=cfg.train.log_every_steps,
            global_batch_size=global_batch,
            val_batches=self.full_val_batches,
        )
        self.ddp = wrap_ddp(
            self.qat.prepared,
            cfg.runtime.grad_compression,
            on_allreduce=self.monitor.allreduce.record,
        )
        self.optimizer = build_optimizer(self.qat.parameters(), cfg.optim, lr=cfg.train.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_nonfinite_steps)
        self.distillation, self.teacher_source = None, None
        if cfg.train.distill_weight > 0:
            teacher, self.teacher_source = build_teacher(
                cfg.model,
                cfg.train.distill_teacher_weights,
                self.qat.fp32_model,
                num_classes=cfg.data.num_classes,
                image_size=cfg.data.image_size,
                dense=self.task.dense_outputs,
                aux_loss=self.task.aux_head,
            )
            self.distillation = Distillation(
                teacher, cfg.train.distill_weight, cfg.train.distill_temperature
            )
        self.baselines = Baselines(
            self.task,
            cfg.quant,
            env,
            val_batches=lambda: self._val_batches(cfg.runtime.latency_batch_size),
            # not the training order's seed: other images
            calibration_batches=lambda steps: self._train_batches(steps, seed=cfg.train.seed + 1),
            image_size=cfg.data.image_size,
            fine_tuning=bool(cfg.model.weights),
        )
        self.budget = AccuracyBudget(
            self.task,
            cfg.quant,
            env,
            val_batches=self.full_val_batches,
            train_batches=lambda steps, seed: self._train_batches(steps, seed=seed),
            optim_cfg=cfg.optim,
            peak_lr=cfg.train.lr,
            grad_compression=cfg.runtime.grad_compression,
            image_size=cfg.data.image_size,
            batch_size=cfg.runtime.latency_batch_size,
            latency_iters=cfg.runtime.latency_iters,
            compiled=self.compile_final,
        )
        self.step = 0
        self.sync_seconds = 0.0
        self.first_sync_since_step: tuple[int, SyncStats] | None = None
        self.train_seconds = 0.0
        self.history: list[dict] = []
        self.skipped_samples = 0  # bad samples this rank skipped (data.on_error='skip')
        self.resumed_from_step: int | None = None
        self.checkpointer = Checkpointer(
            self.run.root, cfg.checkpoint, rank=env.rank, world_size=env.world_size
        )
        self.checkpointer.remove_leftovers()  # rank 0 only: this run is the folder's one writer

        if env.is_rank0:
            self.run.root.mkdir(parents=True, exist_ok=True)
            self.run.resolved_config.write_text(to_toml(cfg))
            self.monitor.text("config/resolved", "```\n" + to_toml(cfg) + "\n```")
        self._write_topology()
        self._resume()
        self.baselines.at_start(self.qat)
        self.monitor.info(
            f"{cfg.model.name}: {env.world_size} rank(s) x batch {cfg.train.batch_size}, "
            f"{self.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs, "
            f"{torch.get_num_threads()} thread(s) per rank"
        )

    def _inductor_available(self) -> bool:
        """Whether Inductor can compile the final model here; without a C++ compiler the run
        still finishes, its int8 model measured uncompiled, and rank 0 says so once."""
        missing = inductor_can_compile()
        if missing is not None and self.env.is_rank0:
            log.warning(
                "%s: Inductor cannot compile the final int8 model, so it is measured uncompiled "
                "(as with runtime.compile_final = false; the report's `compiled` is false): its "
                "latencies are the reference graph's, not oneDNN's int8 kernels'. Install a C++ "
                "compiler (e.g. `apt-get install g++`) or set CXX for compiled figures.",
                missing,
            )
        return missing is None

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, dict]:
        """The checkpoint parts: model (a plain state dict of the prepared model), optimizer,
        LR scheduler, and the train state (step, QAT phase, data position, config)."""
        return {
            "model": self.qat.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "train_state": {
                "step": self.step,
                "epoch": self.step // self.steps_per_epoch,
                "step_in_epoch": self.step % self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "phase": dataclasses.asdict(self.qat.phase),
                "eval_history": self.history,
                "skipped_samples": self.skipped_samples,
                "skipped_nonfinite_steps": self.guard.skipped_steps,
                "baselines": self.baselines.state_dict(),
                "config": self.cfg.to_dict(),
            },
        }

    def load_state_dict(self, parts: dict[str, dict]) -> None:
        train_state = parts["train_state"]
        if train_state["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(
                f"checkpoint has {train_state['steps_per_epoch']} steps per epoch, this run "
                f"{self.steps_per_epoch}: the data position would not match (keep "
                "train.batch_size, train.steps_per_epoch and the shards of the original run)"
            )
        self.qat.load_state_dict(parts["model"])
        self.optimizer.load_state_dict(parts["optimizer"])
        self.scheduler.load_state_dict(parts["scheduler"])
        self.step = train_state["step"]
        self.history = list(train_state["eval_history"])
        # Older checkpoints lack the counters and baselines.
        self.skipped_samples = train_state.get("skipped_samples", 0)
        self.guard.skipped_steps = train_state.get("skipped_nonfinite_steps", 0)
        self.baselines.load_state_dict(train_state.get("baselines", {}))
        self.qat.set_phase(QatPhase(**train_state["phase"]))
        restore_rng_state(parts["rng"])

    def _resume(self) -> None:
        """Resume from checkpoint.resume_from, else from the newest complete checkpoint. Rank 0
        chooses, so every rank loads the same folder."""
        folder = None
        if self.env.is_rank0:
            found = find_complete(self.checkpointer.root, self.cfg.checkpoint.resume_from)
            folder = str(found) if found else None
        folder = broadcast_object(folder)
        if folder is None:
            return
        self.load_state_dict(
            read_checkpoint(folder, rank=self.env.rank, world_size=self.env.world_size)
        )
        self.resumed_from_step = self.step
        self.monitor.info(f"resumed from {folder} at step {self.step}")

    def save_checkpoint(self) -> None:
        """Sync statistics, then write `checkpoints/step-<N>` (collective: every rank calls)."""
        if not self.cfg.checkpoint.enabled:
            return
        self.sync()
        folder = self.checkpointer.save(self.step, self.state_dict())
        if folder is not None:
            self.monitor.info(f"checkpoint {folder}")

    def _write_topology(self) -> None:
        record = {"global_rank": self.env.rank, **self.placement.to_dict()}
        record["network"] = self.network
        if self.cpu_int8_capabilities is not None:
            record["cpu_int8_capabilities"] = self.cpu_int8_capabilities
        records = all_gather_object(record)
        if self.env.is_rank0:
            text = json.dumps(records, indent=2)
            self.run.topology.write_text(text)
            self.monitor.text("config/placement", "```\n" + text + "\n```")

    def _worker_init(self):
        if self.loader_cpus is None:
            return None
        return functools.partial(topology.pin_loader_worker, list(self.loader_cpus))

    # --- the loop -------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        start_epoch = self.step // self.steps_per_epoch
        for epoch in range(start_epoch, cfg.train.epochs):
            batches = self._train_batches(
                self.steps_per_epoch,
                seed=cfg.train.seed,
                epoch=epoch,
                start_step=self.step - epoch * self.steps_per_epoch,
                worker_init_fn=self._worker_init(),
            )
            self._train_epoch(epoch, batches)
            if cfg.train.eval_every_epochs and (epoch + 1) % cfg.train.eval_every_epochs == 0:
                self.evaluate(epoch)
            self.save_checkpoint()

    def _train_epoch(self, epoch: int, batches) -> None:
        for batch in self.monitor.timed(batches):
            if self.baselines.ptq_due(self.step):
                self.baselines.measure_ptq(self.qat)  # before fake quant's first step
                self.monitor.expect_one_time_cost()
            self._advance_phase()
            self.guard.before_step(self.qat.prepared)
            step_start = time.perf_counter()
            loss, outputs = train_step(
                self.ddp,
                self.optimizer,
                self.scheduler,
                self.task,
                batch.images,
                batch.target,
                distillation=self.distillation,
                may_update=self._may_update,
            )
            self.train_seconds += time.perf_counter() - step_start
            train_metric = self.task.new_metric()
            train_metric.update(outputs, batch.target)
            self.step += 1
            self.skipped_samples += batch.skipped
            every = self.cfg.checkpoint.every_steps
            if every and self.step % every == 0 and self.step % self.steps_per_epoch:
                self.save_checkpoint()  # epoch ends are saved by train()
            elif self.step % self.cfg.quant.sync_every_steps == 0:
                self.sync()
            self.monitor.end_step(
                step=self.step,
                epoch=epoch,
                loss=loss,
                metric=train_metric,
                lr=self.scheduler.get_last_lr()[0],
                model=self.qat.prepared,
            )

    def _may_update(self, loss: float) -> bool:
        """The non-finite guard's verdict on this step (collective; raises NonFiniteError when
        the run must stop)."""
        return self.guard.should_step(
            step=self.step + 1,
            loss=loss,
            lr=self.scheduler.get_last_lr()[0],
            params=self.qat.parameters(),
            last_checkpoint=self.checkpointer.latest,
        )

    def _advance_phase(self) -> None:
        """Apply the QAT schedule for the current step; statistics are synced before observers
        freeze, so the frozen qparams are the global batch's on every rank."""
        phase = phase_at(self.step, self.cfg.quant)
        if phase == self.qat.phase:
            return
        if phase.observers_frozen and not self.qat.phase.observers_frozen:
            self.sync()
        self.qat.set_phase(phase)
        self.monitor.expect_one_time_cost()  # new fake-quant kernels compile on this step
        self.monitor.info(f"step {self.step}: QAT phase {phase}")

    def sync(self) -> SyncStats:
        """Make observer, fake-quant and BatchNorm statistics identical on every rank."""
        stats = self.qat.sync()
        if self.first_sync_since_step is None or self.first_sync_since_step[0] != self.step:
            # Later syncs at the same step (evaluation, checkpoint) find nothing to do; the
            # report's divergence comes from the first one after training stopped.
            self.first_sync_since_step = (self.step, stats)
        self.sync_seconds += stats.seconds
        self.monitor.on_sync(stats.seconds, self.step, self.qat.prepared)
        return stats

    # --- evaluation ---------------------------------------------------------------------

    def _train_batches(
        self,
        steps: int,
        *,
        seed: int,
        epoch: int = 0,
        start_step: int = 0,
        worker_init_fn=None,
    ):
        """This rank's train batches of the task (`data.train_batches`)."""
        return data.train_batches(
            self.cfg.data,
            self.task,
            batch_size=self.cfg.train.batch_size,
            steps=steps,
            rank=self.env.rank,
            world_size=self.env.world_size,
            seed=seed,
            epoch=epoch,
            start_step=start_step,
            worker_init_fn=worker_init_fn,
            # A stuck loader worker stops this rank, naming itself, before the other ranks'
            # collectives time out naming nobody.
            stall_timeout_s=0.9 * self.cfg.runtime.timeout_s,
        )

    def _val_batches(self, batch_size: int):
        """This rank's share of the validation set."""
        return data.val_batches(
            self.cfg.data,
            self.task,
            batch_size=batch_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )

    def _metric_values(self, forward) -> dict[str, float]:
        """The task's metric values of `forward` over every rank's val share (collective)."""
        batches = self._val_batches(self.cfg.runtime.latency_batch_size)
        return evaluate(self.task, forward, batches)

    def _primary(self, forward) -> float:
        """The task's primary metric of `forward` over every rank's val share (collective)."""
        return self._metric_values(forward)[self.task.metric]

    def _show_frames(
        self, prefix: str, qat: QatModel, int8_model: torch.nn.Module | None = None
    ) -> None:
        """The monitor's validation frames with the predictions of `qat`'s weights in float
        (`fp32`) and of its int8 conversion (`int8_model`, converted here when None); local,
        and nothing is computed where the monitor draws no frames."""
        if not self.monitor.draws_frames:
            return
        if int8_model is None:
            with qat.evaluating():
                int8_model = qat.to_int8()
        with qat.evaluating(fake_quant=False) as fp32:
            self.monitor.frames(prefix, self.step, {"fp32": fp32, "int8": int8_model})

    def evaluate(self, epoch: int | None = None) -> dict:
        """The task's primary metric of the fake-quant model (eval mode) and of a converted
        int8 copy, split over ranks (`fake_quant_<metric>`, `int8_<metric>`); every metric
        value and the validation frames to the monitor. Observers are paused and RNG states
        restored: training continues unchanged."""
        self.sync()
        metric = self.task.metric
        with self.qat.evaluating() as model:
            fake_quant_values = self._metric_values(model)
            int8_model = self.qat.to_int8()
            int8_values = self._metric_values(int8_model)
        fake_quant, int8 = fake_quant_values[metric], int8_values[metric]
        result = {"step": self.step, f"fake_quant_{metric}": fake_quant, f"int8_{metric}": int8}
        if epoch is not None:
            result["epoch"] = epoch
        self.history.append(result)
        self.monitor.metric_values("eval/fake_quant", fake_quant_values, self.step)
        self.monitor.metric_values("eval/int8", int8_values, self.step)
        self._show_frames("eval", self.qat, int8_model)
        self.monitor.info(
            f"eval at step {self.step}: {metric} fake-quant {fake_quant:.4f} int8 {int8:.4f}"
        )
        return result

    # --- the end --------------------------------------------------------------------------

    def finish(self) -> dict | None:
        """Final sync and evaluation on all ranks; rank 0 converts, compiles, measures and
        writes `final/`. Returns the report on rank 0, None elsewhere."""
        if self.first_sync_since_step is None or self.first_sync_since_step[0] != self.step:
            self.sync()
        baselines = self.baselines.at_end(self.qat, self.step)
        # The model finalize converts: the trained one, or with layers in fp32 for the budget.
        final, budget_fields = self.budget.apply(
            self.qat,
            baselines.get(metric_key("fp32", self.task.metric)),
            finetune_lr=self.scheduler.get_last_lr()[0],
            seed=self.cfg.train.seed,
        )
        # Eval mode and paused observers through the state hashes, conversion and measures.
        with final.evaluating() as model:
            fake_quant = self._primary(model)
            report = self._training_report(fake_quant, baselines) | budget_fields
            if not self.env.is_rank0:
                return None
            report = self._finalize(report, final, model)
        self._show_frames("final", final)
        return report

    def _training_report(self, fake_quant: float, baselines: dict[str, float]) -> dict:
        """The report fields only training knows (collective: gathers every rank's state hash,
        step count and skipped samples and steps)."""
        cfg, final_sync = self.cfg, self.first_sync_since_step[1]
        ranks = all_gather_object(
            (self.qat.state_sha256(), self.step, self.skipped_samples, self.guard.skipped_steps)
        )
        hashes, steps, skipped, nonfinite = (list(column) for column in zip(*ranks))
        global_batch = cfg.train.batch_size * self.env.world_size
        # Steps trained by this process: a resumed run timed only those.
        trained = (self.step - (self.resumed_from_step or 0)) * global_batch
        source = self.qat.weights_source
        metric = self.task.metric
        return report_fields(
            model=cfg.model.name,
            task=self.task.name,
            metric=metric,
            higher_is_better=self.task.higher_is_better,
            weights_source=dataclasses.asdict(source) if source else None,
            training_only_ops=self.qat.training_only_ops,
            world_size=self.env.world_size,
            global_batch_size=global_batch,
            steps=self.step,
            epochs=cfg.train.epochs,
            train_images_per_s=trained / self.train_seconds if self.train_seconds else 0.0,
            train_images=trained,
            **{metric_key("fp32_fake_quant", metric): fake_quant},
            fake_quant_op=fake_quant_op(self.qat.prepared),
            **baselines,
            observer_sync_max_divergence_before=final_sync.max_divergence_before,
            observer_sync_max_divergence_after=final_sync.max_divergence_after,
            observer_sync_seconds_total=self.sync_seconds,
            final_state_sha256=hashes[0],
            resumed_from_step=self.resumed_from_step,
            rank_state_sha256=hashes,
            rank_steps=steps,
            skipped_samples=sum(skipped),
            skipped_nonfinite_steps=nonfinite[0],
            rank_skipped_nonfinite_steps=nonfinite,
            teacher_seconds_total=self.distillation.seconds if self.distillation else 0.0,
            teacher_weights_source=(
                dataclasses.asdict(self.teacher_source) if self.teacher_source else None
            ),
            eval_history=self.history,
            cpu_int8_capabilities=self.cpu_int8_capabilities or {},
            torch_version=torch.__version__,
            torchao_version=torchao.__version__,
        )

    def _finalize(self, report: dict, final: QatModel, eval_model: torch.fx.GraphModule) -> dict:
        """Rank 0: convert `final` (`eval_model`: its graph as `final.evaluating()` yields it),
        compile, measure and write `final/` (report.json among it)."""
        cfg, r = self.cfg, self.cfg.runtime
        if self.placement.pinning and self.placement.node_cpus:
            # The other ranks are done: rank 0 takes its whole node for compile and benchmark.
            topology.widen(self.placement.node_cpus)
        self.monitor.info(
            f"converting to int8, compiling and measuring (rank 0, {torch.get_num_threads()} "
            "threads)"
        )
        # The AOTInductor package (about a minute to build for resnet18 on 2 cores) is left to
        # scripts/export_final.py, which runs this same step.
        report = finalize(
            eval_model,
            final.fp32_model,
            self.task,
            self.full_val_batches,
            image_size=cfg.data.image_size,
            input_size=self.task.input_size(cfg.data.image_size),
            batch_sizes=[*r.latency_batch_sizes, r.latency_batch_size],
            latency_iters=r.latency_iters,
            out_dir=self.run.final,
            compile_model=self.compile_final,
            aoti=False,
            openvino=r.final_openvino,
            report=report,
            require_full_quantization=r.require_full_quantization,
            eval_mismatch=final.eval_mismatch,
        )
        self.monitor.final(report, self._hparams(report))
        metric = metric_label(report)
        fake_quant, int8 = (metric_field(report, b) for b in ("fp32_fake_quant", "int8"))
        self.monitor.info(
            f"done: fake-quant {metric} {fake_quant:.4f}, int8 {metric} "
            f"{int8:.4f}, int8 {report['int8_latency_ms']:.2f} ms vs fp32 "
            f"{report['fp32_latency_ms']:.2f} ms (x{report['int8_speedup']:.2f}) -> "
            f"{self.run.final}"
        )
        return report

    def _hparams(self, report: dict) -> dict[str, object]:
        """The run's settings shown beside its final metrics in TensorBoard's hparams plugin."""
        cfg = self.cfg
        return {
            "model": cfg.model.name,
            "task": self.task.name,
            "world_size": report["world_size"],
            "global_batch_size": report["global_batch_size"],
            "batch_size": cfg.train.batch_size,
            "epochs": cfg.train.epochs,
            "lr": cfg.train.lr,
            "optimizer": cfg.optim.name,
            "warmup_steps": cfg.optim.warmup_steps,
            "weight_decay": cfg.optim.weight_decay,
            "image_size": cfg.data.image_size,
            "fake_quant_start_step": cfg.quant.fake_quant_start_step,
            "observer_freeze_step": cfg.quant.observer_freeze_step,
            "bn_freeze_step": cfg.quant.bn_freeze_step,
            "sync_every_steps": cfg.quant.sync_every_steps,
        }

    def close(self) -> None:
        self.monitor.close()
