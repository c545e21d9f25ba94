"""Issue #9's promises tried as an adversary would: each test first breaks what a claim depends on.

Done means verified (a damaged tar or records file, or a changed input, is labelled again), a lock
cannot wedge the output, the output never overlaps the inputs, missing input is reported up front,
SIGTERM leaves a resumable output, and exit codes say whether failures remain in the output.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import flip_byte, gradient, image_bytes, photo_samples, write_manifest, write_wds
from experts_for_tests import register_test_experts

from label_pipeline.cli import main
from label_pipeline.output import OutputLocked, OutputStore

register_test_experts()
TESTS = Path(__file__).resolve().parent
SUBPROCESS_MAIN = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from experts_for_tests import register_test_experts
register_test_experts()
from label_pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(manifest: Path, *extra: str) -> int:
    return main(["run", str(manifest), "--no-progress", *extra])


def digests(out: Path) -> dict[str, str]:
    """sha256 of every tar and Parquet file of an output root."""
    files = sorted([*out.glob("shards/*.tar"), *out.glob("records/*.parquet")])
    return {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def labelled(tmp_path):
    """Two input shards labelled with edge:canny, plus a clean reference output of the same input."""
    write_wds(tmp_path / "in" / "00000.tar", photo_samples(3, size=(40, 60)))
    write_wds(tmp_path / "in" / "00001.tar", photo_samples(2, size=(30, 20), start=3))
    source = {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..00001}}.tar"}
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.yaml", source, out, ["edge:canny"])
    assert run(manifest) == 0
    return manifest, out, digests(out)


def first_member_offset(tar_path: Path) -> int:
    return 512 + 10  # inside the first member's data, after its header


# -- 1. done means verified ------------------------------------------------------------------------
def test_a_flipped_byte_in_a_finished_tar_is_relabelled_by_a_rerun(labelled, caplog):
    manifest, out, clean = labelled
    flip_byte(out / "shards" / "00000.tar", first_member_offset(out / "shards" / "00000.tar"))
    assert run(manifest) == 0
    assert digests(out) == clean
    assert "00000 is labelled again" in caplog.text and "modified after it was committed" in caplog.text


def test_a_corrupt_records_file_is_relabelled_by_a_rerun(labelled):
    manifest, out, clean = labelled
    parquet = out / "records" / "00001.parquet"
    parquet.write_bytes(b"\0" * parquet.stat().st_size)
    assert run(manifest) == 0
    assert digests(out) == clean


def test_relabel_does_not_carry_over_members_of_a_silently_corrupted_tar(labelled, tmp_path, caplog):
    manifest, out, _ = labelled
    tar = out / "shards" / "00000.tar"
    flip_byte(tar, first_member_offset(tar), keep_mtime=True)  # invisible to a stat: found by sha256
    source = {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..00001}}.tar"}
    changed = [{"name": "edge:canny", "options": {"low": 50}}]
    assert run(write_manifest(manifest, source, out, changed), "--relabel", "edge") == 0
    assert "sha256 differs from its done-record" in caplog.text
    reference = tmp_path / "reference"
    assert run(write_manifest(tmp_path / "r.yaml", source, reference, changed)) == 0
    assert digests(out) == digests(reference)  # the stored image is the input's again
    assert main(["verify", str(out)]) == 0


def test_a_replaced_input_shard_is_relabelled(labelled, tmp_path, caplog):
    manifest, out, _ = labelled
    write_wds(tmp_path / "in" / "00001.tar", photo_samples(4, size=(24, 24), start=50), keys=list("wxyz"))
    assert run(manifest) == 0
    assert "its input changed since it was labelled" in caplog.text
    reference = tmp_path / "reference"
    source = {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..00001}}.tar"}
    assert run(write_manifest(tmp_path / "r.yaml", source, reference, ["edge:canny"])) == 0
    assert digests(out) == digests(reference)


def test_done_records_name_what_they_vouch_for(labelled, tmp_path):
    _, out, _ = labelled
    record = json.loads((out / "records" / "00000.done.json").read_text())
    tar, parquet, source = out / "shards" / "00000.tar", out / "records" / "00000.parquet", tmp_path / "in"
    assert record["bytes"] == tar.stat().st_size and record["tar_stat"]["mtime_ns"] == tar.stat().st_mtime_ns
    assert record["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
    assert record["records"]["sha256"] == hashlib.sha256(parquet.read_bytes()).hexdigest()
    stat = (source / "00000.tar").stat()
    assert record["input_stat"] == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# -- 4. a lock that cannot wedge -------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"\x00garbage{", b'{"host": "elsewhere", "pid": 1}'])
def test_a_left_over_lock_file_never_wedges_the_output(labelled, content):
    manifest, out, clean = labelled
    (out / "_lock").write_bytes(content)  # e.g. an empty file left by a run that hit a full disk
    (out / "records" / "00000.done.json").unlink()
    assert run(manifest) == 0
    assert digests(out) == clean and not (out / "_lock").exists()


def test_a_live_holder_is_refused_and_force_unlock_always_works(labelled, capsys):
    manifest, out, _ = labelled
    holder = OutputStore(str(out))
    holder.acquire_lock()
    try:
        assert run(manifest) == 2
        assert "is being written by another run" in capsys.readouterr().err
        assert run(manifest, "--force-unlock") == 0
    finally:
        holder.release_lock()


def _contend(root: str, barrier: multiprocessing.Barrier, results: multiprocessing.Queue) -> None:
    store = OutputStore(root)
    barrier.wait()
    try:
        store.acquire_lock()
    except OutputLocked:
        results.put("lost")
        barrier.wait()
        return
    results.put("won")
    barrier.wait()  # hold the lock until every contender has tried
    store.release_lock()


@pytest.mark.parametrize("stale", [None, b"", b'{"host": "h", "pid": 999999999}'])
def test_many_contenders_exactly_one_winner(tmp_path, stale):
    root = tmp_path / "out"
    root.mkdir()
    if stale is not None:
        (root / "_lock").write_bytes(stale)
    context = multiprocessing.get_context("fork")
    contenders = 12
    barrier, results = context.Barrier(contenders), context.Queue()
    processes = [
        context.Process(target=_contend, args=(str(root), barrier, results)) for _ in range(contenders)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    outcomes = sorted(results.get(timeout=5) for _ in range(contenders))
    assert outcomes.count("won") == 1, outcomes


# -- 5. the output never overlaps the input --------------------------------------------------------
def test_an_output_that_would_overwrite_the_input_is_refused(tmp_path, capsys):
    root = tmp_path / "X"
    write_wds(root / "shards" / "00000.tar", photo_samples(2))
    before = (root / "shards" / "00000.tar").read_bytes()
    source = {"format": "webdataset", "path": f"{root}/shards/*.tar".replace("*", "00000")}
    assert run(write_manifest(tmp_path / "m.yaml", source, root, ["edge:canny"])) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert (root / "shards" / "00000.tar").read_bytes() == before
    assert not (root / "_run.json").exists()


def test_an_output_inside_a_folder_source_is_refused(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(image_bytes(gradient(20, 20)))
    manifest = write_manifest(
        tmp_path / "m.yaml", {"format": "folder", "path": str(images)}, images / "lab", ["edge:canny"]
    )
    assert run(manifest) == 2
    assert "overlaps the input" in capsys.readouterr().err and not (images / "lab").exists()


# -- 6. missing input is an error up front ---------------------------------------------------------
def test_no_input_at_all_is_a_usage_error_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("LABELS_ROOT", str(tmp_path / "labels"))
    assert main(["run", "cc12m", "--no-progress", "--experts", "edge:canny"]) == 2
    err = capsys.readouterr().err
    assert "make download DATASET=cc12m" in err and "Traceback" not in err
    assert not (tmp_path / "labels").exists()


def test_coco_without_data_points_to_make_prepare_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("LABELS_ROOT", str(tmp_path / "labels"))
    assert main(["run", "coco", "--no-progress", "--experts", "edge:canny"]) == 2
    err = capsys.readouterr().err
    assert "make prepare DATASET=coco" in err and "Traceback" not in err
    assert not (tmp_path / "labels").exists()


def test_some_missing_input_shards_one_line_label_the_rest_exit_1(tmp_path, capfd):
    write_wds(tmp_path / "in" / "00000.tar", photo_samples(2))
    source = {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..00010}}.tar"}
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.yaml", source, out, ["edge:canny"])
    for _ in range(2):  # the same answer on every rerun while the shards are missing
        assert run(manifest) == 1
        err = capfd.readouterr().err
        assert err.count("10 of 11 input shards do not exist") == 1 and "Traceback" not in err
    assert (out / "records" / "00000.done.json").exists()
    assert json.loads((out / "records" / "00003.failed.json").read_text())["error"].startswith(
        "input shard missing"
    )
    assert list((out / "logs").glob("run-*.log"))


# -- 11. SIGTERM -----------------------------------------------------------------------------------
def test_sigterm_mid_shard_releases_everything_and_resumes_identically(tmp_path):
    for index in range(2):
        write_wds(tmp_path / "in" / f"{index:05d}.tar", photo_samples(6, start=6 * index))
    source = {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..00001}}.tar"}
    out, clean = tmp_path / "out", tmp_path / "clean"
    env = {**os.environ, "SLOW_EDGE_SECONDS": "0.25", "PYTHONPATH": str(TESTS.parent)}
    command = [sys.executable, "-c", SUBPROCESS_MAIN, "run"]
    manifest = write_manifest(tmp_path / "m.yaml", source, out, ["edge:slow"])
    process = subprocess.Popen([*command, str(manifest), "--no-progress"], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("*.tmp-*")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    err = process.stderr.read().decode()
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not (out / "_lock").exists() and not list((out / "shards").glob("*.tmp-*"))
    assert subprocess.run([*command, str(manifest), "--no-progress"], env=env).returncode == 0
    reference = write_manifest(tmp_path / "c.yaml", source, clean, ["edge:slow"])
    assert subprocess.run([*command, str(reference), "--no-progress"], env=env).returncode == 0
    assert digests(out) == digests(clean)


# -- 13. exit codes --------------------------------------------------------------------------------
def test_failed_samples_keep_exit_1_on_every_rerun(tmp_path):
    samples = photo_samples(2)
    samples[1]["jpg"] = b"not an image"
    write_wds(tmp_path / "in" / "00000.tar", samples)
    source = {"format": "webdataset", "path": f"{tmp_path}/in/00000.tar"}
    manifest = write_manifest(tmp_path / "m.yaml", source, tmp_path / "out", ["edge:canny"])
    assert [run(manifest) for _ in range(3)] == [1, 1, 1]
