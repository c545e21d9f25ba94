"""End-to-end runs: output contract, bad input, CLI, verify, relabelling.

Every test runs once per runner (``local``, in-process; ``ray``, on a local Ray instance with 2 CPUs
and 4 logical GPUs): the same assertions hold for both.
"""

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from builders import gradient, image_bytes, photo_samples, write_manifest, write_wds
from experts_for_tests import register_test_experts

from label_pipeline.cli import main
from label_pipeline.core.format import decode_png

register_test_experts()
RUNNER = {"name": "local"}  # the runner ``run`` passes to the CLI; set per test by the fixture below


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    tests = Path(__file__).resolve().parent
    saved = os.environ.get("PYTHONPATH")
    # Ray workers inherit this environment: they import the test experts by module name.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tests), str(tests.parent), saved]))
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(autouse=True, params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def runner(request):
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    RUNNER["name"] = request.param
    yield request.param
    RUNNER["name"] = "local"


def members_of(tar_path):
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def samples_of(tar_path):
    out = {}
    for name, data in members_of(tar_path):
        key, _, suffix = name.partition(".")
        out.setdefault(key, {})[suffix] = data
    return out


@pytest.fixture
def two_shards(tmp_path):
    inputs = tmp_path / "in"
    write_wds(inputs / "00000.tar", photo_samples(3, size=(40, 60)))
    write_wds(inputs / "00001.tar", photo_samples(2, size=(30, 20), start=3), keys=["b0", "b1"])
    return str(inputs / "{00000..00001}.tar")


def run(manifest, *extra):
    return main(["run", str(manifest), "--no-progress", "--runner", RUNNER["name"], *extra])


def test_output_contract(tmp_path, two_shards):
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.yaml", {"format": "webdataset", "path": two_shards}, out, ["edge:canny"]
    )
    assert run(manifest) == 0
    shard = samples_of(out / "shards" / "00000.tar")
    assert list(shard) == ["000000", "000001", "000002"]  # same keys, same order as the input
    names = [n for n, _ in members_of(out / "shards" / "00000.tar")]
    assert names[:4] == ["000000.edge.png", "000000.jpg", "000000.json", "000000.txt"]  # sorted per sample
    original = samples_of(tmp_path / "in" / "00000.tar")
    sample, meta = shard["000001"], json.loads(shard["000001"]["json"])
    assert sample["jpg"] == original["000001"]["jpg"]  # image bytes unchanged
    assert sample["txt"] == b"picture number 1"
    assert meta["status"] == "ok" and meta["size"] == [40, 60] and meta["experts"]["edge"]["status"] == "ok"
    assert meta["source"]["meta"]["url"].endswith("/1.jpg")
    edge = decode_png(sample["edge.png"])
    assert edge.shape == (40, 60) and edge.dtype == np.uint8 and (edge == 255).mean() > 0.5  # 255 = no edge
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tar.getmembers()} == {(0, 0, 0, "", 0o644)}
    records = pq.read_table(out / "records" / "00000.parquet").to_pylist()
    assert [r["key"] for r in records] == list(shard) and all(r["status"] == "ok" for r in records)
    done = json.loads((out / "records" / "00000.done.json").read_text())
    assert done["samples"] == 3 and done["bytes"] == (out / "shards" / "00000.tar").stat().st_size
    assert done["experts"]["edge"]["ok"] == 3
    run_record = json.loads((out / "_run.json").read_text())
    assert run_record["experts"]["edge"]["name"] == "edge:canny" and not (out / "_lock").exists()


def test_rerun_skips_done_shards_and_is_byte_identical(tmp_path, two_shards):
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.yaml", {"format": "webdataset", "path": two_shards}, out, ["edge:canny"]
    )
    assert run(manifest) == 0
    first = (out / "shards" / "00001.tar").read_bytes()
    stamp = (out / "shards" / "00001.tar").stat().st_mtime_ns
    assert run(manifest) == 0
    assert (out / "shards" / "00001.tar").stat().st_mtime_ns == stamp  # skipped, not rewritten
    (out / "records" / "00001.done.json").unlink()  # an uncommitted shard is redone ...
    assert run(manifest) == 0
    assert (out / "shards" / "00001.tar").read_bytes() == first  # ... to the same bytes


