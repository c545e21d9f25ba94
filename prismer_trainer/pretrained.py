"""Pretrained CLIP / RoBERTa weights into a Prismer model, from transformers checkpoints.

The ViT comes from a CLIP vision tower (CLS token and projection dropped, q/k/v packed, positional
embedding resized to the model's grid), the decoder's pretrained half from RoBERTa. Sources: a hub id,
``hf-hub:org/repo/file``, a local ``save_pretrained`` directory or a weights file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from prismer_trainer.model import PrismerModel, resize_positional_embedding
from prismer_trainer.model_config import LEGACY_HUB_IDS, ModelConfig

logger = logging.getLogger(__name__)


class PretrainedUnavailable(RuntimeError):
    """A pretrained CLIP/RoBERTa checkpoint cannot be found or fetched; the message says how to fix it."""


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_pretrained(
    model: PrismerModel, vision: str | bool = True, language: str | bool = True
) -> dict[str, list[str]]:
    """Initialise the ViT from a transformers CLIP checkpoint and the decoder from a transformers RoBERTa one.

    ``vision`` / ``language``: ``True`` = the config's default (``vision_pretrained``/``text_pretrained``),
    ``False`` = skip, or a source: a hub id (``openai/clip-vit-base-patch16``), ``hf-hub:org/repo/file``,
    a local checkpoint directory (``save_pretrained`` output) or a weights file. New parts (stems,
    resampler, adaptors, cross-attention, output layer) keep their initialisation. Returns the loaded keys.
    """
    config, loaded = model.config, {}
    if vision:
        source = config.vision_pretrained if vision is True else vision
        hf_state = read_transformers_checkpoint(source, what="CLIP vision", arg="vision")
        loaded["vision"] = _copy_into(model, clip_to_prismer(hf_state, config, source))
    if language:
        source = config.text_pretrained if language is True else language
        hf_state = read_transformers_checkpoint(source, what="RoBERTa", arg="language")
        loaded["language"] = _copy_into(model, roberta_to_prismer(hf_state, config, source))
    return loaded


def _copy_into(model: PrismerModel, mapped: dict[str, torch.Tensor]) -> list[str]:
    own = model.state_dict()
    for key, value in mapped.items():
        if own[key].shape != value.shape:
            raise ValueError(
                f"pretrained {key} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}: "
                f"the checkpoint does not fit the {model.config.name!r} config"
            )
        with torch.no_grad():
            own[key].copy_(value)
    logger.info("loaded %d pretrained tensors", len(mapped))
    return sorted(mapped)


def read_transformers_checkpoint(
    source: str, what: str = "pretrained", arg: str = "source"
) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint: a local dir or file, ``hf-hub:...`` or a hub model id."""
    if not source:
        raise PretrainedUnavailable(f"no {what} checkpoint configured; pass {arg}=<hub id or local dir>")
    path = Path(source).expanduser()
    if not path.exists():
        path = _resolve_hub_weights(source, what, arg)
    return _read_checkpoint_dir(path, what) if path.is_dir() else _read_weight_file(path)


def _read_checkpoint_dir(path: Path, what: str) -> dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return _read_weight_file(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():  # sharded checkpoint
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in _read_weight_file(path / shard).items()}
    raise PretrainedUnavailable(f"{path} holds no {what} weights (looked for {', '.join(_WEIGHT_FILES)})")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _resolve_hub_weights(source: str, what: str, arg: str) -> Path:
    from label_pipeline.core.weights import WeightsUnavailable, resolve_weights

    if source.startswith("hf-hub:"):
        candidates = [source]
        model_id = source.removeprefix("hf-hub:")
    else:
        model_id = LEGACY_HUB_IDS.get(source, source)
        candidates = [f"hf-hub:{model_id}/{name}" for name in _WEIGHT_FILES]
    reasons = []
    for candidate in candidates:
        try:
            return resolve_weights(candidate, expert=f"prismer {what}")
        except WeightsUnavailable as exc:
            reasons.append(exc.reason)
    raise PretrainedUnavailable(
        f"cannot get the {what} checkpoint {model_id!r} ({'; '.join(dict.fromkeys(reasons))}). Fix: run once "
        f"with network access (unset HF_HUB_OFFLINE) to cache it, or download {model_id!r} elsewhere "
        f"(`huggingface-cli download {model_id} {_WEIGHT_FILES[0]} config.json --local-dir DIR`) and pass "
        f"{arg}='DIR' to load_pretrained"
    )


