"""``verify``, ``status`` and ``inspect`` on damaged outputs: one line per problem, never a traceback.

Each test damages a labelled output the way disks, people and killed runs do, then checks that the
tool names the damage, goes on with the other shards and exits 1 (``verify --repair``: 0, with the
bytes of a clean run back).
"""

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import flip_byte, gradient, image_bytes, photo_samples, write_manifest, write_wds
from PIL import Image

from label_pipeline.cli import main
from label_pipeline.contact_sheet import PLACEHOLDER_GREY, TILE
from label_pipeline.core.tario import write_tar
from label_pipeline.output import OutputStore


def label(
    tmp_path: Path, shards: int, samples: list[list[dict[str, bytes]]] | None = None, exit_code: int = 0
) -> Path:
    """Label ``shards`` small input shards with edge:canny; returns the output root."""
    inputs = tmp_path / "in"
    for index in range(shards):
        content = samples[index] if samples else photo_samples(2, size=(24, 32), start=2 * index)
        write_wds(inputs / f"{index:05d}.tar", content)
    out = tmp_path / "out"
    source = {"format": "webdataset", "path": str(inputs / f"{{00000..{shards - 1:05d}}}.tar")}
    manifest = write_manifest(tmp_path / "m.yaml", source, out, ["edge:canny"])
    assert main(["run", str(manifest), "--no-progress"]) == exit_code
    return out


def digests(out: Path) -> dict[str, str]:
    files = sorted([*out.glob("shards/*.tar"), *out.glob("records/*.parquet")])
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def problem_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("PROBLEM ")]


