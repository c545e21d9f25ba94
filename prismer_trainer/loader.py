"""Training data from the label shards (docs/FORMAT.md): WebDataset tars → augmented, batched model inputs.

The path of one sample, in a loader worker:

1. **Stream.** The dataset's shards are split by node (rank) and worker; each such stream reads its
   shards in a fresh order every pass ("resampled epochs", infinite when training) through a shuffle
   buffer. Everything random is a pure function of ``(seed, stream, position)``, so a stream can be
   restarted at any batch (see :class:`ShardStream`): that is the loader position a checkpoint records.
2. **Decode only what the model uses.** The image with :func:`label_pipeline.decode.decode_image` (the
   exact pixels the labels were aligned to, EXIF included), the caption, and the PNG/JSON members of
   the model's experts, and the OCR words' stored CLIP-PCA features (``ocr_features.npy``). A missing,
   undecodable or misaligned expert member masks that expert for that sample instead of failing.
3. **One joint geometry** for RGB and labels (:func:`joint_transform`): Prismer's random resized crop,
   then RGB → train resolution (bicubic) and every label → 224 (nearest), a joint horizontal flip that
   also negates the normal's x component, and RandAugment(2, 5) whose geometric ops are defined in
   normalised coordinates, so a translation moves each tensor by the same fraction of its own size.
4. **Small tensors.** RGB and dense labels stay uint8; categorical labels stay uint8 id maps plus, per
   sample, an id → row table (``rows``) into a small per-batch embedding table. :func:`to_model_inputs`
   builds the float inputs and the 64-d embedding maps on the device. Prismer built 64×224×224 float
   maps per categorical expert on the CPU (~38 MB per sample).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import fsspec
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from label_pipeline.decode import DecodeError, decode_image
from label_pipeline.format import IMAGE_EXTENSIONS, decode_npy, decode_png, sanitize_key
from label_pipeline.tario import split_member_name

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LABEL_RESOLUTION = 224  # Prismer resizes every expert label to 224², whatever the RGB resolution
BACKGROUND = 255
DENSE_CHANNELS = {"depth": 1, "edge": 1, "normal": 3}
CATEGORICAL = ("seg_coco", "seg_ade", "obj_detection", "ocr_detection")
EMBED_DIM = 64
WORD_FEATURES = "ocr_features.npy"  # per-word CLIP-PCA features, row i = word i of ocr_detection.json
WORD_FEATURE_DTYPE = np.float16
# Fill values for pixels that a geometric augmentation brings in from outside the image (Prismer's).
RGB_FILL = 0
DENSE_FILL = 0


# ================================================================================================
# Captions and questions
# ================================================================================================
_SPECIAL_CHARS = re.compile(r'[.!"()*#:;~]')
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Prismer's caption cleaning: capitalise (which lower-cases the rest), turn ``.!"()*#:;~`` into
    spaces, squeeze whitespace, keep at most ``max_words`` words."""
    text = _SPECIAL_CHARS.sub(" ", caption.capitalize())
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_question(question: str, max_words: int = 30) -> str:
    """:func:`pre_caption` for questions, ending in ``?``."""
    text = pre_caption(question, max_words)
    return text if text.endswith("?") else text + "?"


def training_text(caption: str, prefix: str = "", max_words: int = 30) -> str:
    """The supervised text: ``pre_caption(prefix + " " + caption)`` (fine-tune prefix "A picture of")."""
    return pre_caption(f"{prefix} {caption}" if prefix else caption, max_words)


# ================================================================================================
# Tokenizers
# ================================================================================================
class Tokenizer(Protocol):
    """What the loader and loop need from a tokenizer (word-level for the demo, RoBERTa's BPE for real)."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode_text(self, text: str) -> list[int]: ...  # no special tokens

    def decode(self, ids: Sequence[int]) -> str: ...  # special tokens dropped

    def save(self, directory: Path) -> None: ...


class WordTokenizer:
    """A whitespace word vocabulary built from the training captions (the demo has no RoBERTa offline).

    Ids 0–3 are ``<s> <pad> </s> <unk>``, RoBERTa's ids for the first three, so the model's defaults hold.
    """

    SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
    kind = "word"

    def __init__(self, words: Sequence[str]) -> None:
        self.itos = [*self.SPECIALS, *(w for w in words if w not in self.SPECIALS)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.vocab_size = len(self.itos)

    @classmethod
    def build(cls, texts: Sequence[str]) -> WordTokenizer:
        words = sorted({w for text in texts for w in text.split()})
        return cls(words)

    def encode_text(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.bos_id, self.pad_id, self.eos_id}
        return " ".join(self.itos[i] for i in ids if i not in special and 0 <= i < self.vocab_size)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"kind": self.kind, "words": self.itos[len(self.SPECIALS) :]}
        (directory / "word_vocab.json").write_text(json.dumps(payload, ensure_ascii=False))

    @classmethod
    def load(cls, directory: Path) -> WordTokenizer:
        return cls(json.loads((directory / "word_vocab.json").read_text())["words"])


class TokenizerUnavailable(RuntimeError):
    """RoBERTa's tokenizer cannot be loaded (offline, not cached); the message says what to do."""


_HUB_IDS = {"roberta-base": "FacebookAI/roberta-base", "roberta-large": "FacebookAI/roberta-large"}


