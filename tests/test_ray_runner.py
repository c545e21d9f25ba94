"""The Ray runner: GPU pinning, CPU fallback, faults (dead actors, poisoned samples, OOM, a killed
driver), object storage (S3 served by moto), the replica planner and the runner's manifest block.

One Ray instance (2 CPUs, 4 logical GPUs) serves the whole module; its workers import the test
experts below by module name, hence ``PYTHONPATH``.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from builders import photo_samples, write_manifest, write_wds
from experts_for_tests import BrightnessDepth, register_test_experts

from expert_zoo.base import ExpertSpec
from expert_zoo.canny import CannyEdge, CannyOptions
from expert_zoo.registry import register
from label_pipeline.cli import main
from label_pipeline.config import ConfigError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
TESTS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PidSlowOptions(CannyOptions):
    sleep: float = 0.3
    pid_dir: str | None = None


class PidSlowEdge(CannyEdge):
    """Canny that notes its process id in ``pid_dir`` and sleeps per batch (a test kills it)."""

    spec = ExpertSpec(task="edge", backend="pidslow", version="1", mode="L", batch_size=2)
    Options = PidSlowOptions

    def __init__(self, config=None, device="cpu"):
        super().__init__(config, device)
        if "pid_dir" in self.config:
            Path(self.config["pid_dir"], "edge.pid").write_text(str(os.getpid()))

    def predict(self, images, deps):
        time.sleep(self.config.get("sleep", 0.3))
        return super().predict(images, deps)


class KillerEdge(CannyEdge):
    """Canny whose process dies on any image exactly 13 pixels wide: a sample that crashes the expert."""

    spec = ExpertSpec(task="edge", backend="killer", version="1", mode="L", batch_size=2)

    def predict(self, images, deps):
        if any(image.shape[1] == 13 for image in images):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().predict(images, deps)


class OutOfMemoryError(RuntimeError):
    """Named like torch's CUDA OOM error, which is how the runner recognises one."""


class GreedyDepth(BrightnessDepth):
    """Brightness 'depth' that runs out of memory on batches of more than two images."""

    spec = ExpertSpec(task="depth", backend="greedy", version="1", mode="L", batch_size=4)

    def predict(self, images, deps):
        if len(images) > 2:
            raise OutOfMemoryError("CUDA out of memory (test)")
        return super().predict(images, deps)


class DeviceProbe(CannyEdge):
    """A 'normal' expert that resolves its device like the torch experts do (auto → CUDA or CPU)."""

    spec = ExpertSpec(task="normal", backend="probe", version="1", mode="L", batch_size=4, uses_gpu=True)

    def __init__(self, config=None, device="cpu"):
        super().__init__(config, device)
        from expert_zoo.torch_utils import resolve_device

        self.torch_device = resolve_device(device)


