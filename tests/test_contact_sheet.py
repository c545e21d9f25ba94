"""Contact sheets show every label faithfully: thin edge lines survive shrinking, legends carry the
colours the panel uses, depth has a colour bar, and a white panel still has a visible frame."""

from __future__ import annotations

import json

import numpy as np
import pytest
from builders import gradient, image_bytes
from PIL import Image

from label_pipeline.contact_sheet import (
    FRAME_GREY,
    MARGIN,
    TILE,
    TITLE_HEIGHT,
    colour_depth,
    contact_sheet,
    fit_panel,
    min_downscale,
    palette,
    panel_size,
)
from label_pipeline.core.format import encode_json, encode_png
from label_pipeline.core.labelmaps import class_names

EDGE_SIZE = (1000, 2000)  # (H, W): shrunk 6.25x to a 320-px panel


def _sample(image: np.ndarray, labels: dict[str, tuple[np.ndarray, str]], **extra: bytes) -> dict[str, bytes]:
    """Tar members of one ok sample holding ``labels`` (task → (map, PNG mode)) and ``extra`` members."""
    members = {"jpg": image_bytes(image), "txt": b"a test picture"}
    members.update({f"{task}.png": encode_png(array, mode) for task, (array, mode) in labels.items()})
    members.update(extra)
    experts = {task: {"status": "ok"} for task in labels}
    members["json"] = json.dumps({"status": "ok", "experts": experts}).encode()
    return members


def _panel(sheet: Image.Image, column: int, size: tuple[int, int]) -> np.ndarray:
    """The pixels of panel ``column`` (``size`` = (width, height)) on a sheet."""
    x = MARGIN + column * (TILE + MARGIN)
    return np.asarray(sheet)[TITLE_HEIGHT : TITLE_HEIGHT + size[1], x : x + size[0]]


def _legend(sheet: Image.Image, column: int, size: tuple[int, int]) -> np.ndarray:
    """The legend area under panel ``column``."""
    x = MARGIN + column * (TILE + MARGIN)
    return np.asarray(sheet)[TITLE_HEIGHT + size[1] + 2 :, x : x + TILE]


