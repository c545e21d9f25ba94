"""Throughput of the labelling engine at GPU rates: does the CPU stage keep a fast expert busy?

A "GPU-speed" expert is a stand-in that sleeps N ms per image (the CPU stays free, as it does while
a GPU computes) and returns a depth-like map (a smooth L8 map derived from the image), so its labels
cost what real labels cost to encode. The demo photos go through the in-process runner
(``run_local``: read, decode, expert, PNG encode, tar + sha256, commit) once per setting per round,
settings interleaved round by round so that a busy machine slows all of them alike:

* CPU-stage bound: the run with a 0 ms expert (decode + encode + write + commit alone);
* expert bound: N ms × images;
* efficiency = max(expert bound, CPU-stage bound) ÷ end-to-end, per round, min / median / max over
  the rounds (targets: ≥ 0.90 at 2 and 5 ms, ≥ 0.95 at 20 ms);
* writer ÷ canny: what writing costs a canny run (tar + sha256 + fsync + Parquet + done-record):
  the end-to-end time with the real output store minus the time with a store that only consumes
  the samples (runs in A-B-B-A order), ÷ the bare canny expert's time on the same photos
  (target ≤ 0.10). The writer's own
  cost per image (timed alone, not overlapped) is printed too.

``--png`` prints the encode time and size of label PNGs under each zlib level and strategy
(docs/FORMAT.md, "PNG settings"); ``--pools`` times label encoding in a thread pool against a
process pool.

    python bench/throughput.py                          # 300 images in 300-image shards, 5 rounds
    python bench/throughput.py --shard-size 12          # the demo's small shards
    python bench/throughput.py --png                    # the PNG settings table
    python bench/throughput.py --pools                  # threads vs processes for encoding
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
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
from label_pipeline.core.format import IMAGE_EXTENSIONS, encode_json, encode_png
from label_pipeline.core.tario import Member, write_tar
from label_pipeline.output import OutputStore, ShardWrite
from label_pipeline.run import RunOptions
from label_pipeline.runners.local import run_local
from label_pipeline.sources.demo import demo_samples

logger = logging.getLogger("throughput")
EXPERT_MS = (2.0, 5.0, 20.0)
TARGETS = {2.0: 0.90, 5.0: 0.90, 20.0: 0.95}
WRITER_TARGET = 0.10


@dataclass(frozen=True)
class SleepOptions(ExpertOptions):
    ms: float = 0.0  # sleep per image: the time a GPU would compute, with the CPU left free


class SleepExpert(Expert):
    """A GPU-speed stand-in: each batch takes ``ms`` per image, making its smooth, depth-like L8 maps
    included (as a GPU expert's copy-back and post-processing are), and sleeps the rest."""

    spec = ExpertSpec(task="depth", backend="stand_in", version="1", mode="L", batch_size=8)
    Options = SleepOptions
    opts: SleepOptions

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        finish = time.perf_counter() + self.opts.ms * len(images) / 1000
        labels = [Label(depth_like(image)) for image in images]
        time.sleep(max(finish - time.perf_counter(), 0.0))
        return labels


def depth_like(image: np.ndarray) -> np.ndarray:
    """A smooth map of the image's size: its green channel 8× down and back up (~0.2 ms)."""
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


def write_manifest(path: Path, pattern: str, expert: dict[str, Any]) -> Path:
    data = {
        "name": "throughput",
        "source": {"format": "webdataset", "path": pattern},
        "output": str(path.parent / "unused"),
        "experts": [expert],
    }
    path.write_text(yaml.safe_dump(data))
    return path


def stand_in(ms: float, batch_size: int) -> dict[str, Any]:
    return {
        "name": "depth:stand_in",
        "class": f"{Path(__file__).stem}:SleepExpert",
        "options": {"ms": ms, "batch_size": batch_size},
    }


# -- the rounds ------------------------------------------------------------------------------------
def timed_run(manifest: Path, output: Path) -> tuple[float, int]:
    """(seconds, samples) of one labelling run into a fresh output root."""
    started = time.perf_counter()
    summary = run_local(
        load_manifest(str(manifest)), RunOptions(output=str(output)), progress=False, device="cpu"
    )
    return time.perf_counter() - started, summary.samples


@contextlib.contextmanager
def null_writer() -> Iterator[None]:
    """Output stores that consume every sample (the pipeline still encodes them) and write nothing."""

    def write_shard(self: OutputStore, shard_id: str, samples: Iterable[Iterable[Member]]) -> ShardWrite:
        for members in samples:
            for _ in members:
                pass
        return ShardWrite("0" * 64, 0, {})

    def write_records(self: OutputStore, shard_id: str, rows: list[dict[str, Any]]) -> ShardWrite:
        return ShardWrite("0" * 64, 0, {})

    def write_done(self: OutputStore, shard_id: str, record: dict[str, Any]) -> None:
        return None

    saved = OutputStore.write_shard, OutputStore.write_records, OutputStore.write_done
    OutputStore.write_shard, OutputStore.write_records, OutputStore.write_done = (  # type: ignore[method-assign]
        write_shard,
        write_records,
        write_done,
    )
    try:
        yield
    finally:
        OutputStore.write_shard, OutputStore.write_records, OutputStore.write_done = saved  # type: ignore[method-assign]


def bare_canny_seconds(arrays: list[np.ndarray], batch_size: int) -> float:
    """The canny expert alone over the decoded images, in its batch size."""
    canny = CannyEdge()
    started = time.perf_counter()
    for start in range(0, len(arrays), batch_size):
        canny(arrays[start : start + batch_size], {})
    return time.perf_counter() - started


@dataclass
class Rounds:
    efficiency: dict[float, list[float]]  # expert ms → per round
    cpu_bound_s: list[float]
    writer_ratio: list[float]
    canny_s: list[float]


def run_rounds(tmp: Path, pattern: str, images: int, rounds: int, batch_size: int) -> Rounds:
    manifests = {
        ms: write_manifest(tmp / f"stand_in_{ms:g}.yaml", pattern, stand_in(ms, batch_size))
        for ms in (0.0, *EXPERT_MS)
    }
    canny = write_manifest(tmp / "canny.yaml", pattern, {"name": "edge:canny"})
    arrays = [decode_image(data).array for _, data, _ in demo_photos()]
    arrays = [arrays[index % len(arrays)] for index in range(images)]
    timed_run(manifests[0.0], tmp / "warm-up")  # imports and first-call set-up, once
    result = Rounds({ms: [] for ms in EXPERT_MS}, [], [], [])
    for round_index in range(rounds):
        times = {}
        for ms, manifest in manifests.items():
            seconds, samples = timed_run(manifest, tmp / f"out-{round_index}-{ms:g}")
            assert samples == images, (samples, images)
            times[ms] = seconds
        # A, B, B, A: a load that drifts during the round weighs on both alike.
        written, _ = timed_run(canny, tmp / f"canny-{round_index}-a")
        with null_writer():
            unwritten = sum(timed_run(canny, tmp / f"canny-null-{round_index}-{n}")[0] for n in "ab") / 2
        written = (written + timed_run(canny, tmp / f"canny-{round_index}-b")[0]) / 2
        bare = bare_canny_seconds(arrays, CannyEdge.spec.batch_size)
        result.cpu_bound_s.append(times[0.0])
        for ms in EXPERT_MS:
            result.efficiency[ms].append(max(ms * images / 1000, times[0.0]) / times[ms])
        result.writer_ratio.append((written - unwritten) / bare)
        result.canny_s.append(bare)
        logger.info(
            "round %d: %s; canny run %.3f s, without writing %.3f s, bare canny %.3f s",
            round_index,
            ", ".join(f"{ms:g} ms {t:.3f} s" for ms, t in times.items()),
            written,
            unwritten,
            bare,
        )
    return result


def writer_cost(tmp: Path, shard_size: int, repeat: int) -> float:
    """Seconds per image of the writer alone (tar + sha256 + fsync + Parquet + done-record) on the
    demo photos with canny labels, in shards of ``shard_size``: its cost, not what it adds to a run."""
    photos = demo_photos()
    chosen = [photos[i % len(photos)] for i in range(shard_size)]
    canny = CannyEdge()
    labels = canny([decode_image(data).array for _, data, _ in chosen], {})
    samples, rows = [], []
    for index, ((ext, data, caption), label) in enumerate(zip(chosen, labels)):
        key = f"{index:08d}"
        members = {ext: data, "txt": caption, **{f"edge.{e}": b for e, b in canny.encode(label).items()}}
        members["json"] = encode_json({"key": key, "status": "ok", "experts": {"edge": {"status": "ok"}}})
        samples.append([(f"{key}.{suffix}", payload) for suffix, payload in members.items()])
        rows.append(
            {
                "key": key,
                "status": "ok",
                "error": None,
                "expert_status": '{"edge":"ok"}',
                "image_bytes": len(data),
                "label_bytes": 0,
            }
        )
    store = OutputStore(str(tmp / "writer"))
    store.prepare()
    store.write_records("warm-up", rows)  # pyarrow's first use imports it
    best = float("inf")
    for attempt in range(repeat):
        shard_id = f"{attempt:05d}"
        started = time.perf_counter()
        tar = store.write_shard(shard_id, samples)
        records = store.write_records(shard_id, rows)
        store.write_done(shard_id, {"shard": shard_id, "sha256": tar.sha256, "records": records.as_record()})
        best = min(best, time.perf_counter() - started)
    return best / shard_size


# -- PNG settings ------------------------------------------------------------------------------------
STRATEGIES = {0: "default", 1: "filtered", 2: "huffman", 3: "rle", 4: "fixed"}


def label_maps() -> dict[str, tuple[list[np.ndarray], str]]:
    """Label-like maps of the demo photos: real canny edges, and maps shaped like the neural labels."""
    arrays = [decode_image(data).array for _, data, _ in demo_photos()]
    grey = [cv2.cvtColor(array, cv2.COLOR_RGB2GRAY) for array in arrays]
    depth = [depth_like(array) for array in arrays]
    # Flat regions with a background (255), like the segmentation / detection / OCR id maps.
    regions = [np.where(g > 200, 255, cv2.GaussianBlur(g, (0, 0), 4) // 32).astype(np.uint8) for g in grey]
    return {
        "edge (canny)": ([label.map for label in CannyEdge()(arrays, {}) if label.map is not None], "L"),
        "depth-like": (depth, "L"),
        "normal-like": ([normal_like(map_) for map_ in depth], "RGB"),
        "id map-like": (regions, "L"),
    }


def normal_like(depth: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(depth.astype(np.float32))
    normal = np.stack([-gx, -gy, np.full_like(gx, 8.0)], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return ((normal + 1) * 127.5).astype(np.uint8)


def png_table(repeat: int) -> list[tuple[str, int, str, float, float]]:
    """(label kind, level, strategy, encode ms per map, kB per map); settings interleaved, best of
    ``repeat``."""
    settings = [(level, strategy) for strategy in STRATEGIES for level in range(1, 7)]
    results = []
    for kind, (maps, mode) in label_maps().items():
        best = dict.fromkeys(settings, float("inf"))
        sizes = {}
        for _ in range(repeat):
            for level, strategy in settings:
                started = time.perf_counter()
                encoded = [png(map_, mode, level, strategy) for map_ in maps]
                best[(level, strategy)] = min(best[(level, strategy)], time.perf_counter() - started)
                sizes[(level, strategy)] = sum(map(len, encoded))
        for level, strategy in settings:
            per_map = 1000 * best[(level, strategy)] / len(maps)
            results.append(
                (kind, level, STRATEGIES[strategy], per_map, sizes[(level, strategy)] / len(maps) / 1000)
            )
    return results


def png(array: np.ndarray, mode: str, level: int, strategy: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG", compress_level=level, compress_type=strategy)
    return buffer.getvalue()


# -- threads vs processes ----------------------------------------------------------------------------
def _encode_l(array: np.ndarray) -> bytes:
    return encode_png(array, "L")


def pool_table(rounds: int) -> dict[str, list[float]]:
    """ms per depth-like label encoded (labels of 120 photos) by each pool, interleaved rounds."""
    maps = label_maps()["depth-like"][0] * 10
    workers = min(4, os.cpu_count() or 1)
    pools: dict[str, Callable[[], Executor]] = {
        "in the labelling thread": lambda: ThreadPoolExecutor(1),
        f"thread pool ({workers})": lambda: ThreadPoolExecutor(workers),
        f"process pool ({workers})": lambda: ProcessPoolExecutor(workers),
    }
    times: dict[str, list[float]] = {name: [] for name in pools}
    for _ in range(rounds):
        for name, make in pools.items():
            with make() as pool:
                list(pool.map(_encode_l, maps[:workers]))  # start the workers first
                started = time.perf_counter()
                list(pool.map(_encode_l, maps))
                times[name].append(1000 * (time.perf_counter() - started) / len(maps))
    return times


# -- output ------------------------------------------------------------------------------------------
def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def print_rounds(result: Rounds, images: int, writer_s: float) -> bool:
    cpu = statistics.median(result.cpu_bound_s)
    print(
        f"CPU-stage bound (0 ms expert), median: {1000 * cpu / images:.2f} ms/image "
        f"({images / cpu:.0f} images/s)\n"
    )
    print("| expert ms/img | end-to-end ÷ bound, min / median / max | target |\n| ---: | --- | --- |")
    ok = True
    for ms, values in result.efficiency.items():
        ok &= statistics.median(values) >= TARGETS[ms]
        print(f"| {ms:g} | {spread(values)} | ≥ {TARGETS[ms]:.2f} |")
    canny = statistics.median(result.canny_s) / images
    print(
        f"\nwriter ÷ canny (what writing adds to a canny run ÷ bare canny), min / median / max: "
        f"{spread(result.writer_ratio)} (target ≤ {WRITER_TARGET})\n"
        f"writer alone {1000 * writer_s:.3f} ms/image = {writer_s / canny:.3f} × canny's "
        f"{1000 * canny:.3f} ms/image (the cost the pipeline overlaps)"
    )
    return ok and statistics.median(result.writer_ratio) <= WRITER_TARGET


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="samples labelled per run")
    parser.add_argument("--shard-size", type=int, default=300, help="samples per input shard")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of all settings")
    parser.add_argument("--batch-size", type=int, default=8, help="the stand-in expert's batch")
    parser.add_argument("--png", action="store_true", help="only the PNG level/strategy table")
    parser.add_argument("--pools", action="store_true", help="only threads vs processes for encoding")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    command = "python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"`{command.strip()}` ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start)\n"
    )
    if args.png:
        print("| label | level | strategy | encode ms / map | kB / map |\n| --- | ---: | --- | ---: | ---: |")
        for kind, level, strategy, ms, kb in png_table(repeat=args.rounds):
            print(f"| {kind} | {level} | {strategy} | {ms:.2f} | {kb:.1f} |")
        return 0
    if args.pools:
        print("| label encoding | ms / label, min / median / max |\n| --- | --- |")
        for name, values in pool_table(args.rounds).items():
            print(f"| {name} | {spread(values)} |")
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pattern = write_shards(tmp / "in", args.images, args.shard_size)
        result = run_rounds(tmp, pattern, args.images, args.rounds, args.batch_size)
        writer_s = writer_cost(tmp, args.shard_size, repeat=3)
    print(f"\n{args.images} demo photos in shards of {args.shard_size}, {args.rounds} rounds\n")
    return 0 if print_rounds(result, args.images, writer_s) else 1


if __name__ == "__main__":
    sys.exit(main())
