"""CharNet's post-processing (dense maps → recognised words → Prismer's word-index label), in numpy.

Our own vectorised implementation of what Prismer's CharNet does after the network, with the same
decisions in the same order:

1. **Word boxes.** Every stride-4 cell whose word foreground exceeds ``word_min_score`` proposes a
   rectangle from its (t, b, l, r) distances, rotated by the predicted angle around the cell, in image
   coordinates (``scale_w = W / 480``, ``scale_h = H / 480``).
2. **Character boxes.** Cells that are word foreground *and* have character foreground above
   ``char_min_score`` propose axis-aligned character boxes, each with its 68 class probabilities.
3. **NMS** (:func:`nms_quads`) on both sets: greedy, in descending score order; a kept box suppresses every
   later box with polygon IoU above the threshold, and is replaced by the score-weighted mean of itself and
   its neighbours (IoU above 0.5). A box without any neighbour is dropped, but what it suppressed stays
   suppressed (as in the original). Boxes are then rounded and clipped to the image.
4. **Reading.** Each character goes to the word it overlaps most (IoU); a word's characters are read left
   to right (by centre x relative to the word's first corner) and decoded by arg-max; the text score is
   the mean arg-max probability.
5. **Filtering.** Text scores below 0.8 are dropped; non-alphabetic text is kept from 0.9 and any text
   from 0.98; the rest is snapped to the nearest lexicon word (edit distance, allowed 0/1/2 for words of
   ≤2/≤5/longer) or dropped. Without a lexicon those words are dropped (see :class:`Lexicon`).
6. **Label** (:func:`word_label`): 255 background; the words are filled as polygons in reverse order, so
   the first (highest-scoring) word gets the highest index and wins overlaps; the text is lower-cased.

The polygon IoUs come from an exact, vectorised Sutherland–Hodgman clip instead of per-pair Clipper /
Shapely calls; the greedy loop skips pairs that provably cannot reach the thresholds (bounding-box
bounds) and batches boxes that cannot interact, so the 14k-candidate case on which the original spends
58 s takes a fraction of a second.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from expert_zoo.base import BACKGROUND

logger = logging.getLogger(__name__)

# CharNet's 68 character classes (ICDAR 2015 model) in class-index order; the network's class i is
# CHARSET[i]. Letters are read upper-case, as the original's character dictionary loader does.
CHARSET = "abcdefghijklmnopqrstuvwxyz0123456789!#\"%$'&)(+*-,/.;:=<?>@[]\\_^`{}|~".upper()
MAX_WORDS = 254  # word indices 0..253: 255 is background and 254 is kept free

_MAP_NAMES = ("word_fg", "word_tblr", "word_orient", "char_fg", "char_tblr", "char_cls")
_PAIR_CHUNK = 1 << 17  # polygon pairs clipped at once, to bound memory
_MAX_BLOCK = 64  # NMS: most boxes whose IoUs are computed together


@dataclass(frozen=True)
class PostprocessConfig:
    """Prismer's CharNet settings (``charnet/config/defaults.py`` and the filter's constants)."""

    word_min_score: float = 0.5
    word_stride: int = 4
    word_nms_iou: float = 0.15
    char_min_score: float = 0.25
    char_stride: int = 4
    char_nms_iou: float = 0.3
    neighbour_iou: float = 0.5  # NMS: boxes above this IoU are averaged into the kept box
    min_neighbours: int = 1  # NMS: a box with fewer neighbours than this is dropped
    min_text_score: float = 0.8
    keep_non_alpha_score: float = 0.9
    keep_score: float = 0.98

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PostprocessConfig:
        """Build from an expert config, ignoring keys that are not post-processing settings."""
        fields = cls.__dataclass_fields__
        return cls(**{k: type(getattr(cls, k))(v) for k, v in options.items() if k in fields})


@dataclass
class WordInstance:
    """One recognised word: a 4-point polygon (x0, y0, …, x3, y3) in image pixels, rounded and clipped."""

    box: np.ndarray  # (8,) float32
    box_score: float
    text: str
    text_score: float


# -- geometry --------------------------------------------------------------------------------------
def polygon_areas(polys: np.ndarray) -> np.ndarray:
    """Shoelace area (absolute) of polygons given as (..., K, 2) vertex arrays, in float64."""
    p = np.asarray(polys, dtype=np.float64)
    x, y = p[..., 0], p[..., 1]
    x_next, y_next = np.roll(x, -1, axis=-1), np.roll(y, -1, axis=-1)
    return 0.5 * np.abs((x * y_next - x_next * y).sum(axis=-1))


def _next_vertex(a: np.ndarray) -> np.ndarray:
    """Shift along the vertex axis (axis 1) so that slot k holds vertex k + 1, cyclically."""
    return np.concatenate([a[:, 1:], a[:, :1]], axis=1)


def _clip_halfplane(polys: np.ndarray, normal: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Sutherland–Hodgman step: keep the part of each polygon where ``normal · p + offset >= 0``.

    ``polys`` is (M, K, 2); ``normal`` (M, 2) or (1, 2), ``offset`` (M,) or (1,). Short polygons are
    padded by repeating their last vertex (zero-length edges change no area); empty results are zeros.
    """
    m, k = polys.shape[:2]
    d = polys[..., 0] * normal[:, 0:1] + polys[..., 1] * normal[:, 1:2] + offset[:, None]
    inside = d >= 0
    if inside.all():  # common: this edge cuts none of the polygons
        return polys
    d_next = _next_vertex(d)
    crossing = inside != (d_next >= 0)
    t = d / np.where(crossing, d - d_next, 1.0)
    # Each vertex emits itself (if inside), then its edge's crossing point (if any): 2K slots, compacted.
    points = np.empty((m, 2 * k, 2))
    points[:, 0::2] = polys
    points[:, 1::2] = polys + t[..., None] * (_next_vertex(polys) - polys)
    valid = np.empty((m, 2 * k), dtype=bool)
    valid[:, 0::2] = inside
    valid[:, 1::2] = crossing
    slot = np.cumsum(valid, axis=1) - 1
    count = slot[:, -1] + 1
    last = 2 * k - 1 - np.argmax(valid[:, ::-1], axis=1)
    out = np.repeat(points[np.arange(m), last][:, None, :], max(int(count.max(initial=0)), 1), axis=1)
    rows, cols = np.nonzero(valid)
    out[rows, slot[rows, cols]] = points[rows, cols]
    out[count == 0] = 0.0
    return out


