"""Planning a rerun costs O(listing pages), not a request or a read per shard (issue 11).

Locally a rerun lists ``shards/`` and ``records/`` once, reads the done-record index and no
done-record; on S3 (a moto server that counts the requests it serves) the rerun's requests do not grow
with the number of shards. The index is only a cache: a done-record edited after it was indexed, a
stale index row or a garbage index file never changes what is planned.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from braceexpand import braceexpand
from builders import photo_samples, write_manifest, write_wds

from label_pipeline.cli import main
from label_pipeline.done_index import parse_index
from label_pipeline.output import OutputStore
from label_pipeline.sources.webdataset import complete_urls, expand_shard_urls

ROOT = Path(__file__).resolve().parent.parent
FILE_OF_A_SHARD = re.compile(r"/\d{5}(\.tar|\.parquet|\.done\.json|\.failed\.json|_stats\.json)$")


def run(manifest: Path, *extra: str) -> int:
    return main(["run", str(manifest), "--no-progress", *extra])


def labelled(tmp_path: Path, count: int) -> tuple[Path, Path]:
    for index in range(count):
        write_wds(tmp_path / "in" / f"{index:05d}.tar", photo_samples(2, size=(24, 32), start=2 * index))
    source = {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..{count - 1:05d}}}.tar"}
    manifest = write_manifest(tmp_path / "m.yaml", source, tmp_path / "out", ["edge:canny"])
    assert run(manifest) == 0
    return manifest, tmp_path / "out"


def digests(out: Path) -> dict[str, str]:
    files = sorted([*out.glob("shards/*.tar"), *out.glob("records/*.parquet")])
    return {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def edit_later(path: Path, data: bytes) -> None:
    """Rewrite ``path`` in place as an edit a moment after the run would: file timestamps tick in
    milliseconds, so an edit within the same tick keeps size and mtime and is not seen (FORMAT.md)."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


@pytest.fixture
def done_record_reads(monkeypatch):
    """The done-record files read through ``OutputStore.read_json`` while the test runs."""
    reads: list[str] = []
    original = OutputStore.read_json

    def read_json(self, path):
        if path.endswith(".done.json"):
            reads.append(path)
        return original(self, path)

    monkeypatch.setattr(OutputStore, "read_json", read_json)
    return reads


# -- local: one listing, one index read ------------------------------------------------------------
def test_a_rerun_reads_the_index_and_no_done_record(tmp_path, done_record_reads, caplog):
    manifest, out = labelled(tmp_path, 5)
    index = json.loads((out / "records" / "_done_index.json").read_bytes())
    assert index["version"] == 2 and sorted(index["shards"]) == [f"{i:05d}" for i in range(5)]
    assert "sha256" not in json.dumps(index)  # only what planning checks: no whole done-records
    done_record_reads.clear()
    assert run(manifest) == 0
    assert done_record_reads == [] and "0 to label" in caplog.text


def test_a_done_record_rewritten_in_place_is_read_again(tmp_path, caplog):
    manifest, out = labelled(tmp_path, 3)
    clean = digests(out)
    (out / "records" / "00001.done.json").write_text("{garbage")  # same file (inode), new size
    assert run(manifest) == 0
    assert "00001 is labelled again: the committed output is damaged (done-record unreadable)" in caplog.text
    assert digests(out) == clean


def test_a_same_size_edit_of_a_done_record_changes_the_plan(tmp_path, caplog):
    """A fingerprint edited in place, size kept: the listed mtime differs, so the file is read."""
    manifest, out = labelled(tmp_path, 2)
    path = out / "records" / "00000.done.json"
    record = json.loads(path.read_bytes())
    fingerprint = record["experts"]["edge"]["fingerprint"]
    edited = fingerprint[:-1] + ("0" if fingerprint[-1] != "0" else "1")
    data = path.read_bytes()
    assert data.count(fingerprint.encode()) == 1
    edit_later(path, data.replace(fingerprint.encode(), edited.encode()))
    caplog.clear()
    assert run(manifest) == 0
    assert "1 to label (1 incremental)" in caplog.text


def test_a_stale_index_row_yields_to_the_done_record(tmp_path, done_record_reads):
    """A row whose key matches but whose tar stat does not (an index written before the shard was
    committed again) must not make a good shard look damaged: the done-record decides."""
    _, out = labelled(tmp_path, 2)
    index_path = out / "records" / "_done_index.json"
    index = json.loads(index_path.read_bytes())
    row = index["shards"].index("00001")
    index["tar_change"][row] += 1
    index_path.write_text(json.dumps(index))
    store = OutputStore(str(out))
    done_record_reads.clear()
    done, damaged = store.committed_entries(["00000", "00001"], save_index=True)
    assert sorted(done) == ["00000", "00001"] and damaged == {}
    assert done_record_reads == [store.done_path("00001")]
    rows = parse_index(index_path.read_bytes())
    assert rows["00001"][1].tar_change == (out / "shards" / "00001.tar").stat().st_mtime_ns


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"version": 2, "shards": ["00000"]}', b"[1, 2]"])
def test_a_broken_index_is_ignored_and_rewritten(tmp_path, caplog, content):
    manifest, out = labelled(tmp_path, 2)
    clean = digests(out)
    (out / "records" / "_done_index.json").write_bytes(content)
    caplog.clear()
    assert run(manifest) == 0
    assert "0 to label" in caplog.text and digests(out) == clean
    assert sorted(parse_index((out / "records" / "_done_index.json").read_bytes())) == ["00000", "00001"]


