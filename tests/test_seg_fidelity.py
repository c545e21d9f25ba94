"""Fidelity of ``seg_coco:mask2former``'s semantic head (expert_zoo/segmentation.py).

Prismer's ``generate_segmentation.py`` runs detectron2's Mask2Former with panoptic and instance inference
off, so the label is detectron2's ``semantic_inference`` (softmax over the C+1 classes, the last column,
"no object", dropped; sigmoid masks; ``einsum("qc,qhw->chw")``) computed at the padded input size, then
``sem_seg_postprocess`` (crop the padding, bilinear to the image size), then argmax. This file checks our
head three ways:

* against a restatement of that detectron2 path on hand-made logits where "no object" dominates, as it
  does for most queries of a trained model (a head that keeps the no-object column reads it as class 132
  everywhere; one that drops class 0 shifts every label by one);
* against transformers' ``Mask2FormerImageProcessorPil.post_process_semantic_segmentation`` on the outputs
  of a tiny Mask2Former built in code (its masks are first resized to 384², so our head is asked for the
  same geometry);
* end to end through the expert on an image (preprocess, padding, which logits, crop, resize).

It also checks the label values: value ``l`` is detectron2's contiguous COCO-panoptic id ``l`` (the
index into the model's 133 class logits and HF's ``id2label``), and the name Prismer attaches to row ``l``
of ``coco_features.pt`` is detectron2's name for that id, reworded.
"""

from __future__ import annotations

import copy
import json
import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_data import reference_dir
from tiny_experts import tiny_mask2former

from expert_zoo.segmentation import (
    NUM_CLASSES,
    Mask2FormerCOCO,
    check_label_space,
    class_names,
    padded_shape,
    preprocess,
    resize_argmax,
    semantic_scores,
)

NO_OBJECT = NUM_CLASSES  # the extra, last column of the class logits


def detectron2_semantic_labels(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    padded: tuple[int, int],
    valid: tuple[int, int],
    size: tuple[int, int],
) -> torch.Tensor:
    """detectron2 Mask2Former's semantic path, restated: upsample the mask logits to the padded input,
    ``semantic_inference``, then ``sem_seg_postprocess`` (crop, bilinear to ``size``), then argmax."""
    masks = F.interpolate(mask_logits[None].double(), size=padded, mode="bilinear", align_corners=False)[0]
    class_probs = F.softmax(class_logits.double(), dim=-1)[:, :-1]
    semseg = torch.einsum("qc,qhw->chw", class_probs, masks.sigmoid())
    semseg = semseg[:, : valid[0], : valid[1]]
    semseg = F.interpolate(semseg[None], size=size, mode="bilinear", align_corners=False)[0]
    return semseg.argmax(0)


def our_labels(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    padded: tuple[int, int],
    valid: tuple[int, int],
    size: tuple[int, int],
) -> torch.Tensor:
    return resize_argmax(semantic_scores(class_logits, mask_logits, padded, valid), size).long()


# --------------------------------------------------------------------------------------------------
# hand-made logits: "no object" dominates every query


def _hand_made_logits() -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    """4 queries, each with one real class and a rectangular mask on a 12×16 grid (padded 48×64).

    Every query gives "no object" logit 9 and its real class about 4 (distinct values, so that no two
    classes tie on a quadrant boundary), so after the softmax "no object" holds ~97 % of each query's
    mass: reading that column as a class makes it win everywhere. The real classes are 0 and 132 (the
    two ends a wrong slice loses), 57 and 80 (the first stuff class).
    """
    classes = {0: 0, 1: 132, 2: 57, 3: 80}
    class_logits = torch.zeros(4, NUM_CLASSES + 1)
    class_logits[:, NO_OBJECT] = 9.0
    for query, cls in classes.items():
        class_logits[query, cls] = 4.0 + 0.1 * query
    mask_logits = torch.full((4, 12, 16), -8.0)
    mask_logits[0, 0:6, 0:8] = 8.0
    mask_logits[1, 0:6, 8:16] = 8.0
    mask_logits[2, 6:12, 0:8] = 8.0
    mask_logits[3, 6:12, 8:16] = 8.0
    return class_logits, mask_logits, classes


def test_no_object_column_dominates_in_the_hand_made_logits():
    class_logits, _, _ = _hand_made_logits()
    probs = class_logits.softmax(-1)
    assert (probs[:, NO_OBJECT] > 0.95).all()


