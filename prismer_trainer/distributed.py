"""Processes and devices: the torchrun process group, this rank's device, DDP / FSDP wrapping, mixed
precision.

Runs single-process or under ``torchrun`` (DDP, or FSDP ``SHARD_GRAD_OP`` = ZeRO-2 as in the paper;
NCCL on GPUs, gloo on CPU). bf16 autocast where the GPU has it, else fp16 with a gradient scaler.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from prismer_trainer.model import PrismerModel


@dataclass
class Distributed:
    """This process's place in the run (single-process: rank 0 of 1) and the collectives the loop uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of ``value`` over all ranks."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size


def init_distributed() -> Distributed:
    """Join the torchrun process group (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str | None, world: Distributed) -> torch.device:
    """``requested``, else this rank's GPU, else the CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def wrap_model(
    model: PrismerModel, parallel: str, world: Distributed, device: torch.device
) -> torch.nn.Module:
    """DDP, or FSDP with SHARD_GRAD_OP semantics (ZeRO-2, as the paper): FSDP2's ``fully_shard`` with
    ``reshard_after_forward=False`` on every ViT block, resampler block and decoder layer, then the root.
    The frozen pretrained blocks are left out of sharding, as Prismer's ``ignored_modules``. (FSDP2 also
    runs on CPU with gloo, which FSDP1 refuses.)"""
    if not world.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # the root's output dataclass
        frozen = {p for module in model.frozen_modules() for p in module.parameters()}
        for block in fsdp_units(model):
            fully_shard(block, reshard_after_forward=False, ignored_params=frozen & set(block.parameters()))
        fully_shard(model, reshard_after_forward=False, ignored_params=frozen)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def fsdp_units(model: PrismerModel) -> list[torch.nn.Module]:
    units = list(model.expert_encoder.transformer.resblocks) + list(model.text_decoder.roberta.encoder.layer)
    resampler = getattr(model.expert_encoder, "resampler", None)
    return units + list(getattr(resampler, "perceiver_blocks", []))


def gradient_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch (DDP ``no_sync``; FSDP2 flag)."""
    set_sync = getattr(model, "set_requires_gradient_sync", None)
    if set_sync is not None:
        set_sync(enabled)
        return contextlib.nullcontext()
    no_sync = getattr(model, "no_sync", None)
    if not enabled and no_sync is not None:
        return no_sync()
    return contextlib.nullcontext()


def precision_setup(precision: str, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """(autocast dtype or None for fp32, grad scaler or None). fp16 needs the scaler; bf16 does not."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, None
    if precision == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler(device.type)
