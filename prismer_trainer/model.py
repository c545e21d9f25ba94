"""Prismer (Liu et al., "Prismer: A Vision-Language Model with Multi-Task Experts", TMLR 2024) in one file.

Structure (module names give exactly the state-dict keys of the released checkpoints):

* ``expert_encoder``: a CLIP ViT without CLS token and projection. ``conv1.rgb`` patchifies the image;
  every expert label (depth, normal, edge, seg, object detection, OCR) has its own conv stem that yields a
  token grid of the same size. All grids share the positional embedding. Object-detection tokens also get
  a learned instance embedding (a random row per instance id, so instance identity is permutation
  invariant). The expert tokens are compressed by a Perceiver resampler to ``num_latents`` tokens and
  appended to the RGB tokens, then go through the (frozen) CLIP blocks, each followed by a trainable adaptor.
* ``text_decoder``: RoBERTa whose (frozen) layers are each followed by a new cross-attention to the vision
  tokens and an adaptor, plus one new output layer and the LM head tied to the word embeddings.

Everything is batch-first (``[batch, tokens, width]``); the original ran the ViT sequence-first.
Reference: github.com/NVlabs/prismer (``model/``); this is an independent implementation.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from prismer_trainer.beam_search import GenerationOutput, KeyValue, beam_search
from prismer_trainer.model_config import CATEGORICAL_EXPERTS, DENSE_EXPERTS, FREEZE_MODES, ModelConfig

logger = logging.getLogger(__name__)

# state_dict() lists these twice: the LM-head decoder is tied to the word embeddings, and its bias *is*
# ``lm_head.bias`` (as in HF RoBERTa). Released checkpoints contain both names.
ALIASES: dict[str, str] = {
    "text_decoder.lm_head.decoder.weight": "text_decoder.roberta.embeddings.word_embeddings.weight",
    "text_decoder.lm_head.decoder.bias": "text_decoder.lm_head.bias",
}


_POSITION_IDS = "text_decoder.roberta.embeddings.position_ids"

Context = torch.Tensor | KeyValue | None  # what a text attention attends to besides itself
Vision = torch.Tensor | list[KeyValue]  # vision tokens, or every decoder layer's cross-attention keys/values


def stem_name(expert: str) -> str:
    """conv1 key of an expert: both segmentation experts share the ``seg`` stem."""
    return "seg" if expert.startswith("seg") else expert


# ================================================================================================
# Building blocks
# ================================================================================================
class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU (the pretrained ViT was trained with it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(F.relu(x))


class Adaptor(nn.Module):
    """Residual MLP with a squared-ReLU and no bottleneck (down dim = width).

    Vision (pre-norm): ``x + up(act(down(LN x)))``; text (``norm_late``, post-norm like RoBERTa):
    ``LN(up(act(down x)) + x)``.
    """

    def __init__(self, width: int, norm_late: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm_late = norm_late
        self.adaptor = nn.Sequential(
            OrderedDict(
                [
                    ("down_proj", nn.Linear(width, width)),
                    ("sq_relu", SquaredReLU()),
                    ("up_proj", nn.Linear(width, width)),
                ]
            )
        )
        self.adaptor_ln = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_late:
            return self.adaptor_ln(self.adaptor(x) + x)
        return self.adaptor(self.adaptor_ln(x)) + x


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # b n (h d) -> b h n d


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)  # b h n d -> b n (h d)


class PackedAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout (packed q/k/v), batch-first."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Self-attention over ``x``, or ``x`` attending to ``context``; ``key_mask`` ``[b, n_keys]`` (True =
        attend) hides keys, e.g. the tokens of an expert a sample has no label for."""
        if context is None:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            width = x.shape[-1]
            w_q, w_kv = self.in_proj_weight.split([width, 2 * width])
            b_q, b_kv = self.in_proj_bias.split([width, 2 * width])
            q = F.linear(x, w_q, b_q)
            k, v = F.linear(context, w_kv, b_kv).chunk(2, dim=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return self.out_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class Mlp(nn.Sequential):
    """Width -> 4 width -> width MLP with CLIP's key names (``c_fc``, ``c_proj``)."""

    def __init__(self, width: int, activation: nn.Module, act_name: str) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    (act_name, activation),
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )


