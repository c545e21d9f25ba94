"""The expert interface: a plain class, loaded once, called on batches of decoded RGB images.

An expert never imports Ray. The in-process runner calls it directly; the Ray runner wraps the same
class in an actor. Every label an expert returns is pixel-aligned with the image it was given (the
decoded image after EXIF orientation), so the runner can store it next to the original bytes.
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

import numpy as np

from label_pipeline.core.errors import ConfigError
from label_pipeline.core.format import encode_label_members, encode_npy
from label_pipeline.core.validation import check_type, did_you_mean, short_repr

BACKGROUND = 255  # every categorical map uses 255 for "nothing here"
NPY_MODE = "npy"  # ExpertSpec.mode of an expert that writes an array member instead of a map
# Options that change how fast an expert runs but never what it writes: left out of the fingerprint.
THROUGHPUT_OPTIONS = frozenset({"batch_size"})


@dataclass(frozen=True)
class ExpertOptions:
    """The options every expert accepts. Each expert subclasses this as its ``Options``: one field per
    option, typed, with its default. Fields are checked before any weights load (see ``check_options``);
    ``__post_init__`` checks what depends on several fields and raises :class:`ConfigError`.
    """

    batch_size: int | None = None  # images per forward; throughput only, so not in the fingerprint

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class WeightsOptions(ExpertOptions):
    """Options of an expert that loads weights: where from, and optionally the sha256 they must have."""

    weights: str = ""  # each expert sets its own default source
    sha256: str | None = None
    # (source option, its sha256 option) for every file the expert loads: resolved before any expert loads.
    WEIGHT_FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("weights", "sha256"),)


def option_names(options_cls: type[ExpertOptions]) -> list[str]:
    return sorted(f.name for f in fields(options_cls) if f.init)


OptionsT = TypeVar("OptionsT", bound=ExpertOptions)


def validate_options(
    options_cls: type[OptionsT], given: Any, where: str, owner: str = "this expert"
) -> OptionsT:
    """``given`` checked against ``options_cls``: every key known, every value of its declared type.

    ``where`` is the options' key path (``experts[0].options``); each error names the bad key under it.
    Returns the options with defaults filled in; the caller keeps ``given`` itself for the fingerprint.
    """
    if not isinstance(given, Mapping):
        raise ConfigError(f"{where}: expected a mapping of option names to values, got {short_repr(given)}")
    names = option_names(options_cls)
    hints = typing.get_type_hints(options_cls)
    for key, value in given.items():
        if key not in names:
            raise ConfigError(
                f"{where}.{key}: unknown option for {owner}{did_you_mean(key, names)} "
                f"(options: {', '.join(names)})"
            )
        check_type(value, hints[key], f"{where}.{key}")
    try:
        return options_cls(**given)
    except ConfigError as exc:  # a check across fields, in the options' __post_init__
        raise ConfigError(f"{where}.{exc}") from exc


@dataclass
class Label:
    """One expert's result for one image.

    ``map`` is uint8, H×W (L8) or H×W×3 (RGB8), at the size of the image the expert was given.
    ``data`` is optional JSON-serialisable side information (detections, words); when an expert
    declares ``has_json`` it is always written, an empty list included.
    ``array`` is the payload of an expert without a map (``spec.mode == "npy"``, e.g. per-word
    features): ``map`` is then None and the array is stored as ``{task}.npy``.
    """

    map: np.ndarray | None
    data: Any = None
    array: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.map is None:
            if self.array is None:
                raise ValueError("a label without a map must carry an array")
            return
        if self.map.dtype != np.uint8 or self.map.ndim not in (2, 3):
            raise ValueError(f"label map must be uint8 HxW or HxWx3, got {self.map.dtype} {self.map.shape}")
        if self.map.ndim == 3 and self.map.shape[2] != 3:
            raise ValueError(f"RGB label map must have 3 channels, got {self.map.shape}")


@dataclass(frozen=True)
class ExpertSpec:
    """How the runner should treat an expert: what it needs and what it prefers."""

    task: str  # output member name, e.g. "edge"
    backend: str  # model family, e.g. "canny"
    version: str  # bump when the label an expert writes changes for the same weights
    mode: str  # "L" or "RGB": the PNG mode of the map; "npy": no map, ``Label.array`` as ``{task}.npy``
    has_json: bool = False  # writes ``{task}.json`` next to ``{task}.png``
    batch_size: int = 8  # preferred batch size
    input_size: tuple[int, int] | None = None  # (H, W) the network sees; None = native size
    requires: tuple[str, ...] = ()  # tasks whose labels this expert reads (e.g. detection needs depth)
    uses_gpu: bool = False

    @property
    def name(self) -> str:
        return f"{self.task}:{self.backend}"


class Expert:
    """Base class for experts. Subclasses set ``spec`` and implement ``predict_batch`` (one forward batch
    of at most ``batch_size`` images) or, to see the whole list at once, ``predict``.

    ``__init__`` loads weights (it is called once per process / actor); ``__call__`` labels a batch.
    ``Options`` declares the backend's options (names, types, defaults); ``config`` holds the options
    as given and is part of the fingerprint, so any option that can change a label must live there.
    ``opts`` is the same, checked and with defaults filled in. Neural experts subclass
    :class:`expert_zoo.torch_expert.TorchExpert`, which loads the weights and places the network.
    """

    spec: ClassVar[ExpertSpec]
    Options: ClassVar[type[ExpertOptions]] = ExpertOptions
    GPU_BATCH_SIZE: ClassVar[int | None] = None  # preferred images per forward on CUDA (Prismer's sizes)
    # Options whose defaults enter ``config`` (and so the fingerprint) even when not given: the experts
    # that always fingerprinted them keep their fingerprints.
    FINGERPRINTED_DEFAULTS: ClassVar[tuple[str, ...]] = ()
    torch_device: Any = None  # the resolved torch device, set by experts that run a network
    # The default weights' licence as upstream states it (``label-pipeline experts``, docs/EXPERTS.md).
    LICENCE: ClassVar[str] = ""

    def __init__(self, config: Mapping[str, Any] | None = None, device: str = "cpu") -> None:
        given = dict(config or {})
        # Checked again here (the registry checks first) so a directly built expert is checked too.
        self.opts = self.check_options(given, "options")
        self.config = {**{name: getattr(self.opts, name) for name in self.FINGERPRINTED_DEFAULTS}, **given}
        self.device = device
        self.weights_digest = ""  # subclasses that load weights set the sha256 of what they loaded

    @classmethod
    def check_options(cls, options: Any, where: str) -> ExpertOptions:
        """Validate options against ``Options`` without building the expert (no weights are loaded)."""
        spec = getattr(cls, "spec", None)
        return validate_options(cls.Options, options, where, owner=spec.name if spec else cls.__name__)

    # -- labelling ---------------------------------------------------------------------------
    def __call__(
        self,
        images: Sequence[np.ndarray],
        deps: Mapping[str, Sequence[Label]] | None = None,
    ) -> list[Label]:
        """Label a batch of H×W×3 uint8 RGB arrays; ``deps`` maps each required task to its labels."""
        deps = dict(deps or {})
        missing = [t for t in self.spec.requires if t not in deps]
        if missing:
            raise ValueError(f"{self.spec.name} needs labels from {missing} in the same pass")
        for task in self.spec.requires:
            if len(deps[task]) != len(images):
                count = len(deps[task])
                raise ValueError(f"{self.spec.name} got {count} {task} labels for {len(images)} images")
        labels = self.predict(list(images), deps)
        if len(labels) != len(images):
            raise RuntimeError(f"{self.spec.name} returned {len(labels)} labels for {len(images)} images")
        for image, label in zip(images, labels):
            if label.map is not None and label.map.shape[:2] != image.shape[:2]:
                got, want = label.map.shape[:2], image.shape[:2]
                raise RuntimeError(f"{self.spec.name} label {got} is not aligned with image {want}")
        return labels

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        """Labels for ``images``, one ``predict_batch`` per forward batch (``deps`` split alongside)."""
        by_task = {task: list(task_labels) for task, task_labels in deps.items()}
        labels: list[Label] = []
        for part in self.forward_slices(len(images)):
            labels.extend(self.predict_batch(images[part], {task: d[part] for task, d in by_task.items()}))
        return labels

    def predict_batch(self, images: list[np.ndarray], deps: Mapping[str, list[Label]]) -> list[Label]:
        """Labels for at most ``batch_size`` images, and the same number of labels per task in ``deps``."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict_batch or predict")

    def forward_slices(self, count: int) -> list[slice]:
        """``count`` items cut into forward batches of ``batch_size`` (the last one may be shorter)."""
        size = self.batch_size
        return [slice(start, start + size) for start in range(0, count, size)]

    @property
    def batch_size(self) -> int:
        """Images per forward pass: the ``batch_size`` option, else the device's preferred size."""
        on_cuda = self.torch_device is not None and self.torch_device.type == "cuda"
        default = (self.GPU_BATCH_SIZE or self.spec.batch_size) if on_cuda else self.spec.batch_size
        return int(self.config.get("batch_size", default))

    # -- storage -----------------------------------------------------------------------------
    def encode(self, label: Label) -> dict[str, bytes]:
        """Member extension → bytes, e.g. ``{"png": ..., "json": ...}`` (see docs/FORMAT.md)."""
        if self.spec.mode == NPY_MODE:
            if label.array is None:
                raise ValueError(f"{self.spec.name}: an npy-mode expert returned a label without an array")
            return {"npy": encode_npy(label.array)}
        if label.map is None:
            raise ValueError(f"{self.spec.name}: a map-mode expert returned a label without a map")
        return encode_label_members(label.map, label.data if self.spec.has_json else None, self.spec.mode)

    # -- identity ----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Changes whenever the labels this expert writes can change: spec, options or weights."""
        payload = {
            "spec": asdict(self.spec),
            "config": {k: v for k, v in self.config.items() if k not in THROUGHPUT_OPTIONS},
            "weights": self.weights_digest,
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
