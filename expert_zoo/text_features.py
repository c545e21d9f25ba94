"""``ocr_features:clip_pca``: Prismer's word embeddings, made at label time.

Prismer gives every OCR word, and every seg/detection class, a 64-d vector: CLIP ViT-L/14's unnormalised
text embedding (``encode_text``: the final layer-normed state at the end-of-text token times the text
projection) reduced by a PCA fitted on 80,000 words (``dataset/clip_pca.pkl``). The same two steps live
here: :class:`ClipTextEncoder` (transformers ``CLIPTextModelWithProjection``, its ``text_embeds``) and
:class:`PcaProjection` (``(x - mean) @ components.T``, no whitening). :class:`TextFeatures` joins them;
the expert, the class tables of an output root and ``label-pipeline fit-pca`` all use it.

Tokenisation follows ``clip.tokenize``: html entities unescaped, whitespace collapsed, lower case,
``<|startoftext|> BPE <|endoftext|>``, at most the model's context length (77) tokens; longer texts are
cut to the first 75 BPE tokens and keep their end token (``clip.tokenize(truncate=True)``; Prismer's
default, ``truncate=False``, raised an error instead). Padding never matters: the text tower is causal
and reads its output at the end token.

The expert's label is an array, not a map: ``KEY.ocr_features.npy``, float16 (N, 64), row i for word i of
``KEY.ocr_detection.json`` (docs/FORMAT.md). It needs the OCR label of the same image, from the same
pass or from the existing shard, so adding it to a labelled output computes only this member.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from expert_zoo.base import NPY_MODE, ConfigError, Expert, ExpertSpec, Label, WeightsOptions

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "hf-hub:openai/clip-vit-large-patch14"
EMBED_DIM = 64  # Prismer's expert stems take 64-d class / word vectors
TEXT_CHUNK = 256  # texts per forward of the text tower
FEATURE_DTYPE = np.float16  # of the stored word features (docs/FORMAT.md)
_SPACES = re.compile(r"\s+")

PCA_HELP = (
    "make one with `label-pipeline import-prismer-tables PRISMER_CHECKOUT DIR` (Prismer's own PCA, "
    "NVIDIA non-commercial licence; writes DIR/pca.npz) or `label-pipeline fit-pca VOCAB.txt PCA.npz` "
    "(a new one from a word list), then set the expert's option `pca` to that .npz"
)


# ================================================================================================
# PCA
# ================================================================================================
@dataclass(frozen=True)
class PcaProjection:
    """A fitted PCA: ``transform(x) = (x - mean) @ components.T`` (sklearn's, without whitening)."""

    components: np.ndarray  # (k, D) float64
    mean: np.ndarray  # (D,) float64

    def __post_init__(self) -> None:
        k_d, mean = self.components.shape, self.mean.shape
        if len(k_d) != 2 or mean != (k_d[1],):
            raise ValueError(f"PCA components must be (k, D) and mean (D,), got {k_d} and {mean}")
        if not (np.isfinite(self.components).all() and np.isfinite(self.mean).all()):
            raise ValueError("PCA components or mean hold NaN or inf")

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    def transform(self, features: np.ndarray) -> np.ndarray:
        """(N, D) → (N, k) float32, computed in float64 as sklearn does with its float64 fit."""
        x = np.asarray(features, dtype=np.float64)
        return ((x - self.mean) @ self.components.T).astype(np.float32)

    @property
    def digest(self) -> str:
        """sha256 of the values (not of the file), so a re-saved copy has the same identity."""
        digest = hashlib.sha256()
        for array in (self.components, self.mean):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
        return digest.hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> PcaProjection:
        """An ``.npz`` with ``components`` and ``mean`` (or sklearn's ``components_`` / ``mean_``)."""
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            try:
                components = next(data[k] for k in ("components", "components_") if k in names)
                mean = next(data[k] for k in ("mean", "mean_") if k in names)
            except StopIteration:
                raise ValueError(f"{path}: a PCA .npz needs arrays 'components' and 'mean'") from None
            return cls(np.asarray(components, np.float64), np.asarray(mean, np.float64))

    def save(self, path: str | Path, **extra: np.ndarray) -> None:
        """Write the ``.npz`` that :meth:`load` reads (float64), plus any ``extra`` arrays."""
        # Numeric arrays only: load() reads them back with allow_pickle=False.
        np.savez(path, allow_pickle=False, components=self.components, mean=self.mean, **extra)


def fit_pca(features: np.ndarray, dim: int = EMBED_DIM) -> tuple[PcaProjection, dict[str, np.ndarray]]:
    """A ``dim``-component PCA of (N, D) features by SVD, and its statistics (sklearn's ``*_`` values).

    Signs are made deterministic: the largest-magnitude entry of each component is positive.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] <= dim or x.shape[1] < dim:
        raise ValueError(
            f"fitting a {dim}-component PCA needs more than {dim} samples of >= {dim} dims, got {x.shape}"
        )
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    pivots = np.argmax(np.abs(vt), axis=1)
    vt *= np.sign(vt[np.arange(len(vt)), pivots])[:, None]
    variance = singular**2 / (x.shape[0] - 1)
    stats = {
        "explained_variance": variance[:dim],
        "explained_variance_ratio": variance[:dim] / variance.sum(),
        "singular_values": singular[:dim],
        "n_samples": np.array(x.shape[0]),
    }
    return PcaProjection(vt[:dim].copy(), mean), stats


def resolve_pca(source: str, expert: str, sha256: str | None = None) -> PcaProjection:
    """The PCA ``.npz`` named by ``source`` (a path, URL or ``hf-hub:`` file), through the weight resolver."""
    from label_pipeline.core.weights import WeightsUnreadable, resolve_weights

    path = resolve_weights(source, expert=expert, sha256=sha256)
    try:
        return PcaProjection.load(path)
    except (OSError, ValueError) as exc:
        raise WeightsUnreadable(expert, path, f"not a PCA .npz ({exc}); {PCA_HELP}") from exc


# ================================================================================================
# CLIP text tower
# ================================================================================================
def clean_text(text: str) -> str:
    """``clip.tokenize``'s cleaning (without ftfy): html entities unescaped twice, whitespace collapsed,
    lower case."""
    return _SPACES.sub(" ", html.unescape(html.unescape(text))).strip().lower()


class ClipTextEncoder:
    """Texts → CLIP ``text_embeds`` (unnormalised), float32 (N, D). ``model_dir`` is a transformers
    directory of a CLIP text model or of a whole CLIP model (the vision tower is not loaded)."""

    def __init__(self, model_dir: Path, device: Any) -> None:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        from expert_zoo._hf import load_pretrained

        self.device = device
        self.model = load_pretrained(CLIPTextModelWithProjection, model_dir).eval().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.context_length = int(self.model.config.max_position_embeddings)
        self.dim = int(self.model.config.projection_dim)

    def tokenize(self, texts: Sequence[str]) -> Any:
        """Token ids as ``clip.tokenize``: start + BPE + end token, cut to the context length."""
        cleaned = [clean_text(t) for t in texts]
        return self.tokenizer(
            cleaned, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        )

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), TEXT_CHUNK):
            tokens = self.tokenize(texts[start : start + TEXT_CHUNK])
            with torch.inference_mode():
                embeds = self.model(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                ).text_embeds
            out[start : start + len(embeds)] = embeds.float().cpu().numpy()
        return out


# ================================================================================================
# Encoder + PCA
# ================================================================================================
@dataclass(frozen=True)
class TextFeatureOptions(WeightsOptions):
    """``weights``: the CLIP text encoder (a transformers dir or hub repo; default CLIP ViT-L/14, whose
    text tower Prismer used); ``pca``: the PCA ``.npz`` (required, see ``PCA_HELP``); ``pca_sha256``:
    checked when given."""

    weights: str = DEFAULT_ENCODER
    pca: str = ""
    pca_sha256: str | None = None
    WEIGHT_FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("weights", "sha256"), ("pca", "pca_sha256"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.pca:
            raise ConfigError(f"pca: ocr_features:clip_pca needs a PCA-64 .npz; {PCA_HELP}")


class TextFeatures:
    """CLIP text embedding → PCA: texts → (N, 64) float32. ``digest`` identifies both halves.

    Built from resolved files; the text tower itself loads on first use (``encoder``), so a caller that
    only needs the identity (are these tables current?) never loads it.
    """

    def __init__(
        self, model_dir: Path, pca: PcaProjection, encoder_digest: str, source: str, device: Any, expert: str
    ) -> None:
        if pca.dim != EMBED_DIM:
            raise ConfigError(
                f"pca: Prismer's embeddings are {EMBED_DIM}-d, this PCA has {pca.dim} components"
            )
        self.model_dir, self.pca, self.device, self.expert = model_dir, pca, device, expert
        self.encoder_digest, self.encoder_source = encoder_digest, source
        self._encoder: ClipTextEncoder | None = None

    @classmethod
    def from_options(cls, options: TextFeatureOptions, device: Any, expert: str) -> TextFeatures:
        """Resolve the encoder and the PCA the options name (weight resolver: sha256, offline cache)."""
        from expert_zoo._hf import resolve_model_dir
        from label_pipeline.core.weights import loading_weights, model_dir_digest

        pca = resolve_pca(options.pca, expert, options.pca_sha256)
        config = {"weights": options.weights, "sha256": options.sha256}
        model_dir = resolve_model_dir(config, DEFAULT_ENCODER, expert)
        with loading_weights(expert, model_dir):
            digest = model_dir_digest(model_dir)
        return cls(model_dir, pca, digest, options.weights, device, expert)

    @property
    def encoder(self) -> ClipTextEncoder:
        return self.load()

    def load(self) -> ClipTextEncoder:
        """The text tower, loaded on the first call."""
        if self._encoder is None:
            from label_pipeline.core.weights import loading_weights

            with loading_weights(self.expert, self.model_dir):
                encoder = ClipTextEncoder(self.model_dir, self.device)
            if encoder.dim != self.pca.input_dim:
                raise ConfigError(
                    f"pca: the PCA takes {self.pca.input_dim}-d features, the text encoder "
                    f"{self.encoder_source} gives {encoder.dim}-d"
                )
            self._encoder = encoder
        return self._encoder

    @property
    def digest(self) -> str:
        """Changes with the encoder files or the PCA values."""
        return hashlib.sha256(f"{self.encoder_digest}:{self.pca.digest}".encode()).hexdigest()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, EMBED_DIM), np.float32)
        return self.pca.transform(self.encoder(list(texts)))


# ================================================================================================
# The expert
# ================================================================================================
class ClipPcaWordFeatures(Expert):
    """Per-word CLIP-PCA features of the OCR words (Prismer's ``{idx: {features, text}}`` side file)."""

    LICENCE = "MIT (CLIP); the PCA's own"
    spec: ClassVar[ExpertSpec] = ExpertSpec(
        task="ocr_features",
        backend="clip_pca",
        version="1",
        mode=NPY_MODE,
        batch_size=32,
        requires=("ocr_detection",),
        uses_gpu=True,
    )
    Options: ClassVar[type[TextFeatureOptions]] = TextFeatureOptions
    opts: TextFeatureOptions

    def __init__(self, config: Mapping[str, Any] | None = None, device: str = "cpu") -> None:
        super().__init__(config, device)
        from expert_zoo.torch_utils import resolve_device

        self.torch_device = resolve_device(device)
        self.features = TextFeatures.from_options(self.opts, self.torch_device, self.spec.name)
        self.features.load()  # now: a broken encoder stops the run at start-up, not mid-shard
        self.weights_digest = self.features.digest
        logger.info(
            "text features: %s (%d-d) -> PCA-%d, on %s",
            self.features.encoder_source,
            self.features.encoder.dim,
            self.features.pca.dim,
            self.torch_device,
        )

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        per_image = [word_texts(label) for label in deps["ocr_detection"]]
        # One forward for the batch's distinct words (signs and captions repeat words a lot).
        unique = sorted({text for texts in per_image for text in texts})
        rows = dict(zip(unique, self.features(unique)))
        labels = []
        for texts in per_image:
            array = np.stack([rows[t] for t in texts]) if texts else np.zeros((0, EMBED_DIM), np.float32)
            labels.append(Label(map=None, array=array.astype(FEATURE_DTYPE)))
        return labels


def word_texts(label: Label) -> list[str]:
    """The texts of an OCR label's words, in its json order (row order of the features)."""
    if not isinstance(label.data, list):
        raise ValueError("the ocr_detection label has no word list (its json member is missing)")
    return [str(word.get("text", "")) for word in label.data]
