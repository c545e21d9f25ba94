"""Small builders for test inputs: images in every mode, WebDataset tars, manifests."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from label_pipeline.cli import main
from label_pipeline.core.tario import write_tar


def gradient(height: int, width: int) -> np.ndarray:
    """A deterministic RGB picture with edges (a gradient and a square)."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256], -1)
    image = image.astype(np.uint8)
    image[height // 4 : height // 2, width // 4 : width // 2] = 255
    return image


def image_bytes(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def write_wds(path: Path, samples: list[dict[str, bytes]], keys: list[str] | None = None) -> Path:
    """A WebDataset tar; each sample is ``{extension: bytes}``."""
    keys = keys or [f"{i:06d}" for i in range(len(samples))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        write_tar(handle, [[(f"{k}.{ext}", data) for ext, data in s.items()] for k, s in zip(keys, samples)])
    return path


def photo_samples(count: int, size: tuple[int, int] = (48, 64), start: int = 0) -> list[dict[str, bytes]]:
    samples = []
    for i in range(start, start + count):
        array = np.roll(gradient(*size), i * 3, axis=1)
        samples.append(
            {
                "jpg": image_bytes(array),
                "txt": f"picture number {i}".encode(),
                "json": f'{{"url": "http://example.invalid/{i}.jpg"}}'.encode(),
            }
        )
    return samples


def write_manifest(
    path: Path, source: dict[str, Any], output: Path, experts: list[Any], **extra: Any
) -> Path:
    data = {"name": "test", "source": source, "output": str(output), "experts": experts, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def label_toy_shard(root: Path, samples: list[dict[str, bytes]]) -> Path:
    """``samples`` as one input shard, labelled by the real pipeline (edge:canny) into
    ``root/labels/toy``; returns ``root/labels``, the label root the trainer reads."""
    write_wds(root / "in" / "00000.tar", samples)
    source = {"format": "webdataset", "path": str(root / "in" / "00000.tar")}
    manifest = write_manifest(root / "m.yaml", source, root / "labels" / "toy", ["edge:canny"])
    assert main(["run", str(manifest), "--no-progress"]) == 0
    return root / "labels"


def flip_byte(path: Path, offset: int, keep_mtime: bool = False) -> None:
    """Invert one byte of ``path``; ``keep_mtime``: the way a disk corrupts it, same size and same
    mtime, so that no stat can notice."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


# Runs the CLI in a fresh interpreter and reports that process's own peak RSS. VmHWM, not ru_maxrss:
# ru_maxrss survives exec, so a child forked from a large pytest process would report the parent's
# size; VmHWM belongs to the address space the child's exec created.
_MEASURE_RUN = """
import json, sys
from label_pipeline.cli import main
code = main(["run", sys.argv[1], "--no-progress"])
status = open("/proc/self/status").read().split("VmHWM:")[1].split()
print(json.dumps({"code": code, "peak_kib": int(status[0])}))
"""


def peak_rss_kib_of_run(manifest: Path) -> int:
    """Peak RSS (KiB) of ``label-pipeline run MANIFEST`` in a fresh interpreter, which must exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE_RUN, str(manifest)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    return int(result["peak_kib"])
