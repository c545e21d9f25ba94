"""Checkpoints: one directory per step, written atomically, read without running any code.

``<run>/checkpoints/step_XXXXXXXX/`` holds ``model.pt``, ``optimizer.pt``, ``scheduler.pt``,
``scaler.pt`` (fp16 only), every rank's RNG states (``rng_rank<R>.pt``), the loader position and the
configs (``trainer_state.json``), the tokenizer (``tokenizer/``) and the label embeddings
(``label_embeddings.npz``). It is written under a temporary name and renamed into place after a
``complete`` marker, so a crash leaves either the previous checkpoints or a finished new one. Resuming
continues the schedule and the data stream where they were, so an interrupted run repeats the losses of
an uninterrupted one. Every file holds only tensors and plain containers (or JSON) and is read with
``torch.load(weights_only=True)``: a checkpoint from someone else cannot run code here, and one that
tries is refused with one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from label_pipeline.core.weights import load_error_reason
from prismer_trainer.distributed import Distributed
from prismer_trainer.embeddings import LabelEmbeddings
from prismer_trainer.model_config import ModelConfig
from prismer_trainer.text import Tokenizer
from prismer_trainer.train_config import TrainConfig

logger = logging.getLogger(__name__)

COMPLETE = "complete"
STATE_FILE = "trainer_state.json"
EMBEDDINGS_FILE = "label_embeddings.npz"
TOKENIZER_DIR = "tokenizer"

RESUME_HINT = (
    "delete that checkpoint directory (the previous one is then used), or start again with --no-resume "
    "(add --init-checkpoint <its model.pt> to keep the weights)"
)
INIT_HINT = "--init-checkpoint takes a checkpoint directory or a state-dict file of tensors"
EVAL_HINT = "pass another checkpoint (--checkpoint) or the run directory to take its latest"


@dataclass
class Progress:
    """Where the run is: the counters a checkpoint records (``trainer_state.json``, key ``state``)."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # batches this rank took from its loader: the loader position
    samples: int = 0  # samples seen, all ranks
    world_size: int = 1
    num_workers: int = 0


@dataclass(frozen=True)
class DataSource:
    """What the run trains on, recorded so that ``eval`` finds the same data again."""

    dataset: str
    labels_root: str
    vqa_annotations: tuple[str, ...] = ()


@dataclass
class TrainState:
    """Everything a checkpoint holds: saved with :meth:`save`, restored in place with :meth:`load`.

    ``model`` may be wrapped (DDP / FSDP). This rank's RNG states are restored in two steps: :meth:`load`
    reads them and :meth:`restore_rng` applies them, once the data loader (which draws its base seed from
    torch's RNG) exists.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    model_config: ModelConfig
    config: TrainConfig
    tokenizer: Tokenizer
    embeddings: LabelEmbeddings
    data: DataSource
    world: Distributed = field(default_factory=Distributed)
    progress: Progress = field(default_factory=Progress)
    instance_rng: random.Random = field(default_factory=random.Random)  # detection instance rows
    pending_rng: dict[str, Any] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- saving --------------------------------------------------------------------------------------
    def save(self, run_dir: Path) -> Path:
        """Write ``<run_dir>/checkpoints/step_XXXXXXXX`` atomically (every rank calls this), keep the
        newest ``config.keep_checkpoints``; returns the checkpoint directory."""
        final = checkpoint_dir(run_dir, self.progress.step)
        tmp = final.with_name(f".tmp_{final.name}")
        if self.world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.world.barrier()
        # Collective under FSDP: every rank takes part, rank 0 gets the full tensors.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
        torch.save(rng_states(self.instance_rng, self.device), tmp / f"rng_rank{self.world.rank}.pt")
        if self.world.main:
            self._write_files(tmp, model_sd, optim_sd)
        self.world.barrier()
        if self.world.main:
            _commit(tmp, final)
            prune_checkpoints(run_dir, self.config.keep_checkpoints)
            logger.info("checkpoint %s", final)
        self.world.barrier()
        return final

    def _write_files(self, directory: Path, model_sd: dict, optim_sd: dict) -> None:
        torch.save(model_sd, directory / "model.pt")
        torch.save(optim_sd, directory / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        if self.scaler is not None:
            torch.save(self.scaler.state_dict(), directory / "scaler.pt")
        self.tokenizer.save(directory / TOKENIZER_DIR)
        self.embeddings.save(directory / EMBEDDINGS_FILE)
        meta = {
            "state": asdict(self.progress),
            "model_config": self.model_config.to_dict(),
            "train_config": self.config.to_dict(),
            "dataset": self.data.dataset,
            "labels_root": self.data.labels_root,
            "vqa_annotations": list(self.data.vqa_annotations),
        }
        (directory / STATE_FILE).write_text(json.dumps(meta, indent=1))

    # -- loading -------------------------------------------------------------------------------------
    def load(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, scaler and progress from checkpoint ``path`` in place; keep
        this rank's RNG states in ``pending_rng``. A file that cannot be read is one
        :class:`CheckpointUnreadable`."""
        model_sd = load_tensors(path / "model.pt")
        optim_sd = load_tensors(path / "optimizer.pt")
        with reading_checkpoint(path):  # e.g. the optimizer state of another model
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=model_sd,
                optim_state_dict=optim_sd,
                options=StateDictOptions(full_state_dict=True),
            )
        _load_state_dict(self.scheduler, path / "scheduler.pt")
        if self.scaler is not None and (path / "scaler.pt").exists():
            _load_state_dict(self.scaler, path / "scaler.pt")
        with reading_checkpoint(path / STATE_FILE):
            saved = Progress(**read_metadata(path)["state"])
        self.progress = self._continued(saved)
        rng_file = path / f"rng_rank{self.world.rank}.pt"
        if rng_file.exists():
            plain = load_tensors(rng_file)
            with reading_checkpoint(rng_file):
                self.pending_rng = native_rng_states(plain)

    def _continued(self, saved: Progress) -> Progress:
        """The saved progress, on this run's ranks and workers."""
        now = (self.world.world_size, self.config.num_workers)
        if (saved.world_size, saved.num_workers) != now:
            logger.warning(
                "checkpoint was written with %d ranks x %d workers, now %d x %d: the data order differs "
                "from an uninterrupted run (the position in samples is kept)",
                saved.world_size,
                saved.num_workers,
                *now,
            )
        saved.world_size, saved.num_workers = now
        return saved

    def restore_rng(self) -> bool:
        """Apply the RNG states :meth:`load` read; False when there were none (a fresh run)."""
        if self.pending_rng is None:
            return False
        restore_rng(self.pending_rng, self.instance_rng, self.device)
        self.pending_rng = None
        return True


