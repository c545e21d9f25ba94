"""Replica planning: how many actors each expert gets, with how much GPU/CPU, and the predicted rate.

Pure arithmetic (no Ray), so it is testable on its own. The rules:

* every expert gets one replica first, to measure it on (calibration); GPU experts take a whole card
  when there are at least as many cards as experts, else a power-of-two fraction of one (1/2, 1/4,
  …), so that they pack onto the cards without gaps;
* then the *bottleneck* (the expert with the lowest images/s over all its replicas) grows, one step
  at a time, while its resource still fits; the plan stops when the bottleneck cannot grow (a
  replica anywhere else would not raise the pipeline's rate) or when the shard tasks (read, decode,
  encode, write) are slower already;
* a GPU expert without a manual ``num_gpus`` grows by 1/16 of a card (``GPU_QUANTUM``; finer when
  there are more such experts than cards), so the cards' time is split in proportion to the
  experts' measured cost instead of one card per replica (the six experts on 8 cards reach ~0.73 of
  the bound with whole cards, ~0.95 in eighths, ~0.98 in sixteenths). Its share is cut into
  replicas of one card each plus one each of 1/2, 1/4, 1/8, 1/16 as needed: all sizes divide one
  another, so they pack onto the cards exactly; a running replica whose share no longer fits the
  plan is replaced (the pool retires it once its replacements run). Its cost per image is the
  card-time a replica used:
  ``min(num_gpus, 1) / images_per_s`` (a share of a card runs at that share of the card's speed);
* GPU experts with a manual ``num_gpus`` and CPU experts grow by whole replicas; CPU experts draw
  from half of the cluster's CPUs, shard tasks from the rest. Reservations are fractional when the
  cluster is small, so a 2-CPU laptop still runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from label_pipeline.config import ConfigError
from label_pipeline.runners.ray_config import RayRunnerConfig

GPU_QUANTUM = 16  # a planned GPU share is a multiple of 1/16 card (finer when experts outnumber cards)
_EPS = 1e-6


@dataclass
class ExpertProfile:
    task: str
    uses_gpu: bool
    batch_size: int


@dataclass
class Placement:
    task: str
    replicas: int
    num_gpus: float  # GPUs of the replica calibration measured (and of every replica not planned otherwise)
    num_cpus: float
    batch_size: int  # the expert's forward batch (docs/ARCHITECTURE.md, "Batch sizes")
    images_per_s: float | None = None  # one replica holding ``num_gpus``
    fixed: bool = False  # replica count set in the manifest
    shares: list[float] = field(default_factory=list)  # GPUs of each replica (``num_gpus`` each if not given)
    level: int = 0  # dependency level: 0 = reads no other expert's labels, 1 = reads level-0 labels, …

    def __post_init__(self) -> None:
        if not self.shares:
            self.shares = [self.num_gpus] * self.replicas

    def set_shares(self, shares: list[float]) -> None:
        self.shares, self.replicas = list(shares), len(shares)

    def add_replica(self, share: float | None = None) -> None:
        self.set_shares([*self.shares, self.num_gpus if share is None else share])

    def remove_replica(self, share: float) -> None:
        """One replica of ``share`` GPUs fewer (it died, failed to start or was retired)."""
        shares = list(self.shares)
        match = next((i for i, s in enumerate(shares) if math.isclose(s, share)), None)
        if match is not None:
            shares.pop(match)
        self.set_shares(shares)

    @property
    def gpus(self) -> float:
        return sum(self.shares)

    @property
    def gpu_seconds_per_image(self) -> float | None:
        """Card time one image costs (None: a CPU expert, or not measured yet)."""
        if self.images_per_s is None or self.num_gpus <= 0 or self.images_per_s <= 0:
            return None
        return min(self.num_gpus, 1.0) / self.images_per_s

    @property
    def bound(self) -> float:
        """Images/s all replicas of this expert can label (inf when not measured)."""
        if self.images_per_s is None:
            return math.inf
        cost = self.gpu_seconds_per_image
        if cost is None:
            return self.replicas * self.images_per_s
        return sum(min(share, 1.0) for share in self.shares) / cost


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
            f"{'expert':<16}{'replicas':>9}{'GPUs':>7}{'CPU/rep':>9}{'batch':>7}{'img/s/rep':>11}{'bound':>9}"
            "  GPU per replica"
        ]
        for p in self.experts.values():
            rate, bound = (
                ("-", "-") if p.images_per_s is None else (f"{p.images_per_s:.1f}", f"{p.bound:.1f}")
            )
            shares = "+".join(_fraction(s) for s in sorted(p.shares, reverse=True)) if p.gpus else "-"
            lines.append(
                f"{p.task:<16}{p.replicas:>8}{'*' if p.fixed else ' '}{p.gpus:>7.3g}{p.num_cpus:>9.3g}"
                f"{p.batch_size:>7}{rate:>11}{bound:>9}  {shares}"
            )
        cpu = "-" if self.cpu_stage_images_per_s is None else f"{self.cpu_stage_images_per_s:.1f} img/s"
        predicted = self.predicted_images_per_s
        lines.append(
            f"shard tasks: {self.shards_in_flight} in flight x {self.shard_cpus:.3g} CPU "
            f"(read/decode/encode/write bound {cpu}); * = fixed in the manifest; "
            "img/s/rep = one replica at the share it was measured at"
        )
        lines.append(
            "predicted: "
            + (f"{predicted:.1f} images/s, bottleneck {self.bottleneck}" if predicted else "not calibrated")
        )
        return "\n".join(lines)


def _fraction(share: float) -> str:
    """``1``, ``1/2``, ``3/8``: a GPU share as people read it."""
    if share >= 1 or share <= 0:
        return f"{share:g}"
    for denominator in (2**k for k in range(1, 11)):
        numerator = share * denominator
        if abs(numerator - round(numerator)) < denominator * 1e-4:
            return f"{round(numerator)}/{denominator}"
    return f"{share:.3g}"


def _round_down(value: float) -> float:
    """Ray accounts resources to 1e-4; round down so shares never sum past a whole."""
    return math.floor(value * 10_000) / 10_000


def gpu_share(gpu_experts: int, gpus: float) -> float:
    """GPUs per replica for an expert without a manual setting: a whole card, or 1/2^k of one (the
    largest power-of-two fraction that gives every expert a share: such shares pack without gaps)."""
    if gpu_experts == 0 or gpus <= 0:
        return 0.0
    if gpus >= gpu_experts:
        return 1.0
    per_card = math.ceil(gpu_experts / gpus)
    return _round_down(1 / 2 ** math.ceil(math.log2(per_card)))


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
    manual = sum(p.gpus for t, p in placements.items() if t in config.num_gpus)
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
    """Grow the bottleneck expert while its resources fit; then size the shard stage.

    ``placements`` hold what runs now (with the rates measured on it) and become the plan: a GPU
    expert's ``shares`` list the GPUs of every replica it should have (``ExpertPool`` starts the
    missing ones and retires the ones no longer listed).
    """
    cpu_rate = _cpu_stage_rate(placements, config, cpus, chunk_size, cpu_seconds_per_image)
    slices, quantum = _sliced_experts(placements, config, gpus)
    current = {task: list(placements[task].shares) for task in slices}
    for task, units in slices.items():
        placements[task].set_shares(_pieces(current[task], units, quantum))
    while True:
        measured = [p for p in placements.values() if p.images_per_s is not None]
        if not measured:
            break
        bottleneck = min(measured, key=lambda p: p.bound)
        if cpu_rate is not None and bottleneck.bound >= cpu_rate:
            break  # reading, decoding and writing are slower already: more replicas would idle
        if bottleneck.task in slices:
            units = slices[bottleneck.task] + 1
            shares = _pieces(current[bottleneck.task], units, quantum)
            grown = len(shares) <= config.max_replicas and _fits(shares, bottleneck, placements, gpus)
            if not grown:
                break
            slices[bottleneck.task] = units
            bottleneck.set_shares(shares)
            continue
        if bottleneck.fixed or bottleneck.replicas >= config.max_replicas:
            break
        if not _fits_one_more(bottleneck, placements, gpus, cpus):
            break
        bottleneck.add_replica()
    shards = config.shards_in_flight or default_shards_in_flight(placements, chunk_size)
    free = _free_cpus(placements, cpus)
    shard_cpus = config.shard_cpus if config.shard_cpus is not None else min(1.0, _round_down(free / shards))
    cpu_rate = _cpu_stage_rate(placements, config, cpus, chunk_size, cpu_seconds_per_image)
    return ReplicaPlan(placements, shards, shard_cpus, cpu_rate)


def _sliced_experts(
    placements: Mapping[str, Placement], config: RayRunnerConfig, gpus: float
) -> tuple[dict[str, int], int]:
    """The GPU experts whose share the planner chooses in slices of a card (measured, no manual
    ``num_gpus`` or replica count), each starting from one slice, and the slices per card: 16, or
    more when those experts outnumber the cards (at least 16 slices per expert). ({}, 8) when there
    are none, or not one slice each: then they keep their calibration shares and grow by replicas."""
    sliced = [
        p
        for task, p in placements.items()
        if p.gpu_seconds_per_image is not None and not p.fixed and task not in config.num_gpus
    ]
    free = gpus - sum(p.gpus for p in placements.values() if p not in sliced)
    if not sliced or free <= 0:
        return {}, GPU_QUANTUM
    quantum = GPU_QUANTUM * 2 ** max(0, math.ceil(math.log2(len(sliced) / free)))
    if math.floor(free * quantum + _EPS) < len(sliced):
        return {}, GPU_QUANTUM
    return {p.task: 1 for p in sliced}, quantum


def _pieces(current: list[float], units: int, quantum: int = GPU_QUANTUM) -> list[float]:
    """Replica shares making up ``units`` slices (1/``quantum`` card each): the running replicas that
    fit in it (largest first: they are kept), then whole cards, then one each of 1/2, 1/4, … as needed."""
    kept: list[float] = []
    total = 0.0
    for share in sorted(current, reverse=True):
        if share > 0 and total + share * quantum <= units + _EPS:
            kept.append(share)
            total += share * quantum
    rest = units - total
    pieces = []
    while rest >= quantum - _EPS:
        pieces.append(1.0)
        rest -= quantum
    size = quantum // 2
    while size >= 1:
        if rest >= size - _EPS:
            pieces.append(_round_down(size / quantum))
            rest -= size
        size //= 2
    return kept + pieces


def _fits(
    shares: list[float], candidate: Placement, placements: Mapping[str, Placement], gpus: float
) -> bool:
    used = sum(p.gpus for p in placements.values() if p is not candidate)
    return used + sum(shares) <= gpus + 1e-9


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
        used = sum(p.gpus for p in placements.values())
        return used + candidate.num_gpus <= gpus + 1e-9
    used = sum(p.replicas * p.num_cpus for p in placements.values() if p.num_gpus == 0)
    return used + max(candidate.num_cpus, 1e-4) <= cpu_pool(cpus) + 1e-9


def default_shards_in_flight(placements: Mapping[str, Placement], chunk_size: int) -> int:
    """Shards at once so every replica has >= 2 batches queued.

    A shard task labels one chunk (``chunk_size`` images, ``chunk/batch`` batches per expert) at a
    time, one dependency level after the other, and waits for the chunk's slowest batch: most of
    the time it has batches outstanding at one or two experts, not at all of them. So: two batches'
    worth of shards per replica of every expert, and at least ``levels`` times what the expert
    with most replicas needs on its own; +1 for the shard being written.
    """
    levels = 1 + max((p.level for p in placements.values()), default=0)
    needed = [2 * p.replicas * p.batch_size / max(chunk_size, 1) for p in placements.values()]
    return math.ceil(max(2.0, sum(needed), levels * max(needed, default=1.0))) + 1


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


# -- projection: a dataset's wall time on N GPUs ----------------------------------------------------
# Per-expert forward cost recorded in docs/BENCHMARKS.md ("Experts": full-size architectures, random
# weights, fp32, one image, on the 2-core CPU of the development machine). No GPU measurement is
# recorded yet: these give the experts' relative costs (so the replica split), not GPU hours. A GPU
# run's statistics (OUT/stats/*.json) or bench/gpu_check.sh's JSON give real ones (``--stats``).
RECORDED_SOURCE = "docs/BENCHMARKS.md, full-size forward on CPU (fp32, 1 image): relative costs only"
RECORDED_SECONDS_PER_IMAGE = {
    "edge": 1.684,
    "depth": 13.188,
    "normal": 14.590,
    "seg_coco": 21.661,
    "obj_detection": 33.382,
    "ocr_detection": 12.653,
}


@dataclass
class Projection:
    plan: ReplicaPlan
    images: int
    gpus: float

    @property
    def images_per_s(self) -> float | None:
        rate = self.plan.predicted_images_per_s
        return None if rate is None or math.isinf(rate) else rate

    @property
    def hours(self) -> float | None:
        rate = self.images_per_s
        return self.images / rate / 3600 if rate else None


def project(
    seconds_per_image: Mapping[str, float],
    gpus: float,
    images: int,
    cpus: float = 0.0,
    cpu_seconds_per_image: float | None = None,
    batch_size: int = 8,
) -> Projection:
    """The replica plan for ``gpus`` cards from each expert's card-seconds per image (one replica
    on a whole card), its predicted images/s and the hours ``images`` take. ``cpus`` (with the shard
    tasks' CPU seconds per image) adds the read/decode/encode/write bound; 0 leaves it out."""
    if gpus <= 0:
        raise ConfigError(f"--gpus: expected a positive number of GPUs, got {gpus:g}")
    profiles = {task: ExpertProfile(task, True, batch_size) for task in seconds_per_image}
    config = RayRunnerConfig(max_replicas=10_000)
    placements = first_placements(profiles, config, gpus, max(cpus, 1.0))
    for task, seconds in seconds_per_image.items():
        placements[task].images_per_s = min(placements[task].num_gpus, 1.0) / seconds
    cpu_seconds = cpu_seconds_per_image if cpus > 0 else None
    plan = plan_replicas(placements, config, gpus, max(cpus, 1.0), batch_size, cpu_seconds)
    return Projection(plan, images, gpus)


def seconds_from_stats(stats: Mapping[str, Any]) -> tuple[dict[str, float], float | None, str]:
    """Card-seconds per image of each expert (one replica on a whole card) from a run's statistics
    (``OUT/stats/*.json``, either runner) or bench/gpu_check.sh's JSON; the shard tasks' CPU seconds
    per image when recorded; and a line saying where they come from."""
    if "gpu_check" in stats:
        experts = stats["gpu_check"]["experts"]
        seconds = {
            task: 1.0 / entry["images_per_s"] for task, entry in experts.items() if entry.get("images_per_s")
        }
        return seconds, None, f"bench/gpu_check.sh on {stats['gpu_check'].get('device', '?')}"
    seconds = {}
    for task, entry in stats.get("experts", {}).items():
        placement = entry.get("placement") or {}
        rate, share = placement.get("images_per_s"), placement.get("num_gpus")
        if rate and share:  # the Ray runner's calibration: one replica at its share of a card
            seconds[task] = min(share, 1.0) / rate
        elif entry.get("images") and entry.get("busy_s"):  # busy time per image on its device
            seconds[task] = entry["busy_s"] / entry["images"]
    cpu = stats.get("cpu_stage") or {}
    cpu_seconds = cpu["seconds"] / cpu["images"] if cpu.get("images") else None
    where = f"the {stats.get('runner', '?')} run {stats.get('run_id', '?')} of {stats.get('created', '?')}"
    if stats.get("runner") == "ray" and not stats.get("cluster", {}).get("GPU"):
        where += " (on CPU: its rates are no GPU's)"
    return seconds, cpu_seconds, where


IMG2DATASET_SAMPLES_PER_SHARD = 10_000  # what `make download` asks img2dataset for (label_pipeline.download)


@dataclass
class DatasetSize:
    shards: int
    samples_per_shard: int
    note: str  # where the numbers come from

    @property
    def images(self) -> int:
        return self.shards * self.samples_per_shard


def dataset_size(source: Any, samples_per_shard: int | None = None) -> DatasetSize:
    """Shards × samples per shard of a manifest's ``source`` (a ``SourceConfig``), without reading
    any input where the manifest says it: a WebDataset's shards are its brace pattern, each of
    ``transform.number_sample_per_shard`` (img2dataset's, 10,000 by default) or
    ``samples_per_shard``; other sources are listed (their annotations must be there) in shards of
    ``shard_size``."""
    if source.format == "webdataset":
        from label_pipeline.sources.webdataset import expand_shard_urls

        shards = len(expand_shard_urls(source.path))
        if samples_per_shard is not None:
            return DatasetSize(
                shards, samples_per_shard, "shards: the manifest's path; samples per shard: given"
            )
        per_shard = source.transform.get("number_sample_per_shard")
        if per_shard is None and str(source.transform.get("tool", "")).startswith("img2dataset"):
            per_shard = IMG2DATASET_SAMPLES_PER_SHARD
            return DatasetSize(
                shards,
                per_shard,
                f"shards: the manifest's path; {per_shard:,} samples each (`make download`)",
            )
        if per_shard is None:
            raise ConfigError(
                "samples per shard: the manifest does not say (source.transform.number_sample_per_shard); "
                "pass --samples-per-shard"
            )
        return DatasetSize(
            shards, int(per_shard), "the manifest's path and transform.number_sample_per_shard"
        )
    from label_pipeline.sources import build_source

    try:
        shards = len(build_source(source).shards())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot list the {source.format} source to count its images ({exc}); pass --images"
        ) from None
    per_shard = samples_per_shard or source.shard_size
    return DatasetSize(
        shards, per_shard, f"{shards} shards listed, of up to {per_shard} samples (shard_size)"
    )


