"""The training loop on shards made by the real label pipeline (edge:canny): a tiny Prismer overfits 8
samples, a resumed run repeats the uninterrupted losses, eval scores CIDEr / VQA, and torchrun runs DDP
and FSDP on 2 CPU processes."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from builders import image_bytes, label_toy_shard

from prismer_trainer.__main__ import main as trainer_cli
from prismer_trainer.checkpoint import latest_checkpoint
from prismer_trainer.train import LearningRate, TrainOptions, train
from prismer_trainer.train_config import TrainConfig, stage_config

REPO = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "stripe")


def picture(colour: tuple[int, int, int], shape: str) -> np.ndarray:
    image = np.full((64, 80, 3), 30, np.uint8)
    if shape == "square":
        image[16:48, 24:56] = colour
    else:
        image[:, 8:24] = colour
        image[:, 48:64] = colour
    return image


@pytest.fixture(scope="module")
def toy_labels(tmp_path_factory) -> Path:
    """8 demo-like samples (a coloured shape + its caption), labelled by the real pipeline (edge:canny)."""
    root = tmp_path_factory.mktemp("toy")
    samples = [
        {
            "png": image_bytes(picture(rgb, shape), "PNG"),
            "txt": f"a {name} {shape} on a dark background".encode(),
        }
        for name, rgb in COLOURS.items()
        for shape in SHAPES
    ]
    return label_toy_shard(root, samples)


def toy_config(**changes) -> TrainConfig:
    """The tiny preset at 64 px, mild augmentation (so 8 captions are learnt in a few seconds)."""
    base = dict(
        resolution=64,
        label_resolution=64,
        lr=3e-3,
        warmup_steps=5,
        num_workers=0,
        randaug_n=0,
        hflip=0.0,
        crop_scale=(0.8, 1.0),
        shuffle_buffer=8,
        log_every=10,
        checkpoint_every=1000,
        sample_captions=0,
    )
    return stage_config("pretrain", "tiny", **{**base, **changes})


@pytest.fixture(scope="module")
def overfit_run(toy_labels, tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit")
    config = toy_config(max_steps=150, sample_captions=8)
    options = TrainOptions(dataset="toy", labels_root=str(toy_labels), out_dir=out, resume=False, threads=1)
    return train(config, options), out


def test_tiny_model_overfits_eight_samples(overfit_run):
    result, _ = overfit_run
    losses = [result.losses[s] for s in sorted(result.losses)]
    # Sum of token losses per caption (8 targets). Label smoothing 0.1 floors it at ~4.5 for this
    # ~15-word vocabulary; an untrained model is at ~8 * ln(15) ~ 22.
    assert losses[0] > 15 and np.mean(losses[-10:]) < 6.0, losses[::10]
    assert len(result.samples) == 8
    for key, generated, reference in result.samples:
        assert generated == reference, key  # greedy decoding reproduces every training caption


def test_eval_selects_the_karpathy_split_by_image(overfit_run, tmp_path, monkeypatch):
    _, out = overfit_run
    annotations = tmp_path / "coco" / "annotations"
    annotations.mkdir(parents=True)
    rows = [{"image": "val2014/000001.jpg", "caption": "x"}, {"image": "val2014/000006.jpg", "caption": "y"}]
    (annotations / "coco_karpathy_test.json").write_text(json.dumps(rows))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))  # the default place, as manifests/coco.yaml
    results = tmp_path / "test.json"
    assert (
        trainer_cli(["eval", "--checkpoint", str(out), "--split", "karpathy_test", "--out", str(results)])
        == 0
    )
    report = json.loads(results.read_text())
    assert [p["image_id"] for p in report["predictions"]] == ["000001", "000006"]


def test_eval_scores_cider_with_beam_search(overfit_run, toy_labels, tmp_path):
    _, out = overfit_run
    results = tmp_path / "eval.json"
    assert trainer_cli(["eval", "--checkpoint", str(out), "--split", "all", "--out", str(results)]) == 0
    report = json.loads(results.read_text())
    assert report["task"] == "caption" and report["samples"] == 8
    captions = {p["image_id"]: p["caption"] for p in report["predictions"]}
    assert captions["000003"] == "A green stripe on a dark background."  # Prismer's output form
    assert report["CIDEr"] > 300  # exact matches of the only reference, x100 as papers report


def test_resume_repeats_the_uninterrupted_losses(toy_labels, tmp_path):
    # Two loader workers and random augmentation: the resumed run must pick up the data stream, the
    # schedule, the optimizer and the RNGs exactly where the checkpoint left them.
    config = toy_config(max_steps=6, checkpoint_every=3, num_workers=2, randaug_n=2, hflip=0.5)

    def options(out: Path, **extra) -> TrainOptions:
        return TrainOptions(dataset="toy", labels_root=str(toy_labels), out_dir=out, threads=1, **extra)

    whole = train(config, options(tmp_path / "whole"))
    first = train(config, options(tmp_path / "split", stop_after=3))
    assert sorted(first.losses) == [1, 2, 3] and latest_checkpoint(tmp_path / "split").name == "step_00000003"
    second = train(config, options(tmp_path / "split"))
    assert sorted(second.losses) == [4, 5, 6]
    resumed = {**first.losses, **second.losses}
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(whole.losses[step], rel=1e-6, abs=1e-6), step


def test_schedule_warms_up_then_follows_the_cosine():
    config = stage_config("pretrain", "prismer_base", max_steps=None, epochs=2)
    schedule = LearningRate(config, total_steps=10_000, steps_per_epoch=5_000)
    assert schedule(0) == pytest.approx(1e-6) and schedule(1000) == pytest.approx((3e-4 + 1e-6) / 2)
    assert schedule(2000) == pytest.approx(3e-4) and schedule(4999) == pytest.approx(3e-4)  # per epoch
    assert schedule(5000) == pytest.approx(1e-6 + (3e-4 - 1e-6) * 0.5)
    caption = LearningRate(stage_config("caption", "prismer_base"), total_steps=100, steps_per_epoch=None)
    assert caption(0) == pytest.approx(5e-5) and caption(50) == pytest.approx(2.5e-5) and caption(100) == 0


def test_stage_configs_hold_prismers_hyper_parameters():
    pre, large = stage_config("pretrain"), stage_config("pretrain", "prismer_large")
    assert (pre.lr, large.lr, pre.batch_size, pre.epochs, pre.warmup_steps) == (3e-4, 1e-4, 1024, 20, 2000)
    assert (pre.resolution, pre.crop_scale, pre.freeze, pre.weight_decay) == (
        224,
        (0.5, 1.5),
        "freeze_lang_vision",
        0.05,
    )
    cap, vqa = stage_config("caption"), stage_config("vqa")
    assert (cap.lr, cap.batch_size, cap.epochs, cap.resolution, cap.prefix) == (
        5e-5,
        256,
        3,
        480,
        "A picture of",
    )
    assert (vqa.lr, vqa.batch_size, vqa.epochs, vqa.resolution, vqa.task) == (5e-5, 512, 10, 480, "vqa")
    assert cap.crop_scale == (0.5, 1.0) and cap.freeze == "freeze_vision" and cap.accumulation(8) == 8
    for bad in (dict(stage="finetune"), dict(batch_size=100, micro_batch_size=32), dict(lr=-1.0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_vqa_stage_trains_and_ranks_answers(toy_labels, tmp_path):
    rows = [
        {
            "image": f"toy/{i:06d}.png",
            "question": "What colour is the shape",
            "answer": colour,
            "question_id": i,
        }
        for i, colour in enumerate(c for c in COLOURS for _ in SHAPES)
    ]
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps(rows))
    (tmp_path / "answers.json").write_text(json.dumps(list(COLOURS)))
    out = tmp_path / "vqa"
    config = toy_config(max_steps=60, lr=3e-3, max_words=10)
    config = config.replace(stage="vqa", task="vqa")
    options = TrainOptions(
        dataset="toy",
        labels_root=str(toy_labels),
        out_dir=out,
        resume=False,
        vqa_annotations=(str(qa),),
        threads=1,
    )
    result = train(config, options)
    assert result.losses[60] < result.losses[1] / 3
    argv = [
        "eval",
        "--checkpoint",
        str(out),
        "--answer-list",
        str(tmp_path / "answers.json"),
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert trainer_cli(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == 8 and {p["answer"] for p in report["predictions"]} <= set(COLOURS)
    assert report["accuracy"] >= 75


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(toy_labels: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "prismer_trainer",
        "train",
        "--dataset",
        "toy",
        "--config",
        "tiny",
        "--labels-root",
        str(toy_labels),
        "--out",
        str(out),
        "--threads",
        "1",
        "--resolution",
        "64",
        "--set",
        "label_resolution=64",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "1",  # 2 ranks x 1 x 2 accumulation steps
        "--num-workers",
        "0",
        "--set",
        "sample_captions=0",
        "--log-every",
        "1",
        "--checkpoint-every",
        "2",
        "--max-steps",
        "3",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.slow
def test_ddp_and_fsdp_on_two_cpu_processes(toy_labels, tmp_path):
    ddp = _torchrun(toy_labels, tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "ddp")
    assert checkpoint.name == "step_00000003" and (checkpoint / "rng_rank1.pt").exists()
    losses = _losses(tmp_path / "ddp")
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())

    # FSDP (SHARD_GRAD_OP) picks up DDP's step-2 checkpoint: the same third step, up to reduction order.
    resumed = tmp_path / "fsdp"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "ddp" / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002"
    )
    fsdp = _torchrun(toy_labels, resumed, "--parallel", "fsdp")
    assert fsdp.returncode == 0, fsdp.stdout[-3000:] + fsdp.stderr[-3000:]
    assert _losses(resumed)[3] == pytest.approx(losses[3], rel=1e-4)