class HFTokenizer:
    """A transformers tokenizer (``roberta-base`` / ``roberta-large`` or a local directory)."""

    kind = "hf"

    def __init__(self, source: str) -> None:
        try:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            hub_id = _HUB_IDS.get(source, source)
            raise TokenizerUnavailable(
                f"cannot load the tokenizer {source!r}: {exc}\nIt is neither a local directory nor in the "
                "Hugging Face cache, and the hub cannot be reached (HF_HUB_OFFLINE?). On a machine with "
                f"access run `huggingface-cli download {hub_id}` (or save_pretrained it to a directory and "
                "pass --tokenizer DIR); checkpoints carry their tokenizer, so eval needs no download."
            ) from exc
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id
        self.pad_id, self.vocab_size = self.tok.pad_token_id, len(self.tok)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True).strip()

    def save(self, directory: Path) -> None:
        self.tok.save_pretrained(str(directory))


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer saved next to a checkpoint."""
    if (directory / "word_vocab.json").exists():
        return WordTokenizer.load(directory)
    return HFTokenizer(str(directory))


def caption_tokens(
    tokenizer: Tokenizer, text: str, prompt: str, max_length: int
) -> tuple[list[int], list[int]]:
    """``<s> text </s>`` (truncated to ``max_length``) and its targets: the ``<s> prompt`` positions
    are -100, as Prismer masks ``prompt_length = len(tok(prefix)) - 1`` tokens."""
    body = tokenizer.encode_text(text)[: max_length - 2]
    ids = [tokenizer.bos_id, *body, tokenizer.eos_id]
    prompt_length = 1 + len(tokenizer.encode_text(prompt)) if prompt else 1
    return ids, [-100] * prompt_length + ids[prompt_length:]


def question_answer_tokens(
    tokenizer: Tokenizer, question: str, answer: str | None, max_question: int = 35
) -> tuple[list[int], list[int]]:
    """VQA as Prismer: ``<s> question`` (≤ 35 tokens) then `` Answer </s>``; only the answer is supervised."""
    prompt = [tokenizer.bos_id, *tokenizer.encode_text(question)[:max_question]]
    if answer is None:
        return prompt, [-100] * len(prompt)
    target = [*tokenizer.encode_text(" " + answer.capitalize()), tokenizer.eos_id]
    return prompt + target, [-100] * len(prompt) + target


def pad_batch(sequences: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


# ================================================================================================
# Category / word embeddings for categorical labels
# ================================================================================================
_TABLE_FILES = {"seg_coco": "coco_features", "seg_ade": "ade_features", "obj_detection": "detection_features"}
_NAME_FILES = {"seg_coco": "coco_panoptic_133_names.json", "obj_detection": "unidet_722_names.json"}
_TABLE_SIZES = {"seg_coco": 133, "seg_ade": 150, "obj_detection": 722}


def hashed_embedding(text: str, dim: int = EMBED_DIM, norm: float = 6.0) -> np.ndarray:
    """A fixed pseudo-random vector per (lower-cased) string, with Prismer's typical norm (≈6)."""
    seed = int.from_bytes(hashlib.sha256(text.lower().encode("utf-8")).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim)
    return (vector * norm / np.linalg.norm(vector)).astype(np.float32)


class LabelEmbeddings:
    """64-d vectors for class ids (seg, detection), OCR words and the background.

    ``from_dir`` reads a tables directory (docs/FORMAT.md: ``OUT/embeddings`` of a label root, written by
    the labelling run or by ``label-pipeline import-prismer-tables``), a label root holding one, or
    Prismer's tables as ``*_features.npy`` (its ``dataset/*.pt`` converted). A word's vector is the CLIP-PCA
    feature stored next to the word map (``ocr_features.npy``); it reaches :meth:`vector` as a
    ``("vec", bytes)`` token. ``hashed`` is the tiny demo's stand-in: a fixed pseudo-random vector per class
    name and per word text, not CLIP-PCA.
    """

    def __init__(self, classes: Mapping[str, np.ndarray], background: np.ndarray, source: str) -> None:
        self.classes = {k: np.asarray(v, np.float32) for k, v in classes.items()}
        self.background = np.asarray(background, np.float32).reshape(EMBED_DIM)
        self.source = source

    @classmethod
    def find(cls, directory: str | Path) -> LabelEmbeddings | None:
        """The tables of a tables directory or of a label root (its ``embeddings/``); None if it has none."""
        from label_pipeline.embedding_tables import BACKGROUND as TABLE_BACKGROUND
        from label_pipeline.embedding_tables import TABLES_DIR, read_tables

        url = str(directory).rstrip("/")
        for candidate in (url, f"{url}/{TABLES_DIR}"):
            tables = read_tables(candidate)
            if tables is not None and TABLE_BACKGROUND in tables.arrays:
                classes = {k: v for k, v in tables.arrays.items() if k != TABLE_BACKGROUND}
                return cls(classes, tables.arrays[TABLE_BACKGROUND], source=candidate)
        root = Path(url)
        if "://" in url or not (root / "background_features.npy").exists():
            return None
        classes = {
            expert: np.load(root / f"{name}.npy")
            for expert, name in _TABLE_FILES.items()
            if (root / f"{name}.npy").exists()
        }
        return cls(classes, np.load(root / "background_features.npy"), source=str(root))

    @classmethod
    def from_dir(cls, directory: str | Path) -> LabelEmbeddings:
        found = cls.find(directory)
        if found is None:
            raise FileNotFoundError(
                f"{directory}: no CLIP-PCA label tables. Expected a tables directory (index.json, see "
                "docs/FORMAT.md), a label root holding one in embeddings/, or Prismer's tables as .npy "
                f"({', '.join(f'{n}.npy' for n in _TABLE_FILES.values())}, background_features.npy)"
            )
        return found

    @classmethod
    def hashed(cls) -> LabelEmbeddings:
        classes = {expert: np.stack(_hashed_class_table(expert)) for expert in _TABLE_FILES}
        return cls(classes, hashed_embedding("<background>"), source="hashed")

    def class_vector(self, expert: str, class_id: int) -> np.ndarray:
        table = self.classes.get("seg_coco" if expert == "seg_coco" else expert)
        if table is None:
            raise KeyError(f"no embedding table for {expert}; source {self.source} lacks it")
        if not 0 <= class_id < len(table):
            return self.background  # an id outside the label space (never written by the experts)
        return table[class_id]

    def vector(self, token: tuple[str, Any]) -> np.ndarray:
        kind, value = token
        if kind == "bg":
            return self.background
        if kind == "vec":  # a stored word feature (ocr_features.npy row)
            return np.frombuffer(value, WORD_FEATURE_DTYPE).astype(np.float32)
        if kind == "word":  # the tiny demo's stand-in for a word without a stored feature
            return hashed_embedding(str(value))
        return self.class_vector(kind, int(value))


