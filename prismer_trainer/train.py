"""The training loop, top to bottom: set up → build → resume → step → log → checkpoint.

* Runs single-process or under ``torchrun`` (DDP, or FSDP ``SHARD_GRAD_OP`` = ZeRO-2 as in the paper;
  NCCL on GPUs, gloo on CPU).
* AdamW (weight decay 0.05), linear warmup then cosine (per step or per epoch, as the stage says);
  bf16 autocast where the GPU has it, else fp16 with a gradient scaler; gradient accumulation up to the
  global batch; optional gradient clipping.
* Checkpoints are directories ``<run>/checkpoints/step_XXXXXXXX`` written under a temporary name and
  renamed into place after a ``complete`` marker: model, optimizer, scheduler, scaler, step, every
  rank's RNG states and the loader position. Resuming continues the schedule and the data stream where
  they were, so an interrupted run repeats the losses of an uninterrupted one. Every file holds only
  tensors and plain containers (or JSON) and is read with ``torch.load(weights_only=True)``: a checkpoint
  from someone else cannot run code here, and one that tries is refused with one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from expert_zoo.weights import load_error_reason
from prismer_trainer.config import DEFAULT_EXPERTS, KNOWN_EXPERTS, ModelConfig
from prismer_trainer.configs import TrainConfig
from prismer_trainer.loader import (
    AugmentConfig,
    HFTokenizer,
    LabelEmbeddings,
    QaIndex,
    SampleDecoder,
    ShardStream,
    Tokenizer,
    WordTokenizer,
    caption_corpus,
    dataset_shards,
    dataset_size,
    default_embeddings,
    label_root_of,
    labels_root,
    load_tokenizer,
    make_loader,
    pre_question,
    require_word_features,
    to_model_inputs,
)
from prismer_trainer.model import PrismerModel, load_pretrained

logger = logging.getLogger(__name__)

COMPLETE = "complete"


@dataclass
class RunOptions:
    """Where the data and the run live, and how the model starts (what a TrainConfig does not say)."""

    dataset: str
    out_dir: Path
    labels_root: str | None = None
    experts: str = "auto"  # auto (what the dataset was labelled with) | all | none | comma list
    tokenizer: str | None = None  # "word" | hub id | directory; default: word (tiny) / the RoBERTa preset
    label_embeddings: str | None = None  # directory of Prismer's *_features.npy; None: hashed stand-ins
    init_checkpoint: str | None = None  # weights to start from (e.g. the pre-trained model, to fine-tune)
    pretrained: bool = True  # load CLIP / RoBERTa into a prismer_base/large model that starts fresh
    resume: bool = True
    vqa_annotations: tuple[str, ...] = ()
    stop_after: int | None = None  # leave after this many optimizer steps (the schedule still spans all)
    threads: int | None = None
    device: str | None = None


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # batches this rank took from its loader: the loader position
    samples: int = 0  # samples seen, all ranks
    world_size: int = 1
    num_workers: int = 0


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> loss, this process's steps
    last_checkpoint: Path | None = None
    steps: int = 0
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (key, generated, reference)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size


# ================================================================================================
# The loop
# ================================================================================================
def train(config: TrainConfig, options: RunOptions) -> TrainResult:
    world = init_distributed()
    device = pick_device(options.device, world)
    if options.threads:
        torch.set_num_threads(options.threads)
    run_dir = Path(options.out_dir)
    resume_from = latest_checkpoint(run_dir) if options.resume else None
    if resume_from:
        logger.info("resuming from %s", resume_from)

    # -- data and model ------------------------------------------------------------------------------
    shards = dataset_shards(options.dataset, options.labels_root)
    experts = resolve_experts(options.experts, config.model, options.dataset, options.labels_root)
    tokenizer = resolve_tokenizer(options.tokenizer, config, options, shards, resume_from)
    root = label_root_of(shards)
    require_word_features(root, experts, config.model)
    embeddings = resolve_embeddings(options.label_embeddings, experts, config.model, resume_from, root)
    model_config = ModelConfig.preset(
        config.model,
        experts=experts,
        image_resolution=config.resolution,
        freeze=config.freeze,
        vocab_size=tokenizer.vocab_size,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    if resume_from:  # the checkpoint's model, even if the dataset has been labelled by more experts since
        with reading_checkpoint(resume_from / "trainer_state.json"):
            saved = json.loads((resume_from / "trainer_state.json").read_text())["model_config"]
            model_config = ModelConfig.from_dict(saved)
        experts = model_config.experts
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = PrismerModel(model_config)
    if resume_from is None:
        initialise_weights(model, options)
    if config.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    model.to(device)
    model.train()
    wrapped = wrap_model(model, config.parallel, world, device)

    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    size = dataset_size(shards)
    total_steps = config.total_steps(size)
    schedule = LearningRate(config, total_steps, config.steps_per_epoch(size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    autocast_dtype, scaler = precision_setup(config.precision, device)
    accumulation = config.accumulation(world.world_size)
    logger.info(
        "%s %s on %s: %d steps of %d samples (%d x %d devices x %d accumulation), %d trainable / %d params",
        config.model,
        config.stage,
        device,
        total_steps,
        config.batch_size,
        config.micro_batch_size,
        world.world_size,
        accumulation,
        sum(p.numel() for p in trainable),
        sum(p.numel() for p in model.parameters()),
    )

    # -- resume --------------------------------------------------------------------------------------
    state = TrainState(world_size=world.world_size, num_workers=config.num_workers)
    instance_rng = random.Random(config.seed * 1000 + world.rank)  # instance-embedding rows (detection)
    rng_state = None
    if resume_from:
        state, rng_state = load_checkpoint(
            resume_from, wrapped, optimizer, scheduler, scaler, world, config.num_workers
        )
    stream = build_stream(
        shards, experts, tokenizer, embeddings, config, options, world, train=True, start=state.micro_batches
    )
    batches = iter(make_loader(stream, config.num_workers, pin_memory=device.type == "cuda"))
    # The loader's iterator draws its base seed from torch's RNG: restore RNG states only after it.
    if rng_state is not None:
        restore_rng(rng_state, instance_rng, device)
    else:
        torch.manual_seed(config.seed + world.rank)

    # -- steps ---------------------------------------------------------------------------------------
    result = TrainResult()
    stop_at = total_steps if options.stop_after is None else min(total_steps, state.step + options.stop_after)
    window: list[float] = []
    started = time.perf_counter()
    if state.step >= stop_at:
        logger.info("nothing to train: the run is at step %d of %d", state.step, total_steps)
    while state.step < stop_at:
        loss = optimizer_step(
            wrapped, batches, optimizer, scaler, config, accumulation, device, autocast_dtype, instance_rng
        )
        scheduler.step()
        state.step += 1
        state.micro_batches += accumulation
        state.samples += config.batch_size
        loss = world.mean(loss, device)
        result.losses[state.step] = loss
        window.append(loss)
        if state.step % config.log_every == 0 or state.step == stop_at:
            log_progress(state, total_steps, window, scheduler, started, run_dir, world)
            window, started = [], time.perf_counter()
        if state.step % config.checkpoint_every == 0 or state.step == stop_at:
            result.last_checkpoint = save_checkpoint(
                run_dir,
                state,
                wrapped,
                optimizer,
                scheduler,
                scaler,
                instance_rng,
                tokenizer,
                embeddings,
                model_config,
                config,
                options,
                world,
            )
    result.steps = state.step

    # -- a look at what it learned -------------------------------------------------------------------
    # (Under FSDP the parameters are sharded: one rank cannot generate alone; use `eval` on the checkpoint.)
    sharded = world.enabled and config.parallel == "fsdp"
    if world.main and config.sample_captions and config.task == "caption" and not sharded:
        from prismer_trainer.evaluate import sample_captions

        result.samples = sample_captions(
            model, shards, experts, tokenizer, embeddings, config, device, config.sample_captions
        )
        for key, generated, reference in result.samples:
            logger.info("sample %-12s %s   (reference: %s)", key, generated, reference)
    world.barrier()
    return result


def optimizer_step(
    model: torch.nn.Module,
    batches: Iterator[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    config: TrainConfig,
    accumulation: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    instance_rng: random.Random,
) -> float:
    """One optimizer step over ``accumulation`` micro-batches; returns the mean micro-batch loss."""
    total = 0.0
    for micro in range(accumulation):
        batch = next(batches)
        last = micro == accumulation - 1
        with gradient_sync(model, enabled=last):
            with torch.autocast(
                device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
            ):
                loss = batch_loss(model, batch, device, instance_rng)
            scaled = loss / accumulation
            (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss.item()
    if scaler:
        scaler.unscale_(optimizer)
    if config.grad_clip > 0:  # (FSDP2 gradients are DTensors: the norm spans all shards)
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
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


# ================================================================================================
# Set-up helpers
# ================================================================================================
def init_distributed() -> Distributed:
    """Join the torchrun process group (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str | None, world: Distributed) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def resolve_experts(choice: str, model: str, dataset: str, root: str | None) -> tuple[str, ...]:
    """``all`` = Prismer's six; ``none`` = PrismerZ; ``auto`` = the experts the dataset was labelled with
    (its ``_run.json``) for ``tiny``, Prismer's six for the real models (missing members are masked)."""
    if choice == "none":
        return ()
    if choice == "all" or (choice == "auto" and model != "tiny"):
        return DEFAULT_EXPERTS
    if choice != "auto":
        experts = tuple(e.strip() for e in choice.split(",") if e.strip())
        unknown = [e for e in experts if e not in KNOWN_EXPERTS]
        if unknown:
            raise ValueError(f"unknown experts {unknown}; known: {list(KNOWN_EXPERTS)}")
        return experts
    run = Path(labels_root(root)) / dataset / "_run.json"
    if "/" in dataset or not run.exists():
        logger.warning("%s not found: training with Prismer's six experts", run)
        return DEFAULT_EXPERTS
    labelled = json.loads(run.read_text()).get("experts", {})
    return tuple(e for e in KNOWN_EXPERTS if e in labelled)


