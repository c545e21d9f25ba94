"""``ocr_detection:charnet``: Prismer's OCR expert, CharNet (Hourglass-88, ICDAR 2015 weights).

The image is squashed to 480×480 (PIL bilinear, ImageNet mean/std), the network predicts stride-4 word
and character maps, and :mod:`expert_zoo.ocr_postprocess` turns them into words in image coordinates.

Label: L8 word-index map at the image's size, 255 = background, filled like Prismer's ``get_label``
(the highest-scoring word gets the highest index and is drawn last); at most 254 words. Json: a list of
``{"instance", "text", "score", "polygon"}`` with the lower-cased text, the recognition score (mean
character probability) and the 4-point polygon in image pixels; ``[]`` with an all-255 map when no word
is found (where Prismer wrote nothing).
"""

from __future__ import annotations

import logging
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from expert_zoo.base import ConfigError, ExpertSpec, Label, WeightsOptions
from expert_zoo.nets.charnet import CharNet
from expert_zoo.ocr_postprocess import (
    CHARSET,
    Lexicon,
    PostprocessConfig,
    decode_words,
    word_label,
)
from expert_zoo.torch_expert import TorchExpert, load_strictly, read_state_dict
from expert_zoo.torch_utils import IMAGENET_MEAN, IMAGENET_STD, normalized_batch

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "hf-hub:shikunl/prismer/expert_weights/icdar2015_hourglass88.pth"
INPUT_SIZE = 480
_MAP_NAMES = ("word_fg", "word_tblr", "word_orient", "char_fg", "char_tblr", "char_cls")
_CHAR_DICT_SEPARATOR = chr(31)  # CharNet's char_dict.txt: "<char>\x1f<class index>" per line


