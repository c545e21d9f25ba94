"""Ray runner vs in-process runner on the same workload: images/s, and how close each gets to its bound.

The workload is the demo's photos, repeated into ``--shards`` WebDataset shards of ``--per-shard``
images. Both runners label it; the outputs are checked to be byte-identical. Printed:

  * images/s of each runner end to end, and the ratio Ray ÷ in-process; Ray runs twice in one
    driver: *cold* (worker processes start and experts load: what one CLI run pays) and *warm*
    (the same actors and workers again: the steady state of a long run); per-expert numbers and
    busy fractions are from the warm run;
  * the slowest-expert bound: what the experts alone allow — in-process they run one after the other
    (``1 / Σ 1/rate``), on Ray in parallel with replicas (``min replicas × rate``) — and
    end-to-end ÷ bound for each;
  * from the Ray run's stats file: per-expert images/s and the fraction of time each actor was busy.

``--simulate-gpu-ms MS`` adds ``depth:simulated``, an expert that holds a (logical) GPU for MS per
image, to see replicas and pipelining at work on a machine without GPUs.

    python bench/ray_pipeline.py                                   # edge:canny, 8 shards x 48 images
    python bench/ray_pipeline.py --experts edge:canny --simulate-gpu-ms 20 --gpus 4
    python bench/ray_pipeline.py --experts edge:canny,ocr_detection:ppocr --shards 4 --per-shard 12
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from expert_zoo.base import ExpertSpec, Label
from expert_zoo.canny import CannyEdge, CannyOptions
from expert_zoo.registry import build_expert, register
from label_pipeline.config import load_manifest
from label_pipeline.core.decode import decode_image
from label_pipeline.core.tario import read_tar_samples, write_tar
from label_pipeline.run import RunOptions
from label_pipeline.runners.local import run_local
from label_pipeline.sources.demo import build_demo_dataset


@dataclass(frozen=True)
class SimulatedDepthOptions(CannyOptions):
    ms_per_image: float = 20


class SimulatedDepth(CannyEdge):
    """Holds its device for ``ms_per_image`` per image (sleeping: the host CPU stays free), like a
    GPU-bound network; the label is the image's brightness."""

    spec = ExpertSpec(task="depth", backend="simulated", version="1", mode="L", batch_size=16, uses_gpu=True)
    Options = SimulatedDepthOptions

    def predict(self, images, deps):
        time.sleep(len(images) * float(self.config.get("ms_per_image", 20)) / 1000)
        return [Label(image.mean(axis=2).astype(np.uint8)) for image in images]


def build_workload(root: Path, shards: int, per_shard: int) -> tuple[str, list[np.ndarray]]:
    """Demo photos repeated into WebDataset shards; returns the brace pattern and the decoded images."""
    demo = [member for name in build_demo_dataset(str(root / "demo")) for member in _samples(name)]
    (root / "in").mkdir(parents=True, exist_ok=True)
    decoded = []
    for shard in range(shards):
        samples = []
        for i in range(per_shard):
            index = shard * per_shard + i
            key, members = demo[index % len(demo)]
            samples.append([(f"{index:08d}.{ext}", data) for ext, data in members.items()])
            image = next(data for ext, data in members.items() if ext in ("jpg", "png"))
            decoded.append(decode_image(image).array)
        with open(root / "in" / f"{shard:05d}.tar", "wb") as handle:
            write_tar(handle, samples)
    return f"{root}/in/{{00000..{shards - 1:05d}}}.tar", decoded


def _samples(tar_path: str) -> list[tuple[str, dict[str, bytes]]]:
    with open(tar_path, "rb") as handle:
        return list(read_tar_samples(handle))


