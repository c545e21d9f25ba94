"""Planning a rerun over many done shards: the integrity checks must not make resume slow.

Builds an output root of N committed shards (tiny real input tars, tars, Parquet files and
done-records with the stats a real commit writes) on local disk, then times what a rerun does
before labelling anything: list the inputs (``check_inputs``) and decide what is done
(``plan_shards``). Also times the old way (one stat per tar and per done-record) for the ratio.

    PYTHONPATH=. python bench/plan_resume.py                 # 10,000 shards (target < 1 s)
    PYTHONPATH=. python bench/plan_resume.py --shards 100000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from label_pipeline.config import manifest_from_dict
from label_pipeline.core.format import encode_json
from label_pipeline.output import OutputStore
from label_pipeline.run import RunOptions, check_inputs
from label_pipeline.shard_job import plan_shards

FINGERPRINTS = {"edge": "0123456789abcdef"}


def build(root: Path, count: int) -> None:
    (root / "in").mkdir(parents=True)
    for sub in ("shards", "records"):
        (root / "out" / sub).mkdir(parents=True)
    for index in range(count):
        shard = f"{index:05d}"
        source = root / "in" / f"{shard}.tar"
        source.write_bytes(b"\0" * 1024)
        tar, parquet = root / "out" / "shards" / f"{shard}.tar", root / "out" / "records" / f"{shard}.parquet"
        tar.write_bytes(shard.encode() * 100)
        parquet.write_bytes(shard.encode() * 20)
        record = {
            "shard": shard,
            "samples": 1,
            "ok": 1,
            "failed": 0,
            "experts": {"edge": {"fingerprint": FINGERPRINTS["edge"], "ok": 1, "failed": 0}},
            "sha256": hashlib.sha256(tar.read_bytes()).hexdigest(),
            "bytes": tar.stat().st_size,
            "tar_stat": {"mtime_ns": tar.stat().st_mtime_ns},
            "records": {"bytes": parquet.stat().st_size, "mtime_ns": parquet.stat().st_mtime_ns},
            "input_stat": {"size": 1024, "mtime_ns": source.stat().st_mtime_ns},
        }
        (root / "out" / "records" / f"{shard}.done.json").write_bytes(encode_json(record))


def plan(root: Path, count: int) -> tuple[float, int]:
    manifest = manifest_from_dict(
        {
            "name": "bench",
            "source": {"format": "webdataset", "path": f"{root}/in/{{00000..{count - 1:05d}}}.tar"},
            "output": str(root / "out"),
            "experts": ["edge:canny"],
        }
    )
    started, cpu = time.perf_counter(), time.process_time()
    inputs = check_inputs(manifest, RunOptions())
    work, done = plan_shards(inputs.present, inputs.store, FINGERPRINTS, inputs.identities)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert not work and len(done) == count, (len(work), len(done))
    return elapsed, cpu


def plan_by_stat(root: Path, count: int) -> float:
    """The pre-issue-9 cost model: one size lookup per tar and per input, plus the done-record read."""
    store = OutputStore(str(root / "out"))
    started = time.perf_counter()
    for index in range(count):
        shard = f"{index:05d}"
        store.read_json(store.done_path(shard))
        store.fs.size(store.shard_path(shard))
        os.stat(root / "in" / f"{shard}.tar")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        build(root, args.shards)
        print(f"built {args.shards} done shards in {time.perf_counter() - started:.1f}s")
        plan(root, args.shards)  # warm the page cache and imports, as a rerun on a busy node would be
        rounds = [plan(root, args.shards) for _ in range(3)]
        ours = min(wall for wall, _ in rounds)
        by_stat = min(plan_by_stat(root, args.shards) for _ in range(3))
        cpu = min(cpu for _, cpu in rounds)
        print(f"plan a rerun over {args.shards} done shards: {ours:.3f}s wall, {cpu:.3f}s CPU (target < 1 s)")
        print(f"one stat per file instead (no integrity checks): {by_stat:.3f}s; ratio {by_stat / ours:.2f}")


if __name__ == "__main__":
    main()
