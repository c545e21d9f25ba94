"""Tiny, valid weights for Prismer's six experts, built in code and saved where the experts load them from.

Each ``tiny_<task>(directory)`` writes a reduced-width model of the real architecture (a transformers
model directory or a state-dict file, whichever the expert loads) and returns the manifest entry that
points the expert at it: ``{"name": "task:backend", "options": {"weights": path, ...}}``. The experts load
them through their normal path (``resolve_weights`` + strict ``load_state_dict`` / ``from_pretrained``),
so nothing here fakes a model. Weights are seeded without touching the caller's global RNG.

Used by the expert tests, the end-to-end zoo test and ``bench/experts.py`` (which runs them on CPU at
realistic geometry: ``owl_image_size=960``, ``ocr_input_size=480``). The defaults keep every expert well
under a second per small image on a busy CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from expert_zoo.nets.charnet import CharNet
from expert_zoo.nets.dexined import DexiNed
from expert_zoo.nets.nll_angmf import NLL_ANGMF_TINY, NLLAngMF

ExpertEntry = dict[str, Any]

DEXINED_TINY_WIDTH = 0.125
# A reduced CharNet: same hourglass depth, 8-16 channels, one residual block per level.
CHARNET_TINY = {
    "channels": (8, 8, 8, 16),
    "blocks": (1, 1, 1, 1),
    "stem_channels": 8,
    "bottleneck_channels": 8,
}
OCR_TINY_INPUT_SIZE = 64  # CharNet's input side (a multiple of 32); 480 is the real one
OWL_TINY_IMAGE_SIZE = 64  # OWLv2's square input; the real base model uses 960


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic weight init that leaves the caller's torch RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# -- depth:dpt_hybrid ---------------------------------------------------------------------------------
def tiny_dpt_model(seed: int = 0) -> Any:
    """A tiny DPT-Hybrid (2 ViT layers, 3 one-block ResNet stages) as ``DPTForDepthEstimation``."""
    import transformers

    config = transformers.DPTConfig(
        is_hybrid=True,
        image_size=64,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        layer_norm_eps=1e-6,
        backbone_out_indices=[0, 0, 0, 1],
        neck_hidden_sizes=[16, 32, 32, 32],
        reassemble_factors=[1, 1, 1, 0.5],
        fusion_hidden_size=16,
        backbone_featmap_shape=[1, 64, 4, 4],
        backbone_config={
            "global_padding": "same",
            "layer_type": "bottleneck",
            "depths": [1, 1, 1],
            "hidden_sizes": [16, 32, 64, 128],
            "embedding_size": 8,
            "num_groups": 4,
            "out_features": ["stage1", "stage2", "stage3"],
            "embedding_dynamic_padding": True,
        },
    )
    with seeded(seed):
        model = transformers.DPTForDepthEstimation(config).eval()
    with torch.no_grad():
        model.head.head[4].bias.fill_(1.0)  # keep the non-negative head off its ReLU floor
    return model


def tiny_depth(directory: Path) -> ExpertEntry:
    """``depth:dpt_hybrid`` from a tiny transformers model directory."""
    path = Path(directory) / "tiny_dpt_hybrid"
    tiny_dpt_model().save_pretrained(path)
    return {"name": "depth:dpt_hybrid", "options": {"weights": str(path)}}


# -- normal:nll_angmf ---------------------------------------------------------------------------------
def save_tiny_nll_angmf(path: Path, seed: int) -> Path:
    """A tiny NLL-AngMF checkpoint shaped like the real file: ``{"model": {"module.…": tensor}}``."""
    with seeded(seed):
        model = NLLAngMF(NLL_ANGMF_TINY)
        # Perturb BN statistics too, and wrap keys like a DataParallel checkpoint, as the real file is.
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("running_mean"):
                    buffer.normal_(0, 0.1)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state}, path)
    return path


def tiny_normal(directory: Path) -> ExpertEntry:
    """``normal:nll_angmf`` with ``arch: tiny`` (the reduced encoder and decoder)."""
    path = save_tiny_nll_angmf(Path(directory) / "tiny_nll_angmf.pt", seed=0)
    return {"name": "normal:nll_angmf", "options": {"weights": str(path), "arch": "tiny"}}


# -- edge:dexined -------------------------------------------------------------------------------------
def tiny_dexined(seed: int = 0) -> DexiNed:
    """DexiNed at 1/8 width (the expert reads the width back from the state dict)."""
    with seeded(seed):
        return DexiNed(width=DEXINED_TINY_WIDTH).eval()


def tiny_edge(directory: Path) -> ExpertEntry:
    path = Path(directory) / "tiny_dexined.pth"
    torch.save(tiny_dexined().state_dict(), path)
    return {"name": "edge:dexined", "options": {"weights": str(path)}}


# -- seg_coco:mask2former -----------------------------------------------------------------------------
def tiny_mask2former(num_labels: int = 133, seed: int = 0) -> Any:
    """A tiny Swin + Mask2Former (``Mask2FormerForUniversalSegmentation``) with ``num_labels`` classes."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=12,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=backbone, hidden_dim=32, feature_size=32, mask_feature_size=32, encoder_layers=1,
        decoder_layers=2, num_queries=8, dim_feedforward=64, encoder_feedforward_dim=64,
        num_attention_heads=2, num_labels=num_labels,
    )  # fmt: skip
    with seeded(seed):
        return Mask2FormerForUniversalSegmentation(config).eval()


