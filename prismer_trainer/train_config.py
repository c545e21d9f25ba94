"""Training configurations: one typed dataclass, validated on construction, with Prismer's stages.

Prismer's hyper-parameters (``configs/{pretrain,caption,vqa}.yaml`` and ``train_*.py`` of NVlabs/prismer):

=========  ====  ==================  ======  ============  ===============  ======  ======
stage      res   freeze              batch   lr            schedule         warmup  epochs
=========  ====  ==================  ======  ============  ===============  ======  ======
pretrain   224   freeze_lang_vision  1024    3e-4 / 1e-4   cosine per epoch 2000    20
caption    480   freeze_vision       256     5e-5          cosine per step  0       3
vqa        480   freeze_vision       512     5e-5          cosine per epoch 0       10
=========  ====  ==================  ======  ============  ===============  ======  ======

(lr: BASE / LARGE; pre-train cosine ends at 1e-6, fine-tuning at 0; warmup is linear from 1e-6.) All use
AdamW with weight decay 0.05 on every trainable parameter. ``tiny`` is the CPU demo: a model trained from
scratch, so nothing is frozen, with a higher learning rate and a fixed number of steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prismer_trainer.model_config import FREEZE_MODES, PRESETS, config_from_dict

STAGES: tuple[str, ...] = ("pretrain", "caption", "vqa")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
PARALLEL: tuple[str, ...] = ("ddp", "fsdp")
COSINE_PER: tuple[str, ...] = ("step", "epoch")


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model config. ``batch_size`` is global (all devices, all
    accumulation steps); ``micro_batch_size`` is what one device runs per forward."""

    stage: str = "pretrain"
    model: str = "prismer_base"  # a ModelConfig preset
    # Optimisation
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_steps: int = 2000
    warmup_start_lr: float = 1e-6
    cosine_per: str = "epoch"
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: float = 20.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 1024
    micro_batch_size: int = 32
    grad_clip: float = 0.0  # 0 = off (Prismer does not clip)
    precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp16 + grad scaler; fp32 on CPU
    parallel: str = "ddp"  # ddp | fsdp (SHARD_GRAD_OP, i.e. ZeRO-2, as the paper)
    gradient_checkpointing: bool = False
    # Data
    task: str = "caption"  # caption (pre-train and captioning) | vqa
    freeze: str = "freeze_lang_vision"
    resolution: int = 224
    label_resolution: int = 224
    crop_scale: tuple[float, float] = (0.5, 1.5)
    hflip: float = 0.5
    randaug_n: int = 2
    randaug_m: int = 5
    prefix: str = ""
    max_words: int = 30
    max_tokens: int = 30
    shuffle_buffer: int = 1000
    num_workers: int = 4
    seed: int = 42
    # Evaluation (caption beam search as Prismer: 3 beams, length 8-20 including the prompt)
    num_beams: int = 3
    min_length: int = 8
    max_length: int = 20
    vqa_candidates: int = 16  # rank mode: re-score the top-k answers by their first token
    # Bookkeeping
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    sample_captions: int = 4  # greedy captions printed at the end (and with each checkpoint)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.crop_scale = tuple(self.crop_scale)  # type: ignore[assignment]
        self._check_choices()
        self._check_numbers()

    def _check_choices(self) -> None:
        choices = {
            "stage": STAGES,
            "precision": PRECISIONS,
            "parallel": PARALLEL,
            "cosine_per": COSINE_PER,
            "task": ("caption", "vqa"),
            "freeze": FREEZE_MODES,
            "model": tuple(PRESETS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def _check_numbers(self) -> None:
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr or not 0 <= self.warmup_start_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr, warmup_start_lr <= lr (lr={self.lr})")
        for name in ("batch_size", "micro_batch_size", "resolution", "label_resolution", "max_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of {self.micro_batch_size}")
        for name in ("warmup_steps", "shuffle_buffer", "num_workers", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError("set epochs > 0 or max_steps")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi, got {self.crop_scale}")
        if not 0 < self.min_length <= self.max_length or self.num_beams < 1:
            raise ValueError("need 0 < min_length <= max_length and num_beams >= 1")
        if min(self.log_every, self.checkpoint_every, self.keep_checkpoints) < 1:
            raise ValueError("log_every, checkpoint_every and keep_checkpoints must be >= 1")

    # ----------------------------------------------------------------------------------------------
    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each device."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by micro_batch_size {self.micro_batch_size}"
                f" x {world_size} devices"
            )
        return self.batch_size // per_step

    def steps_per_epoch(self, dataset_size: int | None) -> int | None:
        return None if not dataset_size else max(1, dataset_size // self.batch_size)

    def total_steps(self, dataset_size: int | None) -> int:
        if self.max_steps is not None:
            return self.max_steps
        per_epoch = self.steps_per_epoch(dataset_size)
        if per_epoch is None:
            raise ValueError("the dataset size is unknown (no done-records): pass max_steps")
        return max(1, round(self.epochs * per_epoch))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return config_from_dict(cls, data)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def stage_config(stage: str, model: str = "prismer_base", **overrides: Any) -> TrainConfig:
    """Prismer's hyper-parameters for ``stage`` and model preset ``model`` (``tiny``: the CPU demo)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    base: dict[str, Any] = dict(_PRISMER[stage])
    base.update(stage=stage, model=model)
    if stage == "pretrain" and model == "prismer_large":
        base["lr"] = 1e-4
    if model == "tiny":
        base.update(_TINY)
        if stage != "pretrain":
            base["resolution"] = 224
    return TrainConfig(**{**base, **overrides})


_PRISMER: dict[str, dict[str, Any]] = {
    "pretrain": dict(
        lr=3e-4,
        min_lr=1e-6,
        warmup_steps=2000,
        cosine_per="epoch",
        epochs=20,
        batch_size=1024,
        micro_batch_size=32,
        resolution=224,
        freeze="freeze_lang_vision",
        crop_scale=(0.5, 1.5),
        prefix="",
    ),
    "caption": dict(
        lr=5e-5,
        min_lr=0.0,
        warmup_steps=0,
        cosine_per="step",
        epochs=3,
        batch_size=256,
        micro_batch_size=4,
        resolution=480,
        freeze="freeze_vision",
        crop_scale=(0.5, 1.0),
        prefix="A picture of",
    ),
    "vqa": dict(
        lr=5e-5,
        min_lr=0.0,
        warmup_steps=0,
        cosine_per="epoch",
        epochs=10,
        batch_size=512,
        micro_batch_size=8,
        resolution=480,
        freeze="freeze_vision",
        crop_scale=(0.5, 1.0),
        prefix="",
        task="vqa",
        max_words=30,
    ),
}

# The CPU demo: a tiny model from scratch (nothing pretrained to freeze) that visibly learns in minutes.
_TINY: dict[str, Any] = dict(
    lr=1e-3,
    min_lr=1e-5,
    warmup_steps=20,
    warmup_start_lr=1e-5,
    cosine_per="step",
    max_steps=300,
    batch_size=8,
    micro_batch_size=8,
    freeze="none",
    num_workers=2,
    shuffle_buffer=16,
    precision="fp32",
    log_every=20,
    checkpoint_every=100,
    sample_captions=6,
)