def rewrite_member(tar_path: Path, member: str, data: bytes) -> None:
    """Replace one member's bytes, keeping the tar well-formed (as a buggy writer would)."""
    with tarfile.open(tar_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with open(tar_path, "wb") as handle:
        write_tar(handle, [[(name, data if name == member else content) for name, content in members]])


def test_verify_reports_each_damaged_shard_once_and_checks_the_rest(tmp_path, capsys):
    out = label(tmp_path, 8)
    shards, records = out / "shards", out / "records"
    # 00000 stays clean. 00001: truncated tar (tarfile.ReadError used to escape and stop verify).
    data = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(data[: len(data) // 2])
    # 00002: corrupt Parquet (ArrowInvalid used to escape). 00003: Parquet missing.
    (records / "00002.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    (records / "00003.parquet").unlink()
    # 00004: garbage done-record (used to be skipped: verify said ok). 00005: one without sha256.
    (records / "00004.done.json").write_bytes(b"\x00{not json")
    done = json.loads((records / "00005.done.json").read_text())
    del done["sha256"]
    (records / "00005.done.json").write_text(json.dumps(done))
    # 00006: a label PNG that does not decode, in a well-formed tar whose done-record matches it.
    rewrite_member(shards / "00006.tar", "000000.edge.png", b"\x89PNG\r\n\x1a\n broken")
    done = json.loads((records / "00006.done.json").read_text())
    tar_bytes = (shards / "00006.tar").read_bytes()
    done.update(sha256=hashlib.sha256(tar_bytes).hexdigest(), bytes=len(tar_bytes))
    (records / "00006.done.json").write_text(json.dumps(done))
    # 00007: a well-formed Parquet with one status edited: its sha256 no longer matches the done-record.
    table = pq.read_table(records / "00007.parquet")
    statuses = table.column("status").to_pylist()
    table = table.set_column(table.column_names.index("status"), "status", pa.array(["ok", "undecodable"]))
    assert statuses == ["ok", "ok"]
    pq.write_table(table, records / "00007.parquet")
    # A tar without a done-record: what a killed run leaves. Worth a note, not a problem.
    shutil.copy(shards / "00000.tar", shards / "00099.tar")
    capsys.readouterr()

    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    problems = problem_lines(text)
    expected = {
        "00001": "tar unreadable (ReadError",
        "00002": "records unreadable",
        "00003": "records parquet missing",
        "00004": "done-record is not valid JSON",
        "00005": "done-record lacks field(s) ['sha256']",
        "00006": "00006/000000: edge.png does not decode",
        "00007": "records checksum mismatch",
    }
    assert len(problems) == len(expected), text
    for shard_id, message in expected.items():
        lines = [line for line in problems if line.startswith(f"PROBLEM {shard_id}")]
        assert len(lines) == 1 and message in lines[0], text
    assert not [line for line in problems if line.startswith("PROBLEM 00000")]
    assert " at 0x" not in text  # no memory address in a message
    assert "NOTE 00099: tar not committed" in text
    assert "verified 8 shards, 4 samples: PROBLEMS FOUND in 7 shard(s)" in text


def test_verify_repair_brings_back_the_bytes_of_a_clean_run(tmp_path, capsys):
    out = label(tmp_path, 2)
    clean = digests(out)
    flip_byte(out / "shards" / "00000.tar", 700, keep_mtime=True)  # inside the first member's data
    (out / "records" / "00001.parquet").write_bytes(b"garbage, not a parquet file")
    capsys.readouterr()

    assert main(["verify", str(out)]) == 1
    problems = "\n".join(problem_lines(capsys.readouterr().out))
    assert "PROBLEM 00000: checksum mismatch" in problems and "PROBLEM 00001: records unreadable" in problems
    assert digests(out) != clean

    assert main(["verify", str(out), "--repair"]) == 0
    text = capsys.readouterr().out
    assert "REPAIRED 00000" in text and "REPAIRED 00001" in text
    assert text.strip().endswith("verified 2 shards, 4 samples: ok")
    assert digests(out) == clean
    assert main(["verify", str(out), "--repair"]) == 0  # nothing to repair: nothing relabelled
    assert "REPAIRED" not in capsys.readouterr().out


def test_verify_repair_only_relabels_the_damaged_shards(tmp_path, capsys):
    out = label(tmp_path, 3)
    (out / "shards" / "00002.tar").unlink()
    (out / "records" / "00002.done.json").unlink()  # 00002 was never committed: not repair's job
    untouched = (out / "shards" / "00000.tar").stat().st_mtime_ns
    (out / "shards" / "00001.tar").write_bytes(b"")
    (out / "records" / "stray.done.json").write_text("[]")  # names no input shard: removed, not relabelled
    capsys.readouterr()
    assert main(["verify", str(out), "--repair"]) == 0
    text = capsys.readouterr().out
    assert "REPAIRED 00001" in text and "00002" not in text
    assert "NOT REPAIRED stray: not a shard of the input" in text
    assert not (out / "records" / "stray.done.json").exists()
    assert (out / "shards" / "00000.tar").stat().st_mtime_ns == untouched
    assert not (out / "shards" / "00002.tar").exists()


def test_a_live_run_is_not_repaired_under_its_feet(tmp_path, capsys):
    out = label(tmp_path, 2)
    (out / "records" / "00000.done.json").unlink()  # as if this live run were writing 00000 now
    (out / "records" / "00001.parquet").write_bytes(b"garbage")
    live = OutputStore(str(out))
    live.acquire_lock()  # a live run holds the output
    capsys.readouterr()
    try:
        assert main(["verify", str(out), "--repair"]) == 2
    finally:
        live.release_lock()
    text = capsys.readouterr().out
    assert "NOTE a run holds" in text and "not committed" not in text
    assert (out / "records" / "00001.done.json").exists()  # nothing deleted


def test_status_checks_the_tars_and_lists_stale_inputs(tmp_path, capsys):
    out = label(tmp_path, 4)
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "4 done / 0 failed / 0 pending / 4 total" in capsys.readouterr().out
    (out / "shards" / "00001.tar").unlink()  # status used to say "4 done" here
    (out / "records" / "00002.done.json").write_text("{garbage")
    with open(out / "shards" / "00003.tar", "ab") as handle:
        handle.write(b"\0" * 512)
    assert main(["status", str(out)]) == 1
    text = capsys.readouterr().out
    assert "1 done / 3 damaged / 0 failed / 0 pending / 4 total" in text
    assert "damaged shard 00001: tar missing" in text
    assert "damaged shard 00002: done-record unreadable" in text
    assert "damaged shard 00003: tar has" in text
    # The input of the one intact shard is replaced by other content: it is listed as stale.
    write_wds(tmp_path / "in" / "00000.tar", photo_samples(3, size=(24, 32), start=40))
    assert main(["status", str(out)]) == 1
    assert "stale shard 00000: input changed" in capsys.readouterr().out


def test_status_reads_no_tar(tmp_path, capsys, monkeypatch):
    out = label(tmp_path, 2)
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert opened == []


def test_inspect_draws_an_undecodable_sample_as_a_placeholder(tmp_path, capsys):
    good = image_bytes(gradient(24, 32))
    out = label(tmp_path, 1, [[{"jpg": b"not an image at all"}, {"jpg": good}]], exit_code=1)
    sheet_path = tmp_path / "sheet.png"
    assert main(["inspect", str(out / "shards" / "00000.tar"), "--out", str(sheet_path)]) == 0
    sheet = np.asarray(Image.open(sheet_path).convert("RGB"))
    first_panel = sheet[22 : 22 + TILE // 2, 8 : 8 + TILE]
    grey = (first_panel == PLACEHOLDER_GREY).all(axis=2).mean()
    assert grey > 0.8, "the undecodable sample's image should be a grey placeholder"
    assert (first_panel == (255, 255, 255)).all(axis=2).any(), "the placeholder carries its text"


def test_inspect_takes_an_output_root_and_a_shard_id(tmp_path, capsys):
    out = label(tmp_path, 2)
    sheet_path = tmp_path / "sheet.png"
    assert main(["inspect", str(out), "--limit", "1", "--out", str(sheet_path)]) == 0
    assert "from " + str(out / "shards" / "00000.tar") in capsys.readouterr().out
    assert main(["inspect", str(out), "--shard", "00001", "--key", "000001", "--out", str(sheet_path)]) == 0
    assert sheet_path.exists()
    assert main(["inspect", str(out), "--shard", "00042", "--out", str(sheet_path)]) == 2
    assert main(["inspect", str(tmp_path / "nowhere"), "--out", str(sheet_path)]) == 2


def test_inspect_on_a_truncated_tar_is_one_error_line(tmp_path, capsys, caplog):
    out = label(tmp_path, 1, [photo_samples(4, size=(24, 32))])
    tar_path = out / "shards" / "00000.tar"
    with tarfile.open(tar_path) as tar:
        last = tar.getmembers()[-1]
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: last.offset_data + last.size // 2])  # cut inside the last member
    sheet_path = tmp_path / "sheet.png"
    caplog.clear()
    assert main(["inspect", str(tar_path), "--limit", "10", "--out", str(sheet_path)]) == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "tar unreadable" in errors[0].getMessage()
    assert "Traceback" not in caplog.text and sheet_path.exists()  # the samples before the cut are drawn
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 100)
    assert main(["inspect", str(tmp_path / "junk.tar"), "--out", str(sheet_path)]) == 1


@pytest.mark.parametrize("command", ["status", "verify", "inspect"])
def test_a_path_that_is_not_there_is_a_usage_error(tmp_path, command, caplog):
    argv = [command, str(tmp_path / "missing")] + (
        ["--out", str(tmp_path / "s.png")] if command == "inspect" else []
    )
    assert main(argv) == 2
    assert "Traceback" not in caplog.text
