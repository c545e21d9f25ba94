"""The Ray runner's scheduler at cluster shape, and the same workload through Ray Data.

A Ray cluster on this machine (``ray.cluster_utils.Cluster``: ``--nodes`` nodes with ``--gpus-per-node``
logical GPUs each) labels tiny images with six stand-in experts, one per Prismer task. A stand-in
needs a fixed card time per image and sleeps while it gets it, so the host CPUs stay free as they
would beside a real GPU; replicas that share a card share its time (processor sharing: k batches
running on a card each advance at 1/k speed), as CUDA time-slices the processes on a real one.
Per-image costs follow the ratios of the real experts' forward costs (``COST_RATIOS``:
bench/experts.py, full-size architectures, docs/BENCHMARKS.md), scaled so that the cheapest (edge)
costs ``--edge-ms``.

Printed:

* the bound: Σ expert cost ÷ GPUs, i.e. every card busy all the time with perfect packing;
* ours (``run_ray``, the replica plan chosen automatically from the first batches): end-to-end
  images/s over the whole run (start-up and calibration included) and in steady state (from the
  moment the planned replicas are all in service until the last shard is submitted), each ÷ bound;
* Ray Data: the same images through ``map_batches`` per expert, each with an actor pool of
  ``num_gpus=1`` actors, the best whole-card split of the GPUs (found by search), decoding and label
  encoding included, no tar or Parquet written; images/s over the whole run and in steady state;
* ours ÷ Ray Data.

    python bench/ray_scale.py                       # 2 nodes x 4 GPUs, 6144 images (~10 minutes)
    python bench/ray_scale.py --images 512 --edge-ms 2 --skip-ray-data
"""

from __future__ import annotations

import argparse
import fcntl
import io
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from expert_zoo.base import Expert, ExpertOptions, ExpertSpec, Label  # noqa: E402
from expert_zoo.registry import register  # noqa: E402

# Forward ms/image of the full-size architectures (random weights, fp32, one image), the
# "Prismer-style" column of docs/BENCHMARKS.md ("Experts"): the only forward costs measured for all
# six so far. Their ratios stand in for the GPU costs until bench/gpu_check.sh measures those.
COST_RATIOS = {
    "edge": 1684,
    "depth": 13188,
    "normal": 14590,
    "seg_coco": 21661,
    "obj_detection": 33382,
    "ocr_detection": 12653,
}
TASKS = tuple(COST_RATIOS)


# -- stand-in experts ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimulatedOptions(ExpertOptions):
    ms_per_image: float = 5.0  # card time one image costs
    lock_dir: str = ""  # where the cards' shared state lives ("": every replica has a card of its own)


class SimulatedGPUExpert(Expert):
    """Needs ``ms_per_image`` of card time per image and sleeps while it gets it; replicas on one
    card share it as CUDA time-slices processes (``SharedCard``). The label is a flat map of the
    image's mean brightness: cheap to make and to encode."""

    spec = ExpertSpec(task="edge", backend="simulated", version="1", mode="L", batch_size=8, uses_gpu=True)
    Options = SimulatedOptions
    opts: SimulatedOptions

    def predict(self, images: list[np.ndarray], deps: Mapping[str, Sequence[Label]]) -> list[Label]:
        SharedCard(self.opts.lock_dir).run(self.spec.task, len(images) * self.opts.ms_per_image / 1000)
        return [Label(np.full(image.shape[:2], int(image.mean()), np.uint8)) for image in images]


