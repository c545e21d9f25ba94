"""A run killed with SIGKILL in the middle of a shard resumes to byte-identical output."""

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from builders import photo_samples, write_manifest, write_wds

TESTS = Path(__file__).resolve().parent
RUNNER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from experts_for_tests import register_test_experts
register_test_experts()
from label_pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_run(manifest: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, "run", str(manifest), "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the run to reach the kill point"
        time.sleep(0.02)


def keys_of(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]


def test_sigkill_mid_shard_then_resume_is_byte_identical(tmp_path):
    for index in range(3):
        write_wds(tmp_path / "in" / f"{index:05d}.tar", photo_samples(6, start=6 * index))
    source = {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..00002}}.tar"}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "SLOW_EDGE_SECONDS": "0.25", "PYTHONPATH": str(TESTS.parent)}

    process = start_run(write_manifest(tmp_path / "k.yaml", source, killed, ["edge:slow"]), env)
    # Kill while shard 00001 is half written: shard 00000 committed, a temp tar for 00001 exists.
    wait_for(
        lambda: (
            (killed / "records" / "00000.done.json").exists()
            and any((killed / "shards").glob("00001.tar.tmp-*"))
        ),
        timeout=120,
    )
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "records" / "00001.done.json").exists()
    assert (killed / "_lock").exists()  # left behind by the dead run: must be recognised as stale

    resumed = start_run(write_manifest(tmp_path / "k.yaml", source, killed, ["edge:slow"]), env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    reference = start_run(write_manifest(tmp_path / "c.yaml", source, clean, ["edge:slow"]), env)
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()

    for index in range(3):
        name = f"{index:05d}.tar"
        assert (killed / "shards" / name).read_bytes() == (clean / "shards" / name).read_bytes()
        keys = keys_of(killed / "shards" / name)
        assert keys == [f"{i:06d}" for i in range(6)]  # no duplicate, no missing key
    assert not [p for p in (killed / "shards").iterdir() if ".tmp-" in p.name]  # cleaned on resume
