"""Every source format on tiny fixtures: stable keys, deterministic shards, captions and ids."""

import json

import numpy as np
import pytest
from builders import gradient, image_bytes, photo_samples, write_wds

from label_pipeline.config import SourceConfig
from label_pipeline.sources import ShardReadReport, build_source


def read_all(source):
    out = {}
    for shard in source.shards():
        report = ShardReadReport()
        out[shard.shard_id] = (list(source.read(shard, report)), report)
    return out


def test_webdataset_img2dataset_layout(tmp_path):
    for i in range(2):
        write_wds(
            tmp_path / f"{i:05d}.tar",
            photo_samples(3, start=3 * i),
            keys=[f"{i:05d}{j:04d}" for j in range(3)],
        )
        (tmp_path / f"{i:05d}.parquet").write_bytes(b"PAR1 ignored")
        (tmp_path / f"{i:05d}_stats.json").write_text("{}")
    source = build_source(SourceConfig(format="webdataset", path=str(tmp_path / "{00000..00001}.tar")))
    shards = read_all(source)
    assert list(shards) == ["00000", "00001"]
    samples, report = shards["00001"]
    assert [s.key for s in samples] == ["000010000", "000010001", "000010002"]
    assert samples[0].caption == b"picture number 3" and samples[0].image_ext == "jpg"
    assert samples[0].source["meta"]["url"].endswith("/3.jpg") and report.input_error is None


def test_webdataset_skip_missing_and_clashing_names(tmp_path):
    write_wds(tmp_path / "a" / "00000.tar", photo_samples(1))
    write_wds(tmp_path / "b" / "00000.tar", photo_samples(1))
    clash = SourceConfig(format="webdataset", path=f"{tmp_path}/{{a,b}}/00000.tar")
    with pytest.raises(ValueError, match="clashing"):
        build_source(clash).shards()
    partial = SourceConfig(format="webdataset", path=f"{tmp_path}/a/{{00000..00003}}.tar", skip_missing=True)
    assert [s.shard_id for s in build_source(partial).shards()] == ["00000"]


def test_webdataset_truncated_tar_keeps_samples_before_the_damage(tmp_path):
    path = write_wds(tmp_path / "00000.tar", photo_samples(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    source = build_source(SourceConfig(format="webdataset", path=str(path)))
    ((samples, report),) = read_all(source).values()
    assert 1 <= len(samples) <= 4 and report.input_error  # the sample cut in two keeps its whole members


def _coco_tree(tmp_path):
    for split in ("train2014", "val2014"):
        (tmp_path / split).mkdir()
    names = {
        1: "train2014/COCO_train2014_000000000001.jpg",
        2: "val2014/COCO_val2014_000000000002.jpg",
        3: "train2014/COCO_train2014_000000000003.jpg",
    }
    for relative in names.values():
        (tmp_path / relative).write_bytes(image_bytes(gradient(16, 16)))
    return names


def test_coco_three_annotation_layouts_agree(tmp_path):
    names = _coco_tree(tmp_path)
    official = tmp_path / "captions_train2014.json"
    official.write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": n.split("/")[1]} for i, n in names.items() if "train" in n],
                "annotations": [
                    {"image_id": 3, "id": 7, "caption": "a third"},
                    {"image_id": 1, "id": 5, "caption": "one"},
                    {"image_id": 1, "id": 6, "caption": "another one"},
                ],
            }
        )
    )
    official_val = tmp_path / "captions_val2014.json"
    official_val.write_text(
        json.dumps(
            {
                "images": [{"id": 2, "file_name": names[2].split("/")[1]}],
                "annotations": [{"image_id": 2, "id": 1, "caption": "two"}],
            }
        )
    )
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(
        json.dumps(
            {
                "images": [
                    {
                        "filepath": n.split("/")[0],
                        "filename": n.split("/")[1],
                        "cocoid": i,
                        "sentences": [
                            {"raw": c} for c in {1: ["one", "another one"], 2: ["two"], 3: ["a third"]}[i]
                        ],
                    }
                    for i, n in names.items()
                ]
            }
        )
    )
    blip = tmp_path / "coco_karpathy_train.json"
    blip.write_text(
        json.dumps(
            [
                {"image": names[1], "caption": "one", "image_id": "coco_1"},
                {"image": names[3], "caption": "a third", "image_id": "coco_3"},
                {"image": names[1], "caption": "another one", "image_id": "coco_1"},
                {"image": names[2], "caption": ["two"], "image_id": "coco_2"},
            ]
        )
    )
    results = []
    for annotations in ([str(official), str(official_val)], [str(karpathy)], [str(blip)]):
        source = build_source(
            SourceConfig(format="coco", images=str(tmp_path), annotations=annotations, shard_size=2)
        )
        shards = read_all(source)
        assert list(shards) == ["00000", "00001"]
        samples = [s for ss, _ in shards.values() for s in ss]
        results.append([(s.key, s.caption, s.source["captions"], s.image is not None) for s in samples])
    assert results[0] == results[1] == results[2]
    assert results[0][0] == ("COCO_train2014_000000000001", "one", ["one", "another one"], True)