def test_bad_inputs_never_crash_or_vanish(tmp_path):
    good = image_bytes(gradient(20, 30))
    samples = [
        {"jpg": good, "txt": b"fine"},
        {"jpg": good[: len(good) // 3], "txt": b"truncated image"},
        {"jpg": b"", "txt": b"zero bytes"},
        {"jpg": b"<html>not an image</html>", "txt": b"html"},
        {"txt": b"no image at all", "cls": b"3"},
        {"jpg": good, "txt": "caf\xe9".encode("latin-1")},  # not UTF-8
        {"png": image_bytes(np.zeros((1, 1, 3), np.uint8), "PNG")},
        {"png": image_bytes(np.zeros((400, 500, 3), np.uint8), "PNG"), "txt": b"huge"},
        {"jpg": image_bytes(gradient(20, 13))},  # poisons the flaky expert
        {"jpg": good, "txt": b"last"},
    ]
    write_wds(tmp_path / "in" / "00000.tar", samples)
    write_wds(tmp_path / "in" / "00001.tar", photo_samples(3))
    damaged = tmp_path / "in" / "00001.tar"
    damaged.write_bytes(damaged.read_bytes()[:3000])  # truncated tar
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.yaml",
        {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..00001}}.tar"},
        out,
        ["edge:flaky"],
        decode={"max_pixels": 100_000},
    )
    assert run(manifest) == 1  # finished, with recorded failures
    shard = samples_of(out / "shards" / "00000.tar")
    assert list(shard) == [f"{i:06d}" for i in range(10)]  # nothing lost
    status = {k: json.loads(v["json"])["status"] for k, v in shard.items()}
    assert status == {
        "000000": "ok",
        "000001": "undecodable",
        "000002": "empty_image",
        "000003": "undecodable",
        "000004": "no_image",
        "000005": "ok",
        "000006": "ok",
        "000007": "too_large",
        "000008": "partial",
        "000009": "ok",
    }
    poisoned = json.loads(shard["000008"]["json"])
    assert poisoned["experts"]["edge"] == {
        "status": "error",
        "fingerprint": poisoned["experts"]["edge"]["fingerprint"],
        "error": "RuntimeError: poisoned sample",
    }
    assert (
        "edge.png" not in shard["000008"] and "edge.png" in shard["000009"]
    )  # only its own member is omitted
    assert shard["000005"]["txt"].decode() == "caf\ufffd"
    assert json.loads(shard["000005"]["json"])["caption_status"] == "replaced"
    assert decode_png(shard["000006"]["edge.png"]).shape == (1, 1)
    records = {r["key"]: r for r in pq.read_table(out / "records" / "00000.parquet").to_pylist()}
    assert records["000007"]["status"] == "too_large" and "pixel guard" in records["000007"]["error"]
    done = json.loads((out / "records" / "00001.done.json").read_text())
    assert "input_error" in done and done["samples"] >= 1
    assert main(["verify", str(out)]) == 0


def test_cli_exit_codes(tmp_path, two_shards, capsys, caplog):
    out = tmp_path / "out"
    good = write_manifest(
        tmp_path / "m.yaml", {"format": "webdataset", "path": two_shards}, out, ["edge:canny"]
    )
    assert run(good, "--limit-shards", "1") == 0
    assert "labels written to" in capsys.readouterr().out
    assert main(["status", str(out)]) == 0
    assert "1 done / 0 failed / 1 pending / 2 total" in capsys.readouterr().out
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text(good.read_text() + "colour: blue\n")
    assert run(bad_key) == 2
    assert "unknown key(s) ['colour']" in caplog.text
    assert run(good, "--experts", "edge:nonexistent") == 2
    assert run(good, "--experts", "seg_ade") == 2
    assert run(tmp_path / "missing.yaml") == 2
    missing_var = write_manifest(
        tmp_path / "v.yaml", {"format": "webdataset", "path": "${NO_SUCH_ROOT}/x.tar"}, out, ["edge:canny"]
    )
    assert run(missing_var) == 2
    assert "NO_SUCH_ROOT" in caplog.text
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2


