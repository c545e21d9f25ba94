"""Convert the original MiDaS v3 DPT-Hybrid checkpoint to transformers' ``DPTForDepthEstimation``.

Prismer's depth expert loads ``dpt_hybrid-midas-501f0c75.pt`` into the MiDaS/DPT code base
(``DPTDepthModel(backbone="vitb_rn50_384", non_negative=True)``, a timm ``vit_base_r50_s16_384`` backbone).
This module rebuilds the same network from transformers parts and maps the 368 original entries onto it.

Key mapping, original → transformers (shapes unchanged unless noted; ``k`` = 1..4):

* ``pretrained.model.cls_token`` → ``dpt.embeddings.cls_token``
* ``pretrained.model.pos_embed`` (1×577×768, 24×24 grid + cls) → ``dpt.embeddings.position_embeddings``,
  kept as is and resized at run time (see below)
* ``pretrained.model.patch_embed.backbone.`` → ``dpt.embeddings.backbone.bit.``, with
  ``stem.conv`` → ``embedder.convolution``, ``stem.norm`` → ``embedder.norm`` and
  ``stages.{s}.blocks.{b}.`` → ``encoder.stages.{s}.layers.{b}.`` (``conv1..3``, ``norm1..3`` and
  ``downsample.{conv,norm}`` keep their names)
* ``pretrained.model.patch_embed.proj`` → ``dpt.embeddings.projection``
* ``pretrained.model.blocks.{i}.`` → ``dpt.encoder.layer.{i}.``, with ``norm1`` → ``layernorm_before``,
  ``norm2`` → ``layernorm_after``, ``attn.proj`` → ``attention.output.dense``, ``mlp.fc1`` →
  ``intermediate.dense``, ``mlp.fc2`` → ``output.dense``, and ``attn.qkv`` (2304×768, 2304) split by rows
  into ``attention.attention.query`` / ``key`` / ``value`` (rows 0:768, 768:1536, 1536:2304)
* ``pretrained.model.norm`` → ``dpt.layernorm`` (computed, but the depth head never reads it, in either)
* ``pretrained.act_postprocess{3,4}.0.project.0`` → ``neck.reassemble_stage.readout_projects.{2,3}.0``
* ``pretrained.act_postprocess{3,4}.3`` → ``neck.reassemble_stage.layers.{2,3}.projection``
* ``pretrained.act_postprocess4.4`` (3×3 stride 2) → ``neck.reassemble_stage.layers.3.resize``
* ``scratch.layer{k}_rn`` → ``neck.convs.{k-1}``
* ``scratch.refinenet{k}.`` → ``neck.fusion_stage.layers.{4-k}.`` (transformers fuses deepest first), with
  ``out_conv`` → ``projection`` and ``resConfUnit{u}.conv{c}`` → ``residual_layer{u}.convolution{c}``
* ``scratch.output_conv.{0,2,4}`` → ``head.head.{0,2,4}``

Unused: ``pretrained.model.head.{weight,bias}`` (the ImageNet classifier of the timm ViT, 1000×768) has no
counterpart; the original never calls it either. Every other entry must be consumed and every transformers
entry filled, otherwise conversion fails.

Position embeddings: the original resizes the 24×24 grid to the input's token grid (30×30 at 480²) on every
forward with ``F.interpolate(mode="bilinear")`` (align_corners False, no antialias). transformers'
``DPTViTHybridEmbeddings._resize_pos_embed`` does exactly the same, so the 577-entry table is copied unchanged
and ``allow_input_size`` lets the model accept inputs other than the config's 384².
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

#: Original entries with no transformers counterpart (the ViT's ImageNet classifier, never evaluated).
UNUSED_ORIGINAL_KEYS = ("pretrained.model.head.weight", "pretrained.model.head.bias")

_BIT_DST = "dpt.embeddings.backbone.bit."


def hybrid_config(image_size: int = 384) -> Any:
    """The transformers ``DPTConfig`` of MiDaS v3 DPT-Hybrid as Prismer builds it.

    ViT-B/16 (12 layers, 12 heads, 768 wide, LayerNorm eps 1e-6 as in timm) on a BiT ResNet-50 stem with
    3 stages (3, 4, 9 bottlenecks, GroupNorm 32, weight-standardised convs, TF "same" padding); hooks on
    ResNet stages 1-2 and ViT blocks 8 and 11; readout "project"; reassemble 256/512/768/768 channels with
    the last one downsampled by 2; 256 fusion channels; non-negative head (final ReLU).
    """
    from transformers import DPTConfig

    return DPTConfig(
        is_hybrid=True,
        image_size=image_size,
        patch_size=16,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        backbone_out_indices=[2, 5, 8, 11],
        readout_type="project",
        reassemble_factors=[1, 1, 1, 0.5],
        neck_hidden_sizes=[256, 512, 768, 768],
        fusion_hidden_size=256,
        head_in_index=-1,
        use_batch_norm_in_fusion_residual=False,
        add_projection=False,
        backbone_featmap_shape=[1, 1024, image_size // 16, image_size // 16],
        neck_ignore_stages=[0, 1],
        backbone_config={
            "global_padding": "same",
            "layer_type": "bottleneck",
            "depths": [3, 4, 9],
            "hidden_sizes": [256, 512, 1024, 2048],
            "embedding_size": 64,
            "num_groups": 32,
            "out_features": ["stage1", "stage2", "stage3"],
            "embedding_dynamic_padding": True,
        },
    )


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return the state dict of a loaded MiDaS checkpoint: like ``BaseModel.load``, a dict carrying an
    ``"optimizer"`` entry is a training checkpoint whose weights sit under ``"model"``."""
    if "optimizer" in checkpoint:
        checkpoint = checkpoint["model"]
    return checkpoint