def clip_area(subjects: np.ndarray, clips: np.ndarray) -> np.ndarray:
    """Area of ``subject ∩ clip`` for polygons: subjects (M, K, 2) any simple polygons, clips (M, C, 2)
    or one shared (1, C, 2) *convex* polygons, either orientation. A degenerate clip gives 0."""
    polys = np.asarray(subjects, dtype=np.float64)
    clips = np.asarray(clips, dtype=np.float64)
    x, y = clips[..., 0], clips[..., 1]
    signed = (x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1)
    orientation = np.sign(signed)
    for k in range(clips.shape[1]):
        a, b = clips[:, k], clips[:, (k + 1) % clips.shape[1]]
        edge = b - a
        # Left of the edge is inside for a counter-clockwise (positive) polygon, right otherwise.
        normal = np.stack([-edge[:, 1], edge[:, 0]], axis=1) * orientation[:, None]
        offset = -(normal * a).sum(axis=1)
        polys = _clip_halfplane(polys, normal, offset)
    areas = polygon_areas(polys)
    return np.where(np.broadcast_to(orientation == 0, areas.shape), 0.0, areas)


def rotated_boxes(
    xs: np.ndarray,
    ys: np.ndarray,
    tblr: np.ndarray,
    angle: np.ndarray | None,
    scale_w: float,
    scale_h: float,
    stride: int,
) -> np.ndarray:
    """Cell (x, y) with distances (t, b, l, r) → the 4 corners (N, 8) float32 of its box in image pixels.

    Corners go (x-l, y-t), (x+r, y-t), (x+r, y+b), (x-l, y+b), rotated by ``angle`` (radians) around
    the cell, after scaling to the image; computed in float64 and stored as float32, like the original.
    """
    xs = xs.astype(np.float64)
    ys = ys.astype(np.float64)
    top, bottom, left, right = (tblr[k].astype(np.float64) for k in range(4))
    sx, sy = scale_w * stride, scale_h * stride
    x1, y1 = sx * (xs - left), sy * (ys - top)
    x2, y2 = sx * (xs + right), sy * (ys + bottom)
    cx, cy = sx * xs, sy * ys
    if angle is None:
        cos, sin = np.ones_like(xs), np.zeros_like(xs)
    else:
        angle = angle.astype(np.float64)
        cos, sin = np.cos(angle), np.sin(angle)
    corners = []
    for px, py in ((x1, y1), (x2, y1), (x2, y2), (x1, y2)):
        dx, dy = px - cx, py - cy
        corners += [cx + dx * cos - dy * sin, cy + dx * sin + dy * cos]
    return np.stack(corners, axis=1).astype(np.float32)