def test_verify_catches_a_corrupted_shard(tmp_path, two_shards, capsys):
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.yaml", {"format": "webdataset", "path": two_shards}, out, ["edge:canny"]
    )
    assert run(manifest) == 0
    assert main(["verify", str(out)]) == 0
    shard = out / "shards" / "00001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # flip a byte inside the first member's data
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    assert "00001: checksum mismatch" in capsys.readouterr().out


def test_changed_expert_is_refused_then_relabelled_in_place(tmp_path, two_shards, capsys, caplog):
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.yaml",
        {"format": "webdataset", "path": two_shards},
        out,
        ["edge:canny", "depth:brightness"],
    )
    assert run(manifest) == 0
    before = samples_of(out / "shards" / "00000.tar")
    changed = write_manifest(
        tmp_path / "m2.yaml",
        {"format": "webdataset", "path": two_shards},
        out,
        [{"name": "edge:canny", "options": {"low": 1, "high": 2, "blur_sigma": 0}}, "depth:brightness"],
    )
    assert run(changed) == 2
    assert "--relabel edge" in caplog.text
    assert run(changed, "--relabel", "edge", "--limit-shards", "1") == 0  # interrupted relabel: one shard
    status = json.loads((out / "records" / "00001.done.json").read_text())
    assert run(changed, "--relabel", "edge") == 0  # resumes: only the stale shard is relabelled
    assert json.loads((out / "records" / "00001.done.json").read_text()) != status
    after = samples_of(out / "shards" / "00000.tar")
    for key in before:
        for suffix in ("jpg", "txt", "depth.png"):
            assert after[key][suffix] == before[key][suffix]  # carried over byte for byte
        assert after[key]["edge.png"] != before[key]["edge.png"]
    main(["status", str(out)])
    assert "stale" in capsys.readouterr().out


def test_adding_an_expert_equals_labelling_with_it_from_the_start(tmp_path, two_shards):
    source = {"format": "webdataset", "path": two_shards}
    together, stepwise = tmp_path / "together", tmp_path / "stepwise"
    both = ["edge:canny", "depth:brightness", "obj_detection:depthboxes"]
    assert run(write_manifest(tmp_path / "a.yaml", source, together, both)) == 0
    assert run(write_manifest(tmp_path / "b.yaml", source, stepwise, ["edge:canny", "depth:brightness"])) == 0
    # detection needs depth: it is read back from the existing shard, not recomputed
    assert run(write_manifest(tmp_path / "c.yaml", source, stepwise, ["obj_detection:depthboxes"])) == 0
    for shard in ("00000", "00001"):
        assert (together / "shards" / f"{shard}.tar").read_bytes() == (
            stepwise / "shards" / f"{shard}.tar"
        ).read_bytes()
    sample = samples_of(together / "shards" / "00000.tar")["000000"]
    assert json.loads(sample["obj_detection.json"])[0]["score"] > 0


def test_detection_without_depth_fails_per_sample_with_a_reason(tmp_path, two_shards):
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.yaml", {"format": "webdataset", "path": two_shards}, out, ["obj_detection:depthboxes"]
    )
    assert run(manifest) == 1
    meta = json.loads(samples_of(out / "shards" / "00000.tar")["000000"]["json"])
    assert (
        meta["experts"]["obj_detection"]["status"] == "error"
        and "depth" in meta["experts"]["obj_detection"]["error"]
    )
