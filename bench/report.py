"""Time of ``label-pipeline report`` over a large synthetic output (issue 13: seconds, not minutes).

Builds an output root of ``--samples`` samples in ``--shards`` committed shards, with the six
Prismer tasks (depth, normal, edge, seg_coco, obj_detection, ocr_detection) as real PNG/json
members, a sample-level failure every 100 samples and an OCR failure every 50, records, done-records
and one run-statistics file. Label bytes come from a pool of distinct synthetic samples, so the
output is built in seconds; the report decodes them like any other labels. Then times the report.

    PYTHONPATH=. python bench/report.py                          # 10,000 samples in 10 shards
    PYTHONPATH=. python bench/report.py --samples 100000 --shards 100 --keep /tmp/big
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from label_pipeline.core.format import encode_json, encode_png
from label_pipeline.output import OutputStore
from label_pipeline.report import ReportOptions, write_report
from label_pipeline.run_stats import stats_document, write_stats

TASKS = ("depth", "normal", "edge", "seg_coco", "obj_detection", "ocr_detection")
POOL = 48  # distinct synthetic samples; the output cycles through them


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """A picture of a few coloured rectangles on a gradient, and the rectangles."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    boxes = []
    for _ in range(rng.integers(1, 6)):
        y0, x0 = int(rng.integers(0, height - 16)), int(rng.integers(0, width - 16))
        y1, x1 = int(rng.integers(y0 + 8, height)), int(rng.integers(x0 + 8, width))
        image[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
        boxes.append((x0, y0, x1, y1))
    return image, boxes


def synthetic_members(
    rng: np.random.Generator, height: int, width: int, constant_depth: bool, empty_detection: bool
) -> tuple[dict[str, bytes], list[str]]:
    """One sample's image, caption and six labels (docs/FORMAT.md encodings), and its tasks."""
    image, boxes = _scene(rng, height, width)
    y, x = np.mgrid[0:height, 0:width]
    depth = (
        np.full((height, width), 128, np.uint8)
        if constant_depth
        else ((x + 2 * y) * 255 // (width + 2 * height))
    )
    depth = depth.astype(np.uint8)
    gy, gx = np.gradient(depth.astype(np.float32))
    normal = np.stack([-gx, -gy, np.ones_like(gx) * 4.0], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    edge = 255 - cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 50, 150)
    seg = np.full((height, width), 255, np.uint8)
    detection_map = np.full((height, width), 255, np.uint8)
    detections, words = [], []
    for instance, (x0, y0, x1, y1) in enumerate(boxes):
        seg[y0:y1, x0:x1] = min(int(rng.zipf(1.6)) - 1, 132)
        if not empty_detection:
            detection_map[y0:y1, x0:x1] = instance
            box = [x0, y0, x1, y1]
            detections.append(
                {"instance": instance, "class_id": int(rng.integers(0, 30)), "score": 0.9, "box": box}
            )
    ocr_map = np.full((height, width), 255, np.uint8)
    for instance in range(int(rng.integers(0, 3))):
        x0, y0 = 8 + 40 * instance, 8
        ocr_map[y0 : y0 + 12, x0 : x0 + 32] = instance
        polygon = [[x0, y0], [x0 + 32, y0], [x0 + 32, y0 + 12], [x0, y0 + 12]]
        words.append(
            {
                "instance": instance,
                "text": f"word{int(rng.integers(0, 20))}",
                "score": 0.8,
                "polygon": polygon,
            }
        )
    members = {
        "jpg": _jpeg(image),
        "txt": b"a synthetic picture",
        "depth.png": encode_png(depth, "L"),
        "normal.png": encode_png(((normal + 1) * 127.5).round().astype(np.uint8), "RGB"),
        "edge.png": encode_png(edge, "L"),
        "seg_coco.png": encode_png(seg, "L"),
        "obj_detection.png": encode_png(detection_map, "L"),
        "obj_detection.json": encode_json(detections),
        "ocr_detection.png": encode_png(ocr_map, "L"),
        "ocr_detection.json": encode_json(words),
    }
    return members, list(TASKS)


def _sample(
    pool: list[dict[str, bytes]], index: int, size: tuple[int, int]
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Sample ``index``'s members and its records row: every 100th undecodable, every 50th without OCR."""
    key = f"{index:09d}"
    base = pool[index % len(pool)]
    if index % 100 == 99:
        error = "cannot identify image file"
        meta = {"key": key, "status": "undecodable", "error": error}
        members = {"jpg": b"not an image", "json": encode_json(meta)}
        return members, {"key": key, "status": "undecodable", "error": error, "expert_status": "{}"}
    experts = {task: {"status": "ok", "fingerprint": "bench"} for task in TASKS}
    members = dict(base)
    if index % 50 == 49:
        experts["ocr_detection"] = {
            "status": "error",
            "fingerprint": "bench",
            "error": "RuntimeError: synthetic",
        }
        members = {k: v for k, v in members.items() if not k.startswith("ocr_detection")}
    status = "ok" if all(e["status"] == "ok" for e in experts.values()) else "partial"
    meta = {"key": key, "status": status, "size": list(size), "experts": experts}
    members["json"] = encode_json(meta)
    row = {
        "key": key,
        "status": status,
        "error": None,
        "expert_status": encode_json({t: e["status"] for t, e in experts.items()}).decode(),
    }
    return members, row


def build_output(
    root: Path,
    samples: int,
    shards: int,
    size: tuple[int, int] = (192, 256),
    constant_depth: bool = False,
    empty_detection: bool = False,
    with_stats: bool = True,
) -> None:
    """A committed output root of ``samples`` synthetic samples in ``shards`` shards."""
    rng = np.random.default_rng(0)
    pool = [synthetic_members(rng, *size, constant_depth, empty_detection)[0] for _ in range(POOL)]
    store = OutputStore(str(root))
    store.prepare()
    store.write_run(
        {
            "dataset": "synthetic",
            "experts": {t: {"name": f"{t}:synthetic", "fingerprint": "bench", "options": {}} for t in TASKS},
        }
    )
    per_shard = -(-samples // shards)
    points: list[list[float]] = [[0.0, 0]]
    started = time.monotonic()
    for shard_index in range(shards):
        indices = range(shard_index * per_shard, min(samples, (shard_index + 1) * per_shard))
        _commit_shard(store, f"{shard_index:05d}", [_sample(pool, i, size) for i in indices])
        points.append([round(time.monotonic() - started, 3), indices.stop])
    if with_stats:
        elapsed = max(time.monotonic() - started, 1e-3)
        experts = {t: {"images": samples, "batches": samples // 8, "busy_s": elapsed / 2} for t in TASKS}
        document = stats_document(
            runner="local",
            run_id="bench000",
            created="2026-01-01T00:00:00+0000",
            status="completed",
            elapsed_s=elapsed,
            samples=samples,
            shards={"planned": shards, "done": shards, "failed": 0},
            experts=experts,
            throughput=points,
        )
        write_stats(store, document)


def _commit_shard(
    store: OutputStore, shard: str, samples: list[tuple[dict[str, bytes], dict[str, Any]]]
) -> None:
    """Tar, records, done-record: what a real commit writes (docs/FORMAT.md)."""
    tar = store.write_shard(
        shard, [[(f"{row['key']}.{ext}", data) for ext, data in m.items()] for m, row in samples]
    )
    rows = []
    for members, row in samples:
        label_bytes = sum(len(v) for k, v in members.items() if k.endswith((".png", ".json")) and k != "json")
        rows.append({**row, "image_bytes": len(members["jpg"]), "label_bytes": label_bytes})
    records = store.write_records(shard, rows)
    status_counts: dict[str, int] = {}
    for row in rows:
        status_counts[row["status"]] = status_counts.get(row["status"], 0) + 1
    ok = status_counts.get("ok", 0)
    store.write_done(
        shard,
        {
            "shard": shard,
            "input": "synthetic",
            "samples": len(rows),
            "ok": ok,
            "failed": len(rows) - ok,
            "status_counts": status_counts,
            "experts": {t: {"fingerprint": "bench", "ok": ok, "failed": len(rows) - ok} for t in TASKS},
            "sha256": tar.sha256,
            "bytes": tar.size,
            "tar_stat": tar.stat,
            "records": records.as_record(),
            "duration_s": 1.0,
        },
    )


def time_report(root: Path, repeat: int) -> None:
    """Write the report ``repeat`` times; print wall and CPU time (the VM is shared: CPU is steadier)."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        report, size = write_report(str(root), str(root.parent / "report.html"), ReportOptions())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        parts = ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items())
        read = sum(report.sampled.values())
        print(
            f"report: {walls[-1]:.2f} s wall, {cpus[-1]:.2f} s CPU ({parts}); {size >> 10} KiB, {read} labels"
        )
    print(
        f"report over {report.records.samples} samples: best {min(walls):.2f} s wall "
        f"({min(cpus):.2f} s CPU), worst {max(walls):.2f} s wall"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--size", default="192x256", help="label size HxW")
    parser.add_argument("--keep", help="build the output here and keep it (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="report runs in this process")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp) / "out"
        started = time.perf_counter()
        build_output(root, args.samples, args.shards, (height, width))
        built = time.perf_counter() - started
        print(f"built {args.samples} samples in {args.shards} shards ({height}x{width}) in {built:.1f} s")
        time_report(root, args.repeat)


if __name__ == "__main__":
    main()