# -- NMS -------------------------------------------------------------------------------------------
def nms_quads(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    *,
    neighbour_iou: float = 0.5,
    min_neighbours: int = 1,
    extra: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """CharNet's greedy polygon NMS with neighbour averaging (see the module doc, step 3).

    ``boxes`` (N, 8) float32 convex quadrilaterals, ``scores`` (N,) float32, ``extra`` optional (N, D)
    per-box vectors averaged with the same weights (the character class probabilities).
    Returns ``(keep, merged_boxes, merged_extra)``: ``keep`` indexes the input in descending score order,
    the merged rows line up with ``keep``.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    n = len(boxes)
    empty_extra = None if extra is None else np.zeros((0, extra.shape[1]), extra.dtype)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, 8), np.float32), empty_extra
    # The original's order: a default (quicksort) argsort, reversed. Ties keep the same order only on
    # the same numpy build and CPU, which is as reproducible as the original ever was.
    order = scores.argsort()[::-1]
    quads = boxes.reshape(n, 4, 2).astype(np.float64)[order]
    areas = polygon_areas(quads)
    lo, hi = quads.min(axis=1), quads.max(axis=1)

    lowest = min(iou_threshold, neighbour_iou)
    keep: list[int] = []
    merged_boxes: list[np.ndarray] = []
    merged_extra: list[np.ndarray] = []
    alive = np.ones(n, bool)  # by position in ``order``: not suppressed
    # A zero-area box has IoU 0 with everything: it never suppresses, is never suppressed and never
    # has a neighbour, so unless boxes without neighbours are kept it can be left out from the start.
    pending = np.flatnonzero(areas > 0) if min_neighbours > 0 else np.arange(n)
    bounds = np.concatenate([lo, hi], axis=1).T  # (4, n): x0, y0, x1, y1
    extents = bounds[:, pending]
    while len(pending):
        # The greedy loop is sequential, but the IoUs it needs are not: take the next pending boxes
        # that cannot overlap one another enough to interact, and compute all their IoUs at once.
        count = _independent_prefix(extents[:, :_MAX_BLOCK], areas[pending[:_MAX_BLOCK]], lowest)
        rows, cols, iou = _pair_ious(count, pending, extents, quads, areas, lowest)
        starts = np.searchsorted(rows, np.arange(count + 1))
        changed = False
        for k in range(count):
            i = pending[k]
            others = pending[cols[starts[k] : starts[k + 1]]]
            row_iou = iou[starts[k] : starts[k + 1]]
            live = alive[others]
            others, row_iou = others[live], row_iou[live]
            over = row_iou > iou_threshold
            close = row_iou > neighbour_iou
            neighbours = others[close]
            if len(neighbours) >= min_neighbours:
                members = np.append(order[neighbours], order[i])
                weights = scores[members].reshape(-1, 1)
                keep.append(int(order[i]))
                merged_boxes.append((boxes[members] * weights).sum(axis=0) / weights.sum())
                if extra is not None:
                    merged_extra.append((extra[members] * weights).sum(axis=0) / weights.sum())
            else:
                over &= ~close  # dropped: its neighbours come back, what it merely suppressed does not
            if over.any():
                alive[others[over]] = False
                changed = True
        pending, extents = pending[count:], extents[:, count:]
        if changed:
            still = alive[pending]
            pending, extents = pending[still], extents[:, still]
    keep_arr = np.asarray(keep, dtype=np.int64)
    out_boxes = np.asarray(merged_boxes, dtype=np.float32).reshape(-1, 8)
    if extra is None:
        return keep_arr, out_boxes, None
    out_extra = np.asarray(merged_extra, dtype=extra.dtype).reshape(-1, extra.shape[1])
    return keep_arr, out_boxes, out_extra


def _independent_prefix(extents: np.ndarray, areas: np.ndarray, lowest: float) -> int:
    """Length of the longest prefix of boxes (bounding boxes ``extents`` (4, M), ``areas`` (M,)) in
    which no box can have IoU above ``lowest`` with an earlier one (the bound of :func:`_pair_ious`),
    so that none of them can suppress or merge another: they can be processed as one batch."""
    x0, y0, x1, y1 = extents
    overlap = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    overlap *= np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    bound = np.minimum(overlap, np.minimum(areas[:, None], areas[None]))
    reachable = bound > lowest * (areas[:, None] + areas[None] - bound) * (1 - 1e-9)
    conflict = np.triu(reachable, k=1).any(axis=0)  # box j interacts with some earlier box i < j
    return int(np.argmax(conflict)) if conflict.any() else len(areas)


def _pair_ious(
    count: int,
    pending: np.ndarray,
    extents: np.ndarray,
    quads: np.ndarray,
    areas: np.ndarray,
    lowest: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of each of the first ``count`` pending boxes (the heads) with the pending boxes after it.

    ``extents`` (4, P) holds the pending boxes' bounding boxes (x0, y0, x1, y1). Returns (row into the
    heads, column into pending, IoU), sorted by row then column, leaving out pairs whose bounding boxes
    are apart or whose IoU provably cannot exceed ``lowest``: IoU grows with the intersection, which
    is at most the bounding-box overlap (in the image's frame and in the head's own frame) and the
    smaller area, so this is exact.
    """
    x0, y0, x1, y1 = extents
    overlap_x = np.minimum(x1[:count, None], x1[None]) - np.maximum(x0[:count, None], x0[None])  # (H, P)
    candidate = overlap_x >= 0
    for k in range(count):
        candidate[k, : k + 1] = False  # only boxes after the head
    rows, cols = np.nonzero(candidate)
    overlap_y = np.minimum(y1[rows], y1[cols]) - np.maximum(y0[rows], y0[cols])
    touching = overlap_y >= 0
    rows, cols = rows[touching], cols[touching]
    heads, others = pending[rows], pending[cols]
    a_head, a_other = areas[heads], areas[others]
    bound = np.minimum(overlap_x[rows, cols] * overlap_y[touching], np.minimum(a_head, a_other))
    for tighter in (False, True):  # the cheap bound first, the rotated one on what is left
        if tighter:
            bound = np.minimum(bound, _frame_overlap(quads[heads], quads[others]))
        reachable = bound > lowest * (a_head + a_other - bound) * (1 - 1e-9)
        rows, cols, heads, others = rows[reachable], cols[reachable], heads[reachable], others[reachable]
        a_head, a_other, bound = a_head[reachable], a_other[reachable], bound[reachable]
    inter = np.zeros(len(rows))
    for start in range(0, len(rows), _PAIR_CHUNK):
        part = slice(start, start + _PAIR_CHUNK)
        inter[part] = clip_area(quads[others[part]], quads[heads[part]])
    union = a_head + a_other - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return rows, cols, iou


def _frame_overlap(heads: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Overlap area of the two polygons' bounding boxes in each head's own frame (its first edge and
    the perpendicular): an upper bound of their intersection that is tight for rotated rectangles."""
    edge = heads[:, 1] - heads[:, 0]
    length = np.hypot(edge[:, 0], edge[:, 1])
    u = edge / np.where(length > 0, length, 1.0)[:, None]
    u[length == 0] = (1.0, 0.0)
    bound = np.ones(len(heads))
    for axis in (u, np.stack([-u[:, 1], u[:, 0]], axis=1)):
        a = heads[..., 0] * axis[:, None, 0] + heads[..., 1] * axis[:, None, 1]
        b = others[..., 0] * axis[:, None, 0] + others[..., 1] * axis[:, None, 1]
        bound *= np.maximum(
            np.minimum(a.max(axis=1), b.max(axis=1)) - np.maximum(a.min(axis=1), b.min(axis=1)), 0
        )
    return bound


def _round_and_clip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = boxes.round()
    boxes[:, 0::2] = np.maximum(0, np.minimum(width - 1, boxes[:, 0::2]))
    boxes[:, 1::2] = np.maximum(0, np.minimum(height - 1, boxes[:, 1::2]))
    return boxes


# -- lexicon ---------------------------------------------------------------------------------------
class Lexicon:
    """A word list for snapping uncertain words (Prismer uses ICDAR 2015's ``GenericVocabulary.txt``).

    One word per line; lines starting with ``#`` are comments; surrounding whitespace is stripped.
    :meth:`match` returns the same word as a linear scan for the first minimum edit distance would,
    but only scores words whose length is within 2 of the query: nothing farther can be accepted.
    """

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)
        upper = [w.upper() for w in self.words]
        self._lengths = np.array([len(w) for w in upper], dtype=np.int64)
        width = max(int(self._lengths.max(initial=0)), 1)
        codes = np.full((len(upper), width), -1, dtype=np.int32)
        for row, word in enumerate(upper):
            codes[row, : len(word)] = [ord(c) for c in word]
        self._codes = codes
        self._index = {w: i for i, w in reversed(list(enumerate(upper)))}

    @classmethod
    def from_file(cls, path: str | Path) -> Lexicon:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls([line.strip() for line in lines if not line.startswith("#")])

    def match(self, text: str, max_distance: int = 2) -> tuple[int, str] | None:
        """``(distance, word)`` of the first nearest word, or None when none is within ``max_distance``."""
        query = text.upper()
        if query in self._index:
            return 0, text
        rows = np.flatnonzero(np.abs(self._lengths - len(query)) <= max_distance)
        if not len(rows):
            return None
        distances = _edit_distances(query, self._codes[rows], self._lengths[rows])
        best = int(np.argmin(distances))
        if distances[best] > max_distance:
            return None
        return int(distances[best]), self.words[rows[best]]


def _edit_distances(query: str, codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Levenshtein distance from ``query`` to every row of ``codes`` (padded with -1), vectorised."""
    width = int(lengths.max(initial=0))
    codes = codes[:, :width]
    prev = np.broadcast_to(np.arange(width + 1), (len(codes), width + 1)).copy()
    for i, char in enumerate(query, start=1):
        cur = np.empty_like(prev)
        cur[:, 0] = i
        substitute = prev[:, :-1] + (codes != ord(char))
        delete = prev[:, 1:] + 1
        best = np.minimum(substitute, delete)
        for j in range(1, width + 1):  # insertions depend on the cell to the left
            cur[:, j] = np.minimum(best[:, j - 1], cur[:, j - 1] + 1)
        prev = cur
    return prev[np.arange(len(codes)), lengths]


def _allowed_distance(word: str) -> int:
    return 0 if len(word) <= 2 else 1 if len(word) <= 5 else 2


# -- words -----------------------------------------------------------------------------------------
def _char_owners(word_boxes: np.ndarray, char_boxes: np.ndarray) -> np.ndarray:
    """For each character box, the index of the word polygon it overlaps most (IoU), or -1 for none.

    Bounding boxes that are strictly apart count as 0 without clipping, as in the original, and the
    IoUs are rounded to float32 as the original stores them, so the arg-max sees the same ties.
    """
    words = word_boxes.reshape(-1, 4, 2).astype(np.float64)
    chars = char_boxes.reshape(-1, 4, 2).astype(np.float64)
    w_lo, w_hi = words.min(axis=1), words.max(axis=1)
    w_area = polygon_areas(words)
    owners = np.full(len(chars), -1, dtype=np.int64)
    step = max(1, _PAIR_CHUNK // max(len(words), 1))  # characters per chunk: bounded (C, W) matrices
    for start in range(0, len(chars), step):
        part = chars[start : start + step]
        c_lo, c_hi = part.min(axis=1), part.max(axis=1)
        contact = (
            (c_lo[:, None, 0] <= w_hi[None, :, 0])
            & (c_hi[:, None, 0] >= w_lo[None, :, 0])
            & (c_lo[:, None, 1] <= w_hi[None, :, 1])
            & (c_hi[:, None, 1] >= w_lo[None, :, 1])
        )
        c, w = np.nonzero(contact)
        # The character box is the convex clip polygon; the word polygon may be any simple polygon.
        inter = clip_area(words[w], part[c])
        union = polygon_areas(part)[c] + w_area[w] - inter
        scores = np.zeros(contact.shape, dtype=np.float32)
        scores[c, w] = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
        best = scores.argmax(axis=1)
        owners[start : start + step] = np.where(scores[np.arange(len(part)), best] > 0, best, -1)
    return owners


def read_words(
    word_boxes: np.ndarray,
    word_scores: np.ndarray,
    char_boxes: np.ndarray,
    char_probs: np.ndarray,
    charset: str = CHARSET,
) -> list[WordInstance]:
    """Give each character to its best-overlapping word and read each word's characters left to right."""
    if not len(word_boxes) or not len(char_boxes):
        return []
    owners = _char_owners(word_boxes, char_boxes)
    words = []
    for w in range(len(word_boxes)):
        members = np.flatnonzero(owners == w)
        if not len(members):
            continue
        # Order along x of the character centres, relative to the word's first corner (float32).
        centres = (char_boxes[members].reshape(-1, 4, 2) - word_boxes[w, 0:2]).mean(axis=1)
        order = np.argsort(centres.dot(np.array([1, 0], dtype=np.float32)))
        probs = char_probs[members][order]
        best = probs.argmax(axis=1)
        text = "".join(charset[k] for k in best)
        text_score = float(probs[np.arange(len(best)), best].astype(np.float32).mean())
        words.append(WordInstance(word_boxes[w], float(word_scores[w]), text, text_score))
    return words


def filter_words(
    words: Sequence[WordInstance], lexicon: Lexicon | None, config: PostprocessConfig
) -> list[WordInstance]:
    """Prismer's confidence filter and lexicon correction (module doc, step 5)."""
    kept = []
    for word in words:
        # Compared in float32, as the original compares its float32 score with the constants.
        score = np.float32(word.text_score)
        if score < np.float32(config.min_text_score):
            continue
        confident = score >= np.float32(config.keep_score) or (
            not word.text.isalpha() and score >= np.float32(config.keep_non_alpha_score)
        )
        if confident:
            kept.append(word)
        elif lexicon is not None:
            found = lexicon.match(word.text)
            if found is not None and found[0] <= _allowed_distance(found[1]):
                word.text = found[1]
                kept.append(word)
    return kept


def decode_words(
    maps: Mapping[str, np.ndarray],
    width: int,
    height: int,
    input_size: tuple[int, int] = (480, 480),
    *,
    config: PostprocessConfig = PostprocessConfig(),
    charset: str = CHARSET,
    lexicon: Lexicon | None = None,
) -> list[WordInstance]:
    """One image's network outputs (C×h×w float32 maps, batch axis removed) → filtered words.

    ``width``/``height`` are the image's size; ``input_size`` (H, W) is what the network saw.
    """
    word_fg, word_tblr, word_orient, char_fg, char_tblr, char_cls = (
        np.asarray(maps[k], dtype=np.float32) for k in _MAP_NAMES
    )
    word_fg, char_fg, word_orient = word_fg[1], char_fg[1], word_orient[0]
    scale_w, scale_h = width / input_size[1], height / input_size[0]

    ys, xs = np.nonzero(word_fg > config.word_min_score)
    boxes = rotated_boxes(
        xs, ys, word_tblr[:, ys, xs], word_orient[ys, xs], scale_w, scale_h, config.word_stride
    )
    scores = word_fg[ys, xs]
    keep, word_boxes, _ = nms_quads(
        boxes,
        scores,
        config.word_nms_iou,
        neighbour_iou=config.neighbour_iou,
        min_neighbours=config.min_neighbours,
    )
    word_boxes, word_scores = _round_and_clip(word_boxes, width, height), scores[keep]

    # Characters are only looked for inside word foreground.
    ys, xs = np.nonzero((word_fg > config.word_min_score) & (char_fg > config.char_min_score))
    boxes = rotated_boxes(xs, ys, char_tblr[:, ys, xs], None, scale_w, scale_h, config.char_stride)
    _, char_boxes, char_probs = nms_quads(
        boxes,
        char_fg[ys, xs],
        config.char_nms_iou,
        neighbour_iou=config.neighbour_iou,
        min_neighbours=config.min_neighbours,
        extra=np.ascontiguousarray(char_cls[:, ys, xs].T),
    )
    if char_probs is None:  # nms_quads merges ``extra`` whenever it is given
        raise RuntimeError("character NMS returned no class probabilities")
    char_boxes = _round_and_clip(char_boxes, width, height)
    words = read_words(word_boxes, word_scores, char_boxes, char_probs, charset)
    return filter_words(words, lexicon, config)


def word_label(
    words: Sequence[WordInstance], width: int, height: int, max_words: int = MAX_WORDS
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Prismer's ``get_label``: an H×W uint8 word-index map (255 background) and its json list.

    Words are filled in reverse order, so word 0 of ``words`` gets the highest index and is drawn last.
    Beyond ``max_words`` the lowest-ranked words are dropped (the original had no guard).
    """
    if len(words) > max_words:
        logger.warning("%d words in one image; keeping the first %d", len(words), max_words)
        words = words[:max_words]
    label = np.full((height, width), BACKGROUND, dtype=np.uint8)
    entries = []
    for index, word in enumerate(reversed(words)):
        corners = word.box.reshape(-1, 2).astype(np.int32)
        cv2.fillPoly(label, [corners], index)
        entries.append(
            {
                "instance": index,
                "text": word.text.lower(),
                "score": round(float(word.text_score), 6),
                "polygon": corners.tolist(),
            }
        )
    return label, entries