def resolve_tokenizer(
    choice: str | None, config: TrainConfig, options: RunOptions, shards: list[str], resume_from: Path | None
) -> Tokenizer:
    """The checkpoint's tokenizer when resuming; else ``word`` (a vocabulary of this dataset's texts, for
    ``tiny``) or a transformers tokenizer (RoBERTa for the real presets)."""
    if resume_from is not None:
        return load_tokenizer(resume_from / "tokenizer")
    if choice is None:
        choice = "word" if config.model == "tiny" else ModelConfig.preset(config.model).text_pretrained
    if choice != "word":
        return HFTokenizer(choice)
    if config.task == "vqa":
        rows = [r for rs in QaIndex.from_files(options.vqa_annotations).rows.values() for r in rs]
        answers = [a for r in rows for a in (r["answer"] if isinstance(r["answer"], list) else [r["answer"]])]
        texts = [pre_question(r["question"], config.max_words) for r in rows] + [
            a.capitalize() for a in answers
        ]
        return WordTokenizer.build(texts)
    return WordTokenizer.build(caption_corpus(shards, config.prefix, config.max_words))


def resolve_embeddings(
    choice: str | None,
    experts: tuple[str, ...],
    model: str,
    resume_from: Path | None,
    root: str | None = None,
) -> LabelEmbeddings:
    """The checkpoint's tables when resuming, else ``--label-embeddings DIR``, else the label root's."""
    if resume_from is not None and (resume_from / "label_embeddings.npz").exists():
        with reading_checkpoint(resume_from / "label_embeddings.npz"):
            return load_embeddings(resume_from / "label_embeddings.npz")
    if choice:
        return LabelEmbeddings.from_dir(choice)
    return default_embeddings(root, experts, model)  # the label root's embeddings/ (docs/FORMAT.md)