register_test_experts()
for _name, _cls in [
    ("edge:pidslow", "PidSlowEdge"),
    ("edge:killer", "KillerEdge"),
    ("depth:greedy", "GreedyDepth"),
    ("normal:probe", "DeviceProbe"),
]:
    register(_name, f"test_ray_runner:{_cls}")


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 endpoint on 127.0.0.1 (moto), with credentials in the environment Ray workers inherit."""
    pytest.importorskip("moto.server")
    from s3_server import s3_server

    with s3_server() as (url, _):
        yield url


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), str(TESTS.parent), saved]))
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved


def run(manifest, *extra):
    return main(["run", str(manifest), "--no-progress", *extra])


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.tar"))}


def samples_of(tar_path):
    out = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, _, suffix = member.name.partition(".")
            out.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return out


def stats_of(root: Path) -> dict:
    (path,) = sorted((root / "stats").glob("ray-*.json"))[-1:]
    return json.loads(path.read_text())


def shards(tmp_path, count, per_shard, **kw):
    for index in range(count):
        write_wds(
            tmp_path / "in" / f"{index:05d}.tar", photo_samples(per_shard, start=per_shard * index, **kw)
        )
    return {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..{count - 1:05d}}}.tar"}


# -- the contract on logical GPUs ------------------------------------------------------------------
def test_gpu_pinning_cpu_fallback_and_oom_halving_give_identical_bytes(cluster, tmp_path, capsys, caplog):
    source = shards(tmp_path, 2, 5)
    experts = ["edge:canny", "depth:greedy", "normal:probe", "obj_detection:depthboxes"]
    ray_settings = {
        "num_gpus": {"edge": 1, "depth": 1, "normal": 1, "obj_detection": 0},
        "calibration_batches": 0,  # the proxies, not the calibration, must halve the OOM batches
        "progress_interval_s": 0.1,
    }
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert run(write_manifest(tmp_path / "l.yaml", source, local, experts)) == 0
    manifest = write_manifest(tmp_path / "r.yaml", source, on_ray, experts, runner={"ray": ray_settings})
    with caplog.at_level(logging.INFO, logger="label_pipeline"):
        assert main(["run", str(manifest), "--runner", "ray"]) == 0  # with the live progress view
    assert "experts loaded" in caplog.text and "GPU" in caplog.text and "q=" in caplog.text
    assert shard_bytes(on_ray) == shard_bytes(local) and len(shard_bytes(local)) == 2

    stats = stats_of(on_ray)
    gpu_ids = {task: stats["experts"][task]["replicas"][0]["gpu_ids"] for task in ("edge", "depth", "normal")}
    assert all(len(ids) == 1 for ids in gpu_ids.values())
    assert len({ids[0] for ids in gpu_ids.values()}) == 3  # a card of its own for each
    for task, ids in gpu_ids.items():
        assert stats["experts"][task]["replicas"][0]["cuda_visible_devices"] == ids[0]
    assert stats["experts"]["normal"]["replicas"][0]["device"] == "cpu"  # no CUDA here: CPU fallback
    cpu_expert = stats["experts"]["obj_detection"]["replicas"][0]
    assert cpu_expert["gpu_ids"] == [] and cpu_expert["cuda_visible_devices"] == ""
    assert stats["experts"]["depth"]["oom_splits"] >= 1 and stats["samples"] == 10
    assert stats["status"] == "completed" and stats["shards"]["done"] == 2
    assert sum(stats["experts"]["edge"]["compute_latency_hist"]) == stats["experts"]["edge"]["batches"]

    capsys.readouterr()
    assert main(["status", str(on_ray)]) == 0
    out = capsys.readouterr().out
    assert "2 done / 0 failed / 0 pending / 2 total" in out and "last run" in out and "busy" in out


def test_replicas_planned_from_the_first_batches_take_over_later_shards(cluster, tmp_path, caplog):
    source = shards(tmp_path, 12, 4)
    experts = [{"name": "edge:pidslow", "options": {"sleep": 0.3}}]  # one replica: 6.7 images/s
    settings = {"num_gpus": {"edge": 1}, "calibration_batches": 1, "shards_in_flight": 2}
    on_ray, local = tmp_path / "ray", tmp_path / "local"
    manifest = write_manifest(tmp_path / "r.yaml", source, on_ray, experts, runner={"ray": settings})
    with caplog.at_level(logging.INFO, logger="label_pipeline"):
        assert run(manifest, "--runner", "ray") == 0
    assert "replica plan" in caplog.text and "predicted" in caplog.text
    stats = stats_of(on_ray)
    edge = stats["experts"]["edge"]
    assert edge["placement"]["replicas"] == 4 and len(edge["replicas"]) == 4  # one per logical GPU
    assert len({r["gpu_ids"][0] for r in edge["replicas"]}) == 4
    assert len(edge["busy_by_replica"]) >= 2  # later shards went to the new replicas too
    assert stats["predicted_images_per_s"] > 0 and stats["bottleneck"] == "edge"
    assert run(write_manifest(tmp_path / "l.yaml", source, local, experts)) == 0
    assert shard_bytes(on_ray) == shard_bytes(local) and len(shard_bytes(local)) == 12


def test_batch_size_calibration_picks_the_faster_larger_batch(cluster, tmp_path, caplog):
    source = shards(tmp_path, 2, 6)
    experts = ["edge:overhead"]  # 0.05 s per batch + 0.002 s per image: 4 images/batch beat 1 or 2
    settings = {"calibrate_batch_size": True, "calibration_batches": 0}
    on_ray, local = tmp_path / "ray", tmp_path / "local"
    manifest = write_manifest(tmp_path / "r.yaml", source, on_ray, experts, runner={"ray": settings})
    with caplog.at_level(logging.INFO, logger="label_pipeline"):
        assert run(manifest, "--runner", "ray") == 0
    assert "edge: batch size 4 (calibrated" in caplog.text
    assert stats_of(on_ray)["experts"]["edge"]["placement"]["batch_size"] == 4
    assert run(write_manifest(tmp_path / "l.yaml", source, local, experts)) == 0
    assert shard_bytes(on_ray) == shard_bytes(local) and len(shard_bytes(local)) == 2


# -- faults ----------------------------------------------------------------------------------------
def test_killed_expert_actor_is_restarted_and_output_is_identical(cluster, tmp_path):
    source = shards(tmp_path, 4, 6)
    pids = tmp_path / "pids"
    pids.mkdir()
    experts = [{"name": "edge:pidslow", "options": {"pid_dir": str(pids)}}]
    on_ray, local = tmp_path / "ray", tmp_path / "local"
    manifest = write_manifest(
        tmp_path / "r.yaml", source, on_ray, experts, runner={"ray": {"calibration_batches": 0}}
    )
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(run(manifest, "--runner", "ray")))
    thread.start()
    deadline = time.monotonic() + 120
    while not list((on_ray / "records").glob("*.done.json")):
        assert time.monotonic() < deadline and thread.is_alive(), "the run never committed a shard"
        time.sleep(0.05)
    first_pid = int((pids / "edge.pid").read_text())
    os.kill(first_pid, signal.SIGKILL)  # mid-run: three shards are still being labelled
    thread.join(timeout=240)
    assert outcome == [0]
    assert int((pids / "edge.pid").read_text()) != first_pid  # a restarted actor did the rest
    assert run(write_manifest(tmp_path / "l.yaml", source, local, experts)) == 0
    assert shard_bytes(on_ray) == shard_bytes(local) and len(shard_bytes(local)) == 4


def test_sample_that_kills_its_expert_is_quarantined_and_the_shard_committed(cluster, tmp_path):
    write_wds(tmp_path / "in" / "00000.tar", photo_samples(4))
    poisoned_sample = photo_samples(1, size=(20, 13))[0]  # 13 pixels wide: kills the expert
    write_wds(tmp_path / "in" / "00001.tar", [*photo_samples(1, start=4), poisoned_sample])
    source = {"format": "webdataset", "path": f"{tmp_path}/in/{{00000..00001}}.tar"}
    # one sample per batch and one resubmission: two deaths quarantine the sample (keeps the test short)
    settings = {"batch_sizes": {"edge": 1}, "batch_retries": 1, "calibration_batches": 0}
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.yaml", source, out, ["edge:killer"], runner={"ray": settings})
    assert run(manifest, "--runner", "ray") == 1  # finished, with a recorded failure
    assert (out / "records" / "00001.done.json").exists()
    shard = samples_of(out / "shards" / "00001.tar")
    good, poisoned = (json.loads(shard[key]["json"]) for key in ("000000", "000001"))
    assert good["status"] == "ok" and "edge.png" in shard["000000"]
    assert poisoned["status"] == "partial" and "edge.png" not in shard["000001"]
    assert poisoned["experts"]["edge"]["status"] == "error"
    assert "quarantined" in poisoned["experts"]["edge"]["error"]
    assert all(
        json.loads(s["json"])["status"] == "ok" for s in samples_of(out / "shards" / "00000.tar").values()
    )
    stats = stats_of(out)
    assert stats["experts"]["edge"]["quarantined"] == 1 and stats["shards"]["failed"] == 0


RUNNER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from experts_for_tests import register_test_experts
register_test_experts()
from label_pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_driver(tmp_path, source, out, cluster, log):
    """A CLI run in its own process, joining the test's cluster; one shard at a time."""
    settings = {"shards_in_flight": 1, "calibration_batches": 0}
    manifest = write_manifest(
        tmp_path / f"{out.name}.yaml", source, out, ["edge:slow"], runner={"ray": settings}
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    command = [sys.executable, "-c", RUNNER, "run", str(manifest), "--no-progress", "--runner", "ray"]
    driver = subprocess.Popen([*command, "--address", cluster], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 180
    while not (
        (out / "records" / "00000.done.json").exists() and list((out / "shards").glob("00001.tar.tmp-*"))
    ):
        assert time.monotonic() < deadline and driver.poll() is None, "the run never reached the kill point"
        time.sleep(0.02)
    return driver, manifest


def test_driver_killed_or_interrupted_mid_run_resumes_to_identical_bytes(cluster, tmp_path):
    source = shards(tmp_path, 3, 6)
    killed, interrupted, clean = tmp_path / "killed", tmp_path / "interrupted", tmp_path / "clean"
    terminated = tmp_path / "terminated"
    with (tmp_path / "driver.log").open("wb") as log:
        driver, killed_manifest = start_driver(tmp_path, source, killed, cluster, log)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        driver, interrupted_manifest = start_driver(tmp_path, source, interrupted, cluster, log)
        driver.send_signal(signal.SIGINT)  # Ctrl-C
        assert driver.wait(timeout=60) == 130
    with (tmp_path / "terminated.log").open("wb") as log:
        driver, terminated_manifest = start_driver(tmp_path, source, terminated, cluster, log)
        driver.send_signal(signal.SIGTERM)  # a scheduler stopping the container
        assert driver.wait(timeout=60) == 143
    log = (tmp_path / "driver.log").read_text(errors="replace")[-4000:]
    term_log = (tmp_path / "terminated.log").read_text(errors="replace")
    assert not (killed / "records" / "00001.done.json").exists() and (killed / "_lock").exists()
    for stopped in (interrupted, terminated):
        assert not (stopped / "_lock").exists(), log  # a clean stop releases the output ...
        assert not [p for p in (stopped / "shards").iterdir() if ".tmp-" in p.name]  # ... and temp tars
        assert stats_of(stopped)["status"] == "interrupted"
    assert "stopped by SIGTERM" in term_log and "Traceback" not in term_log, term_log[-4000:]
    committed = len(list(terminated.glob("records/*.done.json")))
    assert f"interrupted: {committed} shards committed" in term_log, term_log[-4000:]  # counts what was

    assert run(killed_manifest, "--runner", "ray") == 0  # resume (this time from the test's process)
    assert run(interrupted_manifest, "--runner", "ray") == 0
    assert run(terminated_manifest, "--runner", "ray") == 0
    assert run(write_manifest(tmp_path / "c.yaml", source, clean, ["edge:slow"])) == 0
    for out in (killed, interrupted, terminated):
        assert shard_bytes(out) == shard_bytes(clean) and len(shard_bytes(clean)) == 3
        for name in shard_bytes(clean):
            keys = [
                m.name.split(".")[0] for m in tarfile.open(out / "shards" / name) if m.name.endswith(".json")
            ]
            assert keys == sorted(set(keys)) and len(keys) == 6  # no duplicate, no missing key
        assert not [p for p in (out / "shards").iterdir() if ".tmp-" in p.name]


# -- object storage --------------------------------------------------------------------------------
def test_inputs_and_outputs_on_s3(cluster, tmp_path, capsys):
    import fsspec

    source = shards(tmp_path, 2, 4)
    fs = fsspec.filesystem("s3")
    fs.mkdir("labels-test")
    for name in ("00000.tar", "00001.tar"):
        fs.put_file(str(tmp_path / "in" / name), f"labels-test/in/{name}")
    s3_source = {"format": "webdataset", "path": "s3://labels-test/in/{00000..00001}.tar"}
    experts = ["edge:canny", "depth:greedy"]
    manifest = write_manifest(tmp_path / "s3.yaml", s3_source, "s3://labels-test/out", experts)
    assert run(manifest, "--runner", "ray") == 0
    local = tmp_path / "local"
    assert run(write_manifest(tmp_path / "l.yaml", source, local, experts)) == 0
    for name, data in shard_bytes(local).items():
        assert fs.cat_file(f"labels-test/out/shards/{name}") == data
    assert not fs.exists("labels-test/out/_lock") and not fs.glob("labels-test/out/shards/*.tmp-*")
    (stats_path,) = fs.glob("labels-test/out/stats/ray-*.json")
    stats = json.loads(fs.cat_file(stats_path))
    assert stats["status"] == "completed" and stats["experts"]["depth"]["oom_splits"] >= 1
    capsys.readouterr()
    assert main(["status", "s3://labels-test/out"]) == 0
    assert "2 done / 0 failed / 0 pending / 2 total" in capsys.readouterr().out
    assert main(["verify", "s3://labels-test/out"]) == 0
    assert run(manifest, "--runner", "ray") == 0  # everything done: nothing relabelled
    assert fs.cat_file("labels-test/out/shards/00000.tar") == shard_bytes(local)["00000.tar"]


# -- the planner and the manifest block (no Ray needed) --------------------------------------------
def test_planner_grows_the_bottleneck_within_the_gpus():
    from label_pipeline.runners.ray_config import RayRunnerConfig
    from label_pipeline.runners.ray_planner import ExpertProfile, first_placements, plan_replicas

    profiles = {
        "depth": ExpertProfile("depth", True, 8),
        "edge": ExpertProfile("edge", True, 8),
        "ocr_detection": ExpertProfile("ocr_detection", False, 8),
    }
    config = RayRunnerConfig(num_gpus={"edge": 0.25})
    placements = first_placements(profiles, config, gpus=4, cpus=16)
    assert placements["depth"].num_gpus == 1 and placements["edge"].num_gpus == 0.25
    assert placements["ocr_detection"].num_gpus == 0 and placements["ocr_detection"].num_cpus == 1
    for task, rate in {"depth": 10.0, "edge": 100.0, "ocr_detection": 25.0}.items():
        placements[task].images_per_s = rate
    plan = plan_replicas(placements, config, gpus=4, cpus=16, chunk_size=8, cpu_seconds_per_image=0.001)
    # depth grows by eighths of a card to all 3.75 GPUs left after edge's quarter (37.5 img/s) in
    # replicas of 1, 1, 1, 1/2 and 1/4 card; ocr, the slowest on the way at 25 img/s, gets a second
    # CPU replica; then depth is the bottleneck and cannot grow
    assert plan.experts["depth"].shares == [1.0, 1.0, 1.0, 0.5, 0.25] and plan.experts["depth"].replicas == 5
    assert plan.experts["edge"].replicas == 1 and plan.experts["edge"].shares == [0.25]
    assert plan.experts["ocr_detection"].replicas == 2 and plan.bottleneck == "depth"
    assert plan.predicted_images_per_s == pytest.approx(37.5)
    assert plan.shards_in_flight >= 2 * 5 + 1  # >= 2 batches queued for each depth replica
    assert "predicted" in plan.describe() and "1+1+1+1/2+1/4" in plan.describe()

    shared = first_placements({t: p for t, p in profiles.items()}, RayRunnerConfig(), gpus=1, cpus=2)
    assert shared["depth"].num_gpus == shared["edge"].num_gpus == 0.5  # two experts share one card
    with pytest.raises(ConfigError, match="needs 3 GPUs"):
        first_placements(profiles, RayRunnerConfig(num_gpus={"depth": 2, "edge": 1}), gpus=2, cpus=2)


def test_batch_size_choice_prefers_smaller_unless_a_bigger_one_is_5_percent_faster():
    from label_pipeline.runners.ray_planner import candidate_batch_sizes, choose_batch_size

    assert candidate_batch_sizes(8) == [4, 8, 16] and candidate_batch_sizes(1) == [1, 2]
    assert candidate_batch_sizes(64) == [32, 64] and candidate_batch_sizes(100) == [50, 100]
    assert choose_batch_size({4: 0.010, 8: 0.005, 16: 0.004}, 8) == 16  # 25% faster
    assert choose_batch_size({4: 0.010, 8: 0.0098, 16: 0.0097}, 8) == 4  # < 5% gains: the smaller
    assert choose_batch_size({4: 0.010, 8: 0.009, 16: None}, 8) == 8  # 16 ran out of memory
    assert choose_batch_size({4: 0.010, 8: 0.012}, 8) == 4  # bigger is slower
    assert choose_batch_size({}, 8) == 8  # nothing measured: unchanged
    assert choose_batch_size({4: None, 8: None, 16: None}, 8) == 2  # all out of memory: below them


def test_runner_block_is_validated_strictly():
    from label_pipeline.runners.ray_config import parse_ray_config

    tasks = ["depth", "edge"]
    config = parse_ray_config({"ray": {"replicas": {"depth": 2}, "num_gpus": {"edge": 0.25}}}, tasks)
    assert config.replicas == {"depth": 2} and config.num_gpus == {"edge": 0.25}
    assert config.calibrate_batch_size is None  # default: calibrate the experts running on CUDA
    assert parse_ray_config({"ray": {"calibrate_batch_size": False}}, tasks).calibrate_batch_size is False
    for bad, message in [
        ({"rey": {}}, "unknown key"),
        ({"ray": {"replica": {"depth": 2}}}, "unknown key"),
        ({"ray": {"replicas": {"dpeth": 2}}}, "unknown task"),
        ({"ray": {"replicas": {"depth": 0}}}, ">= 1"),
        ({"ray": {"replicas": {"depth": 1.5}}}, "integer"),
        ({"ray": {"num_gpus": {"edge": -1}}}, ">= 0"),
        ({"ray": {"shards_in_flight": "many"}}, "integer"),
        ({"ray": {"batch_retries": 0, "quarantine_after": 2}}, "quarantine_after"),
        ({"ray": {"calibrate_batch_size": "yes"}}, "true or false"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_ray_config(bad, tasks)


def test_a_chunk_is_put_once_for_every_expert(cluster):
    """The labeler hands every expert the same object-store reference for a chunk."""
    from label_pipeline.runners.ray_executor import ChunkContext

    context = ChunkContext()
    arrays = [np.zeros((4, 5, 3), np.uint8), np.ones((6, 7, 3), np.uint8)]
    context.share(arrays)
    first_ref, first = context.locate([arrays[1]])
    second_ref, second = context.locate(arrays)
    assert first_ref == second_ref and first == [1] and second == [0, 1]
    other_ref, positions = context.locate([np.zeros((2, 2, 3), np.uint8)])  # not of this chunk
    assert other_ref != first_ref and positions == [0]
    context.clear()