CATEGORICAL_NEEDING_TABLES = ("seg_coco", "seg_ade", "obj_detection", "ocr_detection")


def label_root_of(shards: Sequence[str]) -> str | None:
    """The label root (``…/OUT``) of shards under ``OUT/shards/``; None for shards elsewhere."""
    base, sep, _ = shards[0].rpartition("/shards/") if shards else ("", "", "")
    return base if sep else None


def default_embeddings(root: str | None, experts: Sequence[str], model: str) -> LabelEmbeddings:
    """The label root's CLIP-PCA tables. Only the ``tiny`` demo may fall back to hashed stand-ins;
    ``prismer_base``/``prismer_large`` get an error that names the commands making the tables."""
    found = LabelEmbeddings.find(root) if root else None
    if found is not None:
        logger.info("label embeddings: CLIP-PCA tables from %s", found.source)
        return found
    categorical = [e for e in experts if e in CATEGORICAL_NEEDING_TABLES]
    if model == "tiny" or not categorical:
        if categorical:
            logger.info(
                "tiny demo: no CLIP-PCA tables in %s, so class and word embeddings are hashed stand-ins "
                "(fixed pseudo-random vectors per name), not Prismer's",
                root,
            )
        return LabelEmbeddings.hashed()
    where = f"{root}/embeddings" if root else "DIR"
    raise FileNotFoundError(
        f"no CLIP-PCA label tables in {where}: {model} embeds its {', '.join(categorical)} labels with them. "
        f"Import Prismer's (to fine-tune the released checkpoints): label-pipeline import-prismer-tables "
        f"PRISMER_CHECKOUT {where}; or label with the text-feature stage ocr_features (docs/EXPERTS.md), "
        "which writes them; or pass --label-embeddings DIR"
    )


def require_word_features(root: str | None, experts: Sequence[str], model: str) -> None:
    """``prismer_base``/``prismer_large`` read each OCR word's stored CLIP-PCA feature: refuse labels
    whose ``_run.json`` shows OCR without the text-feature stage (the tiny demo hashes the words)."""
    if model == "tiny" or "ocr_detection" not in experts or root is None:
        return
    try:
        with fsspec.open(f"{root}/_run.json", "r") as handle:
            labelled = json.load(handle).get("experts", {})
    except (OSError, ValueError, AttributeError):
        return  # no run record to tell: samples without features have their OCR masked
    if "ocr_detection" in labelled and "ocr_features" not in labelled:
        raise FileNotFoundError(
            f"{root} has OCR labels but no word features (ocr_features): {model} embeds each word with "
            "its CLIP-PCA feature. Add {name: ocr_features, options: {pca: PCA.npz}} to the dataset's "
            f"manifest and run `label-pipeline run MANIFEST --out {root}`: only that member is computed "
            "(docs/EXPERTS.md, text features)"
        )


def _hashed_class_table(expert: str) -> list[np.ndarray]:
    names: list[str] | None = None
    if expert in _NAME_FILES:
        try:
            from importlib import resources

            text = resources.files("expert_zoo").joinpath("labelmaps", _NAME_FILES[expert]).read_text()
            names = json.loads(text)
        except (OSError, ValueError, ModuleNotFoundError):
            names = None
    names = names or [f"{expert}:{i}" for i in range(_TABLE_SIZES[expert])]
    # Names repeat in UniDet's list; the index keeps duplicates distinct, as Prismer's rows are.
    return [hashed_embedding(f"{name}#{i}") for i, name in enumerate(names)]