class SharedCard:
    """The (logical) card this Ray actor was given, shared by processor sharing: while k batches
    run on it, each advances at 1/k of the card's speed (a GPU time-slices the processes that use
    it, in slices of a few ms). The number of batches running is a counter in a file per card;
    each batch logs its card time there (``card_busy`` reads it back)."""

    STEP_S = 0.01

    def __init__(self, directory: str) -> None:
        self.path: Path | None = None
        if directory:
            import ray

            if ray.is_initialized() and ray.get_gpu_ids():
                node = ray.get_runtime_context().get_node_id()[:12]
                self.path = Path(directory, f"{node}-gpu{ray.get_gpu_ids()[0]}")

    def run(self, task: str, seconds: float) -> None:
        """Return once ``seconds`` of this card's time went to the caller."""
        if self.path is None:
            time.sleep(seconds)
            return
        started = last = time.monotonic()
        sharing = self._add(1)
        try:
            remaining = seconds
            while remaining > 1e-6:
                time.sleep(min(self.STEP_S, remaining * sharing))
                now = time.monotonic()
                remaining -= (now - last) / sharing
                last, sharing = now, self._add(0)
        finally:
            self._add(-1)
        with open(self.path.with_suffix(".log"), "a") as log:
            log.write(
                f"{task} {time.time() - (time.monotonic() - started):.4f} {time.time():.4f} {seconds:.5f}\n"
            )

    def _add(self, delta: int) -> int:
        """Add ``delta`` to the card's count of running batches; returns the count (at least 1)."""
        assert self.path is not None
        with open(self.path.with_suffix(".count"), "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            count = int(handle.read() or 0) + delta
            if delta:
                handle.seek(0)
                handle.truncate()
                handle.write(str(count))
        return max(count, 1)


def _spec(task: str, **extra: Any) -> ExpertSpec:
    return ExpertSpec(
        task=task, backend="simulated", version="1", mode="L", batch_size=8, uses_gpu=True, **extra
    )


class SimDepth(SimulatedGPUExpert):
    spec = _spec("depth")


class SimNormal(SimulatedGPUExpert):
    spec = _spec("normal")


class SimEdge(SimulatedGPUExpert):
    spec = _spec("edge")


class SimSeg(SimulatedGPUExpert):
    spec = _spec("seg_coco")


class SimDetection(SimulatedGPUExpert):
    spec = _spec("obj_detection", requires=("depth",))  # as the real one: it reads depth


class SimOCR(SimulatedGPUExpert):
    spec = _spec("ocr_detection")


STANDINS = {
    "depth": "SimDepth",
    "normal": "SimNormal",
    "edge": "SimEdge",
    "seg_coco": "SimSeg",
    "obj_detection": "SimDetection",
    "ocr_detection": "SimOCR",
}


def register_standins() -> None:
    """``task:simulated`` for the six tasks (workers import this module: bench/ on PYTHONPATH)."""
    for task, cls in STANDINS.items():
        register(f"{task}:simulated", f"ray_scale:{cls}")


def costs_ms(edge_ms: float) -> dict[str, float]:
    """Per-image card time of each stand-in: the real ratios, the edge expert costing ``edge_ms``."""
    return {task: edge_ms * ratio / COST_RATIOS["edge"] for task, ratio in COST_RATIOS.items()}


def expert_entries(costs: Mapping[str, float], lock_dir: str) -> list[dict[str, Any]]:
    return [
        {"name": f"{task}:simulated", "options": {"ms_per_image": round(ms, 3), "lock_dir": lock_dir}}
        for task, ms in costs.items()
    ]


# -- inputs and the cluster ------------------------------------------------------------------------
def tiny_jpeg(index: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(index)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shards(root: Path, shards: int, per_shard: int, size: tuple[int, int]) -> dict[str, str]:
    """WebDataset shards of tiny JPEGs; returns the manifest's ``source``."""
    from label_pipeline.core.tario import write_tar

    (root / "in").mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        samples = [
            [(f"{shard * per_shard + i:08d}.jpg", tiny_jpeg(shard * per_shard + i, size))]
            for i in range(per_shard)
        ]
        with open(root / "in" / f"{shard:05d}.tar", "wb") as handle:
            write_tar(handle, samples)
    return {"format": "webdataset", "path": f"{root}/in/{{00000..{shards - 1:05d}}}.tar"}


def start_cluster(nodes: int, gpus_per_node: int, cpus_per_node: int, temp_dir: str) -> Any:
    """A multi-node Ray cluster on this machine. ``RAY_TMPDIR`` keeps it out of /tmp/ray, where a
    ``label-pipeline run`` elsewhere on this machine would look for a cluster to join."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_TMPDIR"] = temp_dir
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(BENCH), str(BENCH.parent), os.environ.get("PYTHONPATH")])
    )
    resources = {"num_cpus": cpus_per_node, "num_gpus": gpus_per_node}
    cluster = Cluster(initialize_head=True, head_node_args={**resources, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(**resources)
    cluster.wait_for_nodes()
    return cluster


# -- ours ------------------------------------------------------------------------------------------
def run_ours(
    root: Path, source: dict[str, str], costs: Mapping[str, float], lock_dir: str, settings: dict[str, Any]
) -> dict[str, Any]:
    """``run_ray`` on the connected cluster (``settings``: its ``runner.ray`` block); returns its
    statistics file."""
    from label_pipeline.config import load_manifest
    from label_pipeline.run import RunOptions
    from label_pipeline.runners.ray_runner import run_ray

    manifest_path = root / "ours.yaml"
    data = {
        "name": "ray-scale",
        "source": source,
        "output": str(root / "ours"),
        "experts": expert_entries(costs, lock_dir),
        "runner": {"ray": {"progress_interval_s": 30, **settings}},
    }
    manifest_path.write_text(yaml.safe_dump(data))
    started = time.perf_counter()
    run_ray(load_manifest(str(manifest_path)), RunOptions(), progress=False)
    wall = time.perf_counter() - started
    (stats_path,) = (root / "ours" / "stats").glob("ray-*.json")
    stats = json.loads(stats_path.read_text())
    stats["wall_s"] = wall
    return stats


def steady_window(stats: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The events "plan in service" and "all submitted": the steady state lies between them (None
    when the run was too short to have both)."""
    events: dict[str, Any] = {}
    for event in stats.get("events", []):
        events.setdefault(event["event"], event)  # the first of each
    begin, end = events.get("plan in service"), events.get("all submitted")
    if not begin or not end or end["t"] <= begin["t"]:
        return None
    return begin, end


def steady_rate(stats: Mapping[str, Any]) -> tuple[float | None, float]:
    """Images/s in the steady window, and its length in seconds."""
    window = steady_window(stats)
    if window is None:
        return None, 0.0
    begin, end = window  # images labelled by all experts (committed or not: shards hold many)
    return (end["labelled"] - begin["labelled"]) / (end["t"] - begin["t"]), end["t"] - begin["t"]


def card_busy(lock_dir: str, since: float, until: float) -> dict[str, float]:
    """Share of ``[since, until]`` (epoch seconds) each card worked, from its batches' log: a batch's
    card time counts in proportion to the part of its run inside the window."""
    busy = {}
    for path in sorted(Path(lock_dir).glob("*.log")):
        work = 0.0
        for line in path.read_text().splitlines():
            _, start, end, seconds = line.split()
            start_s, end_s = float(start), float(end)
            inside = max(0.0, min(end_s, until) - max(start_s, since))
            work += float(seconds) * inside / (end_s - start_s) if end_s > start_s else 0.0
        busy[path.stem] = work / (until - since) if until > since else 0.0
        path.write_text("")  # the next measurement starts afresh
    return busy


# -- Ray Data --------------------------------------------------------------------------------------
def best_whole_card_split(costs: Mapping[str, float], gpus: int) -> dict[str, int]:
    """Actors of one card per expert that maximise the slowest expert's rate (every expert >= 1)."""
    best, best_rate = None, -1.0
    tasks = list(costs)
    for split in itertools.product(range(1, gpus - len(tasks) + 2), repeat=len(tasks)):
        if sum(split) != gpus:
            continue
        rate = min(n / costs[t] for n, t in zip(split, tasks))
        if rate > best_rate:
            best, best_rate = dict(zip(tasks, split)), rate
    assert best is not None
    return best


class DecodeStage:
    """JPEG bytes → an RGB array column (what our shard tasks do before the experts)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from label_pipeline.core.decode import decode_image

        images = [decode_image(bytes(data)).array for data in batch["jpg"]]
        return {"key": batch["key"], "image": np.stack(images)}


class ExpertStage:
    """One expert as a Ray Data actor: labels a batch and adds its PNG-encoded label column (and,
    for depth, the map detection reads)."""

    def __init__(self, cls: type[Expert], options: dict[str, Any]) -> None:
        self.expert = cls(options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = list(batch["image"])
        deps = {t: [Label(m) for m in batch[f"{t}_map"]] for t in self.expert.spec.requires}
        labels = self.expert(images, deps)
        task = self.expert.spec.task
        batch[f"{task}.png"] = np.array([self.expert.encode(label)["png"] for label in labels], dtype=object)
        if task == "depth":
            batch["depth_map"] = np.stack([label.map for label in labels])
        return batch


def run_ray_data(
    source: dict[str, str], costs: Mapping[str, float], split: Mapping[str, int], lock_dir: str
) -> dict[str, float]:
    """The same images through Ray Data; images/s over the whole run and in steady state."""
    import ray

    from label_pipeline.core.tario import read_tar_samples
    from label_pipeline.sources.webdataset import expand_shard_urls

    rows = []
    for url in expand_shard_urls(source["path"]):
        with open(url, "rb") as handle:
            rows += [{"key": key, "jpg": members["jpg"]} for key, members in read_tar_samples(handle)]
    classes = {task: getattr(sys.modules[__name__], cls) for task, cls in STANDINS.items()}
    started = time.perf_counter()
    dataset = ray.data.from_items(rows).map_batches(DecodeStage, batch_size=8, concurrency=2)
    for task in ("depth", *[t for t in costs if t != "depth"]):  # detection after depth, as ours
        options = {"ms_per_image": costs[task], "lock_dir": lock_dir}
        dataset = dataset.map_batches(
            ExpertStage,
            fn_constructor_args=(classes[task], options),
            batch_size=8,
            num_gpus=1,
            concurrency=split[task],
        )
    times = []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        times += [time.perf_counter() - started] * len(batch["key"])
    wall = time.perf_counter() - started
    count = len(times)
    low, high = times[count // 10], times[(9 * count) // 10]  # 10th to 90th percentile of outputs
    steady = (0.8 * count) / (high - low) if high > low else math.nan
    return {"images": count, "wall_s": wall, "images_per_s": count / wall, "steady_images_per_s": steady}


# -- main ------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs per node")
    parser.add_argument(
        "--images", type=int, default=6144, help="enough for minutes of steady state after the plan starts"
    )
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--edge-ms", type=float, default=5.0, help="card ms/image of the cheapest expert")
    parser.add_argument("--size", type=int, nargs=2, default=(24, 32), metavar=("H", "W"))
    parser.add_argument("--shards-in-flight", type=int, help="runner.ray.shards_in_flight (default: planned)")
    parser.add_argument("--skip-ray-data", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("label_pipeline").setLevel(logging.INFO)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(BENCH))
    register_standins()
    import ray

    gpus = args.nodes * args.gpus_per_node
    costs = costs_ms(args.edge_ms)
    bound = gpus / (sum(costs.values()) / 1000)
    shards = math.ceil(args.images / args.per_shard)
    with tempfile.TemporaryDirectory(prefix="rs", dir="/tmp") as tmp:
        root, lock_dir = Path(tmp), str(Path(tmp, "locks"))
        Path(lock_dir).mkdir()
        source = write_shards(root, shards, args.per_shard, tuple(args.size))
        cluster = start_cluster(args.nodes, args.gpus_per_node, args.cpus_per_node, str(root / "ray"))
        try:
            ray.init(address=cluster.address)
            settings = {"shards_in_flight": args.shards_in_flight} if args.shards_in_flight else {}
            ours = run_ours(root, source, costs, lock_dir, settings)
            window = steady_window(ours)
            if window is not None:
                since, until = (ours["started_unix"] + event["t"] for event in window)
                ours["card_busy"] = card_busy(lock_dir, since, until)
            card_busy(lock_dir, 0, 1)  # empties the lock files before Ray Data's run
            split = best_whole_card_split(costs, gpus)
            theirs = None if args.skip_ray_data else run_ray_data(source, costs, split, lock_dir)
        finally:
            ray.shutdown()
            cluster.shutdown()
    report = summarise(args, costs, bound, ours, split, theirs)
    print(report["text"])
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in report.items() if k != "text"}, indent=1))
    return 0


def summarise(
    args: argparse.Namespace,
    costs: Mapping[str, float],
    bound: float,
    ours: Mapping[str, Any],
    split: Mapping[str, int],
    theirs: Mapping[str, float] | None,
) -> dict[str, Any]:
    gpus = args.nodes * args.gpus_per_node
    steady, window = steady_rate(ours)
    whole = ours["samples"] / ours["wall_s"]
    ratios = ", ".join(f"{t} {COST_RATIOS[t] / COST_RATIOS['edge']:.2f}" for t in TASKS)
    lines = [
        f"cluster: {args.nodes} nodes x {args.gpus_per_node} GPUs (logical), {args.cpus_per_node} CPUs each; "
        f"{ours['samples']} images of {args.size[0]}x{args.size[1]} in {ours['shards']['done']} shards",
        f"stand-in cost ratios (edge = 1): {ratios}",
        "card ms/image: " + ", ".join(f"{t} {ms:.1f}" for t, ms in costs.items()),
        f"bound: sum of costs / {gpus} GPUs = {bound:.1f} images/s",
        "",
        "ours, replica plan (chosen from the first batches): "
        + "; ".join(
            f"{t} {'+'.join(_fmt(s) for s in sorted(e['placement']['shares'], reverse=True))}"
            for t, e in ours["experts"].items()
        ),
        f"  predicted {ours.get('predicted_images_per_s') or 0:.1f} images/s; "
        f"Ray connect {ours.get('connect_s') or 0:.2f} s",
        f"  whole run (actors start, calibration, drain): {whole:.1f} images/s = "
        f"{whole / bound:.2f} of the bound ({ours['wall_s']:.1f} s)",
    ]
    lines.append(
        "  events: "
        + "; ".join(f"{e['t']:.1f}s {e['event']} ({e['labelled']} labelled)" for e in ours.get("events", []))
    )
    if ours.get("card_busy"):
        busy = ours["card_busy"]
        lines.append(
            f"  cards busy in steady state: mean {sum(busy.values()) / len(busy):.0%}, "
            + " ".join(f"{value:.0%}" for value in busy.values())
        )
    if steady is not None:
        lines.append(
            f"  steady state ({window:.0f} s, planned replicas in service): {steady:.1f} images/s = "
            f"{steady / bound:.2f} of the bound"
        )
    result: dict[str, Any] = {
        "bound": bound,
        "costs_ms": dict(costs),
        "ours": {"images_per_s": whole, "steady_images_per_s": steady, "wall_s": ours["wall_s"]},
        "ours_shares": {t: e["placement"]["shares"] for t, e in ours["experts"].items()},
        "ours_stats": dict(ours),
    }
    if theirs is not None:
        best = min(split[t] / costs[t] for t in costs) * 1000
        lines += [
            "",
            "Ray Data, map_batches per expert, num_gpus=1 actors, best whole-card split "
            + ", ".join(f"{t} {n}" for t, n in split.items())
            + f" (at best {best:.1f} images/s = {best / bound:.2f} of the bound)",
            f"  whole run: {theirs['images_per_s']:.1f} images/s = "
            f"{theirs['images_per_s'] / bound:.2f} of the bound ({theirs['wall_s']:.1f} s)",
            f"  steady state (10th-90th percentile of outputs): {theirs['steady_images_per_s']:.1f} "
            f"images/s = {theirs['steady_images_per_s'] / bound:.2f} of the bound",
            "",
            f"ours / Ray Data: {whole / theirs['images_per_s']:.2f} whole run"
            + (f", {steady / theirs['steady_images_per_s']:.2f} steady state" if steady else ""),
        ]
        result["ray_data"] = dict(theirs)
        result["ray_data_split"] = dict(split)
    result["text"] = "\n".join(lines)
    return result


def _fmt(share: float) -> str:
    from label_pipeline.runners.ray_planner import _fraction

    return _fraction(share)


if __name__ == "__main__":
    sys.exit(main())