def _edge_map_with_line(column: int) -> np.ndarray:
    edge = np.full(EDGE_SIZE, 255, np.uint8)  # 255 = no edge
    edge[:, column] = 0  # one 1-px vertical edge line
    edge[EDGE_SIZE[0] // 3, :] = 0  # and one horizontal
    return edge


def _column_skipped_by_nearest(width: int, size: int) -> int:
    """A column that nearest-neighbour shrinking of ``width`` to ``size`` never samples."""
    sampled = np.asarray(
        Image.fromarray(np.arange(width, dtype=np.int32)[None, :]).resize((size, 1), Image.NEAREST)
    )
    return int(next(c for c in range(width // 2, width) if c not in set(sampled[0].tolist())))


def test_min_downscale_keeps_every_one_pixel_line() -> None:
    size = panel_size(*EDGE_SIZE)
    for column in range(0, EDGE_SIZE[1], 37):  # lines everywhere, at every phase of the 6.25x grid
        edge = _edge_map_with_line(column)
        small = min_downscale(edge, size)
        assert small.shape == (size[1], size[0])
        dark_columns = np.flatnonzero((small == 0).all(axis=0))
        assert len(dark_columns) == 1, f"the line at x={column} must stay one dark column"
        assert abs(dark_columns[0] - column * size[0] / EDGE_SIZE[1]) <= 1
        assert (small == 0).all(axis=1).sum() == 1, "the horizontal line must stay one dark row"


def test_min_downscale_rejects_enlarging() -> None:
    with pytest.raises(ValueError, match="shrinks"):
        min_downscale(np.zeros((10, 10), np.uint8), (20, 20))


def test_a_one_pixel_edge_line_survives_on_the_sheet() -> None:
    """A 1-px line in a 2000-px edge map is still a dark line on the 320-px panel of the sheet (nearest
    neighbour sampling, the old way, drops it)."""
    size = panel_size(*EDGE_SIZE)
    column = _column_skipped_by_nearest(EDGE_SIZE[1], size[0])
    edge = _edge_map_with_line(column)
    naive = np.asarray(Image.fromarray(edge).resize(size, Image.NEAREST))
    assert not (naive == 0).all(axis=0).any(), "test premise: nearest neighbour loses this line"

    image = np.full(EDGE_SIZE + (3,), 200, np.uint8)
    sheet = contact_sheet(_sample(image, {"edge": (edge, "L")}), "000001")
    panel = _panel(sheet, 1, size)
    dark = (panel < 64).all(axis=2)
    assert dark.all(axis=0).sum() == 1, "the vertical 1-px line must be a full dark column"
    assert dark.all(axis=1).sum() == 1, "the horizontal 1-px line must be a full dark row"
    assert fit_panel(np.repeat(edge[:, :, None], 3, axis=2), "edge").size == size


def test_white_panel_has_a_visible_frame() -> None:
    """An edge map without edges is all white: its frame still shows where the panel is."""
    image = gradient(60, 80)
    sheet = contact_sheet(_sample(image, {"edge": (np.full((60, 80), 255, np.uint8), "L")}), "000002")
    size = panel_size(60, 80)
    panel = _panel(sheet, 1, size)
    assert (panel == 255).all(), "no edge: the panel itself is white"
    pixels = np.asarray(sheet)
    x = MARGIN + (TILE + MARGIN)
    top, bottom = TITLE_HEIGHT - 1, TITLE_HEIGHT + size[1]
    frame = [pixels[top, x : x + size[0]], pixels[bottom, x : x + size[0]]]
    frame += [pixels[top:bottom, x - 1], pixels[top:bottom, x + size[0]]]
    for side in frame:
        assert (side == FRAME_GREY).all(), "each side of the frame is drawn"


def test_segmentation_legend_has_a_swatch_per_class() -> None:
    seg = np.full((80, 120), 255, np.uint8)
    seg[:40, :60] = 0  # two classes and background
    seg[40:, 60:] = 17
    sheet = contact_sheet(_sample(gradient(80, 120), {"seg_coco": (seg, "L")}), "000003")
    size = panel_size(80, 120)
    panel, legend = _panel(sheet, 1, size), _legend(sheet, 1, size)
    names = class_names("seg_coco")
    assert names is not None
    for class_id in (0, 17):
        colour = np.array(palette(class_id))
        assert (panel == colour).all(axis=2).any(), f"class {class_id} is painted in its palette colour"
        swatch = (legend == colour).all(axis=2)
        assert swatch.sum() >= 100, f"class {class_id} ({names[class_id]}) has a swatch in the legend"
        assert swatch.nonzero()[1].max() < 16, "the swatch is at the start of the legend line"


def test_detection_legend_swatches_match_the_box_colours() -> None:
    instances = np.full((90, 120), 255, np.uint8)
    instances[10:40, 10:50] = 0
    instances[50:80, 60:110] = 1
    boxes = [
        {"instance": 0, "class_id": 3, "score": 0.9, "box": [10, 10, 50, 40]},
        {"instance": 1, "class_id": 5, "score": 0.5, "box": [60, 50, 110, 80]},
    ]
    members = _sample(
        gradient(90, 120), {"obj_detection": (instances, "L")}, **{"obj_detection.json": encode_json(boxes)}
    )
    sheet = contact_sheet(members, "000004")
    legend = _legend(sheet, 1, panel_size(90, 120))
    for box in boxes:
        assert (legend == np.array(palette(box["instance"]))).all(axis=2).sum() >= 100


def test_depth_panel_has_a_colour_bar() -> None:
    depth = np.tile(np.linspace(0, 255, 160).astype(np.uint8), (100, 1))
    sheet = contact_sheet(_sample(gradient(100, 160), {"depth": (depth, "L")}), "000005")
    legend = _legend(sheet, 1, panel_size(100, 160))
    bar_row = next(row[:TILE] for row in legend if len({tuple(c) for c in row[:TILE]}) > 50)  # a gradient
    ends = colour_depth(np.array([[0, 255]], np.uint8))[0]
    assert np.abs(bar_row[0].astype(int) - ends[0]).max() <= 3, "the bar starts at the colour of 0 (far)"
    assert np.abs(bar_row[TILE - 1].astype(int) - ends[1]).max() <= 3, "and ends at the colour of 255 (near)"


def test_small_label_is_enlarged_pixel_for_pixel() -> None:
    """Enlarging never blends: a 4x4 categorical map keeps exactly its palette colours."""
    label = np.arange(16, dtype=np.uint8).reshape(4, 4)
    rgb = np.stack([np.full((4, 4), v, np.uint8) for v in (10, 20, 30)], axis=2)
    rgb[label % 2 == 0] = (200, 0, 0)
    panel = np.asarray(fit_panel(rgb, "categorical"))
    assert panel.shape == (TILE, TILE, 3)
    assert {tuple(c) for c in panel.reshape(-1, 3)} == {(10, 20, 30), (200, 0, 0)}