# ================================================================================================
# Joint geometry: crop, resize, flip, RandAugment
# ================================================================================================
@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation (Prismer: crop scale 0.5–1.5 pre-train, 0.5–1.0 fine-tune)."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaug_n: int = 2
    randaug_m: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.crop_scale[0] <= self.crop_scale[1]:
            raise ValueError(f"crop_scale must be 0 < lo <= hi, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must be 0 < lo <= hi, got {self.crop_ratio}")
        if not 0 <= self.hflip <= 1 or self.randaug_n < 0 or not 0 <= self.randaug_m <= 10:
            raise ValueError("hflip must be a probability, randaug_n >= 0, randaug_m in [0, 10]")


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as torchvision's ``RandomResizedCrop.get_params``: 10 tries of a random area
    (``scale`` × image area) and log-uniform aspect ratio that fits, else the whole image clipped to
    ``ratio``. (With Prismer's pre-train scale up to 1.5, areas above 1 never fit.)"""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize_nearest(array: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop ``box`` and resize to ``size``² with nearest neighbour, sampling source pixel centres (PIL's
    NEAREST convention), in one gather."""
    top, left, h, w = box
    rows = top + np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = left + np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return array[rows[:, None], cols[None, :]]


def crop_resize_bicubic(rgb: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    top, left, h, w = box
    image = Image.fromarray(rgb).resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    return np.asarray(image)


@dataclass(frozen=True)
class GeometricOp:
    """An affine map in normalised image coordinates ``u, v ∈ [0, 1]`` (output → input)."""

    matrix: tuple[tuple[float, float, float], tuple[float, float, float]]

    def pixel_matrix(self, height: int, width: int) -> np.ndarray:
        """The same map in this tensor's own pixels (pixel centres at ``i + 0.5``)."""
        to_unit = np.array([[1 / width, 0, 0.5 / width], [0, 1 / height, 0.5 / height], [0, 0, 1]])
        to_pixel = np.array([[width, 0, -0.5], [0, height, -0.5], [0, 0, 1]])
        affine = np.vstack([np.array(self.matrix, dtype=np.float64), [0, 0, 1]])
        return (to_pixel @ affine @ to_unit)[:2]

    def apply(self, array: np.ndarray, nearest: bool, fill: int) -> np.ndarray:
        height, width = array.shape[:2]
        flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
        channels = 1 if array.ndim == 2 else array.shape[2]
        out = cv2.warpAffine(
            array,
            self.pixel_matrix(height, width),
            (width, height),
            flags=flags,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(fill,) * channels if channels > 1 else fill,
        )
        return out.reshape(array.shape)


# Prismer's RandAugment list: (name, max magnitude at m=10). Brightness and Sharpness are kept (they are
# drawn) although at m=5 their factor is exactly 1.0, i.e. a no-op, as in the original.
RANDAUG_OPS: tuple[tuple[str, float], ...] = (
    ("identity", 0.0),
    ("shear_x", 0.3),
    ("shear_y", 0.3),
    ("translate_x", 0.33),
    ("translate_y", 0.33),
    ("rotate", 30.0),
    ("autocontrast", 0.0),
    ("equalize", 0.0),
    ("brightness", 0.0),
    ("sharpness", 0.0),
)


def randaugment_ops(n: int, m: int, rng: np.random.Generator) -> list[tuple[str, GeometricOp | None]]:
    """Draw ``n`` ops with replacement; geometric ones with a random sign and magnitude ``m/10 · max``."""
    ops = []
    for index in rng.integers(0, len(RANDAUG_OPS), size=n):
        name, top = RANDAUG_OPS[int(index)]
        value = top * m / 10 * (1 if rng.random() < 0.5 else -1)
        ops.append((name, _geometric(name, value)))
    return ops


def _geometric(name: str, value: float) -> GeometricOp | None:
    if name == "shear_x":
        return GeometricOp(((1, value, 0), (0, 1, 0)))
    if name == "shear_y":
        return GeometricOp(((1, 0, 0), (value, 1, 0)))
    if name == "translate_x":  # value is a fraction of the width, so labels move with the image
        return GeometricOp(((1, 0, value), (0, 1, 0)))
    if name == "translate_y":
        return GeometricOp(((1, 0, 0), (0, 1, value)))
    if name == "rotate":  # about the centre
        c, s = math.cos(math.radians(value)), math.sin(math.radians(value))
        return GeometricOp(((c, -s, 0.5 - 0.5 * c + 0.5 * s), (s, c, 0.5 - 0.5 * s - 0.5 * c)))
    return None


def label_fill(expert: str) -> int:
    return BACKGROUND if expert in CATEGORICAL else DENSE_FILL


