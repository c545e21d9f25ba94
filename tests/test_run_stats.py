"""Run statistics and progress: ``OUT/stats/local-*.json`` with the schema the Ray runner writes too,
per-chunk progress with per-expert images/s and an ETA, and plain log lines instead of ``\\r`` bars
when stderr is not a terminal."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import pytest
from builders import gradient, image_bytes, photo_samples, write_manifest, write_wds
from experts_for_tests import register_test_experts

from label_pipeline.cli import main
from label_pipeline.output import OutputStore
from label_pipeline.progress import Progress, format_duration
from label_pipeline.run_stats import Throughput, latest_stats, stats_document

register_test_experts()
TOP_KEYS = {
    "format",
    "runner",
    "run_id",
    "created",
    "status",
    "elapsed_s",
    "samples",
    "images_per_s",
    "shards",
    "experts",
    "throughput",
}
EXPERT_KEYS = {"images", "batches", "busy_s", "failed_batches", "images_per_s", "busy_fraction"}
SHARD_KEYS = {"planned", "done", "failed", "skipped"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def two_shards(tmp_path):
    samples = [*photo_samples(4), {"jpg": image_bytes(gradient(20, 13))}]  # edge:flaky fails on the last
    write_wds(tmp_path / "in" / "00000.tar", samples)
    write_wds(tmp_path / "in" / "00001.tar", photo_samples(3, start=4))
    return write_manifest(
        tmp_path / "m.yaml",
        {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..00001}}.tar"},
        tmp_path / "out",
        ["edge:flaky", "depth:brightness"],
    )


def test_local_run_writes_stats_in_the_shared_schema(tmp_path, two_shards):
    assert main(["run", str(two_shards), "--no-progress"]) == 1  # one partial sample
    (path,) = (tmp_path / "out" / "stats").glob("local-*.json")
    stats = json.loads(path.read_text())
    assert TOP_KEYS <= set(stats) and stats["format"] == 1
    assert stats["runner"] == "local" and stats["status"] == "completed" and stats["samples"] == 8
    assert path.name.startswith("local-") and path.name.endswith(f"-{stats['run_id']}.json")
    assert stats["shards"] == {"planned": 2, "done": 2, "failed": 0, "skipped": 0}
    edge, depth = stats["experts"]["edge"], stats["experts"]["depth"]
    assert EXPERT_KEYS <= set(edge) and EXPERT_KEYS <= set(depth)
    assert depth["images"] == 8 and edge["images"] == 7  # the poisoned image failed edge only
    assert edge["failed_batches"] >= 1 and edge["busy_s"] > 0 and 0 < edge["busy_fraction"] <= 1
    # Both are rounded to 3 decimals from the unrounded time: compare the time they imply.
    assert stats["elapsed_s"] > 0 and 8 / stats["images_per_s"] == pytest.approx(stats["elapsed_s"], abs=1e-3)
    points = stats["throughput"]
    assert points[0] == [0.0, 0] and points[-1][1] == 8 and [p[1] for p in points] == [0, 5, 8]
    assert all(a[0] <= b[0] for a, b in zip(points, points[1:]))
    # a rerun with nothing to do writes no statistics; `status` shows the last run's
    assert main(["run", str(two_shards), "--no-progress"]) == 1
    assert len(list((tmp_path / "out" / "stats").glob("*.json"))) == 1


def test_ray_stats_have_the_same_keys(tmp_path):
    pytest.importorskip("ray")
    from label_pipeline.runners.ray_planner import Placement
    from label_pipeline.runners.ray_stats import ClusterView, LiveView, RunStats

    stats = RunStats(started=10.0, finished=14.0)
    stats.add_samples(6)
    stats.add_samples(2)
    stats.monitor = {
        "experts": {"edge": {"images": 8, "batches": 2, "busy_s": 2.0, "failed_batches": 0, "queued": 0}},
        "cpu": {"images": 8, "seconds": 1.0},
    }
    cluster = ClusterView(
        gpus=0,
        cpus=2,
        placements={"edge": Placement("edge", 2, 0.0, 1.0, 4)},
        replicas={"edge": [{"node": "n", "gpu_ids": []}, {"node": "n", "gpu_ids": []}]},
    )
    summary = SimpleNamespace(results=[1, 2], failed_shards={}, shards_skipped=1)
    prepared = SimpleNamespace(plans=[1, 2], summary=summary, store=OutputStore(str(tmp_path)))
    document = stats.as_dict(prepared, cluster)
    assert TOP_KEYS <= set(document) and document["runner"] == "ray"
    assert SHARD_KEYS <= set(document["shards"]) and document["shards"]["done"] == 2
    assert EXPERT_KEYS <= set(document["experts"]["edge"])
    assert document["experts"]["edge"]["images_per_s"] == 2.0  # 8 images in 4 s
    assert document["experts"]["edge"]["busy_fraction"] == 0.25  # 2 s busy over 4 s x 2 replicas
    assert [p[1] for p in document["throughput"]] == [0, 6, 8] and document["samples"] == 8
    # the live view moves its bar by the images the running shard tasks labelled, before they commit
    view = LiveView(3, interval=0.0, enabled=False)
    view.shard_done(6)
    view.tick({**stats.monitor, "elapsed_s": 4.0, "cpu": {"images": 10}}, cluster, running=2, pending=0)
    assert view.bar.in_shard == 4 and view.bar.fraction_done() == pytest.approx(1 + 4 / 6)


def test_status_shows_the_newest_run_of_either_runner(tmp_path):
    store = OutputStore(str(tmp_path))
    (tmp_path / "stats").mkdir()
    common = dict(status="completed", elapsed_s=1.0, shards={}, experts={}, throughput=[[0.0, 0]])
    older = stats_document(runner="ray", run_id="a", created="2026-01-02T00:00:00+0000", samples=1, **common)
    newer = stats_document(
        runner="local", run_id="b", created="2026-01-03T00:00:00+0000", samples=2, **common
    )
    (tmp_path / "stats" / "ray-20260102T000000Z-a.json").write_text(json.dumps(older))
    (tmp_path / "stats" / "local-20260103T000000Z-b.json").write_text(json.dumps(newer))
    assert latest_stats(store)["run_id"] == "b"  # by time, not by runner name ("ray" > "local")


def test_throughput_keeps_a_bounded_sketch_of_the_whole_run():
    clock = Clock()
    throughput = Throughput(clock=clock, limit=8)
    for _ in range(100):
        clock.now += 1
        throughput.add(10)
    points = throughput.points
    assert len(points) <= 8 and points[0] == [0.0, 0] and points[-1] == [100.0, 1000]
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(points, points[1:]))


def test_progress_moves_per_chunk_with_expert_rates_and_eta():
    clock = Clock()
    progress = Progress(4, stream=io.StringIO(), clock=clock, samples_per_shard=100)
    clock.now += 10
    progress.chunk_done(50, {"edge": (80.0, 0.5)})
    assert progress.fraction_done() == pytest.approx(0.5)  # half of the first shard, by its images
    assert progress.eta_s() == pytest.approx(350 / 5.0)  # 350 images left at 5 images/s
    assert "edge 80.0 img/s busy 50%" in progress.postfix() and "ETA 1m10s" in progress.postfix()
    clock.now += 10
    progress.shard_done(200)  # larger than the hint: the measured mean takes over
    assert progress.samples_per_shard == 200 and progress.fraction_done() == 1.0
    progress.chunk_done(500)  # a huge shard never counts as done before it commits
    assert progress.fraction_done() == pytest.approx(1.99)
    unknown = Progress(3, stream=io.StringIO(), clock=clock)
    unknown.chunk_done(10)
    assert unknown.eta_s() is None and "ETA ?" in unknown.postfix()


def test_progress_logs_plain_lines_when_not_on_a_terminal(caplog):
    clock = Clock()
    log = io.StringIO()
    progress = Progress(2, stream=log, clock=clock, log_interval=30)
    with caplog.at_level(logging.INFO, logger="label_pipeline.progress"):
        progress.chunk_done(5)  # before the interval: nothing yet
        clock.now += 31
        progress.chunk_done(5)
        clock.now += 5
        progress.shard_done(10)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("shards 0.0/2: 10 samples")
    assert lines[1].startswith("shards 1/2: 10 samples") and lines[1].endswith("in 36s")
    assert log.getvalue() == ""  # no bar, no carriage returns


def test_progress_draws_a_bar_on_a_terminal(caplog):
    terminal = Terminal()
    progress = Progress(2, stream=terminal, samples_per_shard=10)
    progress.chunk_done(5, {"edge": (12.0, 0.3)})
    progress.shard_done(10)
    progress.close()
    assert "\r" in terminal.getvalue() and "/2 shards" in terminal.getvalue()
    assert "edge 12.0 img/s" in terminal.getvalue() and not caplog.records
    off = Terminal()
    Progress(2, enabled=False, stream=off).close()
    assert off.getvalue() == ""


def test_a_run_logged_to_a_file_has_no_carriage_returns(tmp_path, two_shards, capsys, caplog):
    with caplog.at_level(logging.INFO):
        assert main(["run", str(two_shards)]) == 1  # progress on, stderr captured (not a terminal)
    assert "\r" not in capsys.readouterr().err
    final = [r.getMessage() for r in caplog.records if r.name == "label_pipeline.progress"]
    assert final and final[-1].startswith("shards 2/2: 8 samples") and "edge" in final[-1]


def test_format_duration():
    assert [format_duration(s) for s in (None, 5, 65, 3725)] == ["?", "5s", "1m05s", "1h02m"]
