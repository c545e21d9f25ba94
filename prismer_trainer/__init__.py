"""Prismer trainer: the Prismer vision-language model (this file's exports), the data path from label
shards to batches (``shards``, ``samples``, ``augment``, ``batches``, ``stream``), and the training loop
(``train``, ``checkpoint``, ``evaluate``). docs/ARCHITECTURE.md lists every module."""

from prismer_trainer.beam_search import GenerationOutput
from prismer_trainer.model import (
    PrismerModel,
    PrismerOutput,
    adapt_state_dict,
    caption_loss,
    embedding_map,
)
from prismer_trainer.model_config import FREEZE_MODES, PRESETS, ModelConfig
from prismer_trainer.pretrained import PretrainedUnavailable, load_pretrained

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