def test_a_rerun_restores_both_caches_so_status_reads_no_done_record(tmp_path, done_record_reads, capsys):
    manifest, out = labelled(tmp_path, 3)
    for cache in ("_done_index.json", "_done_records.json"):
        (out / "records" / cache).unlink()  # e.g. an output written before these caches existed
    assert run(manifest) == 0  # nothing to label: planning reads the done-records and caches them
    done_record_reads.clear()
    assert main(["status", str(out)]) == 0
    assert "3 done / 0 failed / 0 pending / 3 total" in capsys.readouterr().out
    assert done_record_reads == []


def test_status_sees_a_done_record_edited_after_the_cache_was_written(tmp_path, capsys):
    _, out = labelled(tmp_path, 2)
    assert (out / "records" / "_done_records.json").exists()
    record = out / "records" / "00000.done.json"
    data = record.read_bytes()
    assert b'"shard":"00000"' in data
    edit_later(record, data.replace(b'"shard":"00000"', b'"shard":"00009"'))
    capsys.readouterr()
    assert main(["status", str(out)]) == 1
    assert "1 done / 1 damaged" in capsys.readouterr().out


# -- the input side: expansion and skip_missing without a request per URL --------------------------
@pytest.mark.parametrize(
    "pattern",
    [
        "/d/{00000..00012}.tar",
        "/d/{0..12}.tar",
        "/d/{07..10}.tar",
        "/d/{0..007}.tar",
        "/d/{8..12}x",
        "s3://b/p-{000..3}.tar::/e/{1..2}.tar",
        "/d/{3..1}.tar",  # descending: the general parser
        "/d/{a,b}/{00..02}.tar",
        "/d/x.tar",
    ],
)
def test_the_fast_range_expansion_equals_braceexpand(pattern):
    expected = [url for part in pattern.split("::") for url in braceexpand(part)]
    assert expand_shard_urls(pattern) == expected


def test_skip_missing_decides_from_one_listing_per_folder(tmp_path, monkeypatch):
    plain, downloading = tmp_path / "plain", tmp_path / "downloading"
    for folder in (plain, downloading):
        for index in (0, 1, 3):
            write_wds(folder / f"{index:05d}.tar", photo_samples(1))
    (downloading / "_download").mkdir()
    (downloading / "00000_stats.json").write_text("{}")
    (downloading / "00003_stats.json").write_text("{}")

    def no_per_url_check(*args, **kwargs):
        raise AssertionError("a request per URL")

    monkeypatch.setattr("fsspec.implementations.local.LocalFileSystem.exists", no_per_url_check)
    urls = [f"{folder}/{index:05d}.tar" for folder in (plain, downloading) for index in range(4)]
    assert complete_urls(urls) == [urls[0], urls[1], urls[3], urls[4], urls[7]]


# -- the planning-time bench -----------------------------------------------------------------------
def test_the_planning_bench_plans_done_shards_without_reading_them(tmp_path, done_record_reads):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import plan_resume
    finally:
        sys.path.remove(str(ROOT / "bench"))
    count = 1500
    plan_resume.build(tmp_path, count)
    plan_resume.plan(tmp_path, count)  # the first rerun reads each done-record once and indexes it
    assert len(done_record_reads) == count
    done_record_reads.clear()
    times = plan_resume.plan(tmp_path, count)  # asserts that every shard is planned as done
    assert done_record_reads == []
    # ~0.05 s here; the bound only catches a return to per-shard reads or a quadratic step
    assert times["wall"] < 2.0, times


def test_the_planning_bench_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plan_resume.py"), "--shards", "300", "--rounds", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "plan a rerun over 300 done shards" in result.stdout


# -- S3: requests do not grow with the shards -------------------------------------------------------
def rerun_requests_on_s3(tmp_path: Path, counter, count: int) -> list[tuple[str, str]]:
    """Label ``count`` input shards of an img2dataset-like S3 folder to S3, rerun, return the
    requests the rerun made. One shard's download is unfinished (no stats file): skipped."""
    import fsspec
    import s3fs

    bucket = f"plan-{count}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    for index in range(count):
        local = write_wds(tmp_path / "in" / f"{index:05d}.tar", photo_samples(1, size=(16, 16), start=index))
        fs.put_file(str(local), f"{bucket}/in/{index:05d}.tar")
        if index != 1:
            fs.pipe_file(f"{bucket}/in/{index:05d}_stats.json", b"{}")
    fs.pipe_file(f"{bucket}/in/_download/download.json", b"{}")
    source = {
        "format": "webdataset",
        "path": f"s3://{bucket}/in/{{00000..{count - 1:05d}}}.tar",
        "skip_missing": True,
    }
    manifest = write_manifest(tmp_path / f"s3-{count}.yaml", source, f"s3://{bucket}/out", ["edge:canny"])
    assert run(manifest) == 0
    assert len(fs.ls(f"{bucket}/out/shards")) == count - 1
    s3fs.S3FileSystem.clear_instance_cache()  # a rerun starts with no cached listing, as a new process
    counter.reset()
    assert run(manifest) == 0
    return list(counter.requests)


def test_a_rerun_on_s3_makes_no_request_per_shard(tmp_path):
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    from s3_server import s3_server

    with s3_server() as (_, counter):
        few = rerun_requests_on_s3(tmp_path / "few", counter, 4)
        many = rerun_requests_on_s3(tmp_path / "many", counter, 12)
    per_shard = [request for request in few + many if FILE_OF_A_SHARD.search(request[1].split("?")[0])]
    assert per_shard == []
    # The same requests, names aside (bucket, temp and log names): listings (one page each here),
    # the index, run.json, the lock and the log. A page holds 1,000 names: 12 shards cost what 4 do.
    assert shape(few) == shape(many), (shape(few), shape(many))
    assert len(few) <= 40, shape(few)


def shape(requests: list[tuple[str, str]]) -> Counter:
    return Counter((method, re.sub(r"[0-9a-f]{6,}|\d+", "N", path)) for method, path in requests)