def bare_rates(experts: list[str], options: dict, images: list[np.ndarray]) -> dict[str, float]:
    """Images/s of each expert called directly (in-process, CPU), after one warm-up batch."""
    rates, labels = {}, {}
    for name in experts:
        expert = build_expert(name, device="auto", options=options.get(name))
        task, size = expert.spec.task, expert.batch_size
        deps = {dep: labels[dep] for dep in expert.spec.requires}
        expert(images[:size], {d: v[:size] for d, v in deps.items()})
        started, out = time.perf_counter(), []
        for i in range(0, len(images), size):
            out += expert(images[i : i + size], {d: v[i : i + size] for d, v in deps.items()})
        rates[task] = len(images) / (time.perf_counter() - started)
        labels[task] = out
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="edge:canny")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=48)
    parser.add_argument("--simulate-gpu-ms", type=float, default=0.0)
    parser.add_argument("--cpus", type=int, help="local Ray CPUs (default: the machine's)")
    parser.add_argument("--gpus", type=float, help="local Ray GPUs (default: the machine's; logical ok)")
    parser.add_argument("--address", help="join this Ray cluster instead of starting one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from label_pipeline.runners.ray_pool import ActorCache
    from label_pipeline.runners.ray_runner import run_ray

    experts = args.experts.split(",")
    options: dict[str, dict] = {}
    if args.simulate_gpu_ms:
        register("depth:simulated", f"{__name__}:SimulatedDepth")
        experts.append("depth:simulated")
        options["depth:simulated"] = {"ms_per_image": args.simulate_gpu_ms}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pattern, images = build_workload(root, args.shards, args.per_shard)
        entries = [{"name": n, "options": options[n]} if n in options else n for n in experts]
        manifest_path = root / "bench.yaml"
        manifest_path.write_text(
            yaml.safe_dump(
                {
                    "name": "bench",
                    "source": {"format": "webdataset", "path": pattern},
                    "output": str(root / "out"),
                    "experts": entries,
                }
            )
        )
        manifest = load_manifest(str(manifest_path))
        rates = bare_rates(experts, options, images)
        n = len(images)

        started = time.perf_counter()
        run_local(manifest, RunOptions(output=str(root / "local")), progress=False)
        local_s = time.perf_counter() - started

        if args.address:
            ray.init(address=args.address)
        else:
            ray.init(num_cpus=args.cpus, num_gpus=args.gpus, include_dashboard=False)
        actors = ActorCache()  # the warm run reuses the cold run's actors
        try:
            started = time.perf_counter()  # cold: worker processes start, experts load
            run_ray(manifest, RunOptions(output=str(root / "ray_cold")), progress=False, actor_cache=actors)
            cold_s = time.perf_counter() - started
            started = time.perf_counter()  # warm: the same driver again (actors and workers reused)
            run_ray(manifest, RunOptions(output=str(root / "ray")), progress=False, actor_cache=actors)
            ray_s = time.perf_counter() - started
            resources = ray.cluster_resources()
        finally:
            actors.close()
            ray.shutdown()

        same = all(
            (root / "local" / "shards" / p.name).read_bytes() == p.read_bytes()
            for p in (root / "ray" / "shards").glob("*.tar")
        )
        (stats_path,) = (root / "ray" / "stats").glob("ray-*.json")
        stats = json.loads(stats_path.read_text())

    replicas = {task: len(entry["replicas"]) for task, entry in stats["experts"].items()}
    local_bound = 1 / sum(1 / r for r in rates.values())
    ray_bound = min(replicas[t] * r for t, r in rates.items())
    local_ips, ray_ips, cold_ips = n / local_s, n / ray_s, n / cold_s
    print(
        f"workload: {n} images in {args.shards} shards; experts {', '.join(experts)}; "
        f"Ray {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
    )
    print(f"bytes identical (Ray vs in-process): {same}\n")
    print(f"{'expert':<16}{'bare img/s':>12}{'replicas':>10}{'Ray img/s':>11}  busy per replica")
    for task, rate in rates.items():
        entry = stats["experts"][task]
        busy = " ".join(f"{r['busy_fraction']:.0%}" for r in entry["replicas"])
        print(f"{task:<16}{rate:>12.1f}{replicas[task]:>10}{entry['images_per_s'] or 0:>11.1f}  {busy}")
    cpu = stats.get("cpu_stage", {})
    if cpu.get("images"):
        per_image = 1000 * cpu["seconds"] / cpu["images"]
        print(f"\nshard tasks (read, decode, encode, write): {per_image:.1f} ms CPU / image")
    print()
    rows = [("in-process", local_ips, local_bound), ("Ray cold", cold_ips, ray_bound)]
    for name, ips, bound in [*rows, ("Ray warm", ray_ips, ray_bound)]:
        print(
            f"{name:<12}{ips:8.1f} images/s   expert bound {bound:8.1f}   end-to-end/bound {ips / bound:.2f}"
        )
    print(f"Ray / in-process = {ray_ips / local_ips:.2f} warm, {cold_ips / local_ips:.2f} cold")


if __name__ == "__main__":
    main()
