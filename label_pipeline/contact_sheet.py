"""``label-pipeline inspect``: a contact sheet of a sample's image and every expert label, in colour.

Depth gets a colour map, normals are shown as RGB, edges as grey, categorical maps (segmentation,
detection, OCR) get a fixed palette with a legend, and boxes / polygons from the json are drawn on top.
An image or label that does not decode is drawn as a grey placeholder with its key and status: the
shards worth inspecting are often the damaged ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import cv2
import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from label_pipeline.config import ConfigError
from label_pipeline.core.decode import DecodeError, decode_image
from label_pipeline.core.format import IMAGE_EXTENSIONS, decode_png
from label_pipeline.core.labelmaps import class_names
from label_pipeline.core.tario import read_tar_samples
from label_pipeline.inputs import list_folder
from label_pipeline.output import OutputStore
from label_pipeline.verify import describe

TILE = 320  # each panel's longest side in pixels
PLACEHOLDER_GREY = (128, 128, 128)


def palette(index: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per id (golden-ratio hue walk)."""
    hue = int((index * 0.618033988749895 % 1.0) * 179)
    hsv = np.uint8([[[hue, 200, 230]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def colour_categorical(label: np.ndarray, backdrop: np.ndarray | None = None) -> np.ndarray:
    """Palette colours per id over a dimmed grey copy of the image (so regions can be located)."""
    if backdrop is not None and backdrop.shape[:2] == label.shape:
        grey = cv2.cvtColor(backdrop, cv2.COLOR_RGB2GRAY) // 3 + 40
        out = np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8)
    else:
        out = np.zeros(label.shape + (3,), dtype=np.uint8)
    for value in np.unique(label):
        if value != 255:
            out[label == value] = palette(int(value))
    return out


def render_label(task: str, label: np.ndarray, backdrop: np.ndarray | None = None) -> np.ndarray:
    """An expert map as an RGB picture a person can read."""
    if label.ndim == 3:
        return label  # normals are already RGB of (n+1)/2
    if task == "depth":
        return cv2.cvtColor(cv2.applyColorMap(label, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)
    if task == "edge":
        return np.repeat(label[:, :, None], 3, axis=2)
    return colour_categorical(label, backdrop)


def _fit(array: np.ndarray) -> Image.Image:
    image = Image.fromarray(array)
    scale = TILE / max(image.size)
    return image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST
    )


def _annotate(task: str, panel: Image.Image, data: Any, label: np.ndarray, scale: float) -> list[str]:
    """Draw boxes / polygons; return legend lines."""
    draw = ImageDraw.Draw(panel)
    legend: list[str] = []
    names = class_names(task)
    if task == "obj_detection" and isinstance(data, list):
        for det in data:
            box = [v * scale for v in det["box"]]
            draw.rectangle(box, outline=palette(det["instance"]), width=2)
            name = names[det["class_id"]] if names and det["class_id"] < len(names) else str(det["class_id"])
            legend.append(f"{det['instance']}: {name} {det.get('score', 0):.2f}")
    elif task == "ocr_detection" and isinstance(data, list):
        for word in data:
            points = [(x * scale, y * scale) for x, y in word["polygon"]]
            draw.polygon(points, outline=palette(word["instance"]), width=2)
            legend.append(f"{word['instance']}: {word.get('text', '')!r}")
    elif task.startswith("seg"):
        ids, counts = np.unique(label[label != 255], return_counts=True)
        for value, _ in sorted(zip(ids, counts), key=lambda p: -p[1])[:8]:
            legend.append(names[value] if names and value < len(names) else f"class {value}")
    return legend


def contact_sheet(members: dict[str, bytes], key: str) -> Image.Image:
    """The image, then one panel per expert; whatever does not decode becomes a grey placeholder."""
    meta = _sample_meta(members)
    status = str(meta.get("status", "?"))
    caption = _wrap(members.get("txt", b"").decode("utf-8", "replace"))
    rgb, image_panel = _image_panel(members, key, status)
    panels: list[tuple[str, Image.Image, list[str]]] = [(f"{key} ({status})", image_panel, caption)]
    experts = meta.get("experts") if isinstance(meta.get("experts"), dict) else {}
    for task in sorted(experts):
        panels.append(_label_panel(task, members, experts[task], rgb))
    return _compose(panels)


def _sample_meta(members: dict[str, bytes]) -> dict[str, Any]:
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except ValueError:
        return {"status": "json unreadable"}
    return meta if isinstance(meta, dict) else {"status": "json unreadable"}


def _image_panel(members: dict[str, bytes], key: str, status: str) -> tuple[np.ndarray | None, Image.Image]:
    """(RGB array or None, panel): a sample that failed to decode is shown as its key and status."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    try:
        rgb = decode_image(members[image_ext] if image_ext else None).array
    except DecodeError as exc:
        return None, placeholder([key, f"status: {status}", f"{exc.status}: {exc}"])
    return rgb, _fit(rgb)


def _label_panel(
    task: str, members: dict[str, bytes], info: Any, rgb: np.ndarray | None
) -> tuple[str, Image.Image, list[str]]:
    status = info.get("status") if isinstance(info, dict) else None
    if f"{task}.png" not in members:
        error = info.get("error", "") if isinstance(info, dict) else ""
        return f"{task}: {status}", placeholder([f"{task}: {status}", str(error)]), []
    try:
        label = decode_png(members[f"{task}.png"])
        panel = _fit(render_label(task, label, rgb))
        data = json.loads(members[f"{task}.json"]) if f"{task}.json" in members else None
        legend = _annotate(task, panel, data, label, panel.width / label.shape[1])
    except Exception as exc:  # noqa: BLE001 - a damaged label is shown as damaged, not a traceback
        return f"{task}: damaged", placeholder([f"{task}.png", describe(exc)]), []
    return task, panel, legend


def placeholder(lines: list[str]) -> Image.Image:
    """A grey panel carrying text, standing in for a picture that cannot be drawn."""
    panel = Image.new("RGB", (TILE, TILE // 2), PLACEHOLDER_GREY)
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=14)
    wrapped = [part for line in lines for part in (_wrap(line, 40) or [""])]
    for row, line in enumerate(wrapped[: (TILE // 2 - 8) // 16]):
        draw.text((6, 6 + 16 * row), line, fill=(255, 255, 255), font=font)
    return panel


def _wrap(text: str, width: int = 40) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def _compose(panels: list[tuple[str, Image.Image, list[str]]]) -> Image.Image:
    font = ImageFont.load_default(size=14)
    text_rows = max((len(legend) for _, _, legend in panels), default=0)
    tallest = max((panel.height for _, panel, _ in panels), default=TILE)
    height = tallest + 24 + 16 * min(text_rows, 12) + 8
    sheet = Image.new("RGB", (len(panels) * (TILE + 8) + 8, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for column, (title, panel, legend) in enumerate(panels):
        x = 8 + column * (TILE + 8)
        draw.text((x, 4), title, fill=(0, 0, 0), font=font)
        sheet.paste(panel, (x, 22))
        for row, line in enumerate(legend[:12]):
            draw.text((x, tallest + 26 + 16 * row), line[:44], fill=(40, 40, 40), font=font)
    return sheet


@dataclass
class Inspection:
    """What ``inspect_path`` drew: the sheet (None if no sample could be read) and any read error."""

    shard: str
    sheet: Image.Image | None
    error: str | None = None


def inspect_path(path: str, key: str | None = None, limit: int = 4, shard: str | None = None) -> Inspection:
    """Sheets of a shard tar, or of a shard of an output root (``shard``, else its first done shard).

    Raises FileNotFoundError / ConfigError for a path that is not there or holds nothing to show, and
    KeyError when ``key`` is not in an intact shard. A damaged tar is not raised: the samples before
    the damage are drawn and ``error`` says what is wrong.
    """
    fs, local_path = fsspec.core.url_to_fs(path)
    if fs.isdir(local_path):
        path = _shard_of_output(path, shard)
    elif shard is not None:
        raise ConfigError(f"--shard {shard}: {path} is a shard itself, not an output root")
    return inspect_shard(path, key=key, limit=limit)


def _shard_of_output(root: str, shard: str | None) -> str:
    store = OutputStore(root)
    if shard is not None:
        return f"{store.url}/shards/{shard}.tar"
    names = list_folder(store.fs, f"{store.root}/records")
    done, _ = store.committed(sorted(n[: -len(".done.json")] for n in names if n.endswith(".done.json")))
    if not done:
        raise ConfigError(f"{root}: no done shard to inspect (pass a shard tar or --shard ID)")
    return f"{store.url}/shards/{min(done)}.tar"


def inspect_shard(shard_url: str, key: str | None = None, limit: int = 4) -> Inspection:
    """Sheets for ``key`` (or the first ``limit`` samples) of a shard, stacked vertically."""
    sheets = []
    errors: list[str] = []
    with fsspec.open(shard_url, "rb") as handle:
        for sample_key, members in read_tar_samples(handle, errors):
            if key is None or sample_key == key:
                sheets.append(contact_sheet(members, sample_key))
            if (key is not None and sheets) or len(sheets) >= limit:
                break
    error = f"{shard_url}: tar unreadable ({errors[0]})" if errors else None
    if not sheets and error is None:
        raise KeyError(f"key {key!r} not found in {shard_url}" if key else f"{shard_url} holds no sample")
    return Inspection(shard_url, _stack(sheets) if sheets else None, error)


def _stack(sheets: list[Image.Image]) -> Image.Image:
    width = max(s.width for s in sheets)
    stacked = Image.new("RGB", (width, sum(s.height for s in sheets)), (255, 255, 255))
    y = 0
    for sheet in sheets:
        stacked.paste(sheet, (0, y))
        y += sheet.height
    return stacked
