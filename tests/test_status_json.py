"""``label-pipeline status --json`` and ``status --failures [--limit N]``: machine-readable status and
the list of failures (shard, key, expert, status, reason) read from the records."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from builders import gradient, image_bytes, photo_samples, write_manifest, write_wds
from experts_for_tests import register_test_experts

from label_pipeline.cli import main

register_test_experts()


@pytest.fixture(scope="module")
def output_with_failures(tmp_path_factory):
    """Shard 00000 with failed samples and a partial one; shard 00001 listed but missing."""
    root = tmp_path_factory.mktemp("status")
    samples = [
        *photo_samples(2),
        {"jpg": b"<html>not an image</html>", "txt": b"html"},
        {"jpg": b""},
        {"txt": b"no image at all"},
        {"jpg": image_bytes(gradient(20, 13))},  # edge:flaky fails on it; depth does not
        {"png": image_bytes(np.zeros((400, 500, 3), np.uint8), "PNG")},  # over the pixel guard
    ]
    write_wds(root / "in" / "00000.tar", samples)
    out = root / "out"
    manifest = write_manifest(
        root / "m.yaml",
        {"format": "webdataset", "path": f"{root}/in/{{00000..00001}}.tar"},
        out,
        ["edge:flaky", "depth:brightness"],
        decode={"max_pixels": 100_000},
    )
    assert main(["run", str(manifest), "--no-progress"]) == 1  # failures recorded
    return out


def status_json(capsys, *args):
    code = main(["status", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_status_json_holds_everything_status_prints(output_with_failures, capsys):
    out = str(output_with_failures)
    assert main(["status", out]) == 1
    text = capsys.readouterr().out
    code, data = status_json(capsys, out)
    assert code == 1 and data["has_problems"] is True
    assert data["output"] == out and data["dataset"] == "test"
    assert data["shards"] == {"total": 2, "done": 1, "failed": 1, "damaged": 0, "pending": 0, "stale": 0}
    assert "1 done / 1 failed / 0 pending / 2 total" in text
    assert data["samples"] == 7
    assert data["sample_status"] == {
        "empty_image": 1,
        "no_image": 1,
        "ok": 2,
        "partial": 1,
        "too_large": 1,
        "undecodable": 1,
    }
    assert data["experts"]["edge"] == {"shards": 1, "ok": 2, "failed": 1, "stale": 0}
    assert data["experts"]["depth"]["ok"] == 3
    missing = f"input shard missing: {output_with_failures.parent}/in/00001.tar"
    assert data["failed_shards"] == {"00001": missing}
    assert f"failed shard 00001: {missing}" in text
    assert data["run_stats"]["runner"] == "local" and data["run_stats"]["samples"] == 7
    assert "(local, completed)" in text


def test_failures_lists_shards_samples_and_experts_from_the_records(output_with_failures, capsys):
    out = str(output_with_failures)
    code, data = status_json(capsys, out, "--failures", "--limit", "0")
    assert code == 1  # exit codes as plain `status`: a failed shard
    rows = [(f["shard"], f["key"], f["expert"], f["status"]) for f in data["failures"]]
    assert rows == [
        ("00001", None, None, "shard_failed"),
        ("00000", "000002", None, "undecodable"),
        ("00000", "000003", None, "empty_image"),
        ("00000", "000004", None, "no_image"),
        ("00000", "000005", "edge", "error"),  # partial: only the expert that failed
        ("00000", "000006", None, "too_large"),
    ]
    assert data["total"] == data["shown"] == 6
    records = {
        r["key"]: r for r in pq.read_table(output_with_failures / "records" / "00000.parquet").to_pylist()
    }
    for failure in data["failures"][1:]:
        if failure["expert"] is None:
            assert failure["reason"] == records[failure["key"]]["error"]
    assert "pixel guard" in data["failures"][-1]["reason"]
    assert data["failures"][0]["reason"].startswith("input shard missing: ")


def test_failures_limit_and_text_table(output_with_failures, capsys):
    out = str(output_with_failures)
    code, data = status_json(capsys, out, "--failures", "--limit", "2")
    assert code == 1 and data["total"] == 6 and data["shown"] == 2
    assert [f["key"] for f in data["failures"]] == [None, "000002"]
    assert main(["status", out, "--failures", "--limit", "3"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["shard", "key", "expert", "status", "reason"]
    assert lines[1].split()[:4] == ["00001", "-", "-", "shard_failed"]
    assert lines[3].split()[:4] == ["00000", "000003", "-", "empty_image"]
    assert lines[-1] == "6 failures, 3 shown (--limit 0 shows all)"


def test_failures_of_a_clean_output_exit_zero(tmp_path, capsys):
    write_wds(tmp_path / "in" / "00000.tar", photo_samples(2))
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.yaml",
        {"format": "webdataset", "path": str(tmp_path / "in" / "00000.tar")},
        out,
        ["edge:canny"],
    )
    assert main(["run", str(manifest), "--no-progress"]) == 0
    capsys.readouterr()
    code, data = status_json(capsys, str(out), "--failures")
    assert code == 0 and data == {"has_problems": False, "total": 0, "shown": 0, "failures": []}
    code, data = status_json(capsys, str(out))
    assert code == 0 and data["has_problems"] is False and data["failed_shards"] == {}


def test_status_usage_errors_exit_2(output_with_failures, tmp_path, caplog):
    assert main(["status", str(output_with_failures), "--failures", "--limit", "-1"]) == 2
    assert "--limit -1" in caplog.text
    assert main(["status", str(tmp_path / "nowhere"), "--json"]) == 2
