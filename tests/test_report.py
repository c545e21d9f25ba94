"""``label-pipeline report``: counts from every record, label statistics and flags from a bounded
sample, contact sheets, and a page that a real browser renders with every image loaded."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from builders import flip_byte, photo_samples, write_manifest, write_wds
from PIL import Image

from label_pipeline.cli import main
from label_pipeline.core.format import encode_json, encode_png
from label_pipeline.label_stats import TaskStats, collect, flags
from label_pipeline.report import ReportOptions, build_report, report_flags, write_report
from label_pipeline.report_html import render_html

REPO = Path(__file__).resolve().parents[1]


def _bench_module():
    """bench/report.py builds the synthetic outputs: the tests keep the benchmark working too."""
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory) -> Path:
    """Two shards labelled with edge:canny; shard 00001 holds an undecodable and an empty image."""
    tmp = tmp_path_factory.mktemp("report")
    write_wds(tmp / "in" / "00000.tar", photo_samples(4, size=(48, 64)))
    bad = [{"jpg": b"this is not an image", "txt": b"broken"}, {"jpg": b"", "txt": b"empty"}]
    write_wds(tmp / "in" / "00001.tar", photo_samples(3, size=(48, 64), start=4) + bad)
    source = {"format": "webdataset", "path": str(tmp / "in" / "{00000..00001}.tar")}
    manifest = write_manifest(tmp / "m.yaml", source, tmp / "out", ["edge:canny"])
    assert main(["run", str(manifest), "--no-progress"]) == 1  # failed samples: exit 1
    return tmp / "out"


def test_report_counts_every_record_and_draws_samples_and_failures(demo_output):
    report = build_report(str(demo_output), ReportOptions(gallery=3, failures=4))
    assert report.records.samples == 9
    assert report.records.status == {"ok": 7, "undecodable": 1, "empty_image": 1}
    assert report.records.failures_by_shard == {"00001": 2}
    assert {f.status for f in report.records.failures} == {"undecodable", "empty_image"}
    assert report.status.done == 2 and report.sampled == {"00000": 4, "00001": 5}
    edge = report.labels["edge"]
    assert edge.kind == "edge" and edge.samples == 7  # failed samples have no label to count
    assert 0 < np.mean(edge.per_image) < 0.5  # a gradient with a square has some edges, not only edges
    assert len(report.gallery) == 3 and len(report.failure_sheets) == 2  # only two failures exist
    assert all(s.image.width > 100 for s in report.gallery + report.failure_sheets)
    assert report_flags(report) == []


def test_report_page_is_self_contained(demo_output, tmp_path):
    out = tmp_path / "report.html"
    report, size = write_report(str(demo_output), str(out), ReportOptions(gallery=2, failures=2))
    page = out.read_text(encoding="utf-8")
    assert size == len(page.encode("utf-8"))
    sources = re.findall(r"<img[^>]* src='([^']*)'", page)
    # the edge plots, throughput, failures per shard, 2 random sheets, 2 failure sheets
    assert len(sources) == 7 and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r"(href|src)=['\"]?(https?:|//|file:)", page)  # nothing outside the file
    assert "<script" not in page
    for text in ("Summary", "undecodable", "empty_image", "edge (edge:canny)", "00001/"):
        assert text in page


def test_report_is_deterministic_for_a_seed(tmp_path):
    _bench_module().build_output(tmp_path / "out", samples=300, shards=6, size=(48, 64))
    first = build_report(str(tmp_path / "out"), ReportOptions(samples=100, shards=3, seed=7))
    again = build_report(str(tmp_path / "out"), ReportOptions(samples=100, shards=3, seed=7))
    other = build_report(str(tmp_path / "out"), ReportOptions(samples=100, shards=3, seed=8))
    assert first.sampled == again.sampled and sum(first.sampled.values()) == 100
    assert [s.title for s in first.gallery] == [s.title for s in again.gallery]
    assert first.sampled != other.sampled or [s.title for s in first.gallery] != [
        s.title for s in other.gallery
    ]
    footer = re.compile(r"<footer>.*</footer>")
    assert footer.sub("", render_html(first)) == footer.sub("", render_html(again))


def test_synthetic_output_statistics_and_class_names(tmp_path):
    _bench_module().build_output(tmp_path / "out", samples=200, shards=2, size=(48, 64))
    report = build_report(str(tmp_path / "out"), ReportOptions(samples=200, failures=3))
    assert report.records.samples == 200
    # every 100th sample undecodable, every other 50th without OCR
    assert report.records.status == {"ok": 196, "partial": 2, "undecodable": 2}
    assert report.records.experts["ocr_detection"] == {"ok": 196, "error": 2}
    assert set(report.labels) == {"depth", "normal", "edge", "seg_coco", "obj_detection", "ocr_detection"}
    seg = report.labels["seg_coco"]
    names = [name for _, name, _ in seg.top_classes()]
    assert "person" in names  # class id 0, the most frequent (Zipf) class, named
    assert report.labels["normal"].normal_z[-4:].sum() > 0  # the synthetic normals face the camera
    assert report.labels["depth"].constant == 0
    # failures take turns by status: both kinds are drawn
    status_of = {f"{f.shard}/{f.key}": f.status for f in report.records.failures}
    assert len(report.failure_sheets) == 3
    assert {status_of[s.title] for s in report.failure_sheets} == {"partial", "undecodable"}
    assert report.runs and report.runs[0]["runner"] == "local" and report.runs[0]["throughput"]


def test_constant_depth_and_empty_detector_are_flagged(tmp_path):
    _bench_module().build_output(
        tmp_path / "out", samples=120, shards=2, size=(32, 48), constant_depth=True, empty_detection=True
    )
    report = build_report(str(tmp_path / "out"), ReportOptions(samples=120))
    found = report_flags(report)
    assert any(f.startswith("depth: constant maps") and "100.0%" in f for f in found), found
    assert any(f.startswith("obj_detection: empty on 100.0%") for f in found), found
    # the synthetic normals are the depth's gradient: constant as well
    assert any(f.startswith("normal: constant maps") for f in found), found
    assert not any(f.startswith(("edge:", "seg_coco:", "ocr_detection:")) for f in found), found
    assert "constant maps" in render_html(report)


def test_task_statistics_from_members():
    stats: dict[str, TaskStats] = {}
    meta = {"experts": {"depth": {"status": "ok"}, "edge": {"status": "ok"}, "seg_coco": {"status": "error"}}}
    depth = np.tile(np.arange(64, dtype=np.uint8), (8, 1))
    edge = np.full((8, 64), 255, np.uint8)
    edge[5, :16] = 0  # one 1-px line on an odd row: 16 of 512 pixels
    members = {
        "json": encode_json(meta),
        "depth.png": encode_png(depth, "L"),
        "edge.png": encode_png(edge, "L"),
    }
    collect(stats, "k", members)
    collect(stats, "k2", {**members, "edge.png": b"garbage"})
    assert set(stats) == {"depth", "edge"}  # the failed expert is not counted
    depth_values = stats["depth"].values
    assert stats["depth"].samples == 2 and depth_values.sum() > 0 and depth_values[64:].sum() == 0
    assert stats["edge"].samples == 1 and stats["edge"].per_image == [16 / 512]
    assert stats["edge"].unreadable and stats["edge"].unreadable[0].startswith("k2: ")
    assert any("do not decode" in f for f in flags(stats["edge"]))
    assert flags(stats["depth"], failed=1, labelled=10) == ["fails on 10.0% of its samples (1 of 10)"]


def test_report_survives_damage_that_keeps_size_and_mtime(tmp_path, capsys):
    out = tmp_path / "out"
    _bench_module().build_output(out, samples=60, shards=3, size=(32, 48), with_stats=False)
    # Inside the first header, the tar does not read; in the closing Parquet magic, the records do not.
    flip_byte(out / "shards" / "00001.tar", 100, keep_mtime=True)
    parquet = out / "records" / "00002.parquet"
    flip_byte(parquet, parquet.stat().st_size - 1, keep_mtime=True)
    html = tmp_path / "r.html"
    assert main(["report", str(out), "--out", str(html), "--samples", "60"]) == 0
    assert "wrote" in capsys.readouterr().out
    page = html.read_text()
    assert "tar of shard 00001 unreadable" in page and "records of shard 00002 unreadable" in page
    assert "No run statistics" in page


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert main(["report", str(tmp_path), "--samples", "-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "_run.json" in err and "--samples must be 0 or more" in err
    assert not (tmp_path / "r.html").exists()


# -- a real browser -------------------------------------------------------------------------------
# The checker added to a copy of the page: once everything has loaded, it writes into the DOM how many
# images decoded, and which did not. --dump-dom prints the DOM after the load event.
IMAGE_CHECK = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  document.body.setAttribute('data-images', `${images.length - broken.length}/${images.length}`);
  document.body.setAttribute('data-broken', broken.join('|'));
});
</script>"""
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "headless Chromium is not installed (apt-get install -y chromium); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(message + ": required under CI")
        pytest.skip(message)
    return found


