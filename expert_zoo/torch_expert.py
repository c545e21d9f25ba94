"""The skeleton of an expert that runs a torch network: device, precision, weights, forward batches.

:class:`TorchExpert` does, once for every neural expert: resolve the ``weights`` option to a local file or
model directory, load the network from it inside
:func:`~label_pipeline.core.weights.loading_weights` (so a broken
file is one actionable line), record the weights' digest for the fingerprint, and put the network on
the expert's device in eval mode (channels_last on CUDA where the expert asks for it). A subclass only
says how to build its network from the resolved path (:meth:`TorchExpert.load_model`) and how to label
one forward batch (``predict_batch``), with its own pre- and post-processing.

Imported only by experts that use torch, so the pipeline core and the offline experts never import it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from expert_zoo._hf import model_directory
from expert_zoo.base import Expert, WeightsOptions
from expert_zoo.torch_utils import inference, resolve_device
from label_pipeline.core.weights import loading_weights, resolve_weights, weights_digest

logger = logging.getLogger(__name__)
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def read_state_dict(path: str | Path) -> Mapping[str, Any]:
    """A checkpoint file loaded as plain tensors (``weights_only``: never runs code from the file)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a state dict, got {type(checkpoint).__name__}")
    return checkpoint


def load_strictly(model: ModuleT, state_dict: Mapping[str, Any]) -> ModuleT:
    """``model`` with every entry of ``state_dict`` loaded (none missing, none extra), in eval mode."""
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


class TorchExpert(Expert):
    """Base class of the neural experts. Subclasses implement :meth:`load_model` and ``predict_batch``
    (or ``predict``), and take their options from a :class:`~expert_zoo.base.WeightsOptions` subclass;
    an option ``dtype`` (``auto``, ``float32``, ``bfloat16``, ``float16``), when declared, sets the
    precision of :meth:`inference`.

    After ``__init__``: ``torch_device``, ``dtype``, ``model`` (on the device, eval mode) and
    ``weights_digest`` (sha256 of the weight file, or of the model directory's files).
    """

    Options: ClassVar[type[WeightsOptions]] = WeightsOptions
    opts: WeightsOptions
    model: Any  # the network (a torch module; transformers models carry more attributes)
    CHANNELS_LAST: ClassVar[bool] = False  # channels_last on CUDA (convolutional networks gain from it)
    MODEL_DIRECTORY: ClassVar[bool] = False  # weights are a transformers model directory

    def __init__(self, config: Mapping[str, Any] | None = None, device: str = "cpu") -> None:
        super().__init__(config, device)
        self.torch_device = resolve_device(device)
        self.dtype: str = getattr(self.opts, "dtype", "auto")
        started = time.perf_counter()
        path = self.locate_weights()
        with loading_weights(self.spec.name, path):
            self.weights_digest = weights_digest(path)
            model = self.load_model(path)
        self.model = self._placed(model)
        elapsed = time.perf_counter() - started
        logger.info("loaded %s from %s on %s in %.1f s", self.spec.name, path, self.torch_device, elapsed)

    def locate_weights(self) -> Path:
        """The local file or model directory that the ``weights`` option names (fetched and verified)."""
        path = resolve_weights(self.opts.weights, expert=self.spec.name, sha256=self.opts.sha256)
        return model_directory(path) if self.MODEL_DIRECTORY else path

    def load_model(self, path: Path) -> torch.nn.Module:
        """Build the network from the resolved weights and load them strictly; any error it raises becomes
        one :class:`~label_pipeline.core.weights.WeightsUnreadable` line naming the expert and ``path``."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_model")

    def _placed(self, model: Any) -> Any:
        model = model.eval().to(self.torch_device)
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    @property
    def _channels_last(self) -> bool:
        return self.CHANNELS_LAST and self.torch_device.type == "cuda"

    def network_input(self, batch: torch.Tensor) -> torch.Tensor:
        """An N×C×H×W batch in the memory format the network was placed in."""
        if self._channels_last:
            return batch.contiguous(memory_format=torch.channels_last)
        return batch

    def inference(self) -> contextlib.AbstractContextManager[None]:
        """``inference_mode`` plus autocast at the expert's ``dtype`` (default: bf16 on CUDA, fp32 on CPU)."""
        return inference(self.torch_device, self.dtype)
