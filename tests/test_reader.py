"""``label_pipeline.read_labels``: the usable samples of a label output as arrays, failed samples
skipped, ``partial`` samples with only the experts that succeeded; and the plain-webdataset recipe of
docs/FORMAT.md ("Reading the output")."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from builders import gradient, image_bytes, photo_samples, write_manifest, write_wds
from experts_for_tests import register_test_experts
from PIL import Image, ImageOps
from webdataset.autodecode import DecodingError

import label_pipeline
from label_pipeline.cli import main
from label_pipeline.core.format import decode_png

register_test_experts()
EXPERTS = ["edge:flaky", "depth:brightness", "obj_detection:depthboxes"]


def rotated_jpeg() -> bytes:
    """A 20×30 (H×W) JPEG whose EXIF orientation (6) shows it as 30×20."""
    image = Image.fromarray(gradient(20, 30))
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    shard0 = [
        *photo_samples(2),
        {"jpg": b"<html>not an image</html>", "txt": b"html"},  # undecodable: its bytes stay in the tar
        {"jpg": image_bytes(gradient(20, 13)), "txt": b"poisoned"},  # edge fails: partial
        {"txt": b"no image at all"},
        {"jpg": rotated_jpeg(), "txt": b"rotated"},
    ]
    write_wds(root / "in" / "00000.tar", shard0)
    write_wds(root / "in" / "00001.tar", [{"jpg": b""}, *photo_samples(1, start=5)], keys=["b0", "b1"])
    out = root / "out"
    manifest = write_manifest(
        root / "m.yaml", {"format": "webdataset", "path": f"{root}/in/{{00000..00001}}.tar"}, out, EXPERTS
    )
    assert main(["run", str(manifest), "--no-progress"]) == 1  # failed samples are recorded
    return out


def test_read_labels_skips_failed_samples_and_failed_experts(labelled):
    samples = {s["key"]: s for s in label_pipeline.read_labels(str(labelled))}
    assert list(samples) == [
        "000000",
        "000001",
        "000003",
        "000005",
        "b1",
    ]  # no undecodable / no_image / empty
    full = samples["000000"]
    assert full["image"].shape == (48, 64, 3) and full["image"].dtype == np.uint8
    assert sorted(full["labels"]) == ["depth", "edge", "obj_detection"]
    assert all(label.shape == (48, 64) and label.dtype == np.uint8 for label in full["labels"].values())
    assert full["annotations"]["obj_detection"][0]["box"] == [0, 0, 32, 24]
    assert full["caption"] == "picture number 0" and full["json"]["status"] == "ok"
    assert full["url"].endswith("/shards/00000.tar")
    partial = samples["000003"]
    assert partial["json"]["status"] == "partial" and partial["json"]["experts"]["edge"]["status"] == "error"
    assert sorted(partial["labels"]) == ["depth", "obj_detection"]  # only the experts that succeeded
    rotated = samples["000005"]  # decoded as the pipeline decoded it: EXIF applied, labels aligned
    assert rotated["json"]["exif_transposed"] is True
    assert rotated["image"].shape == (30, 20, 3) and rotated["labels"]["edge"].shape == (30, 20)


def test_read_labels_selects_experts_and_can_skip_decoding(labelled):
    shard = labelled / "shards" / "00000.tar"
    only_edge = list(label_pipeline.read_labels(str(shard), experts=["edge"]))
    assert [sorted(s["labels"]) for s in only_edge] == [["edge"], ["edge"], [], ["edge"]]
    assert all(s["annotations"] == {} for s in only_edge)
    raw = next(iter(label_pipeline.read_labels([str(shard)], experts=["depth"], decode=False)))
    tar_image = photo_samples(1)[0]["jpg"]
    assert raw["image"] == tar_image  # the original bytes, unchanged
    assert decode_png(raw["labels"]["depth"]).shape == (48, 64)


def test_read_labels_refuses_a_folder_that_is_not_an_output(tmp_path):
    with pytest.raises(ValueError, match="not a label output root"):
        label_pipeline.read_labels(str(tmp_path))


def test_plain_webdataset_decode_fails_on_failed_samples_but_the_recipe_works(labelled):
    url = str(labelled / "shards" / "{00000..00001}.tar")
    with pytest.raises(DecodingError) as failed:  # on the undecodable sample's original bytes
        list(wds.WebDataset(url, shardshuffle=False).decode("pil"))
    assert (failed.value.key, failed.value.k) == ("000002", "jpg")

    # docs/FORMAT.md, "Reading the output", verbatim apart from the URL
    def usable(sample):  # failed samples keep their original bytes, which may not be an image
        return json.loads(sample["json"])["status"] in ("ok", "partial")

    def pixels(key, data):  # webdataset's own image decoders convert every map to one mode
        member = key.lstrip(".")  # "jpg" for the image, "edge.png" for a label
        if member.rsplit(".", 1)[-1] not in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"):
            return None  # json, txt, npy: webdataset's default handlers
        with Image.open(io.BytesIO(data)) as image:
            if "." not in member:  # the image: EXIF orientation applied, as the pipeline did
                return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
            return np.asarray(image)  # a label map as stored: L ids, RGB normals

    dataset = wds.WebDataset(url, shardshuffle=False).select(usable).decode(pixels)
    samples = {s["__key__"]: s for s in dataset}
    reader = {s["key"]: s for s in label_pipeline.read_labels(str(labelled))}
    assert list(samples) == list(reader) == ["000000", "000001", "000003", "000005", "b1"]
    assert "edge.png" not in samples["000003"] and samples["000003"]["json"]["status"] == "partial"
    assert samples["000005"]["jpg"].shape == (30, 20, 3)  # EXIF applied
    for key, sample in samples.items():
        assert np.array_equal(sample["jpg"], reader[key]["image"]), key
        for task, label in reader[key]["labels"].items():
            assert np.array_equal(sample[f"{task}.png"], label), (key, task)
        assert sample["obj_detection.json"] == reader[key]["annotations"]["obj_detection"]


def test_importing_the_package_stays_light():
    code = "import label_pipeline, label_pipeline.core.format, sys; print('webdataset' in sys.modules)"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "False"
