"""The training loop, top to bottom: set up → build → resume → step → log → checkpoint.

* Runs single-process or under ``torchrun`` (DDP or FSDP; :mod:`prismer_trainer.distributed`).
* AdamW (weight decay 0.05), linear warmup then cosine (per step or per epoch, as the stage says);
  mixed precision as the device allows; gradient accumulation up to the global batch; optional
  gradient clipping.
* Checkpoints (:mod:`prismer_trainer.checkpoint`) hold the whole :class:`TrainState`, the loader position
  included: a resumed run repeats the losses of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prismer_trainer.batches import to_model_inputs
from prismer_trainer.checkpoint import (
    INIT_HINT,
    STATE_FILE,
    DataSource,
    Progress,
    TrainState,
    latest_checkpoint,
    load_tensors,
    read_metadata,
    reading_checkpoint,
)
from prismer_trainer.data import RunData, resolve_embeddings, resolve_experts, resolve_tokenizer
from prismer_trainer.distributed import (
    gradient_sync,
    init_distributed,
    pick_device,
    precision_setup,
    wrap_model,
)
from prismer_trainer.embeddings import label_root_of, require_word_features
from prismer_trainer.evaluate import sample_captions
from prismer_trainer.model import PrismerModel
from prismer_trainer.model_config import ModelConfig
from prismer_trainer.pretrained import load_pretrained
from prismer_trainer.shards import dataset_shards, dataset_size, labels_root
from prismer_trainer.stream import make_loader
from prismer_trainer.train_config import TrainConfig

logger = logging.getLogger(__name__)
LOG_INTERVAL_S = 60.0  # a progress line at least this often, however slow the steps


@dataclass
class TrainOptions:
    """Where the data and the run live, and how the model starts (what a TrainConfig does not say)."""

    dataset: str
    out_dir: Path
    labels_root: str | None = None
    experts: str = "auto"  # auto (what the dataset was labelled with) | all | none | comma list
    tokenizer: str | None = None  # "word" | hub id | directory; default: word (tiny) / the RoBERTa preset
    label_embeddings: str | None = None  # a tables directory; None: the label root's (tiny: hashed)
    init_checkpoint: str | None = None  # weights to start from (e.g. the pre-trained model, to fine-tune)
    pretrained: bool = True  # load CLIP / RoBERTa into a prismer_base/large model that starts fresh
    resume: bool = True
    vqa_annotations: tuple[str, ...] = ()
    stop_after: int | None = None  # leave after this many optimizer steps (the schedule still spans all)
    threads: int | None = None
    device: str | None = None
    tensorboard: str | None = None  # also log the metrics to TensorBoard event files in this directory


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> loss, this process's steps
    last_checkpoint: Path | None = None
    steps: int = 0
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (key, generated, reference)


# ================================================================================================
# The loop
# ================================================================================================
def train(config: TrainConfig, options: TrainOptions) -> TrainResult:
    world = init_distributed()
    device = pick_device(options.device, world)
    if options.threads:
        torch.set_num_threads(options.threads)
    run_dir = Path(options.out_dir)
    if options.tensorboard:
        summary_writer_class()  # fail before any data or model is loaded when tensorboard is missing
    resume_from = latest_checkpoint(run_dir) if options.resume else None
    if resume_from:
        logger.info("resuming from %s", resume_from)

    data = prepare_data(config, options, resume_from)
    model_config = model_config_for(config, data, resume_from)
    data.experts = model_config.experts
    model = build_model(model_config, config, options, device, fresh=resume_from is None)
    wrapped = wrap_model(model, config.parallel, world, device)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    size = dataset_size(data.shards)
    total_steps = config.total_steps(size)
    schedule = LearningRate(config, total_steps, config.steps_per_epoch(size))
    autocast_dtype, scaler = precision_setup(config.precision, device)
    state = TrainState(
        model=wrapped,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor),
        scaler=scaler,
        model_config=model_config,
        config=config,
        tokenizer=data.tokenizer,
        embeddings=data.embeddings,
        data=DataSource(options.dataset, labels_root(options.labels_root), tuple(options.vqa_annotations)),
        world=world,
        progress=Progress(world_size=world.world_size, num_workers=config.num_workers),
        instance_rng=random.Random(config.seed * 1000 + world.rank),  # detection instance-embedding rows
    )
    _log_setup(state, total_steps, device)
    if resume_from:
        state.load(resume_from)
    stream = data.stream(config, world, train=True, start=state.progress.micro_batches)
    batches = iter(make_loader(stream, config.num_workers, pin_memory=device.type == "cuda"))
    # The loader's iterator draws its base seed from torch's RNG: restore RNG states only after it.
    if not state.restore_rng():
        torch.manual_seed(config.seed + world.rank)

    metrics = MetricsLog(run_dir, options.tensorboard if world.main else None, main=world.main)
    try:
        result = run_steps(state, batches, total_steps, options.stop_after, run_dir, autocast_dtype, metrics)
    finally:
        metrics.close()
    # A look at what it learned. (Under FSDP the parameters are sharded: one rank cannot generate alone;
    # use `eval` on the checkpoint.)
    sharded = world.enabled and config.parallel == "fsdp"
    if world.main and config.sample_captions and config.task == "caption" and not sharded:
        result.samples = sample_captions(model, data, config, device, config.sample_captions)
        for key, generated, reference in result.samples:
            logger.info("sample %-12s %s   (reference: %s)", key, generated, reference)
    world.barrier()
    return result


def run_steps(
    state: TrainState,
    batches: Iterator[dict[str, Any]],
    total_steps: int,
    stop_after: int | None,
    run_dir: Path,
    autocast_dtype: torch.dtype | None,
    metrics: MetricsLog | None = None,
) -> TrainResult:
    """Optimizer steps until ``total_steps`` (or ``stop_after`` more): log every ``log_every`` steps (and
    at least every ``LOG_INTERVAL_S``), checkpoint every ``checkpoint_every`` and at the end."""
    config, progress, world = state.config, state.progress, state.world
    metrics = metrics or MetricsLog(run_dir, None, main=world.main)
    accumulation = config.accumulation(world.world_size)
    device = state.device
    result = TrainResult()
    stop_at = total_steps if stop_after is None else min(total_steps, progress.step + stop_after)
    window: list[float] = []
    started = time.perf_counter()
    if progress.step >= stop_at:
        logger.info("nothing to train: the run is at step %d of %d", progress.step, total_steps)
    while progress.step < stop_at:
        loss = optimizer_step(state, batches, accumulation, autocast_dtype)
        state.scheduler.step()
        progress.step += 1
        progress.micro_batches += accumulation
        progress.samples += config.batch_size
        loss = world.mean(loss, device)
        result.losses[progress.step] = loss
        window.append(loss)
        overdue = time.perf_counter() - started >= LOG_INTERVAL_S  # slow steps still show progress
        if progress.step % config.log_every == 0 or progress.step == stop_at or overdue:
            log_progress(state, (total_steps, stop_at), window, started, metrics)
            window, started = [], time.perf_counter()
        if progress.step % config.checkpoint_every == 0 or progress.step == stop_at:
            result.last_checkpoint = state.save(run_dir)
    result.steps = progress.step
    return result


def optimizer_step(
    state: TrainState,
    batches: Iterator[dict[str, Any]],
    accumulation: int,
    autocast_dtype: torch.dtype | None,
) -> float:
    """One optimizer step over ``accumulation`` micro-batches; returns the mean micro-batch loss."""
    model, optimizer, scaler, device = state.model, state.optimizer, state.scaler, state.device
    total = 0.0
    for micro in range(accumulation):
        batch = next(batches)
        with gradient_sync(model, enabled=micro == accumulation - 1):
            with torch.autocast(
                device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
            ):
                loss = batch_loss(model, batch, device, state.instance_rng)
            scaled = loss / accumulation
            (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss.item()
    if scaler:
        scaler.unscale_(optimizer)
    if state.config.grad_clip > 0:  # (FSDP2 gradients are DTensors: the norm spans all shards)
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, state.config.grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / accumulation


def batch_loss(
    model: torch.nn.Module, batch: dict[str, Any], device: torch.device, instance_rng: random.Random
) -> torch.Tensor:
    """Prismer's loss: token cross-entropy (label smoothing 0.1) summed per sample, weighted (VQA), mean."""
    experts = to_model_inputs(batch, device, non_blocking=True)
    out = model(
        experts,
        batch["input_ids"].to(device, non_blocking=True),
        batch["attention_mask"].to(device, non_blocking=True),
        batch["targets"].to(device, non_blocking=True),
        rng=instance_rng,
    )
    return (out.loss_per_sample * batch["weights"].to(device)).mean()