# ================================================================================================
# Vision: CLIP ViT + expert stems + Perceiver resampler
# ================================================================================================
class ClipBlock(nn.Module):
    """A pretrained CLIP residual block (frozen in pre-training); AdaptedClipBlock runs its two halves."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = PackedAttention(width, heads)
        self.mlp = Mlp(width, QuickGELU(), "gelu")
        self.ln_1 = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)


class AdaptedClipBlock(nn.ModuleList):
    """``[ClipBlock, Adaptor]``: attention, adaptor, then MLP (list indices give the ``.0.``/``.1.`` keys)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__([ClipBlock(width, heads), Adaptor(width)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch types container items (and buffers) as plain Modules: the casts name what they hold.
        block, adaptor = cast(ClipBlock, self[0]), self[1]
        x = x + block.attn(block.ln_1(x))
        x = adaptor(x)
        return x + block.mlp(block.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([AdaptedClipBlock(width, heads) for _ in range(layers)])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = _run(block, self.gradient_checkpointing, x)
        return x


class PerceiverBlock(nn.Module):
    """Latents attend to ``[latents; expert tokens]`` (Flamingo-style), then a squared-ReLU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = PackedAttention(width, heads)
        self.mlp = Mlp(width, SquaredReLU(), "sq_relu")
        self.ln_1 = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        self.ln_ff = nn.LayerNorm(width)

    def forward(
        self, latents: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        query = self.ln_1(latents)
        key_mask = None
        if token_mask is not None:  # the latents themselves are always visible
            key_mask = torch.cat([token_mask.new_ones(query.shape[:2]), token_mask], dim=1)
        latents = latents + self.attn(query, torch.cat([query, self.ln_2(tokens)], dim=1), key_mask)
        return latents + self.mlp(self.ln_ff(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, num_latents: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(width**-0.5 * torch.randn(num_latents, width))
        self.perceiver_blocks = nn.ModuleList([PerceiverBlock(width, heads) for _ in range(layers)])

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[b, n, d]`` expert tokens (``token_mask`` ``[b, n]``, False = ignore) -> ``[b, latents, d]``."""
        latents = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for block in self.perceiver_blocks:
            latents = block(latents, tokens, token_mask)
        return latents


def expert_stem(in_channels: int, width: int, upsample: float, strides: Sequence[int]) -> nn.Sequential:
    """Resize, four conv3x3-BN-ReLU stages (width/8, /4, /2, 1), then a 1x1 conv: indices 1,2,4,5,...,13."""
    layers: list[nn.Module] = [nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=True)]
    channels = [in_channels, width // 8, width // 4, width // 2, width]
    for c_in, c_out, stride in zip(channels, channels[1:], strides):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    layers.append(nn.Conv2d(width, width, 1, bias=False))
    return nn.Sequential(*layers)


def resize_positional_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[s*s, d]`` -> ``[gh*gw, d]`` by bicubic interpolation (align_corners=False), as Prismer does."""
    side = math.isqrt(pos.shape[0])
    if side * side != pos.shape[0]:
        raise ValueError(f"positional embedding has {pos.shape[0]} rows, not a square grid")
    if (side, side) == tuple(grid):
        return pos
    image = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image.float(), size=tuple(grid), mode="bicubic", align_corners=False).to(pos.dtype)
    return image.permute(0, 2, 3, 1).flatten(0, 2)


def embedding_map(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-pixel class embeddings: ids ``[b, h, w]`` (or ``[b, 1, h, w]``) and a table ``[k, e]`` shared by
    the batch or ``[b, k, e]`` per sample -> ``[b, e, h, w]``. A pure gather, so the values equal a map built
    on the CPU."""
    if ids.dim() == 4:
        ids = ids[:, 0]
    ids = ids.long()
    if table.dim() == 2:
        emb = F.embedding(ids, table)
    elif table.dim() == 3 and table.shape[0] == ids.shape[0]:
        offsets = torch.arange(ids.shape[0], device=ids.device).view(-1, 1, 1) * table.shape[1]
        emb = F.embedding(ids + offsets, table.reshape(-1, table.shape[-1]))
    else:
        raise ValueError(
            f"table must be [k, e] or [batch, k, e]; got {tuple(table.shape)} for ids {tuple(ids.shape)}"
        )
    return emb.permute(0, 3, 1, 2)


class ExpertEncoder(nn.Module):
    """RGB + expert labels -> ``[b, grid**2 + num_latents, width]`` vision tokens."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width, patch = config.vision_width, config.patch_size
        self.experts = config.experts
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(config.grid_size**2, width))
        if "obj_detection" in config.experts:
            self.instance_embedding = nn.Parameter(
                width**-0.5 * torch.randn(config.num_instance_embeddings, width)
            )
        self.conv1 = nn.ModuleDict({"rgb": nn.Conv2d(3, width, patch, patch, bias=False)})
        for expert in config.experts:
            if stem_name(expert) in self.conv1:  # seg_coco and seg_ade share one stem
                continue
            if expert in DENSE_EXPERTS:
                stem = expert_stem(DENSE_EXPERTS[expert], width, 16 / patch, (2, 2, 2, 2))
            else:
                stem = expert_stem(config.expert_embed_dim, width, 4 / patch, (2, 2, 1, 1))
            self.conv1[stem_name(expert)] = stem
        self.transformer = VisionTransformer(width, config.vision_layers, config.vision_heads)
        if config.experts:
            self.resampler = PerceiverResampler(
                width, config.resampler_layers, config.resampler_heads, config.num_latents
            )
        self.ln_pre = nn.LayerNorm(width)
        self.ln_post = nn.LayerNorm(width)

    def forward(
        self,
        experts: Mapping[str, Any],
        instance_rows: Mapping[int, int] | None = None,
        rng: random.Random | None = None,
    ) -> torch.Tensor:
        """See :meth:`PrismerModel.encode` for the input format."""
        x = self._tokens(self.conv1["rgb"](experts["rgb"]))
        expert_tokens = [self._expert_tokens(name, experts, instance_rows, rng) for name in self.experts]
        if expert_tokens:
            mask = self._token_mask(experts.get("present"), expert_tokens)
            x = torch.cat([x, self.resampler(torch.cat(expert_tokens, dim=1), mask)], dim=1)
        return self.ln_post(self.transformer(self.ln_pre(x)))

    def _token_mask(
        self, present: Mapping[str, torch.Tensor] | None, expert_tokens: list[torch.Tensor]
    ) -> torch.Tensor | None:
        """``[b, n]`` True where a token comes from an expert the sample has a label for.

        ``present`` maps expert → ``[b]`` bool (missing entries count as present). None when nothing is
        missing, so a full batch runs exactly the original computation.
        """
        if not present or all(bool(present[n].all()) for n in self.experts if n in present):
            return None
        parts = []
        for name, tokens in zip(self.experts, expert_tokens):
            flags = present.get(name)
            if flags is None:
                flags = torch.ones(tokens.shape[0], dtype=torch.bool)
            parts.append(flags.to(tokens.device, torch.bool)[:, None].expand(-1, tokens.shape[1]))
        return torch.cat(parts, dim=1)

    def _tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """Stem output ``[b, d, h, w]`` -> tokens ``[b, h*w, d]`` + the shared (resized) pos. embedding."""
        pos = resize_positional_embedding(self.positional_embedding, (grid.shape[-2], grid.shape[-1]))
        pos = pos.to(grid.dtype)
        return grid.flatten(2).transpose(1, 2) + pos

    def _expert_tokens(
        self,
        name: str,
        experts: Mapping[str, Any],
        instance_rows: Mapping[int, int] | None,
        rng: random.Random | None,
    ) -> torch.Tensor:
        if name not in experts:
            raise KeyError(f"expert input {name!r} missing; this model needs {['rgb', *self.experts]}")
        value, instance = experts[name], None
        if name in CATEGORICAL_EXPERTS:
            value, instance = self._categorical_map(name, value)
        grid = self.conv1[stem_name(name)](value)
        if name == "obj_detection":
            grid = self._add_instance_embedding(grid, instance, instance_rows, rng)
        return self._tokens(grid)

    @staticmethod
    def _categorical_map(name: str, value: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A categorical input as a 64-d embedding map (+ the instance ids for object detection).

        Accepted: ``{"ids": [b,h,w] ints, "table": [k,64] or [b,k,64]}`` (built here, on the model's
        device), a prebuilt float map ``[b,64,h,w]``, or for obj_detection the original
        ``{"label": map, "instance": ids}``.
        """
        if isinstance(value, torch.Tensor):
            if name == "obj_detection":
                raise ValueError(
                    "obj_detection needs instance ids: pass {'ids', 'table'} or {'label', 'instance'}"
                )
            return value, None
        if "ids" in value:
            return embedding_map(value["ids"], value["table"]), value["ids"]
        return value["label"], value.get("instance")

    def _add_instance_embedding(
        self,
        grid: torch.Tensor,
        instance: torch.Tensor | None,
        instance_rows: Mapping[int, int] | None,
        rng: random.Random | None,
    ) -> torch.Tensor:
        """Add one instance-embedding row per instance id to the stem tokens of that instance.

        As in the original, one row is drawn per unique id of the *whole batch* (in sorted order, background
        255 included) with Python's ``random.randint``; ``instance_rows`` (id -> row) replaces the draw.
        """
        if instance is None:
            raise ValueError("obj_detection input has no instance ids")
        if instance.dim() == 3:
            instance = instance[:, None]
        ids = torch.unique(instance).tolist()
        rows = self._instance_rows(ids, instance_rows, rng)
        lookup = torch.zeros(max(ids) + 1, dtype=torch.long)
        lookup[torch.tensor(ids, dtype=torch.long)] = torch.tensor(rows, dtype=torch.long)
        small = F.interpolate(instance.float(), size=grid.shape[-2:], mode="nearest")[:, 0].long()
        emb = self.instance_embedding[lookup.to(grid.device)[small]]  # [b, h, w, d]
        return grid + emb.permute(0, 3, 1, 2).to(grid.dtype)

    def _instance_rows(
        self, ids: list[int], instance_rows: Mapping[int, int] | None, rng: random.Random | None
    ) -> list[int]:
        if instance_rows is not None:
            missing = [i for i in ids if i not in instance_rows]
            if missing:
                raise ValueError(f"instance_rows lacks ids {missing} (ids in batch: {ids})")
            return [int(instance_rows[i]) for i in ids]
        draw = (rng or random).randint  # the module-level RNG by default, like the original
        return [draw(0, self.instance_embedding.shape[0] - 1) for _ in ids]


# ================================================================================================
# Language: RoBERTa decoder with cross-attention and adaptors
# ================================================================================================
class TextSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)

    def keys_values(self, source: torch.Tensor) -> KeyValue:
        return _split_heads(self.key(source), self.heads), _split_heads(self.value(source), self.heads)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor | None = None, context: Context = None
    ) -> torch.Tensor:
        """Self-attention (``context=None``), else cross-attention to tokens or precomputed keys/values."""
        q = _split_heads(self.query(x), self.heads)
        k, v = context if isinstance(context, tuple) else self.keys_values(x if context is None else context)
        bias = None
        if allowed is not None:
            # HF-style additive mask (finfo.min, not -inf): a fully masked row stays finite.
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~allowed, torch.finfo(q.dtype).min)
        p = self.dropout if self.training else 0.0
        return _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p))


