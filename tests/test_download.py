"""The download stage, offline: each web dataset's published file → img2dataset → labelled shards.

Images come from a threaded HTTP server on 127.0.0.1 that the test starts; each published file, in
its dataset's exact layout, holds good urls, a dead one (404) and one that is not an image. One
dataset's download is killed mid-shard (SIGKILL to its process group) and resumed.
"""

from __future__ import annotations

import http.server
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from builders import gradient, image_bytes
from PIL import Image

from label_pipeline import download, prepare
from label_pipeline.cli import main as cli_main
from label_pipeline.config import load_manifest
from label_pipeline.sources.webdataset import expand_shard_urls

REPO = Path(__file__).resolve().parent.parent
GOOD = 12  # good image urls per published file
DEAD_ROW, TEXT_ROW = 3, 11  # rows (0-based) of the 404 url and of the non-image url
SLOW_ROW = 13  # in shard 1: the url that hangs while the download is killed
FAST = ["--processes", "1", "--threads", "4", "--samples-per-shard", "10"]
BIG = 5  # this image is bigger than the 480 px transform: it is scaled down, aspect kept


class ImageServer:
    """Serves /img/N.jpg, 404 for /dead/, HTML for /text/; /slow/N.jpg waits for ``gate``."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.gate = threading.Event()
        self.images = {i: image_bytes(gradient(40 + i, 56 + 2 * i)) for i in range(GOOD + 4)}
        self.images[BIG] = image_bytes(gradient(600, 800))
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's naming
                server.requests.append(self.path)
                kind, _, name = self.path.strip("/").partition("/")
                if kind == "slow":
                    server.gate.wait(timeout=60)
                if kind in ("img", "slow"):
                    self._send(server.images[int(name.split(".")[0])], "image/jpeg")
                elif kind == "text":
                    self._send(b"<html><body>not an image</body></html>", "text/html")
                else:
                    self.send_error(404)

            def _send(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the killed download hung up
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def rows(self, slow: bool = False) -> list[tuple[str, str]]:
        """(url, caption) rows: GOOD images with the dead and the non-image url between them."""
        rows = []
        images = iter(range(GOOD + 4))
        for row in range(GOOD + 2 + int(slow)):
            if row == DEAD_ROW:
                rows.append((f"{self.base}/dead/{row}.jpg", f"dead link {row}"))
            elif row == TEXT_ROW:
                rows.append((f"{self.base}/text/{row}.jpg", f"a web page {row}"))
            else:
                kind = "slow" if slow and row == SLOW_ROW else "img"
                rows.append((f"{self.base}/{kind}/{next(images)}.jpg", f'a "quoted" caption, café {row}'))
        return rows


@pytest.fixture
def server() -> Iterator[ImageServer]:
    server = ImageServer()
    thread = threading.Thread(target=server.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.gate.set()
        server.httpd.shutdown()
        server.httpd.server_close()


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    data, labels = tmp_path / "data", tmp_path / "labels"
    data.mkdir()
    monkeypatch.setenv("DATA_ROOT", str(data))
    monkeypatch.setenv("LABELS_ROOT", str(labels))
    return data, labels


def publish(dataset: str, rows: list[tuple[str, str]], data: Path) -> Path:
    """Write ``rows`` in the dataset's published layout, under its published name."""
    path = data / download.URL_LISTS[dataset].filename
    if dataset == "cc3m":  # no header; caption, url
        path.write_text("".join(f"{caption}\t{url}\n" for url, caption in rows), encoding="utf-8")
    elif dataset == "cc12m":  # no header; url, caption
        path.write_text("".join(f"{url}\t{caption}\n" for url, caption in rows), encoding="utf-8")
    else:  # SBU: parallel lists
        data_ = {
            "image_urls": [u for u, _ in rows],
            "captions": [c for _, c in rows],
            "user_ids": [f"{i}@N00" for i in range(len(rows))],
        }
        path.write_text(json.dumps(data_), encoding="utf-8")
    return path