@pytest.mark.parametrize(
    ("padded", "valid", "size"),
    [((48, 64), (48, 64), (48, 64)), ((48, 64), (40, 60), (83, 117)), ((48, 64), (45, 64), (20, 31))],
)
def test_head_matches_detectron2_semantic_inference_when_no_object_dominates(padded, valid, size):
    class_logits, mask_logits, _ = _hand_made_logits()
    expected = detectron2_semantic_labels(class_logits, mask_logits, padded, valid, size)
    ours = our_labels(class_logits, mask_logits, padded, valid, size)
    assert ours.shape == size
    mismatch = (ours != expected).float().mean().item()
    assert mismatch == 0.0, f"{mismatch:.1%} of pixels differ from detectron2's semantic_inference"


def test_hand_made_quadrants_get_their_query_class():
    """Each quadrant's label is its query's real class, 0 and 132 included, never 'no object'."""
    class_logits, mask_logits, classes = _hand_made_logits()
    labels = our_labels(class_logits, mask_logits, (48, 64), (48, 64), (48, 64))
    quadrants = {
        0: labels[2:22, 2:30],
        1: labels[2:22, 34:62],
        2: labels[26:46, 2:30],
        3: labels[26:46, 34:62],
    }
    for query, patch in quadrants.items():
        assert set(patch.unique().tolist()) == {classes[query]}, (query, patch.unique().tolist())


def test_scores_are_the_softmax_without_no_object_times_sigmoid_masks():
    class_logits, mask_logits, _ = _hand_made_logits()
    scores = semantic_scores(class_logits, mask_logits, (12, 16), (12, 16))  # no resize: plain einsum
    assert scores.shape == (12, 16, NUM_CLASSES)
    expected = torch.einsum(
        "qc,qhw->hwc", class_logits.double().softmax(-1)[:, :NUM_CLASSES], mask_logits.double().sigmoid()
    )
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# a tiny Mask2Former built in code, against transformers' post-processing


def _confident_tiny_model(no_object_bias: float = 0.0):
    """The tiny Mask2Former made confident like a trained one: sharper masks and class logits, so that
    its label maps hold several classes (at random init every query predicts ~0.5 everywhere)."""
    model = tiny_mask2former(NUM_CLASSES)
    generator = torch.Generator().manual_seed(0)
    mask_head = model.model.transformer_module.decoder.mask_predictor.mask_embedder
    with torch.no_grad():
        [p for n, p in mask_head.named_parameters() if n.endswith("weight")][-1].mul_(200.0)
        model.class_predictor.weight.normal_(0.0, 1.0, generator=generator)
        model.class_predictor.bias[NO_OBJECT] += no_object_bias
    return model.eval()


@pytest.fixture(scope="module")
def tiny_outputs():
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return _confident_tiny_model()(pixel_values=pixels)


@pytest.mark.parametrize("no_object_dominates", [False, True])
def test_head_matches_transformers_post_processing(tiny_outputs, no_object_dominates):
    from transformers.models.mask2former.image_processing_pil_mask2former import (
        Mask2FormerImageProcessorPil,
    )

    out = copy.copy(tiny_outputs)
    if no_object_dominates:  # every query: "no object" 5 above its best real class, most of its mass
        logits = out.class_queries_logits.clone()
        logits[..., NO_OBJECT] = logits[..., :NO_OBJECT].max(-1).values + 5.0
        out.class_queries_logits = logits
        assert (logits.softmax(-1)[..., NO_OBJECT] > 0.8).all()
    sizes = [(50, 70), (97, 61)]
    expected = Mask2FormerImageProcessorPil().post_process_semantic_segmentation(out, target_sizes=sizes)
    for i, size in enumerate(sizes):
        # transformers resizes the mask logits to 384² (its preprocessed size), with no padding to crop.
        ours = our_labels(
            out.class_queries_logits[i], out.masks_queries_logits[i], (384, 384), (384, 384), size
        )
        _assert_same_labels(ours, expected[i].long(), out, i, size)


