"""Prismer model configuration: one typed dataclass, validated on construction, with named presets.

``prismer_base`` / ``prismer_large`` reproduce the released models (CLIP ViT-B/16 + roberta-base,
CLIP ViT-L/14@336px + roberta-large); ``tiny`` is a few-MB model with the same structure for tests and
the CPU demo. ``experts=()`` gives PrismerZ (RGB only: no expert stems, no resampler).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

# Expert label inputs the model knows: name -> input channels (categorical ones carry 64-d class embeddings).
DENSE_EXPERTS: dict[str, int] = {"depth": 1, "normal": 3, "edge": 1}
CATEGORICAL_EXPERTS: tuple[str, ...] = ("seg_coco", "seg_ade", "obj_detection", "ocr_detection")
KNOWN_EXPERTS: tuple[str, ...] = (*DENSE_EXPERTS, *CATEGORICAL_EXPERTS)
# The released models' expert list, in the order of their state-dict stems.
DEFAULT_EXPERTS: tuple[str, ...] = ("depth", "normal", "seg_coco", "edge", "obj_detection", "ocr_detection")
FREEZE_MODES: tuple[str, ...] = ("none", "freeze_lang", "freeze_vision", "freeze_lang_vision")
# Hub ids without an organisation were moved; the hub resolves them only through redirects.
LEGACY_HUB_IDS: dict[str, str] = {
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
}

_Config = TypeVar("_Config")


def config_from_dict(cls: type[_Config], data: Mapping[str, Any]) -> _Config:
    """``cls(**data)`` for a config dataclass, naming unknown fields (e.g. from a newer checkpoint)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    return cls(**dict(data))


@dataclass
class ModelConfig:
    """Hyper-parameters of a Prismer model. Build presets with :meth:`preset`."""

    name: str = "custom"
    experts: tuple[str, ...] = DEFAULT_EXPERTS
    image_resolution: int = 224
    # Vision: CLIP ViT (no CLS token, no projection) with one trainable adaptor per block.
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    # Expert encoding: per-expert stems, then a Perceiver resampler down to ``num_latents`` tokens.
    expert_embed_dim: int = 64
    num_instance_embeddings: int = 128
    resampler_layers: int = 4
    resampler_heads: int = 8
    num_latents: int = 64
    # Language: RoBERTa decoder with cross-attention + adaptor per layer and one extra output layer.
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 50265
    max_positions: int = 514
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # Which parameters train (see prismer_trainer.model.is_frozen_parameter).
    freeze: str = "freeze_lang_vision"
    # transformers checkpoints for load_pretrained (hub id or local dir); "" = none exists (tiny).
    vision_pretrained: str = "openai/clip-vit-base-patch16"
    text_pretrained: str = "roberta-base"

    def __post_init__(self) -> None:
        self.experts = tuple(self.experts)
        self._check_experts()
        self._check_sizes()
        if self.freeze not in FREEZE_MODES:
            raise ValueError(f"freeze must be one of {FREEZE_MODES}, got {self.freeze!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"{name}={getattr(self, name)} is outside the vocabulary ({self.vocab_size})"
                )

    def _check_experts(self) -> None:
        unknown = [e for e in self.experts if e not in KNOWN_EXPERTS]
        if unknown:
            raise ValueError(f"unknown experts {unknown}; known: {list(KNOWN_EXPERTS)}")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"experts listed twice: {list(self.experts)}")

    def _check_sizes(self) -> None:
        positive = (
            "image_resolution patch_size vision_width vision_layers vision_heads expert_embed_dim "
            "num_instance_embeddings resampler_layers resampler_heads num_latents text_width text_layers "
            "text_heads text_intermediate vocab_size max_positions"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_resolution < self.patch_size:
            raise ValueError(f"image_resolution {self.image_resolution} < patch_size {self.patch_size}")
        # Expert stems use width/8, /4, /2 channels.
        if self.vision_width % 8:
            raise ValueError(f"vision_width must be a multiple of 8, got {self.vision_width}")
        for width, heads in (("vision_width", "vision_heads"), ("vision_width", "resampler_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(
                    f"{width}={getattr(self, width)} is not divisible by {heads}={getattr(self, heads)}"
                )
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width={self.text_width} is not divisible by text_heads={self.text_heads}")

    # ----------------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """RGB patch grid side: the positional embedding has ``grid_size**2`` rows."""
        return self.image_resolution // self.patch_size

    @property
    def num_vision_tokens(self) -> int:
        """Tokens the decoder cross-attends to: RGB patches plus the resampler latents (if any experts)."""
        return self.grid_size**2 + (self.num_latents if self.experts else 0)

    @property
    def is_prismerz(self) -> bool:
        return not self.experts

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["experts"] = list(self.experts)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return config_from_dict(cls, data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (``prismer_base``, ``prismer_large``, ``tiny``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "prismer_base": dict(name="prismer_base"),
    "prismer_large": dict(
        name="prismer_large",
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        text_width=1024,
        text_layers=24,
        text_heads=16,
        text_intermediate=4096,
        vision_pretrained="openai/clip-vit-large-patch14-336",
        text_pretrained="roberta-large",
    ),
    # Same structure, tiny widths: forward+backward of a batch of 2 at 224 px well under a second on CPU.
    "tiny": dict(
        name="tiny",
        vision_width=64,
        vision_layers=2,
        vision_heads=2,
        resampler_layers=2,
        resampler_heads=2,
        num_latents=8,
        text_width=64,
        text_layers=2,
        text_heads=2,
        text_intermediate=128,
        vision_pretrained="",
        text_pretrained="",
    ),
}