class TextOutput(nn.Module):
    """RoBERTa's post-norm output of attention or FFN: ``LN(dropout(dense x) + residual)``."""

    def __init__(self, in_width: int, width: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class TextAttention(nn.Module):
    """Post-norm RoBERTa attention; with ``context``, cross-attention (keys/values from vision tokens)."""

    def __init__(self, config: ModelConfig, kv_width: int | None = None) -> None:
        super().__init__()
        width = config.text_width
        self.self = TextSelfAttention(width, config.text_heads, kv_width or width, config.attention_dropout)
        self.output = TextOutput(width, width, config.layer_norm_eps, config.hidden_dropout)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor | None = None, context: Context = None
    ) -> torch.Tensor:
        return self.output(self.self(x, allowed, context), x)


class TextIntermediate(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TextLayer(nn.Module):
    """A pretrained RoBERTa layer; Prismer runs its attention and its FFN separately."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = TextAttention(config)
        self.intermediate = TextIntermediate(config.text_width, config.text_intermediate)
        self.output = TextOutput(
            config.text_intermediate, config.text_width, config.layer_norm_eps, config.hidden_dropout
        )

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.attention(x, allowed))


class DecoderLayer(nn.ModuleList):
    """``[TextLayer, cross-attention, Adaptor]``: self-attn, cross-attn to vision, adaptor, FFN."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            [
                TextLayer(config),
                TextAttention(config, kv_width=config.vision_width),
                Adaptor(config.text_width, norm_late=True, eps=1e-5),
            ]
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, vision: Context) -> torch.Tensor:
        layer, cross_attention, adaptor = cast(TextLayer, self[0]), self[1], self[2]
        x = layer.attention(x, allowed)
        x = cross_attention(x, context=vision)
        x = adaptor(x)
        return layer.feed_forward(x)


class TextEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pad_token_id = config.pad_token_id
        # Kept only so the state dict matches HF 4.26 checkpoints; positions are computed from the ids.
        self.register_buffer("position_ids", torch.arange(config.max_positions).expand(1, -1).clone())
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.text_width, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(
            config.max_positions, config.text_width, padding_idx=config.pad_token_id
        )
        self.token_type_embeddings = nn.Embedding(1, config.text_width)
        self.LayerNorm = nn.LayerNorm(config.text_width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # RoBERTa positions: real tokens count up from pad_id + 1, pads sit at pad_id.
        not_pad = input_ids.ne(self.pad_token_id).long()
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class TextEncoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([DecoderLayer(config) for _ in range(config.text_layers)])
        self.output_layer = TextLayer(config)  # new; no cross-attention
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, vision: Vision) -> torch.Tensor:
        for i, layer in enumerate(self.layer):
            context = vision[i] if isinstance(vision, list) else vision
            x = _run(layer, self.gradient_checkpointing, x, allowed, context)
        return self.output_layer(x, allowed)


class RobertaBackbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embeddings = TextEmbeddings(config)
        self.encoder = TextEncoder(config)

    def forward(self, input_ids: torch.Tensor, allowed: torch.Tensor, vision: Vision) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids), allowed, vision)


