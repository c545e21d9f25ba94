"""Replica planning: how many actors each expert gets, with how much GPU/CPU, and the predicted rate.

Pure arithmetic (no Ray), so it is testable on its own. The rules:

* every expert gets one replica first; GPU experts share the cluster's cards when there are fewer
  cards than experts (``1/k`` of a card each, so they pack onto whole cards on every node);
* then replicas are added one at a time to the *bottleneck* (the expert with the lowest
  ``replicas × images/s``) while its resource still fits; the plan stops when the bottleneck
  cannot grow, since a replica anywhere else would not raise the pipeline's rate;
* CPU experts draw from half of the cluster's CPUs; shard tasks (read, decode, encode, write) from
  the rest. Reservations are fractional when the cluster is small, so a 2-CPU laptop still runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from label_pipeline.config import ConfigError
from label_pipeline.runners.ray_config import RayRunnerConfig


@dataclass
class ExpertProfile:
    task: str
    uses_gpu: bool
    batch_size: int


@dataclass
class Placement:
    task: str
    replicas: int
    num_gpus: float
    num_cpus: float
    batch_size: int  # the expert's forward batch (docs/ARCHITECTURE.md, "Batch sizes")
    images_per_s: float | None = None  # one replica
    fixed: bool = False  # replica count set in the manifest

    @property
    def bound(self) -> float:
        """Images/s all replicas of this expert can label (inf when not measured)."""
        return math.inf if self.images_per_s is None else self.replicas * self.images_per_s


@dataclass
class ReplicaPlan:
    experts: dict[str, Placement]
    shards_in_flight: int
    shard_cpus: float
    cpu_stage_images_per_s: float | None = None

    def _stages(self) -> dict[str, float]:
        """Measured images/s of each stage: the experts, and ``shard tasks`` (read/decode/encode/write)."""
        stages = {p.task: p.bound for p in self.experts.values() if p.images_per_s is not None}
        if self.cpu_stage_images_per_s is not None:
            stages["shard tasks"] = self.cpu_stage_images_per_s
        return stages

    @property
    def bottleneck(self) -> str | None:
        stages = self._stages()
        return min(stages, key=stages.__getitem__) if stages else None

    @property
    def predicted_images_per_s(self) -> float | None:
        return min(self._stages().values(), default=None)

    def describe(self) -> str:
        lines = [
            f"{'expert':<16}{'replicas':>9}{'GPU/rep':>9}{'CPU/rep':>9}{'batch':>7}{'img/s/rep':>11}{'bound':>9}"
        ]
        for p in self.experts.values():
            rate, bound = (
                ("-", "-") if p.images_per_s is None else (f"{p.images_per_s:.1f}", f"{p.bound:.1f}")
            )
            lines.append(
                f"{p.task:<16}{p.replicas:>8}{'*' if p.fixed else ' '}{p.num_gpus:>9.3g}{p.num_cpus:>9.3g}"
                f"{p.batch_size:>7}{rate:>11}{bound:>9}"
            )
        cpu = "-" if self.cpu_stage_images_per_s is None else f"{self.cpu_stage_images_per_s:.1f} img/s"
        predicted = self.predicted_images_per_s
        lines.append(
            f"shard tasks: {self.shards_in_flight} in flight x {self.shard_cpus:.3g} CPU "
            f"(read/decode/encode/write bound {cpu}); * = fixed in the manifest"
        )
        lines.append(
            "predicted: "
            + (f"{predicted:.1f} images/s, bottleneck {self.bottleneck}" if predicted else "not calibrated")
        )
        return "\n".join(lines)


def _round_down(value: float) -> float:
    """Ray accounts resources to 1e-4; round down so shares never sum past a whole."""
    return math.floor(value * 10_000) / 10_000


def gpu_share(gpu_experts: int, gpus: float) -> float:
    """GPUs per replica for an expert without a manual setting: a whole card, or 1/k of one."""
    if gpu_experts == 0 or gpus <= 0:
        return 0.0
    if gpus >= gpu_experts:
        return 1.0
    return _round_down(1 / math.ceil(gpu_experts / gpus))


def cpu_pool(cpus: float) -> float:
    """CPUs that CPU-bound expert replicas may reserve; the rest is for shard tasks."""
    return max(1.0, math.floor(cpus / 2))


def first_placements(
    profiles: Mapping[str, ExpertProfile], config: RayRunnerConfig, gpus: float, cpus: float
) -> dict[str, Placement]:
    """One replica per expert (what calibration runs on); fails when manual GPU shares don't fit."""
    auto_gpu = [t for t, p in profiles.items() if p.uses_gpu and t not in config.num_gpus]
    share = gpu_share(len(auto_gpu), gpus)
    placements: dict[str, Placement] = {}
    for task, profile in profiles.items():
        num_gpus = config.num_gpus.get(task, share if task in auto_gpu else 0.0)
        placements[task] = Placement(
            task,
            replicas=config.replicas.get(task, 1),
            num_gpus=num_gpus,
            num_cpus=0.0,
            batch_size=profile.batch_size,
            fixed=task in config.replicas,
        )
    manual = sum(p.num_gpus for t, p in placements.items() if t in config.num_gpus)
    if manual > gpus + 1e-9:
        raise ConfigError(
            f"runner.ray.num_gpus: one replica of each expert needs {manual:g} GPUs, the cluster has {gpus:g}"
        )
    _assign_cpus(placements, config, cpus)
    return placements