def _assert_same_labels(ours: torch.Tensor, expected: torch.Tensor, out, index: int, size) -> None:
    """Equal labels, except where the two best scores tie within float32 rounding (summation order)."""
    classes = out.class_queries_logits[index].softmax(-1)[:, :-1]
    masks = F.interpolate(out.masks_queries_logits[index][None], size=(384, 384), mode="bilinear")[
        0
    ].sigmoid()
    scores = F.interpolate(torch.einsum("qc,qhw->chw", classes, masks)[None], size=size, mode="bilinear")[0]
    top2 = scores.topk(2, dim=0).values
    near_tie = (top2[0] - top2[1]) < 1e-5
    differ = ours != expected
    assert not (differ & ~near_tie).any(), (
        f"{int((differ & ~near_tie).sum())} pixels differ from transformers"
    )
    assert differ.float().mean() < 0.01
    assert len(expected.unique()) > 1, "a one-class map would not test the class index"


# --------------------------------------------------------------------------------------------------
# the expert end to end, against the detectron2 path on its own preprocessed input


def test_expert_labels_match_detectron2_path(tmp_path):
    model = _confident_tiny_model(no_object_bias=8.0)
    model.save_pretrained(tmp_path)
    expert = Mask2FormerCOCO({"weights": str(tmp_path), "batch_size": 2})
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(37, 83), (120, 45)]]
    labels = expert(images)
    for image, label in zip(images, labels):
        tensor = preprocess(image)
        padded = padded_shape(tuple(tensor.shape[1:]))
        batch = torch.zeros(1, 3, *padded)
        batch[0, :, : tensor.shape[1], : tensor.shape[2]] = tensor
        with torch.no_grad():
            out = expert.model(pixel_values=batch)
        expected = detectron2_semantic_labels(
            out.class_queries_logits[0],
            out.masks_queries_logits[0],
            padded,
            tuple(tensor.shape[1:]),
            image.shape[:2],
        )
        np.testing.assert_array_equal(label.map, expected.numpy().astype(np.uint8))
        assert len(np.unique(label.map)) > 1


# --------------------------------------------------------------------------------------------------
# label values ↔ class names

# detectron2's COCO-panoptic categories in contiguous-id order (= HF id2label of the converted models):
# 80 things, then 53 stuff classes. Restated here to check Prismer's rewording id by id.
DETECTRON2_STUFF = (
    "banner blanket bridge cardboard counter curtain door-stuff floor-wood flower fruit gravel house light "
    "mirror-stuff net pillow platform playingfield railroad river road roof sand sea shelf snow stairs tent "
    "towel wall-brick wall-stone wall-tile wall-wood water-other window-blind window-other tree-merged "
    "fence-merged ceiling-merged sky-other-merged cabinet-merged table-merged floor-other-merged "
    "pavement-merged mountain-merged grass-merged dirt-merged paper-merged food-other-merged "
    "building-other-merged rock-merged wall-other-merged rug-merged"
).split()


def _prismer_wording(detectron2_name: str) -> str:
    """How Prismer's ``coco_features.pt['labels']`` words a detectron2 stuff name (observed rule)."""
    name = detectron2_name.removesuffix("-merged")
    if name in ("floor-other", "wall-other"):
        return f"other type of {name.split('-')[0]}"
    name = re.sub(r"-(stuff|wood|other)$", "", name)
    return {"playingfield": "playing field"}.get(name, name)


def test_label_value_is_the_detectron2_contiguous_id():
    names = class_names()
    assert len(DETECTRON2_STUFF) == NUM_CLASSES - 80
    assert [_prismer_wording(n) for n in DETECTRON2_STUFF] == names[80:]
    assert names[:3] == ["person", "bicycle", "car"] and names[79] == "toothbrush"


def test_a_detectron2_ordered_model_is_accepted_silently(caplog):
    id2label = dict(enumerate(class_names()[:80] + DETECTRON2_STUFF))
    with caplog.at_level(logging.WARNING, logger="expert_zoo.segmentation"):
        check_label_space(id2label, NUM_CLASSES)
    assert not caplog.records
    shifted = dict(enumerate(DETECTRON2_STUFF[:1] + class_names()[:80] + DETECTRON2_STUFF[1:]))
    with pytest.raises(ValueError, match="COCO-panoptic order"):
        check_label_space(shifted, NUM_CLASSES)


def test_names_equal_prismers_coco_features_labels():
    """Row ``l`` of Prismer's ``coco_features.pt`` (the embedding of label value ``l``) names class ``l``."""
    reference = json.loads((reference_dir("labelmaps") / "coco_panoptic_133_names.json").read_text())
    assert class_names() == reference