def charnet_kwargs_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The :class:`CharNet` arguments that a state dict was made with (Prismer's: the defaults).

    Reads the widths from the stem, the hourglass levels and the heads, so reduced test networks load
    through the same path as the real checkpoint.
    """
    prefix = "backbone.hourglass_blocks.0."
    channels, blocks = [], []
    while f"{prefix}low_2.0.conv_1.0.weight" not in state_dict:  # descend to the innermost level
        channels.append(int(state_dict[f"{prefix}up_1.0.conv_1.0.weight"].shape[0]))
        blocks.append(_count_blocks(state_dict, f"{prefix}up_1."))
        prefix += "low_2."
        if (
            f"{prefix}up_1.0.conv_1.0.weight" not in state_dict
            and f"{prefix}0.conv_1.0.weight" not in state_dict
        ):
            raise KeyError(f"not a CharNet hourglass state dict (nothing under {prefix!r})")
    channels.append(int(state_dict[f"{prefix}up_1.0.conv_1.0.weight"].shape[0]))
    blocks.append(_count_blocks(state_dict, f"{prefix}up_1."))
    channels.append(int(state_dict[f"{prefix}low_2.0.conv_1.0.weight"].shape[0]))
    blocks.append(_count_blocks(state_dict, f"{prefix}low_2."))
    return {
        "channels": tuple(channels),
        "blocks": tuple(blocks),
        "depth": len(channels) - 1,
        "stem_channels": int(state_dict["backbone.pre.0.weight"].shape[0]),
        "bottleneck_channels": int(state_dict["word_detector.word_fg_pred.weight"].shape[1]),
        "num_classes": int(state_dict["char_recognizer.classifier.weight"].shape[0]),
    }


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.conv_1\.0\.weight$")
    return sum(1 for key in state_dict if pattern.match(key))


def load_charnet(state_dict: Mapping[str, torch.Tensor]) -> CharNet:
    """Build a CharNet shaped like the checkpoint and load it strictly, in eval mode."""
    try:
        kwargs = charnet_kwargs_from_state_dict(state_dict)
    except KeyError as exc:  # a bare KeyError would only show the key
        key = str(exc.args[0]) if exc.args else ""
        raise ValueError(f"not a CharNet state dict: {key if ' ' in key else f'it has no {key!r}'}") from exc
    return load_strictly(CharNet(**kwargs), state_dict)


def load_char_dict(path: str | Path) -> str:
    """CharNet's ``char_dict.txt`` (``<char>\\x1f<index>`` lines) → the class characters, upper-cased."""
    chars: dict[int, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line:
            char, index = line.split(_CHAR_DICT_SEPARATOR)
            chars[int(index)] = char.upper()
    if sorted(chars) != list(range(len(chars))):
        raise ValueError(f"{path}: class indices must be 0..{len(chars) - 1} without gaps")
    return "".join(chars[i] for i in range(len(chars)))


@dataclass(frozen=True)
class _CharNetOwnOptions(WeightsOptions):
    weights: str = DEFAULT_WEIGHTS
    lexicon: str | None = None  # word list for snapping uncertain words
    char_dict: str | None = None  # a CharNet char_dict.txt; default: the built-in classes
    input_size: int = INPUT_SIZE  # square side the network sees; a multiple of the model's stride
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input_size < 1:
            raise ConfigError(f"input_size: must be >= 1, got {self.input_size}")


# Every PostprocessConfig field is an option too, to override one threshold.
_POSTPROCESS_TYPES = typing.get_type_hints(PostprocessConfig)
CharNetOptions = make_dataclass(
    "CharNetOptions",
    [(f.name, _POSTPROCESS_TYPES[f.name], field(default=f.default)) for f in fields(PostprocessConfig)],
    bases=(_CharNetOwnOptions,),
    frozen=True,
    namespace={"__module__": __name__},
)


class CharNetOCR(TorchExpert):
    """Prismer's OCR expert: CharNet (Xing et al., ICCV 2019), Hourglass-88, ICDAR 2015 weights.

    Config: ``weights`` (source for ``resolve_weights``; default Prismer's ``icdar2015_hourglass88.pth``
    on the hub), optional ``sha256``; ``lexicon``: a word-list file for snapping uncertain words (Prismer
    used ICDAR 2015's ``GenericVocabulary.txt``; without one, words that would need snapping are
    dropped); ``char_dict``: a CharNet ``char_dict.txt`` (default: the built-in 68 classes);
    ``input_size`` (square side, multiple of 32; default 480); ``batch_size``; ``dtype`` (``auto``:
    bf16 autocast on CUDA, fp32 on CPU); and any :class:`PostprocessConfig` field to override a threshold.
    """

    LICENCE = "CC-BY-NC-4.0"
    spec: ClassVar[ExpertSpec] = ExpertSpec(
        task="ocr_detection",
        backend="charnet",
        version="1",
        mode="L",
        has_json=True,
        batch_size=4,
        input_size=(INPUT_SIZE, INPUT_SIZE),
        uses_gpu=True,
    )
    GPU_BATCH_SIZE: ClassVar[int] = 32
    Options = CharNetOptions
    opts: Any  # a CharNetOptions (built with make_dataclass, so not a static type)
    CHANNELS_LAST = True

    def __init__(self, config: Mapping[str, Any] | None = None, device: str = "cpu") -> None:
        super().__init__(config, device)
        self.input_size = self.opts.input_size
        if self.input_size % self.model.size_multiple:
            raise ValueError(
                f"input_size must be a multiple of {self.model.size_multiple}, got {self.input_size}"
            )
        self.postprocess = PostprocessConfig.from_options(self.config)
        self.charset = load_char_dict(self.opts.char_dict) if self.opts.char_dict else CHARSET
        num_classes = self.model.char_recognizer.classifier.out_channels
        if len(self.charset) != num_classes:
            raise ValueError(
                f"the character dictionary has {len(self.charset)} classes, the model {num_classes}"
            )
        self.lexicon = Lexicon.from_file(self.opts.lexicon) if self.opts.lexicon else None
        if self.lexicon is None:
            logger.info("no lexicon configured: words that Prismer would snap to its lexicon are dropped")

    def load_model(self, path: Path) -> torch.nn.Module:
        return load_charnet(read_state_dict(path))

    def predict_batch(self, images: list[np.ndarray], deps: Mapping[str, list[Label]]) -> list[Label]:
        maps = self.network_maps(images)
        return [
            self.label_from_maps({name: m[k] for name, m in maps.items()}, image.shape[:2])
            for k, image in enumerate(images)
        ]

    def network_maps(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The post-processing's inputs for a batch: N×C×h×w float32 numpy maps (stride 4)."""
        size = (self.input_size, self.input_size)
        batch = normalized_batch(images, size, IMAGENET_MEAN, IMAGENET_STD, self.torch_device)
        with self.inference():
            out = self.model(self.network_input(batch))
        return {name: out[name].float().cpu().numpy() for name in _MAP_NAMES}

    def label_from_maps(self, maps: Mapping[str, np.ndarray], size: tuple[int, int]) -> Label:
        """One image's maps (C×h×w) → its word-index map at ``size`` (H, W) and the words' json."""
        height, width = size
        words = decode_words(
            maps,
            width,
            height,
            (self.input_size, self.input_size),
            config=self.postprocess,
            charset=self.charset,
            lexicon=self.lexicon,
        )
        label, entries = word_label(words, width, height)
        return Label(map=label, data=entries)