def _find_prefix(state: Mapping[str, torch.Tensor], suffix: str, what: str, source: str) -> str:
    hits = sorted(k[: -len(suffix)] for k in state if k.endswith(suffix))
    if not hits:
        raise ValueError(f"{source!r} is not a transformers {what} checkpoint (no '*{suffix}' key)")
    return hits[0]


def clip_to_prismer(
    state: Mapping[str, torch.Tensor], config: ModelConfig, source: str = ""
) -> dict[str, torch.Tensor]:
    """Map a transformers CLIP (vision) state dict to ``expert_encoder.*`` keys.

    The CLS token and the projection are dropped, q/k/v are packed as in nn.MultiheadAttention, and the
    positional embedding loses its CLS row and is resized (bicubic) to the model's patch grid.
    """
    p = _find_prefix(state, "embeddings.patch_embedding.weight", "CLIP vision", source)
    layers = {
        int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"encoder\.layers\.(\d+)\.", k))
    }
    if len(layers) != config.vision_layers:
        raise ValueError(
            f"{source!r} has {len(layers)} CLIP layers, config {config.name!r} has {config.vision_layers}"
        )
    pos = state[p + "embeddings.position_embedding.weight"][1:]
    out = {
        "expert_encoder.conv1.rgb.weight": state[p + "embeddings.patch_embedding.weight"],
        "expert_encoder.positional_embedding": resize_positional_embedding(
            pos, (config.grid_size, config.grid_size)
        ),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for t in ("weight", "bias"):
            out[f"expert_encoder.{ours}.{t}"] = state[f"{p}{theirs}.{t}"]
    for i in sorted(layers):
        src, dst = f"{p}encoder.layers.{i}.", f"expert_encoder.transformer.resblocks.{i}.0."
        for t in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{n}_proj.{t}"] for n in "qkv"]
            out[f"{dst}attn.in_proj_{t}"] = torch.cat(qkv, dim=0)
            out[f"{dst}attn.out_proj.{t}"] = state[f"{src}self_attn.out_proj.{t}"]
            out[f"{dst}ln_1.{t}"] = state[f"{src}layer_norm1.{t}"]
            out[f"{dst}ln_2.{t}"] = state[f"{src}layer_norm2.{t}"]
            out[f"{dst}mlp.c_fc.{t}"] = state[f"{src}mlp.fc1.{t}"]
            out[f"{dst}mlp.c_proj.{t}"] = state[f"{src}mlp.fc2.{t}"]
    return out


_ROBERTA_LAYER_PARTS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
)


def roberta_to_prismer(
    state: Mapping[str, torch.Tensor], config: ModelConfig, source: str = ""
) -> dict[str, torch.Tensor]:
    """Map a transformers RoBERTa (``RobertaForMaskedLM``/``RobertaModel``) state dict to ``text_decoder.*``.

    Layer ``i`` becomes ``layer.i.0`` (the pretrained half of each decoder layer); embeddings and the LM head
    (when present) keep their names. The tied decoder weight comes with the word embeddings.
    """
    state = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in state.items()}
    p = _find_prefix(state, "embeddings.word_embeddings.weight", "RoBERTa", source)
    layers = {int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"encoder\.layer\.(\d+)\.", k))}
    if len(layers) != config.text_layers:
        raise ValueError(
            f"{source!r} has {len(layers)} RoBERTa layers, config {config.name!r} has {config.text_layers}"
        )
    out = {}
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"):
        for t in ("weight", "bias") if name == "LayerNorm" else ("weight",):
            out[f"text_decoder.roberta.embeddings.{name}.{t}"] = state[f"{p}embeddings.{name}.{t}"]
    for i in sorted(layers):
        for part in _ROBERTA_LAYER_PARTS:
            for t in ("weight", "bias"):
                out[f"text_decoder.roberta.encoder.layer.{i}.0.{part}.{t}"] = state[
                    f"{p}encoder.layer.{i}.{part}.{t}"
                ]
    head = {k.removeprefix("lm_head."): v for k, v in state.items() if k.startswith("lm_head.")}
    if not head:
        logger.warning(
            "%s has no LM head; text_decoder.lm_head keeps its initialisation", source or "checkpoint"
        )
    for name in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias"):
        if name in head:
            out[f"text_decoder.lm_head.{name}"] = head[name]
    bias = head.get("bias", head.get("decoder.bias"))
    if bias is not None:
        out["text_decoder.lm_head.bias"] = bias
    return out
