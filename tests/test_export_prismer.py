"""``label-pipeline export-prismer``: our label output → Prismer's folders, read back by Prismer's reader.

One run labels 4 images (2 shards) with ``edge:canny`` and the tiny experts of ``tiny_experts`` (depth,
normal, seg_coco, obj_detection, and CharNet for OCR, blinded on portrait images so that one image has
no words), plus a synthetic ``ocr_features`` stage (deterministic float16 rows, distinct per word); one
image carries an EXIF rotation. The export is then read with a restatement of Prismer's
``dataset/utils.py:get_expert_labels`` and the look-ups of its ``post_label_process``.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from builders import gradient, image_bytes, write_manifest, write_wds
from PIL import Image
from tiny_experts import tiny_depth, tiny_detection, tiny_normal, tiny_ocr, tiny_segmentation

from expert_zoo.base import NPY_MODE, Expert, ExpertSpec, Label
from expert_zoo.ocr import CharNetOCR
from expert_zoo.registry import register
from label_pipeline.cli import main
from label_pipeline.core.decode import decode_image
from label_pipeline.core.format import decode_npy, decode_png
from label_pipeline.core.tario import read_tar_samples
from label_pipeline.export_prismer import detection_json, word_side_file

pytest.importorskip("transformers")

DATASET = "cc12m"
# shard → [(key, height, width, EXIF orientation or None)]
SAMPLES = {
    "00000": [("land", 40, 56, None), ("portrait", 56, 36, None)],
    "00001": [("wide", 36, 64, None), ("rotated", 40, 48, 6)],
}
EXPORTED = ("depth", "normal", "edge", "seg_coco", "obj_detection", "ocr_detection")


class PortraitBlindCharNet(CharNetOCR):
    """The tiny CharNet (which reads words everywhere) made to find none on portrait images."""

    spec: ClassVar[ExpertSpec] = ExpertSpec(
        task="ocr_detection", backend="portrait_blind", version="1", mode="L", has_json=True, batch_size=4
    )

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        labels = super().predict(images, deps)
        return [
            Label(np.full(image.shape[:2], 255, np.uint8), data=[])
            if image.shape[0] > image.shape[1]
            else label
            for image, label in zip(images, labels)
        ]


def synthetic_word_feature(row: int, text: str) -> np.ndarray:
    """A fixed float16 vector per (row, text): equal texts in one image still get distinct rows."""
    rng = np.random.default_rng(zlib.crc32(f"{row}:{text}".encode()))
    return rng.normal(0.0, 3.0, 64).astype(np.float16)


class SyntheticWordFeatures(Expert):
    """``ocr_features`` without CLIP: the member format of the real stage, rows from the word list."""

    spec: ClassVar[ExpertSpec] = ExpertSpec(
        task="ocr_features",
        backend="synthetic",
        version="1",
        mode=NPY_MODE,
        batch_size=8,
        requires=("ocr_detection",),
    )

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        labels = []
        for words in (label.data for label in deps["ocr_detection"]):
            rows = [synthetic_word_feature(i, w["text"]) for i, w in enumerate(words)]
            array = np.stack(rows) if rows else np.zeros((0, 64), np.float16)
            labels.append(Label(map=None, array=array))
        return labels


register("ocr_detection:portrait_blind", "test_export_prismer:PortraitBlindCharNet")
register("ocr_features:synthetic", "test_export_prismer:SyntheticWordFeatures")


def _jpeg(height: int, width: int, seed: int, orientation: int | None) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 40, (height, width, 3))
    array = np.clip(gradient(height, width).astype(int) + noise, 0, 255).astype(np.uint8)
    if orientation is None:
        return image_bytes(array)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(array, exif=exif.tobytes())


def _label(root: Path, entries: list[dict[str, Any]], shards: dict[str, list]) -> Path:
    for index, (shard, samples) in enumerate(shards.items()):
        members = [
            {"jpg": _jpeg(h, w, 10 * index + k, o), "txt": f"caption of {key}".encode()}
            for k, (key, h, w, o) in enumerate(samples)
        ]
        write_wds(root / "in" / f"{shard}.tar", members, keys=[s[0] for s in samples])
    last = len(shards) - 1
    source = {"format": "webdataset", "path": f"{root}/in/{{00000..{last:05d}}}.tar"}
    manifest = write_manifest(root / "labels.yaml", source, root / "out", entries)
    assert main(["run", str(manifest), "--no-progress", "--device", "cpu"]) == 0
    return root / "out"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    weights = root / "weights"
    weights.mkdir()
    ocr = tiny_ocr(weights)
    entries = [
        tiny_depth(weights),
        tiny_normal(weights),
        "edge:canny",
        tiny_segmentation(weights),
        tiny_detection(weights),
        {"name": "ocr_detection:portrait_blind", "options": ocr["options"]},
        "ocr_features:synthetic",
    ]
    return _label(root, entries, SAMPLES)


@pytest.fixture(scope="module")
def exported(labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    dest = tmp_path_factory.mktemp("prismer") / "labels"
    images = dest.parent / "data"
    code = main(["export-prismer", str(labelled), str(dest), "--dataset", DATASET, "--images", str(images)])
    return {"code": code, "dest": dest, "images": images, "out": labelled}


def _shard_samples(out: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    result = {}
    for shard in SAMPLES:
        with open(out / "shards" / f"{shard}.tar", "rb") as handle:
            result[shard] = dict(read_tar_samples(handle))
    return result


# --------------------------------------------------------------------------------------------------
# Prismer's reader, restated (dataset/utils.py at NVlabs/prismer 4f27ab3)


def prismer_get_expert_labels(
    data_path: str, label_path: str, image_path: str, dataset: str, experts: Sequence[str]
) -> tuple[Image.Image, dict[str, Image.Image], dict[str, Any]]:
    """The image, its expert label images and side information, as Prismer's training loader gets them.

    An empty (zero-byte) dense label becomes zeros, an empty detection map all-255; the detection json
    is required; the OCR map is read only when its ``.pt`` exists (else all-255 and ``None``). The
    ``.pt`` is opened with ``torch.load``'s default, which is ``weights_only`` in current torch.
    """
    image = Image.open(os.path.join(data_path, dataset, image_path)).convert("RGB")
    width, height = image.size
    suffix = "." + image_path.split(".")[-1]
    labels: dict[str, Image.Image] = {}
    info: dict[str, Any] = {}

    def path(expert: str, ext: str) -> str:
        return os.path.join(label_path, expert, dataset, image_path.replace(suffix, ext))

    for expert in experts:
        if expert in ("seg_coco", "seg_ade", "edge", "depth", "normal"):
            mode = "RGB" if expert == "normal" else "L"
            if os.stat(path(expert, ".png")).st_size > 0:
                labels[expert] = Image.open(path(expert, ".png")).convert(mode)
            else:
                shape = (height, width, 3) if mode == "RGB" else (height, width)
                labels[expert] = Image.fromarray(np.zeros(shape, np.uint8)).convert(mode)
        elif expert == "obj_detection":
            if os.stat(path(expert, ".png")).st_size > 0:
                labels[expert] = Image.open(path(expert, ".png")).convert("L")
            else:
                labels[expert] = Image.fromarray(np.full((height, width), 255, np.uint8)).convert("L")
            with open(path(expert, ".json")) as handle:
                info[expert] = json.load(handle)
        elif expert == "ocr_detection":
            if os.path.exists(path(expert, ".pt")):
                labels[expert] = Image.open(path(expert, ".png")).convert("L")
                info[expert] = torch.load(path(expert, ".pt"))
            else:
                labels[expert] = Image.fromarray(np.full((height, width), 255, np.uint8)).convert("L")
                info[expert] = None
    return image, labels, info


def prismer_embedding_lookups(
    labels: dict[str, Image.Image], info: dict[str, Any]
) -> dict[str, dict[int, Any]]:
    """What ``post_label_process`` looks up for every value of the categorical maps but 255:
    ``DETECTION_FEATURES[label_map[str(l)]]`` (the UniDet class id) and ``label_map[l]['features']``."""
    found: dict[str, dict[int, Any]] = {"obj_detection": {}, "ocr_detection": {}}
    for value in np.unique(np.asarray(labels["obj_detection"])):
        if value != 255:
            found["obj_detection"][int(value)] = info["obj_detection"][str(int(value))]
    for value in np.unique(np.asarray(labels["ocr_detection"])):
        if value != 255:
            found["ocr_detection"][int(value)] = info["ocr_detection"][int(value)]["features"]
    return found


# --------------------------------------------------------------------------------------------------


def test_export_writes_prismers_layout(exported: dict[str, Any]) -> None:
    dest = exported["dest"]
    assert exported["code"] == 1  # the EXIF-rotated sample is left out (and said so)
    assert sorted(p.name for p in dest.iterdir()) == sorted(EXPORTED)
    for shard, samples in SAMPLES.items():
        for key, *_ in samples[:2]:
            if key == "rotated":
                assert not list(dest.glob(f"*/{DATASET}/{shard}/{key}.*"))
                continue
            for expert in ("depth", "normal", "edge", "seg_coco", "obj_detection"):
                assert (dest / expert / DATASET / shard / f"{key}.png").is_file()
            assert (dest / "obj_detection" / DATASET / shard / f"{key}.json").is_file()
            has_words = key != "portrait"
            for ext in ("png", "pt"):  # nothing at all for the image without words, as Prismer
                assert (dest / "ocr_detection" / DATASET / shard / f"{key}.{ext}").is_file() == has_words
    assert sorted(p.name for p in (exported["images"] / DATASET / "00001").iterdir()) == [
        "wide.jpg",
        "wide.txt",
    ]


def test_prismers_reader_gets_our_labels(exported: dict[str, Any]) -> None:
    shards = _shard_samples(exported["out"])
    read = 0
    for shard, samples in SAMPLES.items():
        for key, *_ in samples:
            if key == "rotated":
                continue
            members = shards[shard][key]
            image, labels, info = prismer_get_expert_labels(
                str(exported["images"]), str(exported["dest"]), f"{shard}/{key}.jpg", DATASET, EXPORTED
            )
            ours = decode_image(members["jpg"]).array
            np.testing.assert_array_equal(np.asarray(image), ours)  # the same image bytes, unchanged
            for expert in ("depth", "normal", "edge", "seg_coco", "obj_detection"):
                np.testing.assert_array_equal(
                    np.asarray(labels[expert]), decode_png(members[f"{expert}.png"])
                )
            _check_detection(labels, info, members)
            _check_words(labels, info, members, expect_words=key != "portrait")
            read += 1
    assert read == 3


def _check_detection(labels: dict, info: dict, members: dict[str, bytes]) -> None:
    records = json.loads(members["obj_detection.json"])
    assert records, "the tiny detector keeps every box"
    assert info["obj_detection"] == {str(r["instance"]): r["class_id"] for r in records}
    lookups = prismer_embedding_lookups(labels, info)["obj_detection"]
    assert lookups and all(0 <= class_id < 722 for class_id in lookups.values())


def _check_words(labels: dict, info: dict, members: dict[str, bytes], expect_words: bool) -> None:
    words = json.loads(members["ocr_detection.json"])
    if not expect_words:
        assert words == [] and info["ocr_detection"] is None
        assert (np.asarray(labels["ocr_detection"]) == 255).all()
        return
    features = decode_npy(members["ocr_features.npy"])
    assert len(words) > 1 and features.shape == (len(words), 64)
    np.testing.assert_array_equal(
        np.asarray(labels["ocr_detection"]), decode_png(members["ocr_detection.png"])
    )
    side = info["ocr_detection"]
    assert sorted(side) == sorted(w["instance"] for w in words)
    for row, word in enumerate(words):
        entry = side[word["instance"]]
        assert entry["text"] == word["text"]
        assert entry["features"].dtype == torch.float32 and entry["features"].shape == (64,)
        expected = synthetic_word_feature(row, word["text"]).astype(np.float32)
        np.testing.assert_array_equal(entry["features"].numpy(), expected)
    lookups = prismer_embedding_lookups(labels, info)["ocr_detection"]
    assert lookups, "every word pixel value has its feature in the .pt"


def test_summary_names_what_was_left_out(labelled: Path, tmp_path: Path, capsys) -> None:
    assert main(["export-prismer", str(labelled), str(tmp_path / "again")]) == 1
    printed = capsys.readouterr().out
    assert "ocr_detection: 1 images without words, no file (as Prismer)" in printed
    assert "left out: 1 samples, EXIF-rotated image" in printed
    assert "/test/" in printed  # the manifest's name is the default dataset key
    assert (tmp_path / "again" / "edge" / "test" / "00000" / "land.png").is_file()


def test_export_is_reproducible(exported: dict[str, Any], tmp_path: Path) -> None:
    again = tmp_path / "labels"
    args = ["export-prismer", str(exported["out"]), str(again), "--dataset", DATASET]
    assert main(args) == 1
    first = {
        p.relative_to(exported["dest"]): p.read_bytes() for p in exported["dest"].rglob("*") if p.is_file()
    }
    second = {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()}
    assert first == second


def test_word_side_file_keys_rows_by_instance() -> None:
    """Row i of the features belongs to word i of the json list, whose pixel value is its ``instance``
    (not necessarily i); the file holds plain tensors only."""
    import io

    words = [{"instance": 2, "text": "exit"}, {"instance": 0, "text": "stop"}, {"instance": 1, "text": "go"}]
    features = np.stack([synthetic_word_feature(i, w["text"]) for i, w in enumerate(words)])
    side = torch.load(io.BytesIO(word_side_file(words, features)), weights_only=True)
    assert sorted(side) == [0, 1, 2]
    for row, word in enumerate(words):
        assert side[word["instance"]]["text"] == word["text"]
        np.testing.assert_array_equal(
            side[word["instance"]]["features"].numpy(), features[row].astype(np.float32)
        )
    assert json.loads(detection_json([{"instance": 1, "class_id": 700}, {"instance": 0, "class_id": 3}])) == {
        "1": 700,
        "0": 3,
    }


# --------------------------------------------------------------------------------------------------
# refusals and a complete export


def test_refuses_dest_inside_the_output(labelled: Path, caplog, capsys) -> None:
    for dest in (labelled / "prismer", labelled):
        with caplog.at_level(logging.ERROR):
            caplog.clear()
            assert main(["export-prismer", str(labelled), str(dest)]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "inside the label output" in errors[0] and "\n" not in errors[0]
    assert not (labelled / "prismer").exists()
    assert capsys.readouterr().out == ""


def test_refuses_a_folder_that_is_not_a_label_output(tmp_path: Path, caplog) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "photo.jpg").write_bytes(b"not a label output")
    with caplog.at_level(logging.ERROR):
        assert main(["export-prismer", str(tmp_path / "plain"), str(tmp_path / "dest")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "is not a label output" in errors[0]
    assert not (tmp_path / "dest").exists()


def test_complete_output_exports_with_exit_zero(tmp_path: Path) -> None:
    out = _label(tmp_path, ["edge:canny"], {"00000": [("one", 30, 20, None), ("two", 24, 40, None)]})
    dest = tmp_path / "prismer"
    assert main(["export-prismer", str(out), str(dest), "--dataset", "vg"]) == 0
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*.png")) == [
        "edge/vg/00000/one.png",
        "edge/vg/00000/two.png",
    ]
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        member = tar.extractfile("one.edge.png").read()
    assert (dest / "edge" / "vg" / "00000" / "one.png").read_bytes() == member