def read_samples(tars: list[Path]) -> dict[str, dict[str, bytes]]:
    """Every sample of the tars by key; a key seen twice fails the test."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in tars:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})
                assert ext not in samples[key], f"{member.name} twice"
                samples[key][ext] = tar.extractfile(member).read()
    return samples


def good_rows(rows: list[tuple[str, str]]) -> dict[str, str]:
    """Expected key → caption: the key is the row number (10 samples per shard → 6 digits)."""
    return {f"{i:06d}": caption for i, (url, caption) in enumerate(rows) if "/img/" in url or "/slow/" in url}


def check_labelled(dataset: str, labels: Path, rows: list[tuple[str, str]]) -> dict[str, dict[str, bytes]]:
    assert cli_main(["run", dataset, "--experts", "edge:canny", "--no-progress"]) == 0
    out = labels / dataset
    samples = read_samples(sorted((out / "shards").glob("*.tar")))
    expected = good_rows(rows)
    assert sorted(samples) == sorted(expected)  # every image once; the dead and non-image urls absent
    for key, members in samples.items():
        assert members["txt"].decode() == expected[key]
        meta = json.loads(members["json"])
        assert meta["status"] == "ok" and meta["source"]["meta"]["url"] == rows[int(key)][0]
        with Image.open(io.BytesIO(members["edge.png"])) as edge:
            assert edge.size[::-1] == tuple(meta["size"])
    return samples


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cc3m", "sbu"])
def test_published_file_to_labelled_shards(dataset, server, roots, capsys):
    pytest.importorskip("img2dataset")
    data, labels = roots
    rows = server.rows()
    publish(dataset, rows, data)

    assert download.main([dataset, "--data-root", str(data), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "shards   2 downloaded / 0 incomplete / 0 not started / 2 expected" in printed
    assert (
        f"images   {GOOD} of {GOOD + 2} urls" in printed
        and "failed to download 1, failed to resize 1" in printed
    )
    folder = data / dataset
    url_list = pq.read_table(folder / "_download" / "urls.parquet").to_pylist()
    assert [(r["url"], r["caption"]) for r in url_list] == rows  # the published order, quotes intact
    record = json.loads((folder / "_download" / "download.json").read_text())
    assert record["transform"] == {**download.DEFAULT_TRANSFORM, "tool": download.tool_version()}
    assert record["input"]["rows"] == len(rows) and record["shards_expected"] == 2
    stored = pq.read_table(folder / "00000.parquet").to_pylist()
    assert {r["key"]: r["status"] for r in stored}["000003"] == "failed_to_download"

    samples = check_labelled(dataset, labels, rows)
    with Image.open(io.BytesIO(samples[f"{BIG + 1:06d}"]["jpg"])) as big:  # row 6 holds image 5
        assert big.size == (640, 480)  # keep_ratio: shorter side 600 → 480, no border
    if dataset == "sbu":
        assert json.loads(samples["000000"]["json"])["source"]["meta"]["user_id"] == "0@N00"

    capsys.readouterr()
    assert cli_main(["status", str(labels / dataset)]) == 0
    status = capsys.readouterr().out
    assert f"download {folder}" in status and "00001" in status and "Image decoding error (1)" in status


@pytest.mark.slow
def test_killed_download_resumes_without_duplicates(server, roots, tmp_path):
    pytest.importorskip("img2dataset")
    data, labels = roots
    rows = server.rows(slow=True)  # row 13, in shard 1, hangs until the gate opens
    publish("cc12m", rows, data)
    folder = data / "cc12m"
    command = [
        sys.executable,
        "-m",
        "label_pipeline.download",
        "cc12m",
        "--data-root",
        str(data),
        *FAST,
        "--timeout",
        "60",
    ]
    with open(tmp_path / "first.log", "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 180
            while not any(p.startswith("/slow/") for p in server.requests):
                assert process.poll() is None, (tmp_path / "first.log").read_text()
                assert time.monotonic() < deadline, "the download never reached the slow url"
                time.sleep(0.1)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the download and the workers it spawned
            process.wait()
    assert (folder / "00000_stats.json").exists() and not (folder / "00001_stats.json").exists()
    partial = download.read_download_summary(str(folder))
    assert partial.incomplete == ["00001"] and not partial.complete
    before = len(server.requests)
    shard0 = {url.removeprefix(server.base) for url, _ in rows[:10]}
    assert shard0 <= set(server.requests)

    server.gate.set()
    assert download.main(["cc12m", "--data-root", str(data), *FAST]) == 0
    assert not set(server.requests[before:]) & shard0  # shard 0 was not downloaded again
    summary = download.read_download_summary(str(folder))
    assert summary.complete and [s.shard for s in summary.shards] == ["00000", "00001"]
    assert summary.total("successes") == GOOD + 1 and summary.total("count") == len(rows)
    check_labelled("cc12m", labels, rows)


# --- conversion, records and refusals (no img2dataset run) -----------------------------------------


@pytest.mark.parametrize("dataset", ["cc3m", "cc12m"])
def test_headerless_tsv_keeps_every_row_in_order(dataset, tmp_path):
    url_first = dataset == "cc12m"
    lines = [
        ("http://a/1.jpg", 'He said "hi'),  # an unbalanced quote must not swallow the next lines
        ("http://a/2.jpg", "<PERSON> and a\ttab"),
        ("http://a/3.jpg", "plain"),
    ]
    body = b"".join(((u + "\t" + c) if url_first else (c + "\t" + u)).encode() + b"\n" for u, c in lines)
    body += b"no tab on this line\n" + (
        b"http://a/5.jpg\tbad \xff byte\n" if url_first else b"bad \xff byte\thttp://a/5.jpg\n"
    )
    source = tmp_path / "list.tsv"
    source.write_bytes(body)
    target = tmp_path / "urls.parquet"
    counts = download.convert_published_file(download.URL_LISTS[dataset], str(source), str(target))
    table = pq.read_table(target).to_pylist()
    assert [(r["url"], r["caption"]) for r in table] == [
        *lines,
        ("", "no tab on this line"),
        ("http://a/5.jpg", "bad \ufffd byte"),
    ]
    assert (counts.rows, counts.malformed_rows, counts.replaced_utf8_rows) == (5, 1, 1)


def test_sbu_parallel_lists(tmp_path):
    source = tmp_path / "sbu-captions-all.json"
    source.write_text(
        json.dumps({"image_urls": ["u0", "u1"], "captions": ["c0", "c1"], "user_ids": ["a", "b"]})
    )
    target = tmp_path / "urls.parquet"
    download.convert_published_file(download.URL_LISTS["sbu"], str(source), str(target))
    assert pq.read_table(target).to_pylist() == [
        {"url": "u0", "caption": "c0", "user_id": "a"},
        {"url": "u1", "caption": "c1", "user_id": "b"},
    ]
    source.write_text(json.dumps({"image_urls": ["u0", "u1"], "captions": ["c0"], "user_ids": ["a", "b"]}))
    with pytest.raises(download.ConfigError, match="one length"):
        download.convert_published_file(download.URL_LISTS["sbu"], str(source), str(target))


def test_missing_published_file_names_its_origin(roots, caplog):
    data, _ = roots
    assert download.main(["cc12m", "--data-root", str(data)]) == 2
    assert (
        "cc12m.tsv" in caplog.text
        and "https://storage.googleapis.com/conceptual_12m/cc12m.tsv" in caplog.text
    )


def test_rerun_with_other_transform_or_changed_list_is_refused(roots, monkeypatch, caplog):
    pytest.importorskip("img2dataset")  # only for its version; the download itself is stubbed out
    calls: list[dict] = []
    monkeypatch.setattr(download, "run_img2dataset", calls.append)
    data, _ = roots
    publish("cc3m", [("http://x/0.jpg", "zero"), ("http://x/1.jpg", "one")], data)
    assert download.main(["cc3m", "--data-root", str(data), "--processes", "1"]) == 1  # nothing downloaded
    arguments = calls[0]
    assert arguments["input_format"] == "parquet" and arguments["incremental_mode"] == "incremental"
    assert (arguments["resize_mode"], arguments["image_size"], arguments["oom_shard_count"]) == (
        "keep_ratio",
        480,
        5,
    )
    assert arguments["number_sample_per_shard"] == 10_000 and arguments["output_folder"] == str(data / "cc3m")

    assert (
        download.main(["cc3m", "--data-root", str(data), "--resize-mode", "border", "--image-size", "256"])
        == 2
    )
    assert "resize_mode: 'keep_ratio' then, 'border' now" in caplog.text
    publish("cc3m", [("http://x/0.jpg", "zero")], data)
    assert download.main(["cc3m", "--data-root", str(data)]) == 2
    assert "not the file this download started from" in caplog.text
    assert len(calls) == 1


def test_ctrl_c_during_img2dataset_exits_130(roots, monkeypatch, caplog):
    img2dataset = pytest.importorskip("img2dataset")

    def interrupted(**_: object) -> None:
        raise SystemExit(0)  # what img2dataset's own SIGINT handler does

    monkeypatch.setattr(img2dataset, "download", interrupted)
    data, _ = roots
    publish("sbu", [("http://x/0.jpg", "zero")], data)
    assert download.main(["sbu", "--data-root", str(data)]) == 130
    assert "run the same command again to resume" in caplog.text


def test_summary_reports_rates_and_incomplete_shards(tmp_path):
    folder = tmp_path / "cc3m"
    folder.mkdir()
    stats = {
        "count": 10000,
        "successes": 7250,
        "failed_to_download": 2700,
        "failed_to_resize": 50,
        "status_dict": {"success": 7250, "HTTP Error 404: Not Found": 2000, "timed out": 700},
    }
    (folder / "00000_stats.json").write_text(json.dumps(stats))
    (folder / "00000.tar").write_bytes(b"")
    (folder / "00001.tar").write_bytes(b"")  # killed before its stats were written
    (folder / "00002.tar").write_bytes(b"")
    (folder / "00002_stats.json").write_text('{"count": 10')  # killed while writing them
    summary = download.read_download_summary(str(folder))
    text = download.format_download_summary(summary)
    assert summary.incomplete == ["00001", "00002"] and not summary.complete
    assert "00000 10000 7250 72.5% HTTP Error 404: Not Found (2000)" in " ".join(text.split())
    assert "incomplete 00001, 00002" in text
    assert download.read_download_summary(str(tmp_path)) is None  # no stats, no record: not a download


@pytest.mark.parametrize("dataset", sorted(download.URL_LISTS))
def test_manifest_brace_range_matches_the_published_size(dataset):
    manifest = load_manifest(dataset, env={"DATA_ROOT": "/d", "LABELS_ROOT": "/l"})
    listed = len(expand_shard_urls(manifest.source.path))
    assert listed == math.ceil(download.URL_LISTS[dataset].rows / download.SAMPLES_PER_SHARD)
    assert manifest.source.skip_missing and manifest.source.transform["resize_mode"] == "keep_ratio"
    assert download.shard_folder(manifest) == (f"/d/{dataset}", listed)


# --- prepare: COCO and Visual Genome ---------------------------------------------------------------


def _jpg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(gradient(32 + seed, 48)))


def test_prepare_coco_names_missing_files_then_labels(roots, capsys):
    data, labels = roots
    assert prepare.main(["coco", "--data-root", str(data)]) == 1
    printed = capsys.readouterr().out
    assert (
        f"MISSING  {data}/coco/train2014" in printed
        and "http://images.cocodataset.org/zips/train2014.zip" in printed
    )
    assert f"MISSING  {data}/coco/annotations/coco_karpathy_val.json" in printed
    assert "sfr-vision-language-research/datasets/coco_karpathy_val.json" in printed

    coco = data / "coco"
    names = {
        "train2014": ["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg"],
        "val2014": ["COCO_val2014_000000000042.jpg"],
    }
    for folder, files in names.items():
        for i, name in enumerate(files):
            _jpg(coco / folder / name, i)
    annotations = coco / "annotations"
    annotations.mkdir()
    train = [{"image": f"train2014/{n}", "caption": f"train {n}", "image_id": n} for n in names["train2014"]]
    (annotations / "coco_karpathy_train.json").write_text(json.dumps(train))
    val = [{"image": f"val2014/{names['val2014'][0]}", "caption": ["a val image"], "image_id": "42"}]
    (annotations / "coco_karpathy_val.json").write_text(json.dumps(val))
    (annotations / "coco_karpathy_test.json").write_text("[]")
    assert prepare.main(["coco", "--data-root", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "annotations list 3 images -> 1 shards" in printed and "the full folder has 82783" in printed
    assert f"make labels DATASET=coco DATA_ROOT={data}" in printed
    assert cli_main(["run", "coco", "--experts", "edge:canny", "--no-progress"]) == 0
    samples = read_samples(sorted((labels / "coco" / "shards").glob("*.tar")))
    assert len(samples) == 3 and all("edge.png" in s for s in samples.values())


def test_prepare_vg_checks_images_the_annotations_name(roots, capsys):
    data, _ = roots
    vg = data / "vg"
    _jpg(vg / "VG_100K" / "1.jpg", 0)
    _jpg(vg / "VG_100K_2" / "2.jpg", 1)
    image_data = [
        {"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "coco_id": None},
        {"image_id": 2, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg", "coco_id": 9},
    ]
    (vg / "image_data.json").write_text(json.dumps(image_data))
    assert prepare.main(["vg", "--data-root", str(data)]) == 1
    printed = capsys.readouterr().out
    assert f"MISSING  {vg}/vg_caption.json" in printed and "vg_caption.json" in printed
    assert f"ok       {vg}/VG_100K  (1 files" in printed
    (vg / "vg_caption.json").write_text(json.dumps([{"image": "VG_100K/1.jpg", "caption": "a tree"}]))
    assert prepare.main(["vg", "--data-root", str(data)]) == 0
    assert "annotations list 2 images" in capsys.readouterr().out
    (vg / "VG_100K_2" / "2.jpg").unlink()
    assert prepare.main(["vg", "--data-root", str(data)]) == 1
    assert "not where the annotations put them" in capsys.readouterr().out
