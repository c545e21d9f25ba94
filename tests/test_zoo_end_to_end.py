"""Prismer's six experts end to end through ``label-pipeline run``, on tiny weights built in code.

One run labels a 3-image WebDataset (2 shards, non-square JPEGs) with depth, normal, edge:dexined,
seg_coco, obj_detection and ocr_detection:charnet, each loaded through its real weight path from the
files ``tiny_experts`` writes; the tests below check the output of that one run. A second test shows
that an expert whose weights are unavailable stops ``run`` before anything is written.
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from builders import gradient, image_bytes, write_manifest, write_wds
from PIL import Image
from tiny_experts import tiny_edge, tiny_expert_entries

from expert_zoo.instance_map import depth_ordered_instance_map
from label_pipeline.cli import main
from label_pipeline.contact_sheet import TILE
from label_pipeline.core.decode import decode_image
from label_pipeline.core.format import decode_png

pytest.importorskip("transformers")

TASKS = ("depth", "normal", "edge", "seg_coco", "obj_detection", "ocr_detection")
JSON_TASKS = ("obj_detection", "ocr_detection")
MEMBERS = {"jpg", "txt", "json"} | {f"{t}.png" for t in TASKS} | {f"{t}.json" for t in JSON_TASKS}
SHARD_IMAGE_SIZES = {"00000": [(40, 56), (56, 36)], "00001": [(36, 64)]}  # (H, W), non-square


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    """A gradient with a bright square, plus noise so that every expert sees some texture."""
    noise = np.random.default_rng(seed).integers(0, 40, (height, width, 3))
    return np.clip(gradient(height, width).astype(int) + noise, 0, 255).astype(np.uint8)


def _samples_of(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, _, suffix = member.name.partition(".")
            out.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return out


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build the tiny weights and the input shards, run the six experts once; the tests read the output."""
    root = tmp_path_factory.mktemp("zoo")
    entries = tiny_expert_entries(root / "weights")
    assert [e["name"].partition(":")[0] for e in entries] == list(TASKS)
    for index, (shard, sizes) in enumerate(SHARD_IMAGE_SIZES.items()):
        samples = [
            {"jpg": image_bytes(_picture(h, w, 2 * index + k)), "txt": f"picture {shard}-{k}".encode()}
            for k, (h, w) in enumerate(sizes)
        ]
        write_wds(root / "in" / f"{shard}.tar", samples, keys=[f"s{shard}_{k}" for k in range(len(sizes))])
    out = root / "out"
    source = {"format": "webdataset", "path": f"{root}/in/{{00000..00001}}.tar"}
    manifest = write_manifest(root / "zoo.yaml", source, out, entries)
    code = main(["run", str(manifest), "--no-progress", "--device", "cpu"])
    return {"code": code, "out": out, "entries": entries}


