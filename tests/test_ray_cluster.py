"""The Ray runner on a cluster's terms: joining one that is already running (`ray start --head`),
nodes that leave or join in the middle of a run (several Ray nodes on this machine, with logical
GPUs), and `label-pipeline plan`'s projection for a dataset on N GPUs (no Ray needed).

The experts are bench/ray_scale.py's stand-ins: they hold a (logical) card for a fixed time per image
and sleep meanwhile. Every cluster here lives under its own ``RAY_TMPDIR``, so no other Ray on this
machine finds it (nor does a run here join another's).
"""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from builders import photo_samples, write_manifest, write_wds

from label_pipeline.cli import main

TESTS = Path(__file__).resolve().parent
BENCH = TESTS.parent / "bench"
sys.path.insert(0, str(BENCH))
import ray_scale  # noqa: E402 - the stand-in experts live with the benchmark that uses them

ray_scale.register_standins()
PYTHONPATH = os.pathsep.join([str(TESTS), str(BENCH), str(TESTS.parent)])


@pytest.fixture
def ray_env(monkeypatch):
    """Ray, under a private ``RAY_TMPDIR`` (short: Ray's socket paths must fit in 107 bytes) and a PYTHONPATH
    from which Ray's workers import the stand-in experts."""
    pytest.importorskip("ray")
    directory = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", directory)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [PYTHONPATH, os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def shards(tmp_path: Path, count: int, per_shard: int) -> dict:
    for index in range(count):
        samples = photo_samples(per_shard, size=(12, 16), start=per_shard * index)
        write_wds(tmp_path / "in" / f"{index:05d}.tar", samples)
    return {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..{count - 1:05d}}}.tar"}


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.tar"))}


def stats_of(root: Path) -> dict:
    (path,) = sorted((root / "stats").glob("ray-*.json"))[-1:]
    return json.loads(path.read_text())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- joining a running cluster ---------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_a_run_joins_a_running_cluster_in_under_a_second(ray_env, tmp_path):
    """`ray start --head` once, then `RAY_ADDRESS=auto label-pipeline run … --runner ray`: a run
    connects in well under a second (it logs the time) and writes what the local runner writes.
    (The first driver after `ray start` waits ~2 s more while the head finishes starting: the first
    run here labels one shard, the second the rest, and the second is timed.)"""
    source = shards(tmp_path, 2, 3)
    on_ray, local = tmp_path / "ray", tmp_path / "local"
    settings = {"calibration_batches": 0}
    manifest = write_manifest(tmp_path / "r.yaml", source, on_ray, ["edge:canny"], runner={"ray": settings})
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0", f"--port={free_port()}"]
        + ["--include-dashboard=false", "--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopped below with everything it started
    )
    try:
        address_file = Path(ray_env, "ray", "ray_current_cluster")
        deadline = time.monotonic() + 120
        while not address_file.exists():
            assert head.poll() is None and time.monotonic() < deadline, "ray start did not come up"
            time.sleep(0.2)
        command = [sys.executable, "-m", "label_pipeline", "run", str(manifest), "--runner", "ray"]
        for extra in (["--limit-shards", "1"], []):
            run = subprocess.run(
                [*command, "--no-progress", *extra],
                env={**env, "RAY_ADDRESS": "auto"},
                capture_output=True,
                text=True,
            )
            assert run.returncode == 0, run.stderr[-3000:]
            assert "started a local Ray instance" not in run.stderr
        found = re.search(r"connected to the Ray cluster at \S+ in ([0-9.]+) s", run.stderr)
        assert found, run.stderr[-3000:]
        assert float(found.group(1)) < 1.0 and stats_of(on_ray)["connect_s"] < 1.0
    finally:
        os.killpg(head.pid, 15)  # `ray start --block` stops the processes it started, then exits
        head.wait(timeout=60)
    assert main(["run", str(write_manifest(tmp_path / "l.yaml", source, local, ["edge:canny"]))]) == 0
    assert shard_bytes(on_ray) == shard_bytes(local) and len(shard_bytes(local)) == 2


# -- nodes leaving and joining ---------------------------------------------------------------------
COSTS_MS = {"depth": 120.0, "edge": 40.0, "obj_detection": 240.0}  # detection reads depth


def stand_in_experts(lock_dir: str) -> list[dict]:
    entries = ray_scale.expert_entries(COSTS_MS, lock_dir)
    for entry in entries:
        entry["options"]["batch_size"] = 4
    return entries


@pytest.fixture
def cluster(ray_env):
    """Two nodes of 2 CPUs and 2 logical GPUs; the head notices a dead node within ~2 s."""
    import ray
    from ray.cluster_utils import Cluster

    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    node = {"num_cpus": 2, "num_gpus": 2}
    cluster = Cluster(
        initialize_head=True, head_node_args={**node, "include_dashboard": False, "_system_config": health}
    )
    worker = cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


