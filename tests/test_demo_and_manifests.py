"""The shipped manifests validate, and the demo runs offline with the two real offline experts."""

import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from label_pipeline.cli import main
from label_pipeline.config import ConfigError, load_manifest, manifest_from_dict

MANIFESTS = sorted((Path(__file__).resolve().parent.parent / "manifests").glob("*.yaml"))


def test_every_dataset_has_a_manifest():
    assert {p.stem for p in MANIFESTS} >= {"demo", "coco", "vg", "cc3m", "sbu", "cc12m"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_shipped_manifests_validate(path):
    manifest = load_manifest(str(path), env={"DATA_ROOT": "/data", "LABELS_ROOT": "s3://bucket/labels"})
    assert manifest.name == path.stem and manifest.experts
    if path.stem != "demo":
        assert manifest.output == f"s3://bucket/labels/{path.stem}"
        assert {e.task for e in manifest.experts} == {
            "depth",
            "normal",
            "edge",
            "seg_coco",
            "obj_detection",
            "ocr_detection",
        }


def test_cc12m_manifest_matches_the_design_card():
    manifest = load_manifest("cc12m", env={"DATA_ROOT": "/d", "LABELS_ROOT": "/l"})
    assert manifest.source.format == "webdataset" and manifest.source.path == "/d/cc12m/{00000..01242}.tar"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"source": {"format": "zip", "path": "x"}}, "source.format"),
        ({"source": {"format": "coco", "images": "x"}}, "source.annotations"),
        ({"source": {"format": "webdataset", "path": "x", "shards": 3}}, "unknown key(s) ['shards']"),
        ({"experts": []}, "experts"),
        ({"experts": ["edge", "edge:canny"]}, "listed more than once"),
        ({"experts": [{"name": "edge", "opts": {}}]}, "unknown key(s) ['opts']"),
        ({"decode": {"max_pixel": 3}}, "decode"),
        ({"name": "has space"}, "name"),
    ],
)
def test_manifest_errors_name_the_bad_key(change, message):
    data = {
        "name": "x",
        "source": {"format": "webdataset", "path": "a.tar"},
        "output": "o",
        "experts": ["edge"],
    }
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        manifest_from_dict({**data, **change}, env={})


def test_demo_labels_offline_and_inspect_renders_a_sheet(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("LABELS_ROOT", str(tmp_path / "labels"))
    assert main(["run", "demo", "--no-progress", "--limit-shards", "1"]) == 0
    out = tmp_path / "labels" / "demo"
    assert "labels written to" in capsys.readouterr().out
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        names = tar.getnames()
        metas = [
            json.loads(tar.extractfile(n).read()) for n in names if n.endswith(".json") and n.count(".") == 1
        ]
    assert all(m["status"] == "ok" for m in metas) and len(metas) == 6
    assert {"astronaut.edge.png", "astronaut.ocr_detection.png", "astronaut.ocr_detection.json"} <= set(names)
    page = json.loads(
        tarfile.open(out / "shards" / "00000.tar").extractfile("page.ocr_detection.json").read()
    )
    assert len(page) >= 3 and any(
        "segmentation" in w["text"].lower() for w in page
    )  # real OCR found real text
    sheet = tmp_path / "sheet.png"
    assert main(["inspect", str(out / "shards" / "00000.tar"), "--key", "page", "--out", str(sheet)]) == 0
    with Image.open(sheet) as image:
        assert image.width >= 3 * 300 and image.height > 300  # image + edge + ocr panels