def _shards(out: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    return {shard: _samples_of(out / "shards" / f"{shard}.tar") for shard in SHARD_IMAGE_SIZES}


def test_run_labels_every_sample_with_all_six_experts(zoo_run: dict) -> None:
    assert zoo_run["code"] == 0
    for shard, samples in _shards(zoo_run["out"]).items():
        assert len(samples) == len(SHARD_IMAGE_SIZES[shard])
        for key, members in samples.items():
            assert set(members) == MEMBERS, key
            image = decode_image(members["jpg"]).array
            meta = json.loads(members["json"])
            assert meta["status"] == "ok" and meta["size"] == list(image.shape[:2])
            for task in TASKS:
                label = decode_png(members[f"{task}.png"])
                assert label.dtype == np.uint8 and label.shape[:2] == image.shape[:2], (key, task)
                assert label.ndim == (3 if task == "normal" else 2)
            assert decode_png(members["seg_coco.png"]).max() <= 132
            _check_detections(json.loads(members["obj_detection.json"]), image.shape[:2])
            _check_words(json.loads(members["ocr_detection.json"]), image.shape[:2])


def _check_detections(records: list[dict], size: tuple[int, int]) -> None:
    height, width = size
    assert records, "the tiny detector keeps every box (threshold 0)"
    assert [r["instance"] for r in records] == list(range(len(records)))
    for record in records:
        x0, y0, x1, y1 = record["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        assert 0 <= record["class_id"] < 722 and 0.0 <= record["score"] <= 1.0


def _check_words(words: list[dict], size: tuple[int, int]) -> None:
    height, width = size
    assert words, "the tiny CharNet's heads are biased to read a word of 'a's"
    for word in words:
        polygon = np.asarray(word["polygon"])
        assert polygon.shape == (4, 2) and (polygon >= 0).all()
        assert (polygon[:, 0] < width).all() and (polygon[:, 1] < height).all()
        assert set(word["text"]) == {"a"}


def test_statuses_and_fingerprints_are_recorded(zoo_run: dict) -> None:
    out = zoo_run["out"]
    run_record = json.loads((out / "_run.json").read_text())
    names = {e["name"].partition(":")[0]: e["name"] for e in zoo_run["entries"]}
    assert {t: e["name"] for t, e in run_record["experts"].items()} == names
    fingerprints = {t: e["fingerprint"] for t, e in run_record["experts"].items()}
    assert len(set(fingerprints.values())) == 6 and all(len(f) == 16 for f in fingerprints.values())
    for shard, samples in _shards(out).items():
        done = json.loads((out / "records" / f"{shard}.done.json").read_text())
        assert done["ok"] == done["samples"] == len(samples) and done["failed"] == 0
        assert {t: e["fingerprint"] for t, e in done["experts"].items()} == fingerprints
        assert all(e["ok"] == len(samples) and e["failed"] == 0 for e in done["experts"].values())
        records = pq.read_table(out / "records" / f"{shard}.parquet").to_pylist()
        assert [r["status"] for r in records] == ["ok"] * len(samples)
        for members in samples.values():
            experts = json.loads(members["json"])["experts"]
            assert experts == {t: {"status": "ok", "fingerprint": fingerprints[t]} for t in TASKS}


def test_verify_passes(zoo_run: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(zoo_run["out"])]) == 0
    assert "verified 2 shards, 3 samples: ok" in capsys.readouterr().out


def _uncertain_edges(records: list[dict], size: tuple[int, int]) -> np.ndarray:
    """Pixels next to a box edge whose rasterisation the json cannot pin down.

    The json rounds boxes to 2 decimals; only a true coordinate in [n - 0.005, n) rounds to the integer n
    and so truncates differently. Integer coordinates strictly inside the image are such edges (0 and the
    image side are where boxes were clipped: exact); every other coordinate truncates as in the expert.
    """
    height, width = size
    uncertain = np.zeros(size, dtype=bool)
    for record in records:
        for index, value in enumerate(record["box"]):
            limit = width if index % 2 == 0 else height
            if value != int(value) or value in (0, limit):
                continue
            edge = int(value)
            if index % 2 == 0:
                uncertain[:, edge - 1 : edge + 1] = True
            else:
                uncertain[edge - 1 : edge + 1, :] = True
    return uncertain


def test_detection_is_ordered_by_depth_from_the_same_pass(zoo_run: dict) -> None:
    """The instance map is what Prismer's occlusion rule gives for the json's boxes and *this* sample's
    depth label (written in the same pass), and not what the reversed depth would give."""
    depth_decides = 0
    for samples in _shards(zoo_run["out"]).values():
        for key, members in samples.items():
            depth = decode_png(members["depth.png"])
            stored = decode_png(members["obj_detection.png"])
            records = json.loads(members["obj_detection.json"])
            boxes = np.array([r["box"] for r in records], dtype=np.float64)
            classes = [r["class_id"] for r in records]
            scores = [r["score"] for r in records]
            certain = ~_uncertain_edges(records, depth.shape)
            same, _ = depth_ordered_instance_map(boxes, classes, scores, depth, dedup_iou=1.0)
            assert np.array_equal(same[certain], stored[certain]), key
            reversed_depth, _ = depth_ordered_instance_map(boxes, classes, scores, 255 - depth, dedup_iou=1.0)
            depth_decides += int(not np.array_equal(reversed_depth[certain], stored[certain]))
    assert depth_decides >= 2, "the tiny detector's boxes should overlap so that depth decides"


def test_inspect_renders_all_six_panels(zoo_run: dict, tmp_path: Path) -> None:
    sheet_path = tmp_path / "sheet.png"
    shard = zoo_run["out"] / "shards" / "00000.tar"
    assert main(["inspect", str(shard), "--limit", "1", "--out", str(sheet_path)]) == 0
    sheet = np.asarray(Image.open(sheet_path).convert("RGB"))
    assert sheet.shape[1] == 7 * (TILE + 8) + 8  # the image, then one panel per expert
    for column in range(7):
        x = 8 + column * (TILE + 8)
        panel = sheet[22 : 22 + TILE // 2, x : x + TILE // 2]
        assert (panel != 255).any(), f"panel {column} is blank"


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("normal:nll_angmf", "hf-hub:shikunl/prismer/expert_weights/scannet.pt"),
        ("obj_detection:owlv2", "hf-hub:google/owlv2-base-patch16-ensemble"),
    ],
)
def test_unavailable_weights_stop_the_run_at_start_up(
    name: str, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LABEL_PIPELINE_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_hub_cache"))
    write_wds(tmp_path / "in" / "00000.tar", [{"jpg": image_bytes(_picture(30, 40, 0))}])
    out = tmp_path / "out"
    experts = [tiny_edge(tmp_path), name]  # a default-weights expert after one that loads fine
    manifest = write_manifest(
        tmp_path / "m.yaml", {"format": "webdataset", "path": f"{tmp_path}/in/00000.tar"}, out, experts
    )
    with caplog.at_level(logging.ERROR):
        assert main(["run", str(manifest), "--no-progress", "--device", "cpu"]) == 2
    message = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert name in message and source in message and "make weights" in message
    assert not list(out.rglob("*.tar")) and not (out / "_run.json").exists()
