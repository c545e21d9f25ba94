"""The expert interface: a plain class, loaded once, called on batches of decoded RGB images.

An expert never imports Ray. The in-process runner calls it directly; the Ray runner wraps the same
class in an actor. Every label an expert returns is pixel-aligned with the image it was given (the
decoded image after EXIF orientation), so the runner can store it next to the original bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from label_pipeline.format import encode_label_members

BACKGROUND = 255  # every categorical map uses 255 for "nothing here"
# Options that change how fast an expert runs but never what it writes: left out of the fingerprint.
THROUGHPUT_OPTIONS = frozenset({"batch_size"})


@dataclass
class Label:
    """One expert's result for one image.

    ``map`` is uint8, H×W (L8) or H×W×3 (RGB8), at the size of the image the expert was given.
    ``data`` is optional JSON-serialisable side information (detections, words); when an expert
    declares ``has_json`` it is always written, an empty list included.
    """

    map: np.ndarray
    data: Any = None

    def __post_init__(self) -> None:
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
    mode: str  # "L" or "RGB": the PNG mode of the map
    has_json: bool = False  # writes ``{task}.json`` next to ``{task}.png``
    batch_size: int = 8  # preferred batch size
    input_size: tuple[int, int] | None = None  # (H, W) the network sees; None = native size
    requires: tuple[str, ...] = ()  # tasks whose labels this expert reads (e.g. detection needs depth)
    uses_gpu: bool = False

    @property
    def name(self) -> str:
        return f"{self.task}:{self.backend}"


class Expert:
    """Base class for experts. Subclasses set ``spec`` and implement ``predict``.

    ``__init__`` loads weights (it is called once per process / actor); ``__call__`` labels a batch.
    ``config`` holds the backend's options; it is part of the fingerprint, so any option that can change
    a label must live there.
    """

    spec: ClassVar[ExpertSpec]
    GPU_BATCH_SIZE: ClassVar[int | None] = None  # preferred images per forward on CUDA (Prismer's sizes)
    torch_device: Any = None  # the resolved torch device, set by experts that run a network

    def __init__(self, config: Mapping[str, Any] | None = None, device: str = "cpu") -> None:
        self.config = dict(config or {})
        self.device = device
        self.weights_digest = ""  # subclasses that load weights set the sha256 of what they loaded

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
        labels = self.predict(list(images), deps)
        if len(labels) != len(images):
            raise RuntimeError(f"{self.spec.name} returned {len(labels)} labels for {len(images)} images")
        for image, label in zip(images, labels):
            if label.map.shape[:2] != image.shape[:2]:
                got, want = label.map.shape[:2], image.shape[:2]
                raise RuntimeError(f"{self.spec.name} label {got} is not aligned with image {want}")
        return labels

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        """Images per forward pass: the ``batch_size`` option, else the device's preferred size."""
        on_cuda = self.torch_device is not None and self.torch_device.type == "cuda"
        default = (self.GPU_BATCH_SIZE or self.spec.batch_size) if on_cuda else self.spec.batch_size
        return int(self.config.get("batch_size", default))

    # -- storage -----------------------------------------------------------------------------
    def encode(self, label: Label) -> dict[str, bytes]:
        """Member extension → bytes, e.g. ``{"png": ..., "json": ...}`` (see docs/FORMAT.md)."""
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


@dataclass
class ExpertRequest:
    """An expert named in a manifest: ``task`` or ``task:backend`` plus backend options."""

    task: str
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, item: str | Mapping[str, Any]) -> ExpertRequest:
        if isinstance(item, str):
            task, _, backend = item.partition(":")
            return cls(task=task.strip(), backend=backend.strip() or None)
        if not isinstance(item, Mapping) or "name" not in item:
            raise ValueError(
                f"an expert entry must be 'task[:backend]' or a mapping with 'name', got {item!r}"
            )
        unknown = set(item) - {"name", "options"}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in expert entry {item!r}")
        request = cls.parse(item["name"])
        request.options = dict(item.get("options") or {})
        return request