def joint_transform(
    rgb: np.ndarray,
    labels: Mapping[str, np.ndarray],
    resolution: int,
    rng: np.random.Generator | None,
    augment: AugmentConfig | None,
    label_resolution: int = LABEL_RESOLUTION,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """RGB (H×W×3 uint8) and its pixel-aligned labels (H×W or H×W×3) → RGB ``resolution``² and labels
    ``label_resolution``², all through the same crop, flip and augmentation. ``augment=None``: resize only."""
    height, width = rgb.shape[:2]
    box = (0, 0, height, width)
    if augment is not None:
        assert rng is not None
        box = random_resized_crop_box(height, width, augment.crop_scale, augment.crop_ratio, rng)
    rgb = crop_resize_bicubic(rgb, box, resolution)
    out = {name: crop_resize_nearest(label, box, label_resolution) for name, label in labels.items()}
    if augment is None:
        return rgb, out
    if rng.random() < augment.hflip:
        rgb = rgb[:, ::-1]
        out = {name: label[:, ::-1] for name, label in out.items()}
        if "normal" in out:  # mirrored surfaces face the other way: x -> -x, i.e. 255 - byte
            normal = out["normal"].copy()
            normal[..., 0] = 255 - normal[..., 0]
            out["normal"] = normal
    for name, op in randaugment_ops(augment.randaug_n, augment.randaug_m, rng):
        if op is not None:
            rgb = op.apply(np.ascontiguousarray(rgb), nearest=False, fill=RGB_FILL)
            out = {k: op.apply(np.ascontiguousarray(v), True, label_fill(k)) for k, v in out.items()}
        elif name == "autocontrast":
            rgb = np.asarray(ImageOps.autocontrast(Image.fromarray(np.ascontiguousarray(rgb))))
        elif name == "equalize":
            rgb = np.asarray(ImageOps.equalize(Image.fromarray(np.ascontiguousarray(rgb))))
    return np.ascontiguousarray(rgb), {k: np.ascontiguousarray(v) for k, v in out.items()}


# ================================================================================================
# One sample: decode the members the model uses
# ================================================================================================
@dataclass
class Example:
    """One decoded, transformed training/eval example (numpy, uint8 where possible)."""

    key: str
    rgb: np.ndarray  # 3×R×R uint8
    dense: dict[str, np.ndarray]  # name → C×L×L uint8
    ids: dict[str, np.ndarray]  # categorical name → L×L uint8
    tokens: dict[str, dict[int, tuple[str, Any]]]  # categorical name → {map value: embedding token}
    present: dict[str, bool]
    input_ids: list[int]
    targets: list[int]
    text: str
    references: list[str] = field(default_factory=list)
    weight: float = 1.0
    question: str | None = None
    question_id: Any = None
    answers: list[str] = field(default_factory=list)


@dataclass
class QaIndex:
    """VQA rows keyed by image stem: ``[{image, question, answer (str | list), weight?, question_id?}]``."""

    rows: dict[str, list[dict[str, Any]]]

    @classmethod
    def from_files(cls, paths: Sequence[str]) -> QaIndex:
        rows: dict[str, list[dict[str, Any]]] = {}
        for path in paths:
            with fsspec.open(path, "r", encoding="utf-8") as handle:
                for row in json.load(handle):
                    rows.setdefault(image_key(row["image"]), []).append(row)
        return cls(rows)


def image_key(image_path: str) -> str:
    """The shard key of an image path (the label pipeline keys samples by the sanitised file stem)."""
    return sanitize_key(image_path.rsplit("/", 1)[-1].rsplit(".", 1)[0])


@dataclass
class SampleDecoder:
    """Members of one shard sample → :class:`Example` (or several, one per question, when evaluating VQA)."""

    experts: tuple[str, ...]
    tokenizer: Tokenizer
    resolution: int
    augment: AugmentConfig | None  # None = evaluation (resize only)
    task: str = "caption"  # caption | vqa
    prefix: str = ""
    max_words: int = 30
    max_tokens: int = 30
    label_resolution: int = LABEL_RESOLUTION
    qa: QaIndex | None = None
    # A word without a stored feature: True (the tiny demo) gives it a hashed stand-in vector; False
    # masks the OCR label of that sample, as for any missing expert.
    hashed_words: bool = True

    def wants(self, key: str, members: Mapping[str, Any]) -> bool:
        """Cheap filter on member names: an image, and a caption (captioning) or questions (VQA)."""
        if not any(ext in members for ext in IMAGE_EXTENSIONS):
            return False
        if self.task == "vqa":
            return self.qa is not None and key in self.qa.rows
        return "txt" in members

    def members_to_read(self, name: str) -> bool:
        """Only these members' bytes are read from the tar."""
        if name in IMAGE_EXTENSIONS or name in ("txt", "json"):
            return True
        expert, _, ext = name.partition(".")
        if name == WORD_FEATURES:
            return "ocr_detection" in self.experts
        return expert in self.experts and ext in ("png", "json")

    def __call__(self, key: str, members: Mapping[str, bytes], rng: np.random.Generator) -> list[Example]:
        image = next(members[ext] for ext in IMAGE_EXTENSIONS if ext in members)
        try:
            rgb = decode_image(image).array
        except DecodeError as exc:
            logger.warning("sample %s: image not decodable (%s); skipped", key, exc)
            return []
        labels, side = self._labels(key, members, rgb.shape[:2])
        rgb_out, labels_out = joint_transform(
            rgb, labels, self.resolution, rng, self.augment, self.label_resolution
        )
        base = self._visual(key, rgb_out, labels_out, side)
        return self._with_text(key, members, base, rng)

    def _labels(
        self, key: str, members: Mapping[str, bytes], size: tuple[int, int]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        labels, side = {}, {}
        for expert in self.experts:
            data = members.get(f"{expert}.png")
            if data is None:
                continue  # not labelled (expert failed or never ran): masked
            try:
                label = decode_png(data)
                if expert in ("obj_detection", "ocr_detection"):
                    side[expert] = json.loads(members.get(f"{expert}.json", b"[]"))
            except (OSError, ValueError) as exc:
                logger.warning("sample %s: %s label unreadable (%s); masked", key, expert, exc)
                continue
            want_ndim = 3 if DENSE_CHANNELS.get(expert) == 3 else 2
            if label.shape[:2] != size or label.ndim != want_ndim:
                logger.warning("sample %s: %s label %s != image %s; masked", key, expert, label.shape, size)
                continue
            if expert == "ocr_detection":
                side["ocr_features"] = self._word_features(key, members, side[expert])
                if side["ocr_features"] is None and not self.hashed_words:
                    logger.warning("sample %s: OCR words without their %s; masked", key, WORD_FEATURES)
                    continue
            labels[expert] = label
        return labels, side

    @staticmethod
    def _word_features(key: str, members: Mapping[str, bytes], words: Any) -> np.ndarray | None:
        """The stored (N, 64) word features, row i for word i of the json; None if absent or unusable."""
        data = members.get(WORD_FEATURES)
        if data is None:
            return None
        try:
            features = decode_npy(data)
        except (OSError, ValueError) as exc:
            logger.warning("sample %s: %s unreadable (%s)", key, WORD_FEATURES, exc)
            return None
        count = len(words) if isinstance(words, list) else -1
        if features.shape != (count, EMBED_DIM) or features.dtype != WORD_FEATURE_DTYPE:
            logger.warning(
                "sample %s: %s is %s %s for %d words",
                key,
                WORD_FEATURES,
                features.dtype,
                features.shape,
                count,
            )
            return None
        return features

    def _visual(
        self, key: str, rgb: np.ndarray, labels: dict[str, np.ndarray], side: dict[str, Any]
    ) -> Example:
        size = self.label_resolution
        dense, ids, tokens, present = {}, {}, {}, {}
        for expert in self.experts:
            present[expert] = expert in labels
            if expert in DENSE_CHANNELS:
                label = labels.get(expert)
                if label is None:
                    label = np.zeros((size, size, DENSE_CHANNELS[expert]), np.uint8)
                dense[expert] = label.reshape(size, size, -1).transpose(2, 0, 1)
            else:
                ids[expert] = labels.get(expert, np.full((size, size), BACKGROUND, np.uint8))
                tokens[expert] = self._tokens(expert, side.get(expert, []), side.get("ocr_features"))
        return Example(key, rgb.transpose(2, 0, 1), dense, ids, tokens, present, [], [], "")

    @staticmethod
    def _tokens(expert: str, side: Any, features: np.ndarray | None = None) -> dict[int, tuple[str, Any]]:
        """Map value → what its embedding is: a class id (seg: the value itself), or an OCR word (its
        stored feature, row = position in the json; without one, its text for the hashed stand-in)."""
        if expert.startswith("seg"):
            return {v: (expert, v) for v in range(_TABLE_SIZES[expert])}
        tokens = {}
        for row, item in enumerate(side if isinstance(side, list) else []):
            instance = int(item.get("instance", -1))
            if not 0 <= instance < BACKGROUND:
                continue
            if expert == "obj_detection":
                tokens[instance] = (expert, int(item["class_id"]))
            elif features is not None:
                tokens[instance] = ("vec", features[row].tobytes())
            else:
                tokens[instance] = ("word", str(item.get("text", "")).lower())
        return tokens

    def _with_text(
        self, key: str, members: Mapping[str, bytes], base: Example, rng: np.random.Generator
    ) -> list[Example]:
        if self.task == "vqa":
            return self._questions(key, base, rng)
        captions = _captions(members)
        caption = captions[int(rng.integers(len(captions)))] if self.augment is not None else captions[0]
        text = training_text(caption, self.prefix, self.max_words)
        base.input_ids, base.targets = caption_tokens(self.tokenizer, text, self.prefix, self.max_tokens)
        base.text, base.references = text, captions
        return [base]

    def _questions(self, key: str, base: Example, rng: np.random.Generator) -> list[Example]:
        rows = self.qa.rows[key] if self.qa else []
        if self.augment is not None:  # training: one (question, answer) per visit, like one dataset row
            rows = [rows[int(rng.integers(len(rows)))]]
        out = []
        for row in rows:
            answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
            question = pre_question(row["question"], self.max_words)
            answer = answers[int(rng.integers(len(answers)))] if self.augment is not None else None
            ids, targets = question_answer_tokens(self.tokenizer, question, answer)
            example = Example(**{**base.__dict__})
            example.input_ids, example.targets, example.text = ids, targets, question
            example.weight, example.question = float(row.get("weight", 1.0)), question
            example.question_id, example.answers = row.get("question_id"), answers
            out.append(example)
        return out


def _captions(members: Mapping[str, bytes]) -> list[str]:
    """The sample's captions: all of them from the json (COCO/VG keep several), else the ``txt``."""
    captions: list[str] = []
    if "json" in members:
        try:
            source = json.loads(members["json"]).get("source", {})
            captions = [c for c in source.get("captions", []) if isinstance(c, str) and c.strip()]
        except (ValueError, AttributeError):
            captions = []
    if not captions:
        captions = [members["txt"].decode("utf-8", errors="replace").strip()]
    return captions


# ================================================================================================
# Batches
# ================================================================================================
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


# ================================================================================================
# Shards and the resumable stream
# ================================================================================================
def labels_root(root: str | None = None) -> str:
    return root or os.environ.get("LABELS_ROOT") or "labels"


def dataset_shards(dataset: str, root: str | None = None) -> list[str]:
    """``{LABELS_ROOT:-labels}/<dataset>/shards/*.tar`` (any fsspec URL), sorted. ``dataset`` may also be a
    directory of shards or a glob."""
    if dataset.endswith(".tar") or "*" in dataset:
        pattern = dataset
    elif "/" in dataset and not dataset.startswith(("./", "../")) or Path(dataset).is_dir():
        pattern = f"{dataset.rstrip('/')}/shards/*.tar"
    else:
        pattern = f"{labels_root(root).rstrip('/')}/{dataset}/shards/*.tar"
    fs, _, paths = fsspec.get_fs_token_paths(pattern)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    urls = sorted(p if protocol in ("file", "local") else f"{protocol}://{p}" for p in paths)
    if not urls:
        raise FileNotFoundError(
            f"no label shards match {pattern}; run `make labels DATASET={dataset}` first (or set LABELS_ROOT)"
        )
    return urls


def dataset_size(shards: Sequence[str]) -> int | None:
    """Samples with an image per the shards' done-records (``records/<shard>.done.json``: ``ok`` plus
    ``partial`` from ``status_counts``), or None when a record is missing."""
    total = 0
    for url in shards:
        base, _, name = url.rpartition("/shards/")
        record = f"{base}/records/{name.removesuffix('.tar')}.done.json"
        try:
            with fsspec.open(record, "r") as handle:
                done = json.load(handle)
            counts = done.get("status_counts") or {"ok": done["ok"]}
            total += int(counts.get("ok", 0)) + int(counts.get("partial", 0))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


@dataclass
class _Ref:
    """A sample of a stream: where it is (pass, shard index in that pass, shard url, ordinal among the
    shard's usable samples) and its members once read (``None`` while fast-forwarding)."""

    epoch: int
    shard: int
    url: str
    ordinal: int
    key: str
    members: dict[str, bytes] | None


def read_shard(
    url: str,
    wants: Callable[[str, Mapping[str, Any]], bool],
    read_member: Callable[[str], bool],
    with_data: bool = True,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Usable samples of a label shard, in order: ``(key, {member: bytes})`` with only the members the
    model needs read (``with_data=False``: names only, values empty). A damaged shard ends early with a
    warning."""
    members: dict[str, bytes] = {}
    current: str | None = None
    # Names only from a local file: random-access mode seeks from header to header, reading no data.
    mode = "r:" if not with_data and _is_local(url) else "r|*"
    try:
        with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode=mode) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if key != current:
                    if current is not None and wants(current, members):
                        yield current, members
                    current, members = key, {}
                if with_data and read_member(ext):
                    handle = tar.extractfile(info)
                    members[ext] = handle.read() if handle else b""
                else:
                    members[ext] = b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        logger.warning("shard %s is damaged (%s: %s); reading stops there", url, type(exc).__name__, exc)
    if current is not None and wants(current, members):
        yield current, members


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class ShardStream(IterableDataset):
    """Batches from label shards, split by rank and worker; resumable at any batch.

    Training (``train=True``): each stream (one per rank × worker) makes passes ("epochs") forever; pass
    ``e`` shuffles the shard list with ``(seed, e)`` and takes every ``streams``-th shard (or one shard, drawn
    round-robin, when there are fewer shards than streams). Samples go through a shuffle buffer. The
    augmentation of the ``n``-th sample of a stream uses ``default_rng([seed, stream, n])``. The buffer's
    choices depend only on sample counts, so restarting at batch ``k`` replays the stream on names only
    (no image bytes read) and then reads just the buffered samples: exact and cheap.

    Evaluation: one in-order pass over this rank/worker's share of the shards, last batch partial.

    Batches are collated in the worker; with ``DataLoader(batch_size=None)`` the loader takes its batches
    from the workers round-robin, which is how :meth:`_stream` maps a loader position to a stream. (The
    position counts samples: it stays exact unless an image that the label pipeline decoded fails to
    decode here.)
    """

    def __init__(
        self,
        shards: Sequence[str],
        decoder: SampleDecoder,
        embeddings: LabelEmbeddings,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        start_batch: int = 0,
        keys: set[str] | None = None,
        collate_fn: Callable[[Sequence[Example], LabelEmbeddings, int], Any] | None = None,
    ) -> None:
        super().__init__()
        self.collate_fn = collate_fn or collate
        if not shards:
            raise ValueError("no shards")
        self.shards, self.decoder, self.embeddings = list(shards), decoder, embeddings
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.start_batch = start_batch
        self.keys = keys

    # -- stream layout -------------------------------------------------------------------------------
    def _stream(self) -> tuple[int, int, int]:
        """(stream id, number of streams, batches this stream already gave before ``start_batch``).

        The DataLoader takes batch ``j`` of this run from worker ``j % W``; that is global batch
        ``start_batch + j``, which the uninterrupted run took from stream ``(start_batch + j) % W``. So
        worker ``w`` plays stream ``(start_batch + w) % W`` of its rank."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        local = (self.start_batch + worker) % workers
        skip = len(range(local, self.start_batch, workers))
        return self.rank * workers + local, self.world_size * workers, skip

    def epoch_shards(self, epoch: int, stream: int, streams: int) -> list[str]:
        order = list(self.shards)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return [order[i % len(order)] for i in range(stream, max(len(order), streams), streams)]

    def _wants(self, key: str, members: Mapping[str, Any]) -> bool:
        return (self.keys is None or key in self.keys) and self.decoder.wants(key, members)

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream, streams, skip_batches = self._stream()
        if not self.train:
            yield from self._eval_batches(stream, streams)
            return
        pending: list[Example] = []
        for ordinal, ref in self._shuffled(stream, streams, skip_batches * self.batch_size):
            rng = np.random.default_rng([self.seed, stream, ordinal])
            pending.extend(self.decoder(ref.key, ref.members or {}, rng))
            while len(pending) >= self.batch_size:
                chunk, pending = pending[: self.batch_size], pending[self.batch_size :]
                yield self.collate_fn(chunk, self.embeddings, self.decoder.tokenizer.pad_id)

    def _eval_batches(self, stream: int, streams: int) -> Iterator[dict[str, Any]]:
        pending: list[Example] = []
        for url in self.shards[stream::streams]:
            for ordinal, (key, members) in enumerate(
                read_shard(url, self._wants, self.decoder.members_to_read)
            ):
                pending.extend(self.decoder(key, members, np.random.default_rng([self.seed, ordinal])))
                while len(pending) >= self.batch_size:
                    chunk, pending = pending[: self.batch_size], pending[self.batch_size :]
                    yield self.collate_fn(chunk, self.embeddings, self.decoder.tokenizer.pad_id)
        if pending:
            yield self.collate_fn(pending, self.embeddings, self.decoder.tokenizer.pad_id)

    def _incoming(
        self, stream: int, streams: int, start: tuple[int, int, int] = (0, 0, 0), with_data: bool = True
    ) -> Iterator[_Ref]:
        """Every usable sample of this stream's passes from ``start`` = (pass, shard index, ordinal),
        forever; names only (no bytes read) when ``with_data`` is false."""
        for epoch in range(start[0], 1 << 62):
            found = False
            shards = self.epoch_shards(epoch, stream, streams)
            for index in range(start[1] if epoch == start[0] else 0, len(shards)):
                first = start[2] if (epoch, index) == start[:2] else 0
                samples = read_shard(shards[index], self._wants, self.decoder.members_to_read, with_data)
                for ordinal, (key, members) in enumerate(samples):
                    found = True
                    if ordinal >= first:
                        yield _Ref(epoch, index, shards[index], ordinal, key, members if with_data else None)
            if not found and epoch > start[0]:
                raise RuntimeError(f"stream {stream}: its shards hold no usable samples ({shards[:3]}…)")

    def _shuffled(self, stream: int, streams: int, skip: int) -> Iterator[tuple[int, _Ref]]:
        """The shuffle buffer over :meth:`_incoming`, yielding ``(ordinal in stream, sample)`` from ``skip``
        on. The buffer's random choices depend only on counts, so the first ``skip`` samples are replayed
        on names only; then the buffered samples are read back and the stream goes on with data."""
        rng = random.Random(f"{self.seed}:buffer:{stream}")
        fast_forward = skip > 0
        incoming = self._incoming(stream, streams, with_data=not fast_forward)
        buffer: list[_Ref] = []
        produced = 0
        while (ref := next(incoming, None)) is not None:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(ref)
                continue
            j = rng.randrange(len(buffer))
            out, buffer[j] = buffer[j], ref
            if not fast_forward:
                yield produced, out
            produced += 1
            if fast_forward and produced >= skip:
                fast_forward = False
                buffer = self._materialise(buffer)
                incoming = self._incoming(stream, streams, (ref.epoch, ref.shard, ref.ordinal + 1))

    def _materialise(self, buffer: list[_Ref]) -> list[_Ref]:
        """Read the members of buffered name-only samples, one pass per shard involved."""
        needed: dict[str, dict[int, list[int]]] = {}
        for position, ref in enumerate(buffer):
            if ref.members is None:  # (a shard can be buffered from two passes: same bytes)
                needed.setdefault(ref.url, {}).setdefault(ref.ordinal, []).append(position)
        for url, wanted in needed.items():
            samples = read_shard(url, self._wants, self.decoder.members_to_read)
            for ordinal, (_, members) in enumerate(samples):
                for position in wanted.get(ordinal, []):
                    old = buffer[position]
                    buffer[position] = _Ref(old.epoch, old.shard, url, ordinal, old.key, members)
        return buffer


def make_loader(
    stream: ShardStream, num_workers: int, pin_memory: bool = False, prefetch_factor: int = 2
) -> DataLoader:
    """A DataLoader over a :class:`ShardStream` (batches are collated in the workers)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False}
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)


def caption_corpus(shards: Sequence[str], prefix: str = "", max_words: int = 30) -> list[str]:
    """All cleaned training texts of the shards (to build the demo's word vocabulary)."""
    texts = []

    def wants(key: str, members: Mapping[str, Any]) -> bool:
        return "txt" in members

    for url in shards:
        for _, members in read_shard(url, wants, lambda ext: ext in ("txt", "json")):
            texts.extend(training_text(c, prefix, max_words) for c in _captions(members))
    return texts