def _assign_cpus(placements: Mapping[str, Placement], config: RayRunnerConfig, cpus: float) -> None:
    """CPU experts reserve one CPU per replica, or an equal share of the pool when it is too small."""
    auto = [p for t, p in placements.items() if p.num_gpus == 0 and t not in config.num_cpus]
    wanted = sum(p.replicas for p in auto)
    per_replica = 1.0 if wanted <= cpu_pool(cpus) else _round_down(cpu_pool(cpus) / wanted)
    for task, placement in placements.items():
        if task in config.num_cpus:
            placement.num_cpus = config.num_cpus[task]
        elif placement.num_gpus == 0:
            placement.num_cpus = per_replica


def plan_replicas(
    placements: dict[str, Placement],
    config: RayRunnerConfig,
    gpus: float,
    cpus: float,
    chunk_size: int,
    cpu_seconds_per_image: float | None,
) -> ReplicaPlan:
    """Grow the bottleneck expert while its resources fit; then size the shard stage."""
    cpu_rate = _cpu_stage_rate(placements, config, cpus, chunk_size, cpu_seconds_per_image)
    while True:
        measured = [p for p in placements.values() if p.images_per_s is not None]
        if not measured:
            break
        bottleneck = min(measured, key=lambda p: p.bound)
        if bottleneck.fixed or bottleneck.replicas >= config.max_replicas:
            break
        if cpu_rate is not None and bottleneck.bound >= cpu_rate:
            break  # reading, decoding and writing are slower already: more replicas would idle
        if not _fits_one_more(bottleneck, placements, gpus, cpus):
            break
        bottleneck.replicas += 1
    shards = config.shards_in_flight or default_shards_in_flight(placements, chunk_size)
    free = _free_cpus(placements, cpus)
    shard_cpus = config.shard_cpus if config.shard_cpus is not None else min(1.0, _round_down(free / shards))
    cpu_rate = _cpu_stage_rate(placements, config, cpus, chunk_size, cpu_seconds_per_image)
    return ReplicaPlan(placements, shards, shard_cpus, cpu_rate)


def _free_cpus(placements: Mapping[str, Placement], cpus: float) -> float:
    return max(cpus - sum(p.replicas * p.num_cpus for p in placements.values()), 0.0)


def _cpu_stage_rate(
    placements: Mapping[str, Placement],
    config: RayRunnerConfig,
    cpus: float,
    chunk_size: int,
    cpu_seconds_per_image: float | None,
) -> float | None:
    """Images/s the shard tasks can read, decode, encode and write (one core each at most)."""
    if not cpu_seconds_per_image:
        return None
    shards = config.shards_in_flight or default_shards_in_flight(placements, chunk_size)
    return min(shards, max(_free_cpus(placements, cpus), 1.0)) / cpu_seconds_per_image


def _fits_one_more(
    candidate: Placement, placements: Mapping[str, Placement], gpus: float, cpus: float
) -> bool:
    if candidate.num_gpus > 0:
        used = sum(p.replicas * p.num_gpus for p in placements.values())
        return used + candidate.num_gpus <= gpus + 1e-9
    used = sum(p.replicas * p.num_cpus for p in placements.values() if p.num_gpus == 0)
    return used + max(candidate.num_cpus, 1e-4) <= cpu_pool(cpus) + 1e-9


def default_shards_in_flight(placements: Mapping[str, Placement], chunk_size: int) -> int:
    """Shards at once so every replica has >= 2 batches queued.

    A shard has one chunk (``chunk_size`` images) at the experts at a time, i.e. ``chunk/batch``
    batches per expert; experts wait for their dependencies half of the time, hence the +1.
    """
    needed = [math.ceil(2 * p.replicas * p.batch_size / max(chunk_size, 1)) for p in placements.values()]
    return max(2, max(needed, default=1)) + 1


MAX_CALIBRATED_BATCH = 64  # candidate batch sizes stop here: beyond it gains are small, memory risk is not


def candidate_batch_sizes(preferred: int) -> list[int]:
    """The batch sizes a calibration times: half, the preferred size and double (capped)."""
    return sorted(
        {max(1, preferred // 2), preferred, min(2 * preferred, max(MAX_CALIBRATED_BATCH, preferred))}
    )


def choose_batch_size(timings: Mapping[int, float | None], preferred: int) -> int:
    """The batch size with the best images/s from ``timings`` (seconds per image; None = out of memory).

    A bigger batch is taken only when it is at least 5% faster than the best smaller one (it costs
    memory and latency for nothing otherwise); a size that ran out of memory never is.
    """
    measured = sorted((size, seconds) for size, seconds in timings.items() if seconds is not None)
    if not measured:
        out_of_memory = [size for size in timings if size <= preferred]
        return max(1, min(out_of_memory) // 2) if out_of_memory else preferred
    best, best_seconds = measured[0]
    for size, seconds in measured[1:]:
        if seconds * 1.05 <= best_seconds:  # >= 5% more images/s
            best, best_seconds = size, seconds
    return best
