"""Prismer trainer: the Prismer vision-language model (this file's exports) plus its data loader and
training loop (``loader``, ``train``)."""

from prismer_trainer.config import FREEZE_MODES, PRESETS, ModelConfig
from prismer_trainer.model import (
    GenerationOutput,
    PretrainedUnavailable,
    PrismerModel,
    PrismerOutput,
    adapt_state_dict,
    caption_loss,
    embedding_map,
    load_pretrained,
)

__all__ = [
    "FREEZE_MODES",
    "PRESETS",
    "GenerationOutput",
    "ModelConfig",
    "PretrainedUnavailable",
    "PrismerModel",
    "PrismerOutput",
    "adapt_state_dict",
    "caption_loss",
    "embedding_map",
    "load_pretrained",
]