class LogWatch(logging.Handler):
    """The runner's log lines, as they come (the run is in another thread)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def wait_for(self, text: str, thread: threading.Thread, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert thread.is_alive(), f"the run ended before logging {text!r}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout:g}s"
            time.sleep(0.1)


@pytest.mark.ray
@pytest.mark.slow
def test_a_node_lost_and_a_node_added_mid_run_give_identical_bytes(cluster, tmp_path):
    """A worker node dies in the middle of a run (its replicas and shard tasks with it): the run
    completes, byte-identical to a clean run. A node added later gets replicas of the new plan."""
    cluster, worker = cluster
    lost_node = worker.node_id
    source = shards(tmp_path, 20, 4)
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    experts = stand_in_experts(str(lock_dir))
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    manifest = write_manifest(
        tmp_path / "c.yaml", source, clean, experts, runner={"ray": {"calibration_batches": 1}}
    )
    assert main(["run", str(manifest), "--runner", "ray", "--no-progress"]) == 0

    # Two shards at a time keep the run going long enough to lose a node and add one while it runs.
    settings = {"calibration_batches": 1, "shards_in_flight": 2, "progress_interval_s": 1}
    manifest = write_manifest(tmp_path / "f.yaml", source, faulty, experts, runner={"ray": settings})
    watch = LogWatch()
    logging.getLogger("label_pipeline").addHandler(watch)
    outcome: list[int] = []
    thread = threading.Thread(
        target=lambda: outcome.append(main(["run", str(manifest), "--runner", "ray", "--no-progress"]))
    )
    try:
        thread.start()
        watch.wait_for("replica plan", thread)
        watch.wait_for("replicas now", thread)  # the plan's replicas run on both nodes
        cluster.remove_node(worker, allow_graceful=False)  # as a spot instance goes
        watch.wait_for("cluster changed: 1 node(s) left", thread)
        added = cluster.add_node(num_cpus=2, num_gpus=2)
        watch.wait_for("1 joined", thread)
        thread.join(timeout=240)
    finally:
        logging.getLogger("label_pipeline").removeHandler(watch)
    assert outcome == [0]
    assert shard_bytes(faulty) == shard_bytes(clean) and len(shard_bytes(clean)) == 20

    stats = stats_of(faulty)
    assert stats["status"] == "completed" and stats["shards"]["failed"] == 0
    lost = [r for e in stats["experts"].values() for r in e["former_replicas"] if r["state"] == "lost"]
    assert lost and {r["node_id"] for r in lost} == {lost_node}
    running = [r for e in stats["experts"].values() for r in e["replicas"]]
    assert lost_node not in {r["node_id"] for r in running}
    assert added.node_id in {r["node_id"] for r in running}  # the new node got replicas
    nodes = [e for e in stats["events"] if e["event"] == "nodes"]
    assert [e["nodes"] for e in nodes][:2] == [1, 2]
    assert sum(1 for e in stats["events"] if e["event"] == "plan") >= 3  # calibration, loss, new node


# -- the projection --------------------------------------------------------------------------------
SIX = ["depth", "normal", "edge", "seg_coco", "obj_detection", "ocr_detection"]
GPU_RATES = {
    "depth": 40.0,
    "normal": 35.0,
    "edge": 300.0,
    "seg_coco": 25.0,
    "obj_detection": 15.0,
    "ocr_detection": 45.0,
}


def ray_stats(rates: dict[str, float], share: float = 1.0) -> dict:
    """A Ray run's statistics as the runner writes them (only what the projection reads matters)."""
    experts = {
        task: {"placement": {"num_gpus": share, "images_per_s": rate}, "images": 64, "busy_s": 64 / rate}
        for task, rate in rates.items()
    }
    return {
        "runner": "ray",
        "run_id": "1a2b3c4d",
        "created": "2026-12-01T10:00:00+0000",
        "experts": experts,
        "cluster": {"GPU": 8.0, "CPU": 32.0},
        "cpu_stage": {"images": 1000, "seconds": 5.0},
    }