def test_coco_missing_image_is_a_sample_not_a_crash(tmp_path):
    names = _coco_tree(tmp_path)
    (tmp_path / names[2]).unlink()
    blip = tmp_path / "list.json"
    blip.write_text(json.dumps([{"image": n, "caption": f"c{i}"} for i, n in names.items()]))
    source = build_source(SourceConfig(format="coco", images=str(tmp_path), annotations=[str(blip)]))
    ((samples, _),) = read_all(source).values()
    assert [s.error for s in samples] == [None, None, "no_image"]


def test_visual_genome_with_region_captions(tmp_path):
    for folder, image_id in (("VG_100K", 10), ("VG_100K_2", 2)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{image_id}.jpg").write_bytes(image_bytes(gradient(12, 20)))
    (tmp_path / "image_data.json").write_text(
        json.dumps(
            [
                {"image_id": 10, "url": "https://x/VG_100K/10.jpg", "coco_id": None},
                {"image_id": 2, "url": "https://x/VG_100K_2/2.jpg", "coco_id": 99},
            ]
        )
    )
    (tmp_path / "region_descriptions.json").write_text(
        json.dumps([{"id": 2, "regions": [{"phrase": "a red car"}, {"phrase": "a tree"}]}])
    )
    source = build_source(
        SourceConfig(
            format="vg",
            images=str(tmp_path),
            image_data=str(tmp_path / "image_data.json"),
            captions=str(tmp_path / "region_descriptions.json"),
        )
    )
    ((samples, _),) = read_all(source).values()
    assert [s.key for s in samples] == ["2", "10"]  # sorted by image id
    assert samples[0].caption == "a red car" and samples[0].source["coco_id"] == 99
    assert samples[1].caption is None and samples[1].image is not None


def test_folder_source_with_sibling_captions(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "x.y.png").write_bytes(image_bytes(gradient(8, 8), "PNG"))
    (tmp_path / "b" / "c" / "x.y.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "a.jpg").write_bytes(image_bytes(gradient(8, 8)))
    (tmp_path / "notes.md").write_text("not an image")
    source = build_source(SourceConfig(format="folder", path=str(tmp_path), shard_size=1))
    shards = read_all(source)
    assert list(shards) == ["00000", "00001"]
    first, second = shards["00000"][0][0], shards["00001"][0][0]
    assert (first.key, first.caption) == ("a", None)
    assert second.key == "b_c_x_y" and second.caption == "caf\xe9".encode("latin-1")
    assert second.source["file"] == "b/c/x.y.png"


def test_demo_source_builds_once_and_is_deterministic(tmp_path):
    source = build_source(SourceConfig(format="demo", path=str(tmp_path / "demo")))
    first = read_all(source)
    stamp = (tmp_path / "demo" / "00000.tar").stat().st_mtime_ns
    second = read_all(build_source(SourceConfig(format="demo", path=str(tmp_path / "demo"))))
    assert (tmp_path / "demo" / "00000.tar").stat().st_mtime_ns == stamp
    keys = [s.key for samples, _ in first.values() for s in samples]
    assert keys == [s.key for samples, _ in second.values() for s in samples]
    assert len(keys) >= 10 and "astronaut" in keys and "sign_open" in keys
    exts = {s.image_ext for samples, _ in first.values() for s in samples}
    assert exts == {"jpg", "png"}
    assert all(isinstance(np.frombuffer(s.image, np.uint8), np.ndarray) for s in first["00000"][0])
