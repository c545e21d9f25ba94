"""Planning a rerun over many done shards: the integrity checks must not make resume slow.

Builds an output root of N committed shards (tiny real input tars, tars, Parquet files and
done-records with the stats a real commit writes) on local disk, then times what a rerun does
before labelling anything: list the inputs (``check_inputs``), list the output root (``prepare``)
and decide what is done (``plan_shards``). Prints wall and CPU time (the minimum of the rounds,
after one warm-up round that also writes the done-record index), and two references: the bare
system calls the checks need (a listing and a stat of every input tar, tar, Parquet file and
done-record: the floor of any implementation that checks them all) and the pre-issue-9 cost
model (one stat per tar and per input, plus a read of every done-record).

    PYTHONPATH=. python bench/plan_resume.py                 # 10,000 shards (target < 1 s)
    PYTHONPATH=. python bench/plan_resume.py --shards 100000 # target < 2 s
    PYTHONPATH=. python bench/plan_resume.py --shards 100000 --dir /tmp/plan100k  # keep the output
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from label_pipeline.config import manifest_from_dict
from label_pipeline.core.format import encode_json
from label_pipeline.output import OutputStore
from label_pipeline.run import RunOptions, check_inputs
from label_pipeline.shard_job import plan_shards

FINGERPRINTS = {"edge": "0123456789abcdef"}


def build(root: Path, count: int) -> None:
    """``count`` committed shards under ``root/out`` made from the input tars in ``root/in``."""
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
        tar_stat, parquet_stat, source_stat = tar.stat(), parquet.stat(), source.stat()
        record = {
            "shard": shard,
            "samples": 1,
            "ok": 1,
            "failed": 0,
            "experts": {"edge": {"fingerprint": FINGERPRINTS["edge"], "ok": 1, "failed": 0}},
            "sha256": "0" * 64,  # never read by planning
            "bytes": tar_stat.st_size,
            "tar_stat": {"mtime_ns": tar_stat.st_mtime_ns},
            "records": {"bytes": parquet_stat.st_size, "mtime_ns": parquet_stat.st_mtime_ns},
            "input_stat": {"size": source_stat.st_size, "mtime_ns": source_stat.st_mtime_ns},
        }
        (root / "out" / "records" / f"{shard}.done.json").write_bytes(encode_json(record))


def manifest_for(root: Path, count: int) -> Any:
    return manifest_from_dict(
        {
            "name": "bench",
            "source": {"format": "webdataset", "path": f"{root}/in/{{00000..{count - 1:05d}}}.tar"},
            "output": str(root / "out"),
            "experts": ["edge:canny"],
        }
    )


def plan(root: Path, count: int) -> dict[str, float]:
    """One rerun's planning; wall and CPU seconds of each step and of the whole."""
    manifest = manifest_for(root, count)
    times: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    inputs = _timed(times, "inputs", lambda: check_inputs(manifest, RunOptions()))
    listing = _timed(times, "listing", inputs.store.prepare)
    store, present, identities = inputs.store, inputs.present, inputs.identities
    work, done = _timed(times, "plan", lambda: plan_shards(present, store, FINGERPRINTS, identities, listing))
    times["wall"], times["cpu"] = time.perf_counter() - wall, time.process_time() - cpu
    assert not work and len(done) == count, (len(work), len(done))
    return times


def _timed(times: dict[str, float], name: str, step: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = step()
    times[name] = time.perf_counter() - started
    return result


def stat_floor(root: Path) -> tuple[float, float]:
    """The system calls alone: list the three folders and stat each file the checks look at
    (wall and CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for folder in (root / "in", root / "out" / "shards", root / "out" / "records"):
        with os.scandir(folder) as entries:
            for entry in entries:
                entry.stat()
    return time.perf_counter() - wall, time.process_time() - cpu


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
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the minimum is reported")
    parser.add_argument(
        "--dir", type=Path, help="build the output here and keep it; reused when it exists (100k: ~3 min)"
    )
    args = parser.parse_args()
    target = 1.0 if args.shards <= 10_000 else 2.0
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        if (root / "in").exists():
            print(f"reusing {root}")
        else:
            started = time.perf_counter()
            build(root, args.shards)
            print(f"built {args.shards} done shards in {time.perf_counter() - started:.1f}s")
        plan(root, args.shards)  # warm-up: page cache, imports, and the done-record index is written
        rounds = [plan(root, args.shards) for _ in range(args.rounds)]
        best = min(rounds, key=lambda t: t["wall"])
        cpu = min(t["cpu"] for t in rounds)
        print(
            f"plan a rerun over {args.shards} done shards: {best['wall']:.3f}s wall, {cpu:.3f}s CPU "
            f"(best of {args.rounds}; target < {target:g} s)"
        )
        print("  " + ", ".join(f"{name} {best[name]:.3f}s" for name in ("inputs", "listing", "plan")))
        floors = [stat_floor(root) for _ in range(args.rounds)]
        floor_wall, floor_cpu = min(w for w, _ in floors), min(c for _, c in floors)
        print(
            f"  the system calls alone (list + stat {4 * args.shards} files): "
            f"{floor_wall:.3f}s wall, {floor_cpu:.3f}s CPU"
        )
        by_stat = min(plan_by_stat(root, args.shards) for _ in range(min(args.rounds, 3)))
        ratio = by_stat / best["wall"]
        print(f"one stat per file, a read per done-record instead: {by_stat:.3f}s; ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