def tiny_segmentation(directory: Path) -> ExpertEntry:
    path = Path(directory) / "tiny_mask2former"
    tiny_mask2former(133).save_pretrained(path)
    return {"name": "seg_coco:mask2former", "options": {"weights": str(path)}}


# -- obj_detection:owlv2 ------------------------------------------------------------------------------
def tiny_tokenizer(prompts: list[str]) -> Any:
    """A word-level tokenizer over the prompts' words; EOS has the highest id, as CLIP's (OWL pools there)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(
        {w for p in prompts for w in pre_tokenizers.Whitespace().pre_tokenize_str(p) for w in [w[0]]}
    )
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    vocab["<bos>"], vocab["<eos>"] = len(vocab), len(vocab) + 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def prismer_prompt_tokenizer() -> Any:
    """:func:`tiny_tokenizer` over the prompts the expert builds from Prismer's 722 UniDet class names."""
    from expert_zoo.detection import DEFAULTS, class_names, query_prompts

    prompts, _ = query_prompts(class_names(), DEFAULTS["prompt"], True)
    return tiny_tokenizer(prompts)


def save_tiny_owlv2(
    path: Path, image_size: int = OWL_TINY_IMAGE_SIZE, box_size: float | None = None, seed: int = 0
) -> Path:
    """A tiny ``Owlv2ForObjectDetection`` plus its tokenizer, saved as a model directory at ``path``.

    Random box heads saturate, so the last box layer is zeroed: every patch then predicts a box centred
    on itself, one patch wide, or ``box_size`` (a fraction of the padded square) wide and high when given
    (large boxes overlap, so their instance map depends on the depth label).
    """
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    tokenizer = prismer_prompt_tokenizer()
    config = Owlv2Config(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": image_size, "patch_size": 16,
        },
        projection_dim=32,
    )  # fmt: skip
    with seeded(seed):
        model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
        if box_size is not None:
            # The box bias puts the size logit at logit(1 / patches per side); shift it to logit(box_size).
            default = 16 / image_size
            shift = torch.logit(torch.tensor(box_size)) - torch.logit(torch.tensor(default))
            model.box_head.dense2.bias[2:] = shift
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_detection(
    directory: Path, image_size: int = OWL_TINY_IMAGE_SIZE, box_size: float | None = 0.45
) -> ExpertEntry:
    """``obj_detection:owlv2`` keeping every box (threshold 0): overlapping boxes, ordered by depth."""
    path = save_tiny_owlv2(Path(directory) / "tiny_owlv2", image_size=image_size, box_size=box_size)
    return {"name": "obj_detection:owlv2", "options": {"weights": str(path), "threshold": 0.0}}


# -- ocr_detection:charnet ----------------------------------------------------------------------------
def tiny_charnet(seed: int = 0) -> CharNet:
    """A reduced CharNet whose heads are biased to see one big word of 'A's everywhere."""
    from expert_zoo.ocr_postprocess import CHARSET

    generator = torch.Generator().manual_seed(seed)
    with seeded(seed):  # construction draws from the global RNG; every parameter is overwritten below
        model = CharNet(**CHARNET_TINY)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        for head in (model.word_detector.word_fg_pred, model.char_detector.char_fg_pred):
            head.bias.copy_(torch.tensor([-5.0, 5.0]))
        model.word_detector.word_tblr_pred.bias.copy_(torch.tensor([0.3, 0.3, 0.8, 0.8]))
        model.char_detector.char_tblr_pred.bias.copy_(torch.tensor([0.25, 0.25, 0.25, 0.25]))
        model.char_recognizer.classifier.bias[CHARSET.index("A")] = 10.0
    return model.eval()


def save_tiny_charnet(path: Path) -> Path:
    torch.save(tiny_charnet().state_dict(), path)
    return path


def tiny_ocr(directory: Path, input_size: int = OCR_TINY_INPUT_SIZE) -> ExpertEntry:
    path = save_tiny_charnet(Path(directory) / "tiny_charnet.pth")
    return {"name": "ocr_detection:charnet", "options": {"weights": str(path), "input_size": input_size}}


# -- all six --------------------------------------------------------------------------------------------
TINY_EXPERTS: dict[str, Callable[[Path], ExpertEntry]] = {
    "depth": tiny_depth,
    "normal": tiny_normal,
    "edge": tiny_edge,
    "seg_coco": tiny_segmentation,
    "obj_detection": tiny_detection,
    "ocr_detection": tiny_ocr,
}


def tiny_expert_entries(directory: Path, tasks: list[str] | None = None) -> list[ExpertEntry]:
    """Manifest entries for ``tasks`` (default: all six), each with its tiny weights under ``directory``."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return [TINY_EXPERTS[task](Path(directory)) for task in tasks or list(TINY_EXPERTS)]