def initialise_weights(model: PrismerModel, options: RunOptions) -> None:
    """Start from ``init_checkpoint`` (our checkpoint dir or a Prismer state-dict file), else from the
    pretrained CLIP / RoBERTa for the real presets; ``tiny`` starts from scratch."""
    if options.init_checkpoint:
        path = Path(options.init_checkpoint)
        state = load_tensors(path / "model.pt" if path.is_dir() else path, _INIT_HINT)
        if isinstance(state.get("model"), dict):  # a {"model": state_dict, ...} bundle
            state = state["model"]
        model.load_prismer_state_dict(state)
        logger.info("initialised from %s", path)
    elif options.pretrained and model.config.vision_pretrained:
        load_pretrained(model)


def wrap_model(
    model: PrismerModel, parallel: str, world: Distributed, device: torch.device
) -> torch.nn.Module:
    """DDP, or FSDP with SHARD_GRAD_OP semantics (ZeRO-2, as the paper): FSDP2's ``fully_shard`` with
    ``reshard_after_forward=False`` on every ViT block, resampler block and decoder layer, then the root.
    The frozen pretrained blocks are left out of sharding, as Prismer's ``ignored_modules``. (FSDP2 also
    runs on CPU with gloo, which FSDP1 refuses.)"""
    if not world.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # the root's output dataclass
        frozen = {p for module in model.frozen_modules() for p in module.parameters()}
        for block in fsdp_units(model):
            fully_shard(block, reshard_after_forward=False, ignored_params=frozen & set(block.parameters()))
        fully_shard(model, reshard_after_forward=False, ignored_params=frozen)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def fsdp_units(model: PrismerModel) -> list[torch.nn.Module]:
    units = list(model.expert_encoder.transformer.resblocks) + list(model.text_decoder.roberta.encoder.layer)
    resampler = getattr(model.expert_encoder, "resampler", None)
    return units + list(getattr(resampler, "perceiver_blocks", []))