class LMHead(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.text_width, config.text_width)
        self.layer_norm = nn.LayerNorm(config.text_width, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.text_width, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(x))))


def decoder_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal AND key-not-padding, ``[b, 1, q, k]`` booleans (True = may attend)."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


class TextDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.roberta = RobertaBackbone(config)
        self.lm_head = LMHead(config)
        self.apply(_init_text_weights)  # before tying, so the embeddings' padding rows stay zero
        self.tie_weights()

    def tie_weights(self) -> None:
        """LM-head decoder weight = word embeddings, decoder bias = ``lm_head.bias`` (as HF RoBERTa)."""
        self.lm_head.decoder.weight = self.roberta.embeddings.word_embeddings.weight
        self.lm_head.decoder.bias = self.lm_head.bias

    def cross_keys_values(self, vision: torch.Tensor) -> list[KeyValue]:
        """Per-layer cross-attention keys/values of the vision tokens, to reuse across generation steps."""
        layers = cast(Iterable[DecoderLayer], self.roberta.encoder.layer)
        return [cast(TextAttention, layer[1]).self.keys_values(vision) for layer in layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        vision: Vision,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(last hidden state [b, n, d], logits [b, n or 1, vocab])``.

        ``vision``: vision tokens ``[b, m, vision_width]`` or :meth:`cross_keys_values` of them.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.roberta(input_ids, decoder_attention_mask(attention_mask), vision)
        return hidden, self.lm_head(hidden[:, -1:] if last_only else hidden)


def _run(module: nn.Module, use_checkpoint: bool, *args: torch.Tensor | KeyValue | None) -> torch.Tensor:
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


# ================================================================================================
# The model
# ================================================================================================
@dataclass
class PrismerOutput:
    logits: torch.Tensor  # [b, n, vocab]
    vision_tokens: torch.Tensor  # [b, grid**2 + num_latents, vision_width]
    hidden_states: torch.Tensor  # decoder last hidden state (before the LM head), [b, n, text_width]
    loss: torch.Tensor | None = None  # mean over the batch of loss_per_sample
    loss_per_sample: torch.Tensor | None = None  # token losses summed per sample, [b]


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy (label smoothing 0.1, -100 ignored), summed per sample: ``[b]``."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shifted, targets, reduction="none", label_smoothing=label_smoothing)
    return loss.view(labels.shape[0], -1).sum(1)


def is_frozen_parameter(name: str, mode: str) -> bool:
    """Prismer's freezing rule: the pretrained CLIP blocks (``resblocks.N.0``) and/or RoBERTa layers
    (``layer.N.0``) are frozen; stems, embeddings, resampler, adaptors, cross-attention and heads train."""
    if mode not in FREEZE_MODES:
        raise ValueError(f"freeze mode must be one of {FREEZE_MODES}, got {mode!r}")
    vision = re.match(r"expert_encoder\.transformer\.resblocks\.\d+\.0\.", name) is not None
    language = re.match(r"text_decoder\.roberta\.encoder\.layer\.\d+\.0\.", name) is not None
    return (vision and mode in ("freeze_vision", "freeze_lang_vision")) or (
        language and mode in ("freeze_lang", "freeze_lang_vision")
    )


class PrismerModel(nn.Module):
    """Prismer for captioning / VQA (the original ``PrismerCaption``/``PrismerVQA`` share this state dict)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.expert_encoder = ExpertEncoder(config)
        self.text_decoder = TextDecoder(config)
        self.set_freeze(config.freeze)

    # ---------------------------------------------------------------------------------------------- setup
    def set_freeze(self, mode: str) -> None:
        """Apply a freezing mode (``none``, ``freeze_lang``, ``freeze_vision``, ``freeze_lang_vision``)."""
        for name, param in self.named_parameters():
            param.requires_grad_(not is_frozen_parameter(name, mode))
        self.freeze_mode = mode

    def to_empty(self, *, device: torch.device | str | int | None, recurse: bool = True) -> PrismerModel:
        """As nn.Module.to_empty (e.g. after building on ``meta``), keeping the LM head tied."""
        super().to_empty(device=device, recurse=recurse)
        self.text_decoder.tie_weights()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen pretrained blocks (e.g. FSDP ``ignored_modules``)."""
        mode, modules = self.freeze_mode, []
        if mode in ("freeze_vision", "freeze_lang_vision"):
            blocks = cast(Iterable[AdaptedClipBlock], self.expert_encoder.transformer.resblocks)
            modules += [block[0] for block in blocks]
        if mode in ("freeze_lang", "freeze_lang_vision"):
            layers = cast(Iterable[DecoderLayer], self.text_decoder.roberta.encoder.layer)
            modules += [layer[0] for layer in layers]
        return modules

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ViT blocks and decoder layers in backward (memory for compute, e.g. LARGE at 480 px)."""
        self.expert_encoder.transformer.gradient_checkpointing = enabled
        self.text_decoder.roberta.encoder.gradient_checkpointing = enabled

    def load_prismer_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
        """Load a released/trained checkpoint, adapting its positional embedding to this resolution."""
        return self.load_state_dict(adapt_state_dict(state_dict, self), strict=strict)

    # ---------------------------------------------------------------------------------------------- run
    def encode(
        self,
        experts: Mapping[str, Any],
        instance_rows: Mapping[int, int] | None = None,
        rng: random.Random | None = None,
    ) -> torch.Tensor:
        """Vision tokens ``[b, grid**2 + num_latents, width]``.

        ``experts`` maps ``rgb`` (``[b,3,H,W]`` CLIP-normalised) and each configured expert to its input:
        dense experts (depth, edge ``[b,1,H,W]``, normal ``[b,3,H,W]``) as floats in [-1, 1]; categorical
        experts (seg_*, obj_detection, ocr_detection) as ``{"ids": [b,H,W] ints, "table": [k,64] | [b,k,64]}``
        (optional ``present``: expert → ``[b]`` bool; a False hides that sample's expert tokens)
        (the embedding map is built on the model's device) or as a prebuilt ``[b,64,H,W]`` map (obj_detection:
        ``{"label": map, "instance": ids}``). For obj_detection the ids double as instance ids; one
        instance-embedding row per id is drawn from ``rng`` (default: the ``random`` module), or taken from
        ``instance_rows`` (id -> row).
        """
        return self.expert_encoder(experts, instance_rows, rng)

    def forward(
        self,
        experts: Mapping[str, Any],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        instance_rows: Mapping[int, int] | None = None,
        rng: random.Random | None = None,
        label_smoothing: float = 0.1,
    ) -> PrismerOutput:
        """Teacher-forced decoding; with ``labels`` (pad/prompt positions = -100) also the caption loss."""
        vision = self.encode(experts, instance_rows, rng)
        hidden, logits = self.text_decoder(input_ids, attention_mask, vision)
        out = PrismerOutput(logits=logits, vision_tokens=vision, hidden_states=hidden)
        if labels is not None:
            out.loss_per_sample = caption_loss(logits, labels, label_smoothing)
            out.loss = out.loss_per_sample.mean()
        return out

    @torch.no_grad()
    def generate(
        self,
        experts: Mapping[str, Any] | None,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
        *,
        vision_tokens: torch.Tensor | None = None,
        num_beams: int = 3,
        max_length: int = 20,
        min_length: int = 8,
        length_penalty: float = 1.0,
        instance_rows: Mapping[int, int] | None = None,
        rng: random.Random | None = None,
    ) -> GenerationOutput:
        """Beam search from ``prompt_ids`` (e.g. ``<s>A picture of``, no ``</s>``), batched.

        Matches HF ``generate(num_beams=..., max_length=..., min_length=...)`` (lengths include the prompt,
        no early stopping, score = sum log-prob / length ** length_penalty); vision tokens are repeated per
        beam.
        """
        if vision_tokens is None:
            if experts is None:
                raise ValueError("pass experts or vision_tokens")
            vision_tokens = self.encode(experts, instance_rows, rng)
        return beam_search(
            self.text_decoder,
            vision_tokens,
            prompt_ids,
            prompt_mask,
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            length_penalty=length_penalty,
            pad_token_id=self.config.pad_token_id,
            eos_token_id=self.config.eos_token_id,
        )


def _init_text_weights(module: nn.Module) -> None:
    """RoBERTa's init (normal 0.02) for the decoder's modules; the pretrained ones are then overwritten."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def adapt_state_dict(state_dict: Mapping[str, torch.Tensor], model: PrismerModel) -> dict[str, torch.Tensor]:
    """Make a Prismer checkpoint loadable with ``strict=True``: drop a DDP ``module.`` prefix, resize the
    positional embedding to the model's grid (pre-train 224 -> fine-tune 480) and fill missing alias keys
    and the unused ``position_ids`` buffer (newer transformers versions do not save it)."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    key = "expert_encoder.positional_embedding"
    target = model.expert_encoder.positional_embedding
    if key in sd and sd[key].shape != target.shape:
        side = math.isqrt(target.shape[0])
        logger.info("resizing %s %s -> %s", key, tuple(sd[key].shape), tuple(target.shape))
        sd[key] = resize_positional_embedding(sd[key], (side, side))
    for alias, canonical in ALIASES.items():
        if alias not in sd and canonical in sd:
            sd[alias] = sd[canonical]
    sd.setdefault(_POSITION_IDS, cast(torch.Tensor, model.text_decoder.roberta.embeddings.position_ids))
    return sd
