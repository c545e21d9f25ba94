"""seg_coco:mask2former and obj_detection:owlv2 on tiny models built here, plus the instance-map rule.

The tiny models are saved with ``save_pretrained`` to a tmp dir and loaded through the expert's real
weight-resolution path (``config["weights"]`` = that dir). Nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_experts import save_tiny_owlv2
from tiny_experts import tiny_mask2former as _tiny_mask2former

from expert_zoo.base import Label
from expert_zoo.instance_map import BACKGROUND, beat_matrix, depth_ordered_instance_map, rasterize_boxes

IMAGE_SIZES = [(37, 83), (120, 45)]  # non-square, one landscape, one portrait


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]


# --------------------------------------------------------------------------------------------------
# instance map: hand-made boxes and depth maps


def _flat_depth(h: int = 20, w: int = 30, value: int = 100) -> np.ndarray:
    return np.full((h, w), value, dtype=np.uint8)


def test_empty_gives_background_and_no_records():
    instance_map, records = depth_ordered_instance_map(np.zeros((0, 4)), [], [], _flat_depth())
    assert instance_map.shape == (20, 30) and instance_map.dtype == np.uint8
    assert (instance_map == BACKGROUND).all() and records == []


def test_single_box_is_truncated_and_recorded():
    box = [1.7, 2.2, 5.9, 6.99]
    instance_map, records = depth_ordered_instance_map(np.array([box]), [7], [0.8], _flat_depth())
    expected = np.full((20, 30), BACKGROUND, np.uint8)
    expected[2:6, 1:5] = 0  # int() truncation of both corners, half-open
    np.testing.assert_array_equal(instance_map, expected)
    assert records == [{"instance": 0, "class_id": 7, "score": 0.8, "box": [1.7, 2.2, 5.9, 6.99]}]


def test_ids_follow_descending_score_and_boxes_are_clipped():
    boxes = np.array([[0, 0, 5, 5], [10, 10, 40, 40], [-3, 12, 4, 18]], dtype=float)
    instance_map, records = depth_ordered_instance_map(boxes, [1, 2, 3], [0.2, 0.9, 0.5], _flat_depth())
    assert [r["class_id"] for r in records] == [2, 3, 1]
    assert (instance_map[10:20, 10:30] == 0).all()  # clipped to the 20×30 image
    assert (instance_map[12:18, 0:4] == 1).all() and (instance_map[0:5, 0:5] == 2).all()


def test_nested_box_is_in_front_whatever_the_depth():
    depth = _flat_depth()
    depth[0:20, 0:30] = 200
    depth[5:10, 5:10] = 0  # the inner box is far away on average, still it is in front
    outer, inner = [0, 0, 30, 20], [5, 5, 10, 10]
    for scores in ([0.9, 0.5], [0.5, 0.9]):
        instance_map, records = depth_ordered_instance_map(
            np.array([outer, inner], float), [0, 1], scores, depth
        )
        inner_id = next(r["instance"] for r in records if r["class_id"] == 1)
        outer_id = 1 - inner_id
        assert (instance_map[5:10, 5:10] == inner_id).all()
        assert (instance_map == outer_id).sum() == 30 * 20 - 25


@pytest.mark.parametrize("near", ["left", "right"])
def test_overlap_goes_to_the_nearer_box(near):
    depth = _flat_depth(value=50)
    left, right = [0, 0, 15, 20], [10, 0, 30, 20]
    if near == "left":
        depth[:, 0:10] = 250
    else:
        depth[:, 15:30] = 250
    instance_map, records = depth_ordered_instance_map(
        np.array([left, right], float), [0, 1], [0.9, 0.8], depth
    )
    assert [r["class_id"] for r in records] == [0, 1]  # left = 0, right = 1
    overlap = instance_map[:, 10:15]
    assert (overlap == (0 if near == "left" else 1)).all()
    assert (instance_map[:, 0:10] == 0).all() and (instance_map[:, 15:30] == 1).all()


def test_equal_mean_depth_later_id_wins():
    instance_map, _ = depth_ordered_instance_map(
        np.array([[0, 0, 15, 20], [10, 0, 25, 20]], float), [0, 1], [0.9, 0.8], _flat_depth()
    )
    assert (instance_map[:, 10:15] == 1).all()


def test_iou_duplicates_are_dropped_keeping_the_higher_score():
    base = [0, 0, 20, 20]
    near_copy = [0, 0, 20, 19]  # IoU 0.95 exactly: kept (Prismer drops only > 0.95)
    dup = [0, 0, 20, 19.99]  # rasterises to the same as near_copy
    boxes = np.array([base, [0, 0, 20, 20.5], near_copy], float)
    _, records = depth_ordered_instance_map(boxes, [0, 1, 2], [0.5, 0.9, 0.4], _flat_depth(30, 30))
    assert [r["class_id"] for r in records] == [1, 2]  # base equals box 1 after truncation: IoU 1
    _, records = depth_ordered_instance_map(
        np.array([base, dup], float), [0, 1], [0.9, 0.8], _flat_depth(30, 30)
    )
    assert len(records) == 2
    _, records = depth_ordered_instance_map(
        np.array([base, [0, 0, 20, 19.5]], float), [0, 1], [0.9, 0.8], _flat_depth(30, 30), dedup_iou=0.9
    )
    assert len(records) == 1


def test_at_most_254_instances_highest_scores_kept():
    n = 300
    boxes = np.array([[i, 0, i + 1, 1] for i in range(n)], float)  # disjoint 1-pixel boxes
    scores = np.linspace(0.1, 0.9, n)
    instance_map, records = depth_ordered_instance_map(boxes, np.arange(n), scores, _flat_depth(1, n))
    assert len(records) == 254 and [r["instance"] for r in records] == list(range(254))
    assert records[0]["class_id"] == n - 1 and records[-1]["class_id"] == n - 254
    assert (instance_map[0, : n - 254] == BACKGROUND).all()  # the lowest scores are dropped
    assert set(np.unique(instance_map)) == set(range(254)) | {BACKGROUND}


def test_empty_rasters_are_dropped():
    _, records = depth_ordered_instance_map(
        np.array([[3.2, 3.0, 3.9, 9.0]], float), [1], [0.9], _flat_depth()
    )
    assert records == []


def _pixel_reference(boxes: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """The module's rule, pixel by pixel from binary masks (boxes already sorted and de-duplicated)."""
    h, w = depth.shape
    rects = rasterize_boxes(boxes, h, w)
    masks = np.zeros((len(rects), h, w), bool)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = True
    means = [depth[m].mean() for m in masks]
    n = len(rects)
    beats = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(i + 1, n):
            both = masks[i] & masks[j]
            if not both.any():
                continue
            if (both == masks[i]).all():
                beats[i, j] = True
            elif (both == masks[j]).all():
                beats[j, i] = True
            elif means[i] > means[j]:
                beats[i, j] = True
            elif means[j] > means[i]:
                beats[j, i] = True
    out = np.full((h, w), BACKGROUND, np.uint8)
    for y in range(h):
        for x in range(w):
            cover = [i for i in range(n) if masks[i, y, x]]
            alive = [i for i in cover if not any(beats[j, i] for j in cover)]
            if alive or cover:
                out[y, x] = max(alive or cover)
    return out