def format_projection(projection: Projection, size: DatasetSize, source_line: str, name: str) -> str:
    """What ``label-pipeline plan`` prints."""
    plan = projection.plan
    lines = [
        f"dataset {name}: {size.shards:,} shards x {size.samples_per_shard:,} = {size.images:,} images "
        f"({size.note})",
        f"per-expert throughput: {source_line}",
        "",
        f"{'expert':<16}{'replicas':>9}{'GPUs':>8}{'img/s per GPU':>15}{'bound img/s':>13}  GPU per replica",
    ]
    for p in plan.experts.values():
        per_gpu = 1.0 / p.gpu_seconds_per_image if p.gpu_seconds_per_image else 0.0
        shares = "+".join(_fraction(s) for s in sorted(p.shares, reverse=True))
        lines.append(f"{p.task:<16}{p.replicas:>9}{p.gpus:>8.3g}{per_gpu:>15.3g}{p.bound:>13.3g}  {shares}")
    rate, hours = projection.images_per_s, projection.hours
    if plan.cpu_stage_images_per_s is not None:
        lines.append(f"shard tasks (read, decode, encode, write): {plan.cpu_stage_images_per_s:.1f} images/s")
    lines.append("")
    if rate and hours is not None:
        lines.append(
            f"predicted: {rate:.1f} images/s on {projection.gpus:g} GPUs (bottleneck {plan.bottleneck}): "
            f"{hours:.2f} hours ({hours / 24:.2f} days) for {size.images:,} images"
        )
    else:
        lines.append("predicted: no expert was measured")
    if source_line == RECORDED_SOURCE:
        lines.append(
            "(CPU costs: the split between experts holds, the hours do not; run bench/gpu_check.sh on a "
            "GPU and pass its JSON, or a GPU run's OUT/stats/*.json, with --stats)"
        )
    return "\n".join(lines)
