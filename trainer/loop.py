"""The training loop: batches from augserve, normalization and training on this device.

    train(config) -> TrainSummary

Per epoch: `train_one_epoch` (a step per batch, or one per epoch for `gd`), `evaluate` on the
validation split (resize + centre crop), metrics to JSONL/CSV, `save_checkpoint`. A checkpoint
holds the model, the optimizer, the step (the schedule is a pure function of it), the torch RNG
state and the stream's resume tokens, so `--resume` continues with exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from augserve.client import Client, ReceivedBatch, open_stream, to_torch
from augserve.core.targets import TargetRequest
from trainer import distributed
from trainer.distributed import Ranks
from trainer.losses import LossFunction, build_loss
from trainer.metrics import MetricsLog, Progress, TrainerGauges
from trainer.mixing import BatchMixer
from trainer.models import build_model
from trainer.segmentation import PIXEL_MODELS, confusion_matrix, mean_iou
from trainer.optim import backward_sum, build_optimizer
from trainer.run_config import TrainConfig
from trainer.schedule import learning_rate, set_learning_rate

log = logging.getLogger("trainer")

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class EpochTotals:
    """Running sums of one epoch (kept in checkpoints so a resumed epoch reports whole)."""

    data_loss: float = 0.0  # sum over samples
    penalty: float = 0.0  # sum over steps
    steps: int = 0
    correct: float = 0.0  # samples predicted right (segmentation: each sample's share of pixels)
    images: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    batches: int = 0


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimizer steps
    batches: int = 0  # batches trained on, over all epochs (the cadence of step metrics)
    totals: EpochTotals = field(default_factory=EpochTotals)
    accumulated_samples: int = 0  # gd: samples whose gradients are summed so far
    resume_tokens: list[list[bytes]] = field(default_factory=list)  # per rank, per endpoint


@dataclass
class TrainSummary:
    epochs: list[dict[str, Any]]
    output: Path
    step: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class BatchCursor:
    """Pulls batches from a stream with one batch of look-ahead, so an epoch ends when the
    next batch belongs to the following one. Times how long it waits."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._iterator: Iterator[ReceivedBatch] = iter(stream)
        self._pending: ReceivedBatch | None = None
        self.exhausted = False
        self.wait_seconds = 0.0

    def next_in(self, epoch: int | None) -> ReceivedBatch | None:
        """The next batch if it belongs to `epoch` (any batch when None), else None."""
        if self._pending is None and not self.exhausted:
            started = time.perf_counter()
            self._pending = next(self._iterator, None)
            self.wait_seconds += time.perf_counter() - started
            self.exhausted = self._pending is None
        batch = self._pending
        if batch is None or (epoch is not None and batch.epoch != epoch):
            return None
        self._pending = None
        return batch