def gradient_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch (DDP ``no_sync``; FSDP2 flag)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if not enabled and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def precision_setup(precision: str, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """(autocast dtype or None for fp32, grad scaler or None). fp16 needs the scaler; bf16 does not."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, None
    if precision == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler(device.type)


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


def build_stream(
    shards: list[str],
    experts: tuple[str, ...],
    tokenizer: Tokenizer,
    embeddings: LabelEmbeddings,
    config: TrainConfig,
    options: RunOptions,
    world: Distributed,
    train: bool,
    start: int = 0,
    keys: set[str] | None = None,
    batch_size: int | None = None,
) -> ShardStream:
    augment = None
    if train:
        augment = AugmentConfig(
            config.crop_scale, hflip=config.hflip, randaug_n=config.randaug_n, randaug_m=config.randaug_m
        )
    qa = QaIndex.from_files(options.vqa_annotations) if config.task == "vqa" else None
    if config.task == "vqa" and not options.vqa_annotations:
        raise ValueError("the vqa stage needs --vqa-annotations FILE (a list of {image, question, answer})")
    decoder = SampleDecoder(
        experts=experts,
        tokenizer=tokenizer,
        resolution=config.resolution,
        augment=augment,
        task=config.task,
        prefix=config.prefix,
        max_words=config.max_words,
        max_tokens=config.max_tokens,
        label_resolution=config.label_resolution,
        qa=qa,
        hashed_words=config.model == "tiny",  # real configs mask OCR words that lack stored features
    )
    return ShardStream(
        shards,
        decoder,
        embeddings,
        batch_size or config.micro_batch_size,
        train=train,
        seed=config.seed,
        rank=world.rank,
        world_size=world.world_size,
        shuffle_buffer=config.shuffle_buffer,
        start_batch=start,
        keys=keys,
    )


def log_progress(
    state: TrainState,
    total_steps: int,
    window: list[float],
    scheduler: Any,
    started: float,
    run_dir: Path,
    world: Distributed,
) -> None:
    if not world.main:
        return
    elapsed = time.perf_counter() - started
    record = {
        "step": state.step,
        "loss": sum(window) / len(window),
        "lr": scheduler.get_last_lr()[0],
        "steps_per_s": len(window) / elapsed if elapsed > 0 else None,
        "samples": state.samples,
    }
    logger.info(
        "step %d/%d  loss %.4f  lr %.3g  %.2f steps/s",
        state.step,
        total_steps,
        record["loss"],
        record["lr"],
        record["steps_per_s"] or 0.0,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


# ================================================================================================
# Checkpoints
# ================================================================================================
def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint with its ``complete`` marker (temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / COMPLETE).exists()) if root.exists() else []
    return done[-1] if done else None


def rng_states(instance_rng: random.Random, device: torch.device) -> dict[str, Any]:
    """This rank's RNG states as tensors and plain numbers, so that the file loads with ``weights_only``."""
    states = {
        "torch": torch.get_rng_state(),
        "numpy": _plain_numpy_state(np.random.get_state()),
        "python": _plain_python_state(random.getstate()),
        "instance": _plain_python_state(instance_rng.getstate()),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(states: dict[str, Any], instance_rng: random.Random, device: torch.device) -> None:
    """Set the RNGs from :func:`native_rng_states` (what :func:`load_checkpoint` returns)."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    instance_rng.setstate(states["instance"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def native_rng_states(plain: dict[str, Any]) -> dict[str, Any]:
    """:func:`rng_states`' file form → the objects the RNGs' ``set_state`` functions take."""
    states = {
        "torch": _byte_tensor(plain["torch"]),
        "numpy": _numpy_state(plain["numpy"]),
        "python": _python_state(plain["python"]),
        "instance": _python_state(plain["instance"]),
    }
    if "cuda" in plain:
        states["cuda"] = _byte_tensor(plain["cuda"])
    return states


def _byte_tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor for a torch RNG state, got {type(value).__name__}")
    return value


def _plain_numpy_state(state: tuple) -> dict[str, Any]:
    """numpy's legacy ``get_state()`` tuple (name, 624 uint32 words, pos, has_gauss, gauss) as plain data."""
    name, words, pos, has_gauss, gauss = state
    keys = torch.from_numpy(np.asarray(words, dtype=np.int64))  # int64: torch's uint32 support is partial
    return {
        "name": str(name),
        "keys": keys,
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _numpy_state(plain: dict[str, Any]) -> tuple:
    keys = plain["keys"].numpy().astype(np.uint32)
    return (plain["name"], keys, int(plain["pos"]), int(plain["has_gauss"]), float(plain["gauss"]))


def _plain_python_state(state: tuple) -> dict[str, Any]:
    """``random.getstate()`` (version, 625 ints, gauss_next) as plain data: the ints as one int64 tensor."""
    version, internal, gauss_next = state
    internal_tensor = torch.tensor(internal, dtype=torch.int64)
    return {"version": int(version), "internal": internal_tensor, "gauss_next": gauss_next}


def _python_state(plain: dict[str, Any]) -> tuple:
    internal = tuple(int(v) for v in plain["internal"].tolist())
    return (int(plain["version"]), internal, plain["gauss_next"])


def save_checkpoint(
    run_dir: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    instance_rng: random.Random,
    tokenizer: Tokenizer,
    embeddings: LabelEmbeddings,
    model_config: ModelConfig,
    config: TrainConfig,
    options: RunOptions,
    world: Distributed,
) -> Path:
    """Write ``step_XXXXXXXX`` atomically: everything into a temporary directory, the ``complete`` marker
    last, then one rename. A crash leaves either the previous checkpoints or a finished new one."""
    final = checkpoint_dir(run_dir, state.step)
    tmp = final.with_name(f".tmp_{final.name}")
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    # Collective under FSDP: every rank takes part, rank 0 gets the full tensors.
    options_sd = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options_sd)
    torch.save(rng_states(instance_rng, next(model.parameters()).device), tmp / f"rng_rank{world.rank}.pt")
    if world.main:
        torch.save(model_sd, tmp / "model.pt")
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        tokenizer.save(tmp / "tokenizer")
        save_embeddings(embeddings, tmp / "label_embeddings.npz")
        meta = {
            "state": asdict(state),
            "model_config": model_config.to_dict(),
            "train_config": config.to_dict(),
            "dataset": options.dataset,
            "labels_root": labels_root(options.labels_root),
            "vqa_annotations": list(options.vqa_annotations),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
    world.barrier()
    if world.main:
        _write_synced(tmp / COMPLETE, b"ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        prune_checkpoints(run_dir, config.keep_checkpoints)
        logger.info("checkpoint %s", final)
    world.barrier()
    return final


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    complete = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if (p / COMPLETE).exists())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    world: Distributed,
    num_workers: int,
) -> tuple[TrainState, dict[str, Any] | None]:
    """Restore model, optimizer, scheduler and scaler in place; return the train state and this rank's RNG
    states (restored by the caller once the loader exists)."""
    model_sd = load_tensors(path / "model.pt")
    optim_sd = load_tensors(path / "optimizer.pt")
    with reading_checkpoint(path):  # e.g. the optimizer state of another model
        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_sd,
            optim_state_dict=optim_sd,
            options=StateDictOptions(full_state_dict=True),
        )
    scheduler_sd = load_tensors(path / "scheduler.pt")
    with reading_checkpoint(path / "scheduler.pt"):
        scheduler.load_state_dict(scheduler_sd)
    if scaler is not None and (path / "scaler.pt").exists():
        scaler_sd = load_tensors(path / "scaler.pt")
        with reading_checkpoint(path / "scaler.pt"):
            scaler.load_state_dict(scaler_sd)
    with reading_checkpoint(path / "trainer_state.json"):
        meta = json.loads((path / "trainer_state.json").read_text())
        state = TrainState(**meta["state"])
    if (state.world_size, state.num_workers) != (world.world_size, num_workers):
        logger.warning(
            "checkpoint was written with %d ranks x %d workers, now %d x %d: the data order differs from "
            "an uninterrupted run (the position in samples is kept)",
            state.world_size,
            state.num_workers,
            world.world_size,
            num_workers,
        )
    state.world_size, state.num_workers = world.world_size, num_workers
    rng_file = path / f"rng_rank{world.rank}.pt"
    if not rng_file.exists():
        return state, None
    plain = load_tensors(rng_file)
    with reading_checkpoint(rng_file):
        return state, native_rng_states(plain)


class CheckpointUnreadable(ValueError):
    """A checkpoint file that cannot be loaded, or that is refused because loading it could run code.

    A ``ValueError``, so ``python -m prismer_trainer`` prints it as one line and exits 2."""


_RESUME_HINT = (
    "delete that checkpoint directory (the previous one is then used), or start again with --no-resume "
    "(add --init-checkpoint <its model.pt> to keep the weights)"
)
_INIT_HINT = "--init-checkpoint takes a checkpoint directory or a state-dict file of tensors"


def load_tensors(path: Path, hint: str = _RESUME_HINT) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code."""
    with reading_checkpoint(path, hint):
        return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def reading_checkpoint(path: Path, hint: str = _RESUME_HINT) -> Iterator[None]:
    """Turn any failure while reading or applying a checkpoint file into one :class:`CheckpointUnreadable`.

    Broken files fail in many ways (zip, pickle, JSON, key and shape errors), so everything is wrapped;
    the original exception stays chained for ``--debug``-style inspection.
    """
    try:
        yield
    except CheckpointUnreadable:
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointUnreadable(
            f"refusing checkpoint file {path}: {load_error_reason(exc)}; only tensors and plain containers "
            f"are loaded, anything else could run code here; {hint}"
        ) from exc
    except Exception as exc:
        reason = load_error_reason(exc)
        raise CheckpointUnreadable(f"cannot load checkpoint file {path}: {reason}; {hint}") from exc


def save_embeddings(embeddings: LabelEmbeddings, path: Path) -> None:
    arrays = {f"class_{k}": v for k, v in embeddings.classes.items()}
    np.savez(path, background=embeddings.background, source=np.array(embeddings.source), **arrays)


def load_embeddings(path: Path) -> LabelEmbeddings:
    with np.load(path) as data:
        classes = {k.removeprefix("class_"): data[k] for k in data.files if k.startswith("class_")}
        return LabelEmbeddings(classes, data["background"], source=str(data["source"]))