class LearningRate:
    """Linear warmup from ``warmup_start_lr`` to ``lr``, then cosine down to ``min_lr``, per step or (as
    Prismer's pre-training and VQA) per epoch."""

    def __init__(self, config: TrainConfig, total_steps: int, steps_per_epoch: int | None) -> None:
        self.config, self.total_steps, self.steps_per_epoch = config, total_steps, steps_per_epoch

    def __call__(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.warmup_start_lr + (c.lr - c.warmup_start_lr) * step / c.warmup_steps
        if c.cosine_per == "epoch" and self.steps_per_epoch and c.max_steps is None:
            progress = (step // self.steps_per_epoch) / max(c.epochs, 1e-9)
        else:
            progress = (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def factor(self, step: int) -> float:
        return self(step) / self.config.lr


# ================================================================================================
# Set-up
# ================================================================================================
def prepare_data(config: TrainConfig, options: TrainOptions, resume_from: Path | None) -> RunData:
    """The dataset's shards, the experts to train with, tokenizer and label embeddings (a resumed run:
    the checkpoint's)."""
    shards = dataset_shards(options.dataset, options.labels_root)
    experts = resolve_experts(options.experts, config.model, options.dataset, options.labels_root)
    tokenizer = resolve_tokenizer(options.tokenizer, config, shards, options.vqa_annotations, resume_from)
    root = label_root_of(shards)
    require_word_features(root, experts, config.model)
    embeddings = resolve_embeddings(options.label_embeddings, experts, config.model, resume_from, root)
    return RunData(shards, experts, tokenizer, embeddings, tuple(options.vqa_annotations))


def model_config_for(config: TrainConfig, data: RunData, resume_from: Path | None) -> ModelConfig:
    """The preset with this run's experts, resolution and vocabulary; when resuming, the checkpoint's
    model, even if the dataset has been labelled by more experts since."""
    if resume_from:
        with reading_checkpoint(resume_from / STATE_FILE):
            return ModelConfig.from_dict(read_metadata(resume_from)["model_config"])
    return ModelConfig.preset(
        config.model,
        experts=data.experts,
        image_resolution=config.resolution,
        freeze=config.freeze,
        vocab_size=data.tokenizer.vocab_size,
        pad_token_id=data.tokenizer.pad_id,
        bos_token_id=data.tokenizer.bos_id,
        eos_token_id=data.tokenizer.eos_id,
    )


def build_model(
    model_config: ModelConfig, config: TrainConfig, options: TrainOptions, device: torch.device, fresh: bool
) -> PrismerModel:
    """The model on ``device`` in train mode; a ``fresh`` one (not resumed) gets its initial weights."""
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = PrismerModel(model_config)
    if fresh:
        initialise_weights(model, options)
    if config.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    model.to(device)
    model.train()
    return model


def initialise_weights(model: PrismerModel, options: TrainOptions) -> None:
    """Start from ``init_checkpoint`` (our checkpoint dir or a Prismer state-dict file), else from the
    pretrained CLIP / RoBERTa for the real presets; ``tiny`` starts from scratch."""
    if options.init_checkpoint:
        path = Path(options.init_checkpoint)
        state = load_tensors(path / "model.pt" if path.is_dir() else path, INIT_HINT)
        if isinstance(state.get("model"), dict):  # a {"model": state_dict, ...} bundle
            state = state["model"]
        model.load_prismer_state_dict(state)
        logger.info("initialised from %s", path)
    elif options.pretrained and model.config.vision_pretrained:
        load_pretrained(model)


def _log_setup(state: TrainState, total_steps: int, device: torch.device) -> None:
    config, world = state.config, state.world
    trainable = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
    logger.info(
        "%s %s on %s: %d steps of %d samples (%d x %d devices x %d accumulation), %d trainable / %d params",
        config.model,
        config.stage,
        device,
        total_steps,
        config.batch_size,
        config.micro_batch_size,
        world.world_size,
        config.accumulation(world.world_size),
        trainable,
        sum(p.numel() for p in state.model.parameters()),
    )


def log_progress(
    state: TrainState,
    steps: tuple[int, int],
    window: list[float],
    started: float,
    metrics: MetricsLog,
) -> None:
    """One log line and one metrics record (main rank) for the steps in ``window``: loss, lr, steps/s,
    samples/s and the ETA (to ``steps = (total, stop_at)``'s ``stop_at``, at the window's pace)."""
    if not state.world.main:
        return
    total_steps, stop_at = steps
    elapsed = time.perf_counter() - started
    steps_per_s = len(window) / elapsed if elapsed > 0 else None
    record = {
        "step": state.progress.step,
        "loss": sum(window) / len(window),
        "lr": state.scheduler.get_last_lr()[0],
        "steps_per_s": steps_per_s,
        "samples_per_s": steps_per_s * state.config.batch_size if steps_per_s else None,
        "samples": state.progress.samples,
        "eta_s": (stop_at - state.progress.step) / steps_per_s if steps_per_s else None,
    }
    until = "" if stop_at == total_steps else f" (stopping at step {stop_at})"
    logger.info(
        "step %d/%d  loss %.4f  lr %.3g  %.2f steps/s  %.1f samples/s  ETA %s%s",
        record["step"],
        total_steps,
        record["loss"],
        record["lr"],
        steps_per_s or 0.0,
        record["samples_per_s"] or 0.0,
        format_duration(record["eta_s"]),
        until,
    )
    metrics.write(record)


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class TensorBoardUnavailable(RuntimeError):
    """``--tensorboard`` was asked for but the ``tensorboard`` package is not installed."""


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line error saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise TensorBoardUnavailable(
            f"--tensorboard needs the tensorboard package, which is not installed ({exc}); "
            "install it with `pip install tensorboard`, or leave out --tensorboard"
        ) from None
    return SummaryWriter


class MetricsLog:
    """Where the main rank's training metrics go: ``run_dir/metrics.jsonl`` (always) and TensorBoard
    event files in ``tensorboard`` (``train/loss``, ``train/lr``, ``train/samples_per_s``)."""

    def __init__(self, run_dir: Path, tensorboard: str | None, main: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.main = main
        self.writer = summary_writer_class()(log_dir=tensorboard) if tensorboard and main else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name in ("loss", "lr", "samples_per_s"):
                if record.get(name) is not None:
                    self.writer.add_scalar(f"train/{name}", record[name], record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
