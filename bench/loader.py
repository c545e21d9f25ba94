"""Trainer loader benchmark (CPU): our batches (uint8 maps + id tables, embedded on the device) versus a
Prismer-style loader that builds every categorical expert's 64×224×224 float embedding map on the CPU.

Both read the same label shards with the same stream, decode and joint augmentation; they differ only in
what a batch holds (Prismer's ``post_label_process``: float RGB, min-max float dense maps, a 64-d float
vector per pixel for seg / detection / OCR, int64 instance ids). Reported per loader:
  * samples/s through a DataLoader with ``--workers`` workers (what the training process receives);
  * the same plus turning the batch into model inputs in the main process (ours: ``to_model_inputs``,
    i.e. the embedding gather, here on the CPU; Prismer's batch is already the model input);
  * bytes per batch (what crosses from the workers; target ours ≤ 1/50 of Prismer's) and the ratio of
    samples/s (target ≥ 5×).

    python bench/loader.py                                   # synthetic COCO-like shards, six experts
    python bench/loader.py --shards 'labels/coco/shards/*.tar' --batches 20
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from label_pipeline.core.format import encode_json, encode_png
from label_pipeline.core.tario import write_tar
from prismer_trainer.augment import AugmentConfig
from prismer_trainer.batches import CLIP_MEAN, CLIP_STD, batch_nbytes, to_model_inputs
from prismer_trainer.embeddings import LabelEmbeddings
from prismer_trainer.samples import Example, SampleDecoder
from prismer_trainer.shards import dataset_shards
from prismer_trainer.stream import BatchStream, make_loader
from prismer_trainer.text import WordTokenizer

EXPERTS = ("depth", "normal", "seg_coco", "edge", "obj_detection", "ocr_detection")


# ------------------------------------------------------------------------------------------------
# Synthetic COCO-like label shards: 480×640 JPEG + all six experts' members
# ------------------------------------------------------------------------------------------------
def synthetic_sample(key: str, rng: np.random.Generator, height: int = 480, width: int = 640) -> list:
    import cv2

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    noise = cv2.GaussianBlur(rng.normal(0, 40, (height, width, 3)).astype(np.float32), (0, 0), 3)
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    seg = np.full((height, width), 255, np.uint8)
    det = np.full((height, width), 255, np.uint8)
    ocr = np.full((height, width), 255, np.uint8)
    boxes = []
    for i in range(8):  # regions of 8 classes, 5 of them also detected instances
        h, w = rng.integers(60, 200), rng.integers(60, 260)
        top, left = rng.integers(0, height - h), rng.integers(0, width - w)
        seg[top : top + h, left : left + w] = rng.integers(0, 133)
        if i < 5:
            det[top : top + h, left : left + w] = i
            boxes.append(
                {"instance": i, "class_id": int(rng.integers(0, 722)), "score": 0.9, "box": [0, 0, 1, 1]}
            )
        cv2.rectangle(rgb, (int(left), int(top)), (int(left + w), int(top + h)), (255, 255, 255), 2)
    words = []
    for i, text in enumerate(("open", "street")):
        ocr[40 + 60 * i : 80 + 60 * i, 30:200] = i
        words.append({"instance": i, "text": text, "score": 0.99, "polygon": [[30, 40], [200, 80]]})
    depth = np.clip(y / height * 255 + noise[..., 0], 0, 255).astype(np.uint8)
    normal = np.clip(128 + noise * 2, 0, 255).astype(np.uint8)
    edge = np.where(cv2.Canny(rgb, 100, 200) > 0, 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    meta = {
        "key": key,
        "status": "ok",
        "size": [height, width],
        "experts": {e: {"status": "ok"} for e in EXPERTS},
    }
    return [
        (f"{key}.jpg", jpeg.tobytes()),
        (f"{key}.txt", b"a synthetic street scene with a sign that says open"),
        (f"{key}.json", encode_json(meta)),
        (f"{key}.depth.png", encode_png(depth, "L")),
        (f"{key}.normal.png", encode_png(normal, "RGB")),
        (f"{key}.edge.png", encode_png(edge, "L")),
        (f"{key}.seg_coco.png", encode_png(seg, "L")),
        (f"{key}.obj_detection.png", encode_png(det, "L")),
        (f"{key}.obj_detection.json", encode_json(boxes)),
        (f"{key}.ocr_detection.png", encode_png(ocr, "L")),
        (f"{key}.ocr_detection.json", encode_json(words)),
    ]


def write_synthetic_shards(root: Path, shards: int, per_shard: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        path = root / "shards" / f"{s:05d}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            write_tar(handle, [synthetic_sample(f"{s:02d}{i:04d}", rng) for i in range(per_shard)])
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------------
# Prismer-style batches: every label turned into its float model input on the CPU
# ------------------------------------------------------------------------------------------------
def prismer_collate(examples: Sequence[Example], embeddings: LabelEmbeddings, pad_id: int) -> dict[str, Any]:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    per_sample = []
    for e in examples:
        item: dict[str, Any] = {"rgb": (torch.tensor(e.rgb).float() / 255 - mean) / std}
        for name, label in e.dense.items():
            x = torch.tensor(label).float() / 255
            item[name] = 2 * (x - x.min()) / (x.max() - x.min() + 1e-6) - 1
        for name, ids in e.ids.items():
            ids_t = torch.tensor(ids).long()
            emb = torch.empty(64, *ids.shape)
            for value in ids_t.unique().tolist():  # Prismer's post_label_process loop
                token = e.tokens[name].get(value, ("bg", None))
                emb[:, ids_t == value] = torch.from_numpy(embeddings.vector(token)).unsqueeze(-1)
            item[name] = {"label": emb, "instance": ids_t[None]} if name == "obj_detection" else emb
        per_sample.append(item)
    batch = torch.utils.data.default_collate(per_sample)
    batch["input_ids"] = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(e.input_ids) for e in examples], batch_first=True, padding_value=pad_id
    )
    return batch


# ------------------------------------------------------------------------------------------------
def measure(
    stream: BatchStream, workers: int, batches: int, warmup: int, to_inputs: bool
) -> tuple[float, int]:
    """(samples/s over ``batches`` batches after ``warmup``, bytes of one batch)."""
    loader = iter(make_loader(stream, workers))
    for _ in range(warmup):
        nbytes = batch_nbytes(next(loader))
    started, samples = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(loader)
        if to_inputs:
            to_model_inputs(batch, "cpu")
        samples += batch["input_ids"].shape[0]
        nbytes = batch_nbytes(batch)
    rate = samples / (time.perf_counter() - started)
    del loader
    return rate, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="glob of label shards (default: synthetic COCO-like shards)")
    parser.add_argument("--synthetic", type=int, default=2, help="synthetic shards x 48 samples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per loader")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best counts")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        shards = (
            dataset_shards(args.shards)
            if args.shards
            else write_synthetic_shards(Path(tmp), args.synthetic, 48)
        )
        tokenizer = WordTokenizer.build(["A synthetic street scene with a sign that says open"])
        decoder = SampleDecoder(EXPERTS, tokenizer, 224, AugmentConfig(crop_scale=(0.5, 1.5)))

        def stream(collate_fn: Any = None) -> BatchStream:
            return BatchStream(
                shards, decoder, LabelEmbeddings.hashed(), args.batch_size, train=True, shuffle_buffer=32,
                collate_fn=collate_fn,
            )  # fmt: skip

        variants = {
            "ours (loader)": (None, False),
            "ours (+ embed on CPU)": (None, True),
            "prismer-style": (prismer_collate, False),
        }
        # Interleaved rounds, best of each: other load on the machine only ever slows a round down.
        results: dict[str, tuple[float, int]] = {}
        for _ in range(args.rounds):
            for name, (collate_fn, to_inputs) in variants.items():
                rate, nbytes = measure(stream(collate_fn), args.workers, args.batches, args.warmup, to_inputs)
                results[name] = max(results.get(name, (0.0, 0)), (rate, nbytes))
    print(
        f"{len(shards)} shards, batch {args.batch_size}, {args.workers} workers, "
        f"{args.batches} timed batches, best of {args.rounds} rounds"
    )
    print(f"{'loader':24s} {'samples/s':>10s} {'MB/batch':>10s}")
    for name, (rate, nbytes) in results.items():
        print(f"{name:24s} {rate:10.1f} {nbytes / 1e6:10.2f}")
    ours, ours_cpu, prismer = (
        results["ours (loader)"],
        results["ours (+ embed on CPU)"],
        results["prismer-style"],
    )
    speedup, with_cpu_embedding = ours[0] / prismer[0], ours_cpu[0] / prismer[0]
    print(f"speed-up  {speedup:.1f}x (loader), {with_cpu_embedding:.1f}x (with CPU embedding)")
    print(f"bytes     1/{prismer[1] / ours[1]:.0f} of Prismer's per batch")


if __name__ == "__main__":
    main()