def _browse(chromium: str, page: Path, profile: Path, *action: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *action, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _rendered(chromium: str, page: Path, profile: Path) -> tuple[str, str, list[str]]:
    """(images loaded "n/m", alt texts of broken images, console messages) of ``page`` in Chromium."""
    checked = page.with_name(page.stem + ".checked.html")
    checked.write_text(page.read_text(encoding="utf-8").replace("</body>", IMAGE_CHECK + "</body>"))
    result = _browse(chromium, checked, profile, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = re.search(r'data-images="([^"]*)"', result.stdout)
    broken = re.search(r'data-broken="([^"]*)"', result.stdout)
    assert loaded and broken is not None, f"the image check did not run: {result.stdout[:300]}"
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return loaded.group(1), broken.group(1), console


def test_the_checks_catch_a_broken_page(tmp_path):
    """The browser checks below can fail: a broken image and a script error are both seen."""
    chromium = _chromium()
    page = tmp_path / "broken.html"
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    page.write_text(
        f"<html><body><img alt=good src='data:image/png;base64,{png}'>"
        "<img alt=bad src='data:image/png;base64,AAAA'><script>missingFunction()</script></body></html>"
    )
    loaded, broken, console = _rendered(chromium, page, tmp_path / "profile")
    assert loaded == "1/2" and broken == "bad"
    assert any("missingFunction" in line for line in console), console


def test_report_renders_in_headless_chromium(demo_output, tmp_path):
    chromium = _chromium()
    page = tmp_path / "report.html"
    report, _ = write_report(str(demo_output), str(page), ReportOptions(gallery=4, failures=2))
    images = len(re.findall(r"<img ", page.read_text(encoding="utf-8")))
    assert images == 9  # edge plots, throughput, failures per shard, 4 random sheets, 2 failure sheets

    loaded, broken, console = _rendered(chromium, page, tmp_path / "profile")
    assert loaded == f"{images}/{images}" and broken == "", f"images not loaded: {broken}"
    assert console == [], console

    shot = tmp_path / "report.png"
    result = _browse(chromium, page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape == (2000, 1280, 3)
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    # The page is mostly light background; plots and photos make up a real share of it.
    assert 0.05 < (pixels.mean(axis=2) < 200).mean() < 0.9
    # Keep the screenshot for a person to look at when REPORT_SCREENSHOT names a file.
    if os.environ.get("REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["REPORT_SCREENSHOT"])
    assert json.dumps(report_flags(report)) == "[]"