def _rename_bit(rest: str) -> str:
    rest = rest.replace("stem.conv.", "embedder.convolution.").replace("stem.norm.", "embedder.norm.")
    rest = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2.", rest)
    return _BIT_DST + rest


_VIT_BLOCK_PARTS = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def _rename_vit_block(index: str, part: str, leaf: str) -> str:
    return f"dpt.encoder.layer.{index}.{_VIT_BLOCK_PARTS[part]}.{leaf}"


def _rename_refinenet(k: str, rest: str) -> str:
    rest = rest.replace("out_conv", "projection")
    rest = re.sub(r"resConfUnit(\d)\.conv(\d)", r"residual_layer\1.convolution\2", rest)
    return f"neck.fusion_stage.layers.{4 - int(k)}.{rest}"


# (pattern on the original key, builder of the transformers key from the match groups)
_RULES: list[tuple[re.Pattern[str], Callable[..., str]]] = [
    (re.compile(r"pretrained\.model\.cls_token"), lambda: "dpt.embeddings.cls_token"),
    (re.compile(r"pretrained\.model\.pos_embed"), lambda: "dpt.embeddings.position_embeddings"),
    (re.compile(r"pretrained\.model\.patch_embed\.backbone\.(.+)"), _rename_bit),
    (
        re.compile(r"pretrained\.model\.patch_embed\.proj\.(weight|bias)"),
        lambda leaf: f"dpt.embeddings.projection.{leaf}",
    ),
    (
        re.compile(
            r"pretrained\.model\.blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
        ),
        _rename_vit_block,
    ),
    (re.compile(r"pretrained\.model\.norm\.(weight|bias)"), lambda leaf: f"dpt.layernorm.{leaf}"),
    (
        re.compile(r"pretrained\.act_postprocess([34])\.0\.project\.0\.(weight|bias)"),
        lambda k, leaf: f"neck.reassemble_stage.readout_projects.{int(k) - 1}.0.{leaf}",
    ),
    (
        re.compile(r"pretrained\.act_postprocess([34])\.3\.(weight|bias)"),
        lambda k, leaf: f"neck.reassemble_stage.layers.{int(k) - 1}.projection.{leaf}",
    ),
    (
        re.compile(r"pretrained\.act_postprocess4\.4\.(weight|bias)"),
        lambda leaf: f"neck.reassemble_stage.layers.3.resize.{leaf}",
    ),
    (re.compile(r"scratch\.layer([1-4])_rn\.weight"), lambda k: f"neck.convs.{int(k) - 1}.weight"),
    (re.compile(r"scratch\.refinenet([1-4])\.(.+)"), _rename_refinenet),
    (re.compile(r"scratch\.output_conv\.([024])\.(weight|bias)"), lambda i, leaf: f"head.head.{i}.{leaf}"),
]
_QKV = re.compile(r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)")


def rename_key(key: str) -> str:
    """The transformers name of one original (non-qkv, non-classifier) entry; KeyError when unknown."""
    for pattern, build in _RULES:
        match = pattern.fullmatch(key)
        if match:
            return build(*match.groups())
    raise KeyError(f"no transformers counterpart for original DPT-Hybrid key {key!r}")


def convert_state_dict(original: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original DPT-Hybrid state dict to transformers names (qkv split into query/key/value).

    Only :data:`UNUSED_ORIGINAL_KEYS` may be left out; any other unknown key raises ``KeyError``.
    Tensors are shared with the input, not copied (the qkv chunks are views).
    """
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in original.items():
        if key in UNUSED_ORIGINAL_KEYS:
            continue
        qkv = _QKV.fullmatch(key)
        if qkv:
            index, leaf = qkv.groups()
            # timm's fused projection stacks the three outputs as [q; k; v] along dim 0.
            for name, chunk in zip(("query", "key", "value"), tensor.chunk(3, dim=0)):
                converted[f"dpt.encoder.layer.{index}.attention.attention.{name}.{leaf}"] = chunk
            continue
        converted[rename_key(key)] = tensor
    return converted


def build_model(original: Mapping[str, torch.Tensor]) -> Any:
    """A ``DPTForDepthEstimation`` in eval mode holding the original weights (strict: every entry filled,
    every shape equal)."""
    from transformers import DPTForDepthEstimation

    converted = convert_state_dict(unwrap_checkpoint(original))
    # The released checkpoint is float32; a half-precision copy is widened so assign=True keeps fp32 params.
    converted = {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}
    config = hybrid_config()
    with torch.device("meta"):
        model = DPTForDepthEstimation(config)
    # assign=True adopts the converted tensors directly: no random init, no second copy of 123 M floats.
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def allow_input_size(model: Any, size: tuple[int, int]) -> None:
    """Let a hybrid DPT accept ``size`` inputs (transformers checks them against ``config.image_size``).

    The position table is still resized per forward from its trained grid, as in the original; only the
    guard changes. Raises ``TypeError`` for non-hybrid models, which need no such patch.
    """
    embeddings = getattr(getattr(model, "dpt", None), "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "image_size") or not hasattr(embeddings, "backbone"):
        raise TypeError("expected a transformers DPT-Hybrid model (model.dpt.embeddings with a backbone)")
    embeddings.image_size = tuple(size)
