"""Batches: collate :class:`~prismer_trainer.samples.Example` s into small tensors, and turn them into the
model's inputs on the device.

RGB and dense labels stay uint8; a categorical label is a uint8 id map plus, per sample, an id → row table
(``rows``) into a small per-batch embedding table (``tables``). :func:`to_model_inputs` builds the float
inputs and the 64-d embedding maps on the device. Prismer built 64×224×224 float maps per categorical
expert on the CPU (~38 MB per sample).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from prismer_trainer.embeddings import LabelEmbeddings
from prismer_trainer.samples import Example

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def collate(examples: Sequence[Example], embeddings: LabelEmbeddings, pad_id: int) -> dict[str, Any]:
    """Stack examples. Categorical experts become ``ids`` (uint8 maps), ``rows`` ([b, 256] int16: map
    value → row of ``tables``) and ``tables`` ([k, 64] float32: only the vectors this batch uses; row 0 is
    the background)."""
    batch: dict[str, Any] = {
        "keys": [e.key for e in examples],
        "rgb": torch.from_numpy(np.stack([e.rgb for e in examples])),
        "dense": {n: torch.from_numpy(np.stack([e.dense[n] for e in examples])) for n in examples[0].dense},
        "ids": {n: torch.from_numpy(np.stack([e.ids[n] for e in examples])) for n in examples[0].ids},
        "rows": {},
        "tables": {},
        "present": {
            n: torch.tensor([e.present[n] for e in examples], dtype=torch.bool) for n in examples[0].present
        },
        "input_ids": pad_batch([e.input_ids for e in examples], pad_id),
        "targets": pad_batch([e.targets for e in examples], -100),
        "weights": torch.tensor([e.weight for e in examples], dtype=torch.float32),
        "texts": [e.text for e in examples],
        "references": [e.references for e in examples],
        "questions": [e.question for e in examples],
        "question_ids": [e.question_id for e in examples],
        "answers": [e.answers for e in examples],
    }
    batch["attention_mask"] = _padding_mask(examples)
    for name in examples[0].ids:
        index: dict[tuple[str, Any], int] = {("bg", None): 0}
        rows = np.zeros((len(examples), 256), np.int16)
        for b, example in enumerate(examples):
            for value, token in example.tokens[name].items():
                rows[b, value] = index.setdefault(token, len(index))
        batch["rows"][name] = torch.from_numpy(rows)
        batch["tables"][name] = torch.from_numpy(np.stack([embeddings.vector(t) for t in index]))
    return batch


def _padding_mask(examples: Sequence[Example]) -> torch.Tensor:
    """1 on real tokens (prompt or supervised), 0 on padding."""
    width = max(len(e.input_ids) for e in examples)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, e in enumerate(examples):
        mask[i, : len(e.input_ids)] = 1
    return mask


def to_model_inputs(
    batch: Mapping[str, Any], device: torch.device | str, non_blocking: bool = False
) -> dict[str, Any]:
    """A collated batch → the model's ``experts`` dict, on ``device``.

    RGB: /255 then CLIP mean/std. Dense labels: per-sample min-max to [-1, 1] over all channels (Prismer's
    ``post_label_process``); a masked (missing) dense label is 0. Categorical: ``{"ids", "table"}`` with the
    per-sample table ``tables[rows]`` ([b, 256, 64]); a missing one is all background.
    """
    move = {"device": device, "non_blocking": non_blocking}
    rgb = batch["rgb"].to(**move).float().div_(255)
    mean = torch.tensor(CLIP_MEAN, device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=rgb.device).view(1, 3, 1, 1)
    experts: dict[str, Any] = {"rgb": (rgb - mean) / std}
    for name, label in batch["dense"].items():
        x = label.to(**move).float().div_(255)
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        high = x.amax(dim=(1, 2, 3), keepdim=True)
        x = 2 * (x - low) / (high - low + 1e-6) - 1
        present = batch["present"][name].to(**move).view(-1, 1, 1, 1)
        experts[name] = torch.where(present, x, torch.zeros_like(x))
    for name, ids in batch["ids"].items():
        table = batch["tables"][name].to(**move)
        rows = batch["rows"][name].to(**move).long()
        experts[name] = {"ids": ids.to(**move), "table": table[rows]}
    # The model hides the tokens of missing experts from its resampler (a mask, not just zeros).
    experts["present"] = {name: flags.to(**move) for name, flags in batch["present"].items()}
    return experts


def batch_nbytes(batch: Any) -> int:
    """Bytes of all tensors in a (nested) batch: what crosses from loader workers to the trainer."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, Mapping):
        return sum(batch_nbytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(batch_nbytes(v) for v in batch)
    return 0


def pad_batch(sequences: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out
