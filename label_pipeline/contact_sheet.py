"""Contact sheets: a sample's image and every expert label, in colour, drawn faithfully.

Used by ``label-pipeline inspect`` (:func:`inspect_path`) and by the run report, which calls
:func:`contact_sheet` on the members of a sample it has read. Both go through the same drawing code:

* depth gets the TURBO colour map and a colour bar (0 = far, 255 = near; per-image scale);
* normals are shown as their RGB encoding, edges as grey (0 = edge);
* categorical maps (segmentation, detection, OCR) get a fixed palette and a legend with a colour
  swatch per class or instance; boxes and polygons from the json are drawn on top;
* shrinking keeps what a label holds: edge maps are downscaled with a block minimum so a 1-px line
  survives (:func:`min_downscale`), categorical maps by nearest neighbour (no blended colours that
  belong to no class), photos and continuous maps by area averaging;
* every panel has a frame, so an all-white edge map (no edges) is still a visible panel.

An image or label that does not decode is drawn as a grey placeholder with its key and status: the
shards worth inspecting are often the damaged ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
FRAME_GREY = (150, 150, 150)  # panel frames: visible on white panels and on the white sheet
MARGIN = 8  # between panels, and around the sheet
TITLE_HEIGHT = 22  # panels start this far below the top of a sheet
ROW = 16  # legend line height
SWATCH = 12  # legend colour squares
MAX_LEGEND_ROWS = 12
COLOUR_BAR_ROWS = 2  # the bar itself, then its end labels
Colour = tuple[int, int, int]


@dataclass
class Panel:
    """One column of a sheet: a title, a picture, and legend lines (each with an optional swatch colour);
    ``colour_bar`` adds the depth colour scale under the picture."""

    title: str
    image: Image.Image
    legend: list[tuple[Colour | None, str]] = field(default_factory=list)
    colour_bar: bool = False

    @property
    def legend_rows(self) -> int:
        return min(len(self.legend), MAX_LEGEND_ROWS) + (COLOUR_BAR_ROWS if self.colour_bar else 0)


def palette(index: int) -> Colour:
    """A stable, well-spread colour per id (golden-ratio hue walk)."""
    hue = int((index * 0.618033988749895 % 1.0) * 179)
    hsv = np.array([[[hue, 200, 230]]], dtype=np.uint8)
    r, g, b = (int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])
    return r, g, b


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


def colour_depth(label: np.ndarray) -> np.ndarray:
    """An L8 depth map through the TURBO colour map (what the colour bar shows)."""
    return cv2.cvtColor(cv2.applyColorMap(label, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)


def render_label(task: str, label: np.ndarray, backdrop: np.ndarray | None = None) -> np.ndarray:
    """An expert map as an RGB picture a person can read."""
    if label.ndim == 3:
        return label  # normals are already RGB of (n+1)/2
    if task == "depth":
        return colour_depth(label)
    if task == "edge":
        return np.repeat(label[:, :, None], 3, axis=2)
    return colour_categorical(label, backdrop)


def panel_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of a panel: the longest side scaled to ``TILE``, the aspect ratio kept."""
    scale = TILE / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def min_downscale(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Shrink ``array`` (H×W or H×W×C) to ``size`` = (width, height), each output pixel the minimum of
    the block of input pixels it covers.

    For maps where 0 marks a thin structure (edges: 0 = edge, 255 = none) a 1-px line then stays a dark
    1-px line at any scale, where nearest-neighbour sampling skips most of it and averaging fades it.
    Blocks tile the input exactly (no pixel skipped), for any, non-integer, factor.
    """
    width, height = size
    if height > array.shape[0] or width > array.shape[1]:
        raise ValueError(f"min_downscale shrinks; got {array.shape[:2]} -> {(height, width)}")
    rows = (np.arange(height) * array.shape[0]) // height
    cols = (np.arange(width) * array.shape[1]) // width
    return np.minimum.reduceat(np.minimum.reduceat(array, rows, axis=0), cols, axis=1)


def fit_panel(array: np.ndarray, kind: str = "smooth") -> Image.Image:
    """``array`` (RGB) scaled to a panel. ``kind`` says what it holds, and so how to shrink it:
    ``"edge"`` block minimum (thin dark lines survive), ``"categorical"`` nearest neighbour (only
    colours of the palette), ``"smooth"`` area averaging (photos, depth, normals). Enlarging is always
    nearest neighbour: a label's pixels stay visible as pixels."""
    size = panel_size(*array.shape[:2])
    if size[0] >= array.shape[1] or size[1] >= array.shape[0]:
        return Image.fromarray(array).resize(size, Image.Resampling.NEAREST)
    if kind == "edge":
        return Image.fromarray(np.ascontiguousarray(min_downscale(array, size)))
    resample = Image.Resampling.NEAREST if kind == "categorical" else Image.Resampling.BOX
    return Image.fromarray(array).resize(size, resample)


def _panel_kind(task: str, label: np.ndarray) -> str:
    if task == "edge":
        return "edge"
    if task == "depth" or label.ndim == 3:
        return "smooth"
    return "categorical"


def _annotate(
    task: str, panel: Image.Image, data: Any, label: np.ndarray, scale: float
) -> list[tuple[Colour | None, str]]:
    """Draw boxes / polygons; return legend lines, each with the colour it has in the panel."""
    draw = ImageDraw.Draw(panel)
    legend: list[tuple[Colour | None, str]] = []
    names = class_names(task)
    if task == "obj_detection" and isinstance(data, list):
        for det in data:
            colour = palette(det["instance"])
            draw.rectangle([v * scale for v in det["box"]], outline=colour, width=2)
            name = names[det["class_id"]] if names and det["class_id"] < len(names) else str(det["class_id"])
            legend.append((colour, f"{det['instance']}: {name} {det.get('score', 0):.2f}"))
    elif task == "ocr_detection" and isinstance(data, list):
        for word in data:
            colour = palette(word["instance"])
            draw.polygon([(x * scale, y * scale) for x, y in word["polygon"]], outline=colour, width=2)
            legend.append((colour, f"{word['instance']}: {word.get('text', '')!r}"))
    elif task.startswith("seg"):
        ids, counts = np.unique(label[label != 255], return_counts=True)
        for value, _ in sorted(zip(ids, counts), key=lambda p: -p[1])[:MAX_LEGEND_ROWS]:
            name = names[value] if names and value < len(names) else f"class {value}"
            legend.append((palette(int(value)), str(name)))
    elif task == "edge":
        legend.append((None, "dark = edge, white = none"))
    elif label.ndim == 3:
        legend.append((None, "RGB = (normal + 1) / 2"))
    return legend


def contact_sheet(members: dict[str, bytes], key: str) -> Image.Image:
    """The sheet of one sample, from its tar members (``{"jpg": …, "json": …, "depth.png": …}``): the
    image, then one panel per expert its json lists; whatever does not decode is a grey placeholder."""
    meta = _sample_meta(members)
    status = str(meta.get("status", "?"))
    caption = _wrap(members.get("txt", b"").decode("utf-8", "replace"))
    rgb, image_panel = _image_panel(members, key, status)
    panels = [Panel(f"{key} ({status})", image_panel, [(None, line) for line in caption])]
    experts = found if isinstance(found := meta.get("experts"), dict) else {}
    for task in sorted(experts):
        panels.append(_label_panel(task, members, experts[task], rgb))
    return compose(panels)


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
    return rgb, fit_panel(rgb)


def _label_panel(task: str, members: dict[str, bytes], info: Any, rgb: np.ndarray | None) -> Panel:
    status = info.get("status") if isinstance(info, dict) else None
    if f"{task}.png" not in members:
        error = info.get("error", "") if isinstance(info, dict) else ""
        return Panel(f"{task}: {status}", placeholder([f"{task}: {status}", str(error)]))
    try:
        label = decode_png(members[f"{task}.png"])
        panel = fit_panel(render_label(task, label, rgb), _panel_kind(task, label))
        data = json.loads(members[f"{task}.json"]) if f"{task}.json" in members else None
        legend = _annotate(task, panel, data, label, panel.width / label.shape[1])
    except Exception as exc:  # noqa: BLE001 - a damaged label is shown as damaged, not a traceback
        return Panel(f"{task}: damaged", placeholder([f"{task}.png", describe(exc)]))
    return Panel(task, panel, legend, colour_bar=task == "depth" and label.ndim == 2)


def placeholder(lines: list[str]) -> Image.Image:
    """A grey panel carrying text, standing in for a picture that cannot be drawn."""
    panel = Image.new("RGB", (TILE, TILE // 2), PLACEHOLDER_GREY)
    draw = ImageDraw.Draw(panel)
    font = _font()
    wrapped = [part for line in lines for part in (_wrap(line, 40) or [""])]
    for row, line in enumerate(wrapped[: (TILE // 2 - 8) // ROW]):
        draw.text((6, 6 + ROW * row), line, fill=(255, 255, 255), font=font)
    return panel


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=14)


def _wrap(text: str, width: int = 40) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def _clip(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels, so it never runs into the next panel."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def compose(panels: list[Panel]) -> Image.Image:
    """Panels side by side on a white sheet: titles above, frames around, legends below."""
    font = _font()
    tallest = max((panel.image.height for panel in panels), default=TILE)
    legend_top = TITLE_HEIGHT + tallest + 4
    rows = max((panel.legend_rows for panel in panels), default=0)
    height = legend_top + ROW * rows + MARGIN
    sheet = Image.new("RGB", (len(panels) * (TILE + MARGIN) + MARGIN, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for column, panel in enumerate(panels):
        x = MARGIN + column * (TILE + MARGIN)
        draw.text((x, 4), _clip(panel.title, font, TILE), fill=(0, 0, 0), font=font)
        sheet.paste(panel.image, (x, TITLE_HEIGHT))
        # The frame sits just outside the picture: it hides no label pixel.
        right, bottom = x + panel.image.width, TITLE_HEIGHT + panel.image.height
        draw.rectangle([x - 1, TITLE_HEIGHT - 1, right, bottom], outline=FRAME_GREY)
        y = legend_top
        if panel.colour_bar:
            _draw_colour_bar(sheet, draw, font, x, y)
            y += ROW * COLOUR_BAR_ROWS
        for colour, text in panel.legend[:MAX_LEGEND_ROWS]:
            _draw_legend_line(draw, font, x, y, colour, text)
            y += ROW
    return sheet


def _draw_legend_line(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    x: int,
    y: int,
    colour: Colour | None,
    text: str,
) -> None:
    """One legend line in a panel's column: a swatch of ``colour`` (when given), then the text."""
    indent = 0
    if colour is not None:
        top = y + (ROW - SWATCH) // 2
        draw.rectangle([x, top, x + SWATCH - 1, top + SWATCH - 1], fill=colour, outline=(60, 60, 60))
        indent = SWATCH + 4
    draw.text((x + indent, y), _clip(text, font, TILE - indent), fill=(40, 40, 40), font=font)


def _draw_colour_bar(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    x: int,
    y: int,
) -> None:
    """The depth scale: TURBO from 0 (far) to 255 (near) across the panel's width, its ends labelled."""
    ramp = np.linspace(0, 255, TILE).round().astype(np.uint8)
    bar = colour_depth(np.repeat(ramp[None, :], ROW - 4, axis=0))
    sheet.paste(Image.fromarray(bar), (x, y + 2))
    draw.rectangle([x - 1, y + 1, x + TILE, y + ROW - 2], outline=FRAME_GREY)
    labels_y = y + ROW
    draw.text((x, labels_y), "0 far", fill=(40, 40, 40), font=font)
    near = "255 near (per-image scale)"
    draw.text((x + TILE - font.getlength(near), labels_y), near, fill=(40, 40, 40), font=font)


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
