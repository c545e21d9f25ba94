"""What a trainer user sees: progress lines with samples/s and an ETA, ``--tensorboard DIR`` (or one
clear line when tensorboard is not installed), and ``eval``'s metric table with a warning when the
split holds training images."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import types

import numpy as np
import pytest
from builders import image_bytes, label_toy_shard

from prismer_trainer.__main__ import main as trainer_cli
from prismer_trainer.train import TrainOptions, format_duration, train
from prismer_trainer.train_config import stage_config

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 50, 220), (230, 220, 30)]


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    """Four labelled pictures (edge:canny) under ``labels/toy``."""
    root = tmp_path_factory.mktemp("ux")
    samples = []
    for index, colour in enumerate(COLOURS):
        image = np.full((48, 48, 3), 30, np.uint8)
        image[12:36, 12:36] = colour
        samples.append({"png": image_bytes(image, "PNG"), "txt": f"shape number {index}".encode()})
    return label_toy_shard(root, samples)


def config(**changes):
    base = dict(
        resolution=32,
        label_resolution=32,
        num_workers=0,
        randaug_n=0,
        shuffle_buffer=4,
        batch_size=2,
        micro_batch_size=2,
        max_steps=4,
        log_every=2,
        checkpoint_every=1000,
        sample_captions=0,
    )
    return stage_config("pretrain", "tiny", **{**base, **changes})


class FakeWriter:
    """Stands in for ``torch.utils.tensorboard.SummaryWriter`` (tensorboard is an optional package)."""

    instances: list[FakeWriter] = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, name, value, step):
        self.scalars.append((name, step, value))

    def close(self):
        self.closed = True


def test_training_logs_samples_per_second_and_an_eta(labels, tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter)
    )
    options = TrainOptions(
        dataset="toy",
        labels_root=str(labels),
        out_dir=tmp_path,
        resume=False,
        threads=1,
        tensorboard=str(tmp_path / "tb"),
    )
    with caplog.at_level(logging.INFO, logger="prismer_trainer"):
        train(config(), options)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2 and "step 2/4" in lines[0] and "samples/s" in lines[0] and "ETA " in lines[0]
    assert lines[1].endswith("ETA 0s")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and records[-1]["eta_s"] == 0
    assert records[0]["samples_per_s"] == pytest.approx(2 * records[0]["steps_per_s"])  # 2 samples a step
    (writer,) = FakeWriter.instances
    assert writer.log_dir == str(tmp_path / "tb") and writer.closed
    assert [(name, step) for name, step, _ in writer.scalars if name == "train/loss"] == [
        ("train/loss", 2),
        ("train/loss", 4),
    ]
    assert {name for name, _, _ in writer.scalars} == {"train/loss", "train/lr", "train/samples_per_s"}


def test_tensorboard_without_the_package_is_one_line_and_exit_2(labels, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were missing
    argv = ["train", "--dataset", "toy", "--config", "tiny", "--labels-root", str(labels)]
    argv += ["--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb"), "--max-steps", "1"]
    assert trainer_cli(argv) == 2
    out = capsys.readouterr().out
    assert "--tensorboard needs the tensorboard package" in out and "pip install tensorboard" in out
    assert "Traceback" not in out and not (tmp_path / "run").exists()  # failed before anything ran


def test_eval_warns_on_training_data_and_prints_a_table(labels, tmp_path, capsys):
    run = tmp_path / "run"
    train(
        config(), TrainOptions(dataset="toy", labels_root=str(labels), out_dir=run, resume=False, threads=1)
    )
    capsys.readouterr()
    results = tmp_path / "seen.json"
    assert trainer_cli(["eval", "--checkpoint", str(run), "--out", str(results)]) == 0
    out = capsys.readouterr().out
    assert "overlaps the training data: 1 of its 1 shards" in out  # the log line (stdout for the trainer)
    table = out[out.index(" on toy (split all)") :].splitlines()
    assert table[1].split() == ["metric", "value"] and table[2].split()[0] == "CIDEr"
    assert table[3].split() == ["samples", "4"] and table[4].startswith("WARNING: 1 shard(s)")
    assert json.loads(results.read_text())["training_overlap_shards"] == 1
    # the same images labelled into another root: not the files it was trained on, no warning
    held_out = tmp_path / "other"
    shutil.copytree(labels / "toy", held_out / "toy")
    argv = [
        "eval",
        "--checkpoint",
        str(run),
        "--labels-root",
        str(held_out),
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert trainer_cli(argv) == 0
    out = capsys.readouterr().out
    assert "overlaps" not in out and "WARNING" not in out and "CIDEr" in out


def test_format_duration():
    assert [format_duration(s) for s in (None, 0, 59.6, 61, 7260)] == ["?", "0s", "1m00s", "1m01s", "2h01m"]
