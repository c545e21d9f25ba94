"""Throughput of the labelling engine at GPU rates: does the CPU stage keep a fast expert busy?

A "GPU-speed" expert is a stand-in that sleeps N ms per image (the CPU stays free, as it does while
a GPU computes) and returns a depth-like map (a smooth L8 map derived from the image), so the
labels cost what real labels cost to encode. The same photos go through the in-process runner
(``run_local``: decode, expert, PNG encode, tar + sha256, commit) once per setting, settings
interleaved round by round so a busy machine slows all of them alike:

* the CPU-stage bound: the run with a 0 ms expert (decode + encode + write + commit alone);
* the expert bound: N ms × images;
* efficiency = max(expert bound, CPU-stage bound) ÷ end-to-end, per round; min / median / max
  over the rounds (targets: ≥ 0.90 at 2 and 5 ms, ≥ 0.95 at 20 ms).

It also prints the writer's cost (tar + sha256 + fsync + Parquet + done-record, i.e. committing a
labelled shard) ÷ the bare canny expert's time on the same photos (target ≤ 0.10), and with
``--png`` the encode time and size of label PNGs under each zlib level and strategy.

    python bench/throughput.py                          # 300 images in 300-image shards, 5 rounds
    python bench/throughput.py --shard-size 12          # the demo's small shards
    python bench/throughput.py --png                    # the PNG settings table (docs/FORMAT.md)
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from PIL import Image

from expert_zoo.base import Expert, ExpertOptions, ExpertSpec, Label
from expert_zoo.canny import CannyEdge
from label_pipeline.config import load_manifest
from label_pipeline.core.decode import decode_image
from label_pipeline.core.format import IMAGE_EXTENSIONS, encode_json
from label_pipeline.core.tario import write_tar
from label_pipeline.output import OutputStore
from label_pipeline.run import RunOptions
from label_pipeline.runners.local import run_local
from label_pipeline.sources.demo import demo_samples

EXPERT_MS = (2.0, 5.0, 20.0)
logger = logging.getLogger(__name__)
TARGETS = {2.0: 0.90, 5.0: 0.90, 20.0: 0.95}
WRITER_TARGET = 0.10


@dataclass(frozen=True)
class SleepOptions(ExpertOptions):
    ms: float = 0.0  # sleep per image: the time a GPU would compute, with the CPU left free


class SleepExpert(Expert):
    """A GPU-speed stand-in: sleeps ``ms`` per image and returns a smooth, depth-like L8 map."""

    spec = ExpertSpec(task="depth", backend="stand_in", version="1", mode="L", batch_size=8)
    Options = SleepOptions
    opts: SleepOptions

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        time.sleep(self.opts.ms * len(images) / 1000)
        return [Label(depth_like(image)) for image in images]


def depth_like(image: np.ndarray) -> np.ndarray:
    """A smooth map of the image's size: its grey level, 8× down and back up (cheap, ~0.2 ms)."""
    height, width = image.shape[:2]
    small = cv2.resize(image[..., 1], (max(width // 8, 1), max(height // 8, 1)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


# -- inputs ----------------------------------------------------------------------------------------
def demo_photos() -> list[tuple[str, bytes, bytes]]:
    """(image extension, image bytes, caption) of each demo photo."""
    photos = []
    for members in demo_samples():
        named = {name.split(".", 1)[1]: data for name, data in members}
        ext = next(ext for ext in IMAGE_EXTENSIONS if ext in named)
        photos.append((ext, named[ext], named.get("txt", b"")))
    return photos


def write_shards(folder: Path, images: int, shard_size: int) -> str:
    """``images`` samples cycling through the demo photos, as WebDataset shards; returns the pattern."""
    photos = demo_photos()
    folder.mkdir(parents=True, exist_ok=True)
    shards = (images + shard_size - 1) // shard_size
    for shard in range(shards):
        samples = []
        for index in range(shard * shard_size, min(images, (shard + 1) * shard_size)):
            ext, data, caption = photos[index % len(photos)]
            samples.append([(f"{index:08d}.{ext}", data), (f"{index:08d}.txt", caption)])
        with open(folder / f"{shard:05d}.tar", "wb") as handle:
            write_tar(handle, samples)
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def write_stand_in_manifest(path: Path, pattern: str, ms: float, batch_size: int) -> Path:
    expert = {
        "name": "depth:stand_in",
        "class": f"{Path(__file__).stem}:SleepExpert",
        "options": {"ms": ms, "batch_size": batch_size},
    }
    data = {
        "name": "throughput",
        "source": {"format": "webdataset", "path": pattern},
        "output": str(path.parent / "unused"),
        "experts": [expert],
    }
    path.write_text(yaml.safe_dump(data))
    return path


# -- end-to-end ÷ bound ------------------------------------------------------------------------------
def timed_run(manifest: Path, output: Path) -> tuple[float, int]:
    """(seconds, samples) of one labelling run into a fresh output root."""
    started = time.perf_counter()
    summary = run_local(load_manifest(str(manifest)), RunOptions(output=str(output)), progress=False, device="cpu")
    return time.perf_counter() - started, summary.samples


def efficiency_rounds(
    tmp: Path, pattern: str, images: int, rounds: int, batch_size: int
) -> dict[float, list[float]]:
    """Per expert speed: max(expert bound, CPU-stage bound) ÷ end-to-end, one value per round."""
    manifests = {
        ms: write_stand_in_manifest(tmp / f"stand_in_{ms:g}.yaml", pattern, ms, batch_size)
        for ms in (0.0, *EXPERT_MS)
    }
    timed_run(manifests[0.0], tmp / "warm-up")  # imports and first-call set-up, once
    ratios: dict[float, list[float]] = {ms: [] for ms in EXPERT_MS}
    cpu_bounds = []
    for round_index in range(rounds):
        times = {}
        for ms, manifest in manifests.items():
            seconds, samples = timed_run(manifest, tmp / f"out-{round_index}-{ms:g}")
            assert samples == images, (samples, images)
            times[ms] = seconds
        cpu_bounds.append(times[0.0])
        for ms in EXPERT_MS:
            bound = max(ms * images / 1000, times[0.0])
            ratios[ms].append(bound / times[ms])
        logger.info("round %d: %s", round_index, {f"{ms:g} ms": round(t, 3) for ms, t in times.items()})
    ratios[0.0] = cpu_bounds  # the CPU-stage bound itself, seconds per round
    return ratios


# -- writer ÷ canny ----------------------------------------------------------------------------------
def writer_ratio(tmp: Path, shard_size: int, repeat: int) -> tuple[float, float, float]:
    """(writer s/image, canny s/image, ratio) on the demo photos in shards of ``shard_size``."""
    photos = demo_photos()
    chosen = [photos[i % len(photos)] for i in range(shard_size)]
    arrays = [decode_image(data).array for _, data, _ in chosen]
    canny = CannyEdge()
    canny(arrays[:1], {})
    started = time.perf_counter()
    for _ in range(repeat):
        labels = canny(arrays, {})
    canny_s = (time.perf_counter() - started) / repeat / shard_size
    samples = []
    rows = []
    for index, ((ext, data, caption), label) in enumerate(zip(chosen, labels)):
        key = f"{index:08d}"
        members = {ext: data, "txt": caption, **{f"edge.{e}": b for e, b in canny.encode(label).items()}}
        members["json"] = encode_json({"key": key, "status": "ok", "experts": {"edge": {"status": "ok"}}})
        samples.append([(f"{key}.{suffix}", payload) for suffix, payload in members.items()])
        rows.append(
            {"key": key, "status": "ok", "error": None, "expert_status": '{"edge":"ok"}', "image_bytes": 1, "label_bytes": 1}
        )
    store = OutputStore(str(tmp / "writer"))
    store.prepare()
    started = time.perf_counter()
    for attempt in range(repeat):
        shard_id = f"{attempt:05d}"
        tar = store.write_shard(shard_id, samples)
        records = store.write_records(shard_id, rows)
        store.write_done(shard_id, {"shard": shard_id, "sha256": tar.sha256, "records": records.as_record()})
    writer_s = (time.perf_counter() - started) / repeat / shard_size
    return writer_s, canny_s, writer_s / canny_s


# -- PNG settings ------------------------------------------------------------------------------------
STRATEGIES = {0: "default", 1: "filtered", 2: "huffman", 3: "rle", 4: "fixed"}


def label_maps() -> dict[str, tuple[list[np.ndarray], str]]:
    """Label-like maps of the demo photos: real canny edges, and maps shaped like the neural labels."""
    arrays = [decode_image(data).array for _, data, _ in demo_photos()]
    grey = [cv2.cvtColor(array, cv2.COLOR_RGB2GRAY) for array in arrays]
    depth = [depth_like(array) for array in arrays]
    normal = [_normal_like(map_) for map_ in depth]
    # Flat regions with a background, like the segmentation / detection / OCR id maps.
    regions = [np.where(g > 200, 255, cv2.GaussianBlur(g, (0, 0), 4) // 32).astype(np.uint8) for g in grey]
    return {
        "edge (canny)": ([label.map for label in CannyEdge()(arrays, {})], "L"),
        "depth-like": (depth, "L"),
        "normal-like": (normal, "RGB"),
        "id map-like": (regions, "L"),
    }


def _normal_like(depth: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(depth.astype(np.float32))
    normal = np.stack([-gx, -gy, np.full_like(gx, 8.0)], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return ((normal + 1) * 127.5).astype(np.uint8)


def png_table(repeat: int) -> list[tuple[str, int, str, float, float]]:
    """(label kind, level, strategy, encode ms per map, kB per map); settings interleaved, best of ``repeat``."""
    settings = [(level, strategy) for strategy in STRATEGIES for level in range(1, 7)]
    results = []
    for kind, (maps, mode) in label_maps().items():
        best = {setting: float("inf") for setting in settings}
        sizes = {}
        for _ in range(repeat):
            for level, strategy in settings:
                started = time.perf_counter()
                encoded = [_png(map_, mode, level, strategy) for map_ in maps]
                best[(level, strategy)] = min(best[(level, strategy)], time.perf_counter() - started)
                sizes[(level, strategy)] = sum(map(len, encoded))
        for level, strategy in settings:
            per_map = 1000 * best[(level, strategy)] / len(maps)
            results.append((kind, level, STRATEGIES[strategy], per_map, sizes[(level, strategy)] / len(maps) / 1000))
    return results


def _png(array: np.ndarray, mode: str, level: int, strategy: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG", compress_level=level, compress_type=strategy)
    return buffer.getvalue()


# -- output ------------------------------------------------------------------------------------------
def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="samples labelled per run")
    parser.add_argument("--shard-size", type=int, default=300, help="samples per input shard")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of all settings")
    parser.add_argument("--batch-size", type=int, default=8, help="the stand-in expert's batch")
    parser.add_argument("--png", action="store_true", help="only the PNG level/strategy table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    command = "python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.png:
        print(f"`{command}`\n\n| label | level | strategy | encode ms / map | kB / map |\n| --- | ---: | --- | ---: | ---: |")
        for kind, level, strategy, ms, kb in png_table(repeat=args.rounds):
            print(f"| {kind} | {level} | {strategy} | {ms:.2f} | {kb:.1f} |")
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pattern = write_shards(tmp / "in", args.images, args.shard_size)
        ratios = efficiency_rounds(tmp, pattern, args.images, args.rounds, args.batch_size)
        writer = writer_ratio(tmp, args.shard_size, repeat=3)
    print(f"`{command}`: {args.images} demo photos in shards of {args.shard_size}, {args.rounds} rounds\n")
    cpu = ratios.pop(0.0)
    print(f"CPU-stage bound (0 ms expert): {1000 * statistics.median(cpu) / args.images:.2f} ms/image "
          f"({args.images / statistics.median(cpu):.0f} images/s)\n")
    print("| expert ms/img | end-to-end ÷ bound, min / median / max | target |\n| ---: | --- | --- |")
    failed = False
    for ms, values in ratios.items():
        failed |= min(values) < TARGETS[ms]
        print(f"| {ms:g} | {spread(values)} | ≥ {TARGETS[ms]:.2f} |")
    writer_s, canny_s, ratio = writer
    print(
        f"\nwriter (tar + sha256 + fsync + Parquet + done-record) {1000 * writer_s:.3f} ms/image ÷ "
        f"canny {1000 * canny_s:.3f} ms/image = {ratio:.3f} (target ≤ {WRITER_TARGET})"
    )
    return 1 if failed or ratio > WRITER_TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