def test_plan_projects_replicas_rate_and_hours_from_a_runs_statistics(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)  # the pattern is enough: no input is read
    source = {
        "format": "webdataset",
        "path": "${DATA_ROOT}/big/{00000..00099}.tar",
        "transform": {"number_sample_per_shard": 10_000},
    }
    manifest = write_manifest(tmp_path / "big.yaml", source, tmp_path / "out", SIX)
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps(ray_stats(GPU_RATES, share=0.5)))  # calibrated on half cards

    assert main(["plan", str(manifest), "--gpus", "8", "--stats", str(stats)]) == 0
    out = capsys.readouterr().out
    assert "100 shards x 10,000 = 1,000,000 images" in out and "the ray run 1a2b3c4d" in out
    # a half card gave `rate` images/s: a whole card gives twice that; perfect packing of 8 cards
    # gives 8 / sum(seconds per image) images/s, and eighths of a card come within 10% of it
    ideal = 8 / sum(0.5 / rate for rate in GPU_RATES.values())
    found = re.search(r"predicted: ([0-9.]+) images/s on 8 GPUs \(bottleneck (\w+)\): ([0-9.]+) hours", out)
    assert found, out
    rate, hours = float(found.group(1)), float(found.group(3))
    assert 0.9 * ideal <= rate <= ideal and found.group(2) in SIX
    assert hours == pytest.approx(1_000_000 / rate / 3600, rel=0.01)
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split()[:1] and line.split()[0] in SIX
    }
    assert sum(float(rows[task][2]) for task in SIX) <= 8.0 + 1e-6  # GPUs column
    assert int(rows["obj_detection"][1]) > int(rows["edge"][1]) or float(rows["obj_detection"][2]) > float(
        rows["edge"][2]
    )

    # eight times the GPUs: close to eight times the rate
    assert main(["plan", str(manifest), "--gpus", "64", "--stats", str(stats)]) == 0
    rate64 = float(re.search(r"predicted: ([0-9.]+) images/s", capsys.readouterr().out).group(1))
    assert 7.2 * rate <= rate64 <= 8.5 * rate

    # bench/gpu_check.sh's report, and the docs' recorded costs (said to be CPU costs)
    report = {
        "gpu_check": {
            "device": "NVIDIA H200",
            "experts": {t: {"images_per_s": 2 * r} for t, r in GPU_RATES.items()},
        }
    }
    (tmp_path / "gpu.json").write_text(json.dumps(report))
    assert main(["plan", str(manifest), "--gpus", "8", "--stats", str(tmp_path / "gpu.json")]) == 0
    out = capsys.readouterr().out
    assert "bench/gpu_check.sh on NVIDIA H200" in out
    assert float(re.search(r"predicted: ([0-9.]+) images/s", out).group(1)) == pytest.approx(rate, rel=0.01)
    assert main(["plan", "cc12m", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "1,243 shards x 10,000 = 12,430,000 images" in out and "CPU costs" in out


def test_plan_refuses_what_it_cannot_project(tmp_path, capsys):
    source = {"format": "webdataset", "path": f"{tmp_path}/{{00000..00009}}.tar"}
    manifest = write_manifest(tmp_path / "m.yaml", source, tmp_path / "out", SIX)
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps(ray_stats({t: r for t, r in GPU_RATES.items() if t != "normal"})))
    assert (
        main(["plan", str(manifest), "--gpus", "8", "--stats", str(stats), "--samples-per-shard", "5"]) == 2
    )
    assert "no measured throughput for ['normal']" in capsys.readouterr().err
    assert main(["plan", str(manifest), "--gpus", "8"]) == 2  # samples per shard unknown
    assert "--samples-per-shard" in capsys.readouterr().err
    assert main(["plan", str(manifest), "--gpus", "8", "--samples-per-shard", "5"]) == 0
    assert "10 shards x 5 = 50 images" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{not json")
    assert (
        main(["plan", str(manifest), "--gpus", "8", "--stats", str(tmp_path / "bad.json"), "--images", "9"])
        == 2
    )
    assert "cannot read it as JSON" in capsys.readouterr().err


# -- the GPU check, dry run --------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_gpu_check_dry_run_writes_both_reports_and_plan_reads_them(ray_env, tmp_path, capsys):
    """bench/gpu_check.sh --dry-run: the GPU check's code path on the CPU with tiny networks (two of
    the six experts, to stay short): both settings per expert, the pipeline sharing one (logical)
    card, the JSON and Markdown reports; `label-pipeline plan` projects from that JSON."""
    out = tmp_path / "report"
    command = [str(BENCH / "gpu_check.sh"), "--dry-run", "--out", str(out), "--experts", "edge,normal"]
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and set(report["experts"]) == {"edge", "normal"}
    for entry in report["experts"].values():
        assert [row["setting"] for row in entry["rows"]] == ["Prismer-style", "ours"]
        assert entry["images_per_s"] > 0 and entry["prismer_images_per_s"] > 0
    pipeline = report["pipeline"]
    assert pipeline["samples"] == 2 and pipeline["images_per_s"] > 0
    for entry in pipeline["experts"].values():
        assert entry["gpu_share"] == 0.5 and entry["images_per_s"] > 0 and 0 < entry["busy_fraction"] <= 1
    markdown = (out / "gpu_check.md").read_text()
    assert "Prismer-style" in markdown and "fractional num_gpus" in markdown and "| edge | 0.5 |" in markdown

    manifest = write_manifest(
        tmp_path / "m.yaml",
        {"format": "webdataset", "path": f"{tmp_path}/{{00000..00009}}.tar"},
        tmp_path / "labels",
        ["edge", "normal"],
    )
    capsys.readouterr()
    plan = ["plan", str(manifest), "--gpus", "2", "--stats", str(out / "gpu_check.json"), "--images", "1000"]
    assert main(plan) == 0
    assert "bench/gpu_check.sh on CPU" in capsys.readouterr().out
