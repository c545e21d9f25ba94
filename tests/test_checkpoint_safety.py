"""Trainer checkpoints hold only tensors and plain containers: every file loads with ``weights_only=True``,
and a checkpoint file that carries code is refused with one line (exit 2) without running it."""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_trainer_loop import toy_labels  # noqa: F401  (the module-scoped fixture)

from prismer_trainer.__main__ import main as trainer_cli
from prismer_trainer.checkpoint import latest_checkpoint, native_rng_states, restore_rng, rng_states

CHECKPOINT_FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "rng_rank0.pt")


def _train_args(labels: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--dataset", "toy", "--config", "tiny", "--labels-root", str(labels), "--out", str(out),
        "--threads", "1", "--resolution", "64", "--set", "label_resolution=64", "--batch-size", "2",
        "--micro-batch-size", "2",
        "--num-workers", "0", "--set", "sample_captions=0", "--max-steps", "2", "--checkpoint-every", "1",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_step_run(toy_labels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A run directory stopped after step 1, with its checkpoint ``step_00000001``."""
    out = tmp_path_factory.mktemp("run")
    assert trainer_cli(_train_args(toy_labels, out, "--stop-after", "1")) == 0
    assert latest_checkpoint(out).name == "step_00000001"
    return out


class _RunsShell:
    """A pickled object whose unpickling runs a shell command (what a hostile checkpoint would carry)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def _copy_run(run: Path, destination: Path) -> Path:
    shutil.copytree(run, destination)
    return latest_checkpoint(destination)


def test_every_checkpoint_file_loads_with_weights_only(one_step_run: Path) -> None:
    checkpoint = latest_checkpoint(one_step_run)
    files = sorted(p.name for p in checkpoint.glob("*.pt"))
    assert set(CHECKPOINT_FILES) <= set(files)
    for name in files:
        torch.load(checkpoint / name, map_location="cpu", weights_only=True)


def test_rng_states_survive_a_weights_only_round_trip(tmp_path: Path) -> None:
    instance = random.Random(7)
    random.gauss(0, 1)  # leaves a cached gaussian in the state, which must be kept too
    np.random.standard_normal()
    torch.save(rng_states(instance, torch.device("cpu")), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1), instance.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0), instance.seed(0)
    saved = torch.load(tmp_path / "rng.pt", weights_only=True)
    restore_rng(native_rng_states(saved), instance, torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1), instance.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_checkpoint_file_carrying_code_is_refused_without_running_it(
    name: str,
    one_step_run: Path,
    toy_labels: Path,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    checkpoint = _copy_run(one_step_run, tmp_path / "run")
    marker = tmp_path / "code_ran"
    torch.save(_RunsShell(f"touch {marker}"), checkpoint / name)
    with caplog.at_level(logging.ERROR):
        assert trainer_cli(_train_args(toy_labels, tmp_path / "run")) == 2
    assert not marker.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert f"refusing checkpoint file {checkpoint / name}" in errors[0] and "system" in errors[0]
    assert "weights_only=False" not in errors[0]
    # The payload is live: a plain unpickling would have run it.
    torch.load(checkpoint / name, weights_only=False)
    assert marker.exists()


def test_a_truncated_checkpoint_file_is_one_line(
    one_step_run: Path,
    toy_labels: Path,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    checkpoint = _copy_run(one_step_run, tmp_path / "run")
    optimizer = checkpoint / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with caplog.at_level(logging.ERROR):
        assert trainer_cli(_train_args(toy_labels, tmp_path / "run")) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"cannot load checkpoint file {optimizer}" in errors[0]
    assert "--no-resume" in errors[0]


def test_resume_from_a_good_checkpoint_finishes(one_step_run: Path, toy_labels: Path, tmp_path: Path) -> None:  # noqa: F811
    _copy_run(one_step_run, tmp_path / "run")
    assert trainer_cli(_train_args(toy_labels, tmp_path / "run")) == 0
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