def _prismer_two_box_reference(boxes: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Prismer's procedure for exactly two boxes: masks, one pairwise decision, paint in id order."""
    h, w = depth.shape
    rects = rasterize_boxes(boxes, h, w)
    masks = np.zeros((2, h, w), np.float64)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = 1
    final = masks.copy()
    both = (masks[0] + masks[1]) == 2
    if both.any():
        if (both == masks[0].astype(bool)).all():
            final[1] -= final[0]
        elif (both == masks[1].astype(bool)).all():
            final[0] -= final[1]
        else:
            m0 = (depth * masks[0]).sum() / masks[0].sum()
            m1 = (depth * masks[1]).sum() / masks[1].sum()
            if m0 > m1:
                final[1] -= both
            if m0 < m1:
                final[0] -= both
    out = np.full((h, w), BACKGROUND, np.uint8)
    for i in range(2):
        out[final[i] > 0] = i
    return out


def _random_case(rng: np.random.Generator, n: int, h: int = 24, w: int = 32):
    x0 = rng.uniform(-2, w - 2, n)
    y0 = rng.uniform(-2, h - 2, n)
    boxes = np.stack([x0, y0, x0 + rng.uniform(1, 16, n), y0 + rng.uniform(1, 14, n)], axis=1)
    if n > 2:  # some nesting
        boxes[1] = boxes[0] + np.array([1, 1, -1, -1]) * rng.uniform(0, 2)
    depth = rng.integers(0, 256, (h, w), dtype=np.uint8)
    return boxes, depth


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_map_matches_pixel_reference(seed):
    rng = np.random.default_rng(seed)
    boxes, depth = _random_case(rng, 7)
    scores = np.linspace(0.9, 0.3, len(boxes))  # already in id order
    instance_map, records = depth_ordered_instance_map(
        boxes, np.arange(len(boxes)), scores, depth, dedup_iou=1.0
    )
    kept = np.array([r["class_id"] for r in records])
    np.testing.assert_array_equal(instance_map, _pixel_reference(boxes[kept], depth))


@pytest.mark.parametrize("seed", range(10))
def test_two_boxes_match_prismers_procedure(seed):
    rng = np.random.default_rng(100 + seed)
    boxes, depth = _random_case(rng, 2)
    if seed % 3 == 0:  # force nesting either way
        boxes[seed % 2] = boxes[1 - seed % 2] + np.array([1, 1, -1, -1])
    instance_map, records = depth_ordered_instance_map(boxes, [0, 1], [0.9, 0.8], depth, dedup_iou=1.0)
    if len(records) == 2:
        np.testing.assert_array_equal(instance_map, _prismer_two_box_reference(boxes, depth))


def test_beat_matrix_nesting_and_depth():
    rects = np.array([[0, 0, 10, 10], [2, 2, 4, 4], [8, 0, 14, 10]])
    depth = np.zeros((10, 14), np.uint8)
    depth[:, 10:] = 255  # box 2 is nearer than box 0 on average
    beats = beat_matrix(rects, depth)
    assert beats[1, 0] and not beats[0, 1]  # nested in front
    assert beats[2, 0] and not beats[0, 2]  # nearer
    assert not beats[1, 2] and not beats[2, 1]  # no overlap


# --------------------------------------------------------------------------------------------------
# seg_coco:mask2former


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m2f")
    _tiny_mask2former(133).save_pretrained(path)
    return path


def test_prismer_resize_shape_follows_torchvision_rule():
    from expert_zoo.segmentation import prismer_resize_shape

    assert prismer_resize_shape(480, 640) == (360, 480)
    assert prismer_resize_shape(640, 480) == (480, 360)
    assert prismer_resize_shape(500, 500) == (479, 479)  # the short side 479 fits under 480
    assert prismer_resize_shape(480, 481) == (479, 479)  # int() truncation, as torchvision
    assert prismer_resize_shape(480, 482) == (479, 480)
    assert prismer_resize_shape(37, 83) == (int(480 * 479 / int(479 * 83 / 37)), 480)


@pytest.mark.parametrize("blocky", [False, True])
def test_resize_argmax_matches_interpolate(blocky):
    from expert_zoo.segmentation import resize_argmax

    scores = torch.rand(5, 7, 9, generator=torch.Generator().manual_seed(0))
    if blocky:  # large uniform regions: most output pixels take the shortcut
        scores = scores[:, :3, :3].repeat_interleave(3, 1).repeat_interleave(3, 2)[:, :7, :9]
    for size in [(7, 9), (20, 13), (3, 30), (41, 57)]:
        expected = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
        torch.testing.assert_close(
            resize_argmax(scores.permute(1, 2, 0).contiguous(), size, max_elements=50).long(),
            expected,
            rtol=0,
            atol=0,
        )


def test_preprocess_normalises_and_optionally_swaps_channels():
    from expert_zoo.segmentation import preprocess

    image = _images()[0]
    rgb, bgr = preprocess(image), preprocess(image, bgr=True)
    assert rgb.shape == (3, 214, 480) and rgb.dtype == torch.float32
    torch.testing.assert_close(bgr, preprocess(np.ascontiguousarray(image[..., ::-1])))
    grey = preprocess(np.full((10, 20, 3), [124, 116, 104], np.uint8))  # ≈ the ImageNet mean → ≈ 0
    assert grey.abs().max() < 0.01


def test_label_space_check():
    from expert_zoo.segmentation import check_label_space, class_names

    names = class_names()
    assert len(names) == 133 and names[0] == "person" and names[132] == "rug"
    check_label_space({i: f"LABEL_{i}" for i in range(133)}, 133)
    check_label_space(dict(enumerate(names)), 133)
    with pytest.raises(ValueError, match="133 classes"):
        check_label_space(None, 150)
    with pytest.raises(ValueError, match="COCO-panoptic order"):
        check_label_space(dict(enumerate(reversed(names))), 133)


def test_mask2former_expert_labels_images(mask2former_dir):
    from expert_zoo.registry import build_expert

    expert = build_expert("seg_coco:mask2former", options={"weights": str(mask2former_dir), "batch_size": 1})
    assert len(expert.weights_digest) == 64
    images = _images()
    labels = expert(images)
    for image, label in zip(images, labels):
        assert label.map.shape == image.shape[:2] and label.map.dtype == np.uint8
        assert label.map.max() <= 132
    # Another order and batch size (images of another padded shape are never batched together).
    expert.config["batch_size"] = 4
    again = expert([images[1], images[0]])
    np.testing.assert_array_equal(again[1].map, labels[0].map)
    np.testing.assert_array_equal(again[0].map, labels[1].map)
    assert set(expert.encode(labels[0])) == {"png"}


def test_mask2former_rejects_other_label_spaces(tmp_path):
    from expert_zoo.segmentation import Mask2FormerCOCO
    from label_pipeline.core.weights import WeightsUnreadable

    _tiny_mask2former(150).save_pretrained(tmp_path)
    with pytest.raises(WeightsUnreadable, match="133 classes"):  # one line naming the expert and the dir
        Mask2FormerCOCO({"weights": str(tmp_path)})


# --------------------------------------------------------------------------------------------------
# obj_detection:owlv2


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory):
    # Patch-sized boxes on the patch grid (the last box layer zeroed); see tiny_experts.save_tiny_owlv2.
    return save_tiny_owlv2(tmp_path_factory.mktemp("owlv2"))