def _load_state_dict(target: Any, path: Path) -> None:
    state = load_tensors(path)
    with reading_checkpoint(path):
        target.load_state_dict(state)


def _commit(tmp: Path, final: Path) -> None:
    """The ``complete`` marker last (synced), then one rename into place."""
    with open(tmp / COMPLETE, "wb") as handle:
        handle.write(b"ok\n")
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    with contextlib.suppress(OSError):
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ================================================================================================
# Finding and reading checkpoints
# ================================================================================================
def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints that have their ``complete`` marker, oldest first (temporaries are ignored)."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).exists()) if root.exists() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_metadata(path: Path, hint: str = RESUME_HINT) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``: progress, model and train configs, data source."""
    with reading_checkpoint(path / STATE_FILE, hint):
        return json.loads((path / STATE_FILE).read_text())


def read_embeddings(path: Path, hint: str = RESUME_HINT) -> LabelEmbeddings:
    """The label embeddings a checkpoint was trained with."""
    with reading_checkpoint(path / EMBEDDINGS_FILE, hint):
        return LabelEmbeddings.load(path / EMBEDDINGS_FILE)


class CheckpointUnreadable(ValueError):
    """A checkpoint file that cannot be loaded, or that is refused because loading it could run code.

    A ``ValueError``, so ``python -m prismer_trainer`` prints it as one line and exits 2."""


def load_tensors(path: Path, hint: str = RESUME_HINT) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code."""
    with reading_checkpoint(path, hint):
        return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def reading_checkpoint(path: Path, hint: str = RESUME_HINT) -> Iterator[None]:
    """Turn any failure while reading or applying a checkpoint file into one :class:`CheckpointUnreadable`.

    Broken files fail in many ways (zip, pickle, JSON, key and shape errors), so everything is wrapped;
    the original exception stays chained for ``--debug``-style inspection.
    """
    try:
        yield
    except CheckpointUnreadable:
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointUnreadable(
            f"refusing checkpoint file {path}: {load_error_reason(exc)}; only tensors and plain containers "
            f"are loaded, anything else could run code here; {hint}"
        ) from exc
    except Exception as exc:
        reason = load_error_reason(exc)
        raise CheckpointUnreadable(f"cannot load checkpoint file {path}: {reason}; {hint}") from exc


# ================================================================================================
# RNG states as plain data (so that the file loads with weights_only=True)
# ================================================================================================
def rng_states(instance_rng: random.Random, device: torch.device) -> dict[str, Any]:
    """This rank's RNG states as tensors and plain numbers, so that the file loads with ``weights_only``."""
    states = {
        "torch": torch.get_rng_state(),
        "numpy": _plain_numpy_state(np.random.get_state()),
        "python": _plain_python_state(random.getstate()),
        "instance": _plain_python_state(instance_rng.getstate()),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def native_rng_states(plain: dict[str, Any]) -> dict[str, Any]:
    """:func:`rng_states`' file form → the objects the RNGs' ``set_state`` functions take."""
    states = {
        "torch": _byte_tensor(plain["torch"]),
        "numpy": _numpy_state(plain["numpy"]),
        "python": _python_state(plain["python"]),
        "instance": _python_state(plain["instance"]),
    }
    if "cuda" in plain:
        states["cuda"] = _byte_tensor(plain["cuda"])
    return states


def restore_rng(states: dict[str, Any], instance_rng: random.Random, device: torch.device) -> None:
    """Set the RNGs from :func:`native_rng_states`."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    instance_rng.setstate(states["instance"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def _byte_tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor for a torch RNG state, got {type(value).__name__}")
    return value


def _plain_numpy_state(state: Any) -> dict[str, Any]:
    """numpy's legacy ``get_state()`` tuple (name, 624 uint32 words, pos, has_gauss, gauss) as plain data."""
    name, words, pos, has_gauss, gauss = state
    keys = torch.from_numpy(np.asarray(words, dtype=np.int64))  # int64: torch's uint32 support is partial
    return {
        "name": str(name),
        "keys": keys,
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _numpy_state(plain: dict[str, Any]) -> tuple:
    keys = plain["keys"].numpy().astype(np.uint32)
    return (plain["name"], keys, int(plain["pos"]), int(plain["has_gauss"]), float(plain["gauss"]))


def _plain_python_state(state: tuple) -> dict[str, Any]:
    """``random.getstate()`` (version, 625 ints, gauss_next) as plain data: the ints as one int64 tensor."""
    version, internal, gauss_next = state
    internal_tensor = torch.tensor(internal, dtype=torch.int64)
    return {"version": int(version), "internal": internal_tensor, "gauss_next": gauss_next}


def _python_state(plain: dict[str, Any]) -> tuple:
    internal = tuple(int(v) for v in plain["internal"].tolist())
    return (int(plain["version"]), internal, plain["gauss_next"])