@dataclass
class Trainer:
    """Everything one run needs; built by `train`."""

    config: TrainConfig
    ranks: Ranks
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_function: LossFunction
    clients: list[Client]
    output_size: tuple[int, int]
    classes: tuple[str, ...]
    output: Path
    metrics: MetricsLog
    state: TrainState
    total_steps: int
    validation_samples: int
    autocast_dtype: torch.dtype | None
    batches_per_epoch: int | None = None  # the longest rank's, known once the stream opens
    gauges: TrainerGauges | None = None
    ddp: nn.Module | None = None  # `model` in DistributedDataParallel when there are several ranks
    # This epoch's sums not yet added to `state.totals` (data loss, penalty, correct), kept on the
    # device so that a step reads nothing back; `_flush` adds them at log and checkpoint times.
    running: torch.Tensor | None = None
    last_images: torch.Tensor | None = None  # for a rank's empty steps (see `_accumulate`)
    mixer: BatchMixer | None = None  # MixUp / CutMix of training batches (`mixing` section)

    # --- one step ---

    def _forward(self, images: torch.Tensor, training: bool = True) -> torch.Tensor:
        model = self.ddp if training and self.ddp is not None else self.model
        if self.autocast_dtype is None:
            return model(images)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return model(images).float()

    def _accumulate(self, batch: ReceivedBatch | None, synchronize: bool = True) -> tuple[torch.Tensor | None, int]:
        """Forward and backward one batch, adding the gradient of its summed loss to `.grad`
        (under DDP: the mean over ranks of those sums; with `synchronize` false in `no_sync`, this
        rank's only). Returns (the batch's summed data loss on the device, sample count).

        A rank without a batch in a step every other rank takes (its shard is shorter) still runs
        a backward, on its previous batch in eval mode times zero: DDP's all-reduce needs every
        rank, and the zero adds nothing, so the weighting stays exact and batch statistics
        untouched."""
        context = self.ddp.no_sync() if self.ddp is not None and not synchronize else contextlib.nullcontext()
        if batch is None:
            if self.ddp is not None and synchronize and self.last_images is not None:
                self.model.eval()
                (self._forward(self.last_images).sum() * 0.0).backward()
                self.model.train()
            return None, 0
        images, labels = self._tensors(batch)
        targets = labels
        if self.mixer is not None:  # soft targets; accuracy stays against each own label
            images, targets = self.mixer(images, labels, batch.epoch, batch.position)
        self.last_images = images
        with context:
            logits = self._forward(images)
            parts = self.loss_function(logits, targets, self.model)
            count = len(labels)
            backward_sum(parts.data, count)
        loss_sum = parts.data.detach() * count
        correct = self.loss_function.correct(logits.detach(), labels)
        sums = torch.stack([loss_sum.float(), parts.penalty.detach().float(), correct.float()])
        self.running = sums if self.running is None else self.running + sums
        return loss_sum, count

    def _flush(self) -> None:
        """Add the device-side sums to `state.totals` (one read back from the device)."""
        if self.running is None:
            return
        loss_sum, penalty, correct = self.running.tolist()
        totals = self.state.totals
        totals.data_loss += loss_sum
        totals.penalty += penalty
        totals.correct += correct
        self.running = None

    def _step(self, sample_count: int) -> float:
        """Turn the summed gradients into the mean over every rank's samples, add the penalty,
        step. DDP averaged the ranks' sums (divided by the world size); times world size over
        the step's samples on all ranks (one tiny all-reduce, read by no host) gives the mean."""
        parameters = [parameter for parameter in self.model.parameters() if parameter.grad is not None]
        total = distributed.global_count(sample_count, self.ranks, self.device)
        scale = self.ranks.world_size / total.clamp(min=1.0)
        for parameter in parameters:
            parameter.grad.mul_(scale.to(parameter.grad.dtype))
        penalty = self.loss_function.penalty(self.model)
        if penalty.requires_grad:  # a constant zero without L1/L2
            # autograd.grad, not backward: the same on every rank, so no DDP hook may see it.
            weights = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
            for parameter, gradient in zip(weights, torch.autograd.grad(penalty, weights, allow_unused=True)):
                if gradient is not None:
                    parameter.grad = gradient if parameter.grad is None else parameter.grad.add_(gradient)
        rate = learning_rate(self.config.schedule, self.state.step, self.total_steps, self.config.optimizer.learning_rate)
        set_learning_rate(self.optimizer, rate)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return rate

    # --- an epoch ---

    def train_one_epoch(self, cursor: BatchCursor, epoch: int, progress: Progress) -> EpochTotals:
        config = self.config
        state = self.state
        totals = state.totals
        one_step_per_epoch = config.optimizer.one_step_per_epoch
        steps_per_epoch = config.data.steps_per_epoch
        batches_expected = steps_per_epoch or self.batches_per_epoch
        self.model.train()
        rate = learning_rate(config.schedule, state.step, self.total_steps, config.optimizer.learning_rate)
        # Every rank takes the longest rank's number of steps (known up front: no per-step vote).
        while totals.steps < batches_expected:
            started = time.perf_counter()
            wait_before = cursor.wait_seconds
            done = steps_per_epoch is not None and totals.batches >= steps_per_epoch
            batch = None if done else cursor.next_in(None if steps_per_epoch else epoch)
            if batch is None and not self.ranks.distributed:
                break  # fewer batches than announced (a policy skipped some): the epoch is over
            # gd sums the whole epoch's gradients locally and all-reduces once, at its last step.
            synchronize = not one_step_per_epoch or totals.steps + 1 >= batches_expected
            loss_sum, count = self._accumulate(batch, synchronize)
            if one_step_per_epoch:
                state.accumulated_samples += count
            else:
                rate = self._step(count)
            elapsed = time.perf_counter() - started
            totals.steps += 1
            totals.images += count
            totals.batches += 1 if batch is not None else 0
            totals.seconds += elapsed
            totals.wait_seconds += cursor.wait_seconds - wait_before
            if batch is not None:
                state.resume_tokens = [list(cursor.stream.resume_tokens)]
            state.batches += 1
            if state.batches % config.run.log_every == 0:
                self._log_step(epoch, rate, loss_sum, count)
            progress.update(
                epoch, config.data.epochs, totals.batches, batches_expected,
                f"loss {totals.data_loss / max(totals.images, 1):.4f} acc {totals.correct / max(totals.images, 1):.3f}",
            )
            if config.run.checkpoint_every and not one_step_per_epoch and state.step % config.run.checkpoint_every == 0:
                self.save_checkpoint()
            if self.step_budget_spent:
                break
        if one_step_per_epoch and not self.step_budget_spent:
            rate = self._step(state.accumulated_samples)
            state.accumulated_samples = 0
        self._flush()
        progress.finish()
        return totals

    @property
    def step_budget_spent(self) -> bool:
        return bool(self.config.run.max_steps) and self.state.step >= self.config.run.max_steps

    def _log_step(self, epoch: int, rate: float, loss_sum: torch.Tensor | None, count: int) -> None:
        self._flush()
        totals = self.state.totals
        batch_loss = float(loss_sum) / max(count, 1) if loss_sum is not None else 0.0
        record = {
            "epoch": epoch,
            "step": self.state.step,
            "batch_loss": batch_loss,
            "data_loss": totals.data_loss / max(totals.images, 1),
            "penalty": totals.penalty / max(totals.steps, 1),
            "accuracy": totals.correct / max(totals.images, 1),
            "learning_rate": rate,
            "images_per_second": totals.images / max(totals.seconds, 1e-9),
            "data_wait_fraction": totals.wait_seconds / max(totals.seconds, 1e-9),
        }
        if self.ranks.is_main:
            self.metrics.write("step", record)
            if self.gauges is not None:
                self.gauges.update(record)
        log.debug("step %(step)d loss %(data_loss).4f acc %(accuracy).3f", record)

    # --- validation ---

    @property
    def segmentation(self) -> bool:
        return self.config.data.task == "segmentation"

    def _tensors(self, batch: ReceivedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized images, labels) of a batch on the device: class indices [N], or for
        segmentation the label maps [N, H, W] int64."""
        images, labels = to_torch(batch.images, batch.labels, self.device, True, *_normalization())
        if self.segmentation:
            labels = torch.from_numpy(batch.masks.astype(np.int64)).to(self.device)
        return images, labels

    def evaluate(self, epoch: int = 0) -> tuple[float, float, float]:
        """(mean data loss, accuracy, mIoU) over the validation split, every rank its shard
        (accuracy per pixel and mIoU for segmentation; mIoU NaN for classification). The
        trainers of a sweep that validate alike at `epoch` read one shared validation stream
        (`data.eval_group_epochs`)."""
        config = self.config
        self.model.eval()
        loss_sum, correct, count = 0.0, 0.0, 0
        outputs = len(self.classes) + 1
        confusion = torch.zeros((outputs, outputs), dtype=torch.int64, device=self.device)
        stream = open_stream(
            self.clients, config.data.dataset, rank=self.ranks.rank, world_size=self.ranks.world_size,
            split="validation", eval_size=self.output_size, batch_size=config.data.eval_batch_size,
            epochs=1, transport=config.data.transport,
            group_size=sum(1 for epochs in config.data.eval_group_epochs if epochs > epoch),
            targets=self.targets,
        )
        with stream, torch.no_grad():
            for batch in stream:
                images, labels = self._tensors(batch)
                logits = self._forward(images, training=False)
                loss_sum += float(self.loss_function(logits, labels, self.model).data) * len(labels)
                correct += float(self.loss_function.correct(logits, labels))
                count += len(labels)
                if self.segmentation:
                    confusion += confusion_matrix(logits, labels, outputs)
        loss_sum, correct, count = distributed.sum_values([loss_sum, correct, count], self.ranks, self.device)
        miou = math.nan
        if self.segmentation:
            miou, _ = mean_iou(distributed.sum_tensor(confusion, self.ranks))
        return loss_sum / max(count, 1), correct / max(count, 1), miou

    @property
    def targets(self) -> TargetRequest | None:
        """What the streams ask for besides images: label maps for segmentation."""
        return TargetRequest(masks=True) if self.segmentation else None

    # --- checkpoints ---

    def save_checkpoint(self) -> None:
        self._flush()
        tokens = distributed.gather(self.state.resume_tokens[0] if self.state.resume_tokens else [], self.ranks)
        if not self.ranks.is_main:
            return
        state = self.state
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "batches": state.batches,
            "totals": asdict(state.totals),
            "accumulated_samples": state.accumulated_samples,
            "gradients": [None if p.grad is None else p.grad.detach().cpu() for p in self.model.parameters()],
            "resume_tokens": tokens,
            "world_size": self.ranks.world_size,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": self.config.to_dict(),
        }
        path = self.output / CHECKPOINT_NAME
        temporary = path.with_suffix(".tmp")
        torch.save(payload, temporary)
        os.replace(temporary, path)

    def load_checkpoint(self, path: Path) -> None:
        payload = torch.load(path, map_location=self.device, weights_only=False)
        if payload["world_size"] != self.ranks.world_size:
            raise ValueError(f"--resume: checkpoint was written by {payload['world_size']} ranks, this run has {self.ranks.world_size}")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        for parameter, gradient in zip(self.model.parameters(), payload["gradients"]):
            parameter.grad = None if gradient is None else gradient.to(self.device)
        self.state = TrainState(
            epoch=payload["epoch"],
            step=payload["step"],
            batches=payload["batches"],
            totals=EpochTotals(**payload["totals"]),
            accumulated_samples=payload["accumulated_samples"],
            resume_tokens=[payload["resume_tokens"][self.ranks.rank]],
        )
        torch.set_rng_state(payload["torch_rng"].cpu())
        if payload["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.step)


def _normalization() -> tuple[tuple[float, ...], tuple[float, ...]]:
    # Mid-gray centred, unit-ish spread: the demo and most photo datasets need nothing finer.
    return (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def build_trainer(config: TrainConfig, ranks: Ranks) -> Trainer:
    device = resolve_device(config.run.device)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    if config.run.deterministic:
        torch.use_deterministic_algorithms(True)
    clients = [Client(endpoint, tls=config.data.tls_files()) for endpoint in config.data.endpoints]
    datasets = {info.name: info for info in clients[0].list_datasets()}
    if config.data.dataset not in datasets:
        raise ValueError(f"data.dataset: {config.data.dataset!r} is not served at {config.data.endpoints[0]}; it serves {sorted(datasets)}")
    info = datasets[config.data.dataset]
    spec = config.data.augment_spec()
    output_size = spec.fixed_output_size or (tuple(info.image_size) if info.image_size else None)
    if output_size is None:
        raise ValueError("data.spec: images of this dataset differ in size; give data.image_size or a spec with a crop or resize")
    loss_function = build_loss(config.loss, config.data.task)
    torch.manual_seed(config.data.seed)
    segmentation, per_pixel = config.data.task == "segmentation", config.model.name in PIXEL_MODELS
    if segmentation and not per_pixel:
        raise ValueError(f"model.name: the segmentation task needs a per-pixel model ({', '.join(PIXEL_MODELS)}), not {config.model.name!r}")
    if per_pixel and not segmentation:
        raise ValueError(f"model.name: {config.model.name!r} gives per-pixel outputs; it trains with data.task: segmentation")
    if segmentation and config.mixing.enabled:
        raise ValueError("mixing: MixUp and CutMix mix class labels; the segmentation task takes none")
    # Segmentation: one output per class and one for background (mask value 0).
    outputs = len(info.classes) + 1 if segmentation else loss_function.output_size(len(info.classes))
    model = build_model(config.model, (3, *output_size), outputs).to(device)
    optimizer = build_optimizer(config.optimizer, model)
    output = Path(config.run.output)
    autocast_dtype = None
    if config.run.amp and device.type == "cuda":
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return Trainer(
        config=config, ranks=ranks, device=device, model=model, optimizer=optimizer, loss_function=loss_function,
        clients=clients, output_size=tuple(output_size), classes=tuple(info.classes), output=output,
        metrics=MetricsLog(output, enabled=ranks.is_main), state=TrainState(), total_steps=1,
        validation_samples=info.validation_samples, autocast_dtype=autocast_dtype,
        mixer=BatchMixer(config.mixing, len(info.classes), config.data.seed, ranks.rank) if config.mixing.enabled else None,
    )


def train(config: TrainConfig, resume: str | Path | None = None) -> TrainSummary:
    """Run training as configured (under torchrun: this rank's part); return the epoch records."""
    ranks = distributed.setup(resolve_device(config.run.device).type)
    trainer = build_trainer(config, ranks)
    if config.run.metrics_port is not None and ranks.is_main:
        trainer.gauges = TrainerGauges(config.run.metrics_port)
        log.info("trainer metrics on http://127.0.0.1:%d/metrics", trainer.gauges.port)
    try:
        return _run(trainer, resume)
    finally:
        for client in trainer.clients:
            client.close()
        if trainer.gauges is not None:
            trainer.gauges.close()
        distributed.teardown(ranks)


def _run(trainer: Trainer, resume: str | Path | None) -> TrainSummary:
    config, ranks = trainer.config, trainer.ranks
    if ranks.is_main:
        trainer.output.mkdir(parents=True, exist_ok=True)
        (trainer.output / "config.yaml").write_text(config.to_yaml())
    if resume is not None:
        path = Path(resume)
        trainer.load_checkpoint(path / CHECKPOINT_NAME if path.is_dir() else path)
    data = config.data
    endless = data.steps_per_epoch is not None
    stream = open_stream(
        trainer.clients, data.dataset, rank=ranks.rank, world_size=ranks.world_size,
        resume_tokens=trainer.state.resume_tokens[0] if trainer.state.resume_tokens else (),
        spec=data.augment_spec(), batch_size=data.batch_size, seed=data.seed,
        epochs=0 if endless else data.epochs, transport=data.transport, prefetch=data.prefetch,
        group_policy=data.group_policy, group_size=data.group_size, decode_group_size=data.decode_group_size,
        targets=trainer.targets,
    )
    batches_per_epoch = data.steps_per_epoch or max(
        distributed.gather(stream.facts.batches_per_epoch, ranks)
    )
    trainer.batches_per_epoch = batches_per_epoch
    trainer.ddp = distributed.wrap(trainer.model, ranks, trainer.device)
    trainer.total_steps = data.epochs if config.optimizer.one_step_per_epoch else data.epochs * batches_per_epoch
    validate = data.validate and trainer.validation_samples >= ranks.world_size * len(trainer.clients)
    progress = Progress(config.run.progress and ranks.is_main)
    records = []
    log.info(
        "training %s on %s (%d classes, %dx%d) with %s, %s loss, %d epochs of %d batches on %s%s",
        config.model.name, data.dataset, len(trainer.classes), *trainer.output_size, config.optimizer.name,
        config.loss.name, data.epochs, batches_per_epoch, trainer.device,
        f" (rank {ranks.rank} of {ranks.world_size})" if ranks.distributed else "",
    )
    cursor = BatchCursor(stream)
    with stream:
        while trainer.state.epoch < data.epochs:
            epoch = trainer.state.epoch
            totals = trainer.train_one_epoch(cursor, epoch, progress)
            if trainer.step_budget_spent and (totals.batches < (batches_per_epoch or 0) or trainer.state.accumulated_samples):
                trainer.save_checkpoint()  # stopped inside the epoch: resume continues it
                log.info("stopped after %d steps (run.max_steps); resume with --resume %s", trainer.state.step, trainer.output)
                break
            # Validation, metrics and the checkpoint: the training stream is not read meanwhile, and
            # says so, so that its group waits for it instead of detaching it as stalled.
            stream.pause()
            sums = distributed.sum_values(
                [totals.data_loss, totals.correct, totals.images, totals.penalty, totals.steps], ranks, trainer.device
            )
            validation_started = time.perf_counter()
            val_loss, val_accuracy, val_miou = trainer.evaluate(epoch) if validate else (math.nan, math.nan, math.nan)
            val_seconds = time.perf_counter() - validation_started
            record = {
                "epoch": epoch,
                "step": trainer.state.step,
                "train_data_loss": sums[0] / max(sums[2], 1),
                "train_penalty": sums[3] / max(sums[4], 1),
                "train_accuracy": sums[1] / max(sums[2], 1),
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                **({"val_miou": val_miou} if trainer.segmentation else {}),
                "images": int(sums[2]),
                "images_per_second": totals.images * ranks.world_size / max(totals.seconds, 1e-9),
                "data_wait_fraction": totals.wait_seconds / max(totals.seconds, 1e-9),
                "seconds": totals.seconds,
                "val_seconds": val_seconds,
            }
            records.append(record)
            if ranks.is_main:
                trainer.metrics.write("epoch", record)
                log.info(
                    "epoch %d: loss %.4f (penalty %.4g) acc %.3f | val loss %.4f acc %.3f%s | %.0f img/s, data wait %.0f%%",
                    epoch, record["train_data_loss"], record["train_penalty"], record["train_accuracy"],
                    val_loss, val_accuracy, f" mIoU {val_miou:.3f}" if trainer.segmentation else "",
                    record["images_per_second"], 100 * record["data_wait_fraction"],
                )
            trainer.state.epoch += 1
            trainer.state.totals = EpochTotals()
            trainer.save_checkpoint()
            stream.resume()
            if trainer.step_budget_spent:
                break
    return TrainSummary(records, trainer.output, trainer.state.step)