def test_query_prompts_split_synonyms():
    from expert_zoo.detection import class_names, query_prompts

    names = class_names()
    assert len(names) == 722 and len(set(names)) == 677
    prompts, owners = query_prompts(["footwear, sneakers", "cup"], "a photo of a {}", True)
    assert prompts == ["a photo of a footwear", "a photo of a sneakers", "a photo of a cup"]
    assert owners == [0, 0, 1]
    assert query_prompts(["footwear, sneakers"], "{}", False) == (["footwear, sneakers"], [0])


def test_boxes_to_pixels_uses_the_padded_square():
    from expert_zoo.detection import boxes_to_pixels

    # A 50×100 image is padded to 100×100: normalised coordinates scale by 100 on both axes.
    out = boxes_to_pixels(np.array([[0.5, 0.25, 0.2, 0.1], [0.5, 0.5, 0.4, 0.4]]), 50, 100)
    np.testing.assert_allclose(out, [[40, 20, 60, 30], [30, 30, 70, 50]])  # second clipped to y ≤ 50


def test_nms_is_class_agnostic_and_greedy():
    from expert_zoo.detection import nms

    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 9]], float)
    keep = nms(boxes, np.array([0.5, 0.9, 0.4, 0.3]), 0.5)
    assert keep.tolist() == [1, 2]


def test_owlv2_expert_labels_images(owlv2_dir):
    from expert_zoo.registry import build_expert

    expert = build_expert("obj_detection:owlv2", options={"weights": str(owlv2_dir), "threshold": 0.0})
    assert tuple(expert.query_embeds.shape) == (722, 32)
    images = _images(1)
    depths = [
        Label(map=np.tile(np.linspace(0, 255, im.shape[1]).astype(np.uint8), (im.shape[0], 1)))
        for im in images
    ]
    labels = expert(images, {"depth": depths})
    for image, label in zip(images, labels):
        assert label.map.shape == image.shape[:2] and label.map.dtype == np.uint8
        assert label.data, "threshold 0 must keep boxes"
        assert [r["instance"] for r in label.data] == list(range(len(label.data)))
        for record in label.data:
            assert set(record) == {"instance", "class_id", "score", "box"}
            assert 0 <= record["class_id"] < 722 and 0.0 <= record["score"] <= 1.0
            x0, y0, x1, y1 = record["box"]
            assert 0 <= x0 <= x1 <= image.shape[1] and 0 <= y0 <= y1 <= image.shape[0]
        present = set(np.unique(label.map)) - {BACKGROUND}
        assert present <= {r["instance"] for r in label.data}
        members = expert.encode(label)
        assert set(members) == {"png", "json"} and isinstance(json.loads(members["json"]), list)
    # Same images, other batching → same labels (the text embeddings are cached, not recomputed).
    single = expert([images[1]], {"depth": [depths[1]]})[0]
    np.testing.assert_array_equal(single.map, labels[1].map)
    assert single.data == labels[1].data


def test_owlv2_high_threshold_writes_empty_labels(owlv2_dir):
    from expert_zoo.detection import OWLv2Detection

    expert = OWLv2Detection({"weights": str(owlv2_dir), "threshold": 1.01})
    images = _images(2)
    labels = expert(images, {"depth": [Label(map=np.zeros(im.shape[:2], np.uint8)) for im in images]})
    for label in labels:
        assert (label.map == BACKGROUND).all() and label.data == []
    with pytest.raises(ValueError, match="depth"):
        expert(images)
