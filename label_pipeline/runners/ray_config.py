"""The ``runner: {ray: …}`` block of a manifest, strictly validated (every key: docs/CLUSTER.md).

Importing this module does not import Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from label_pipeline.config import ConfigError, check_fields, check_type, did_you_mean

OTHER_RUNNERS = ("local",)  # sibling blocks under ``runner:`` that this module leaves alone
PER_TASK = ("replicas", "num_gpus", "num_cpus", "batch_sizes")  # maps task → value


def _at_least(minimum: float, default: Any = None) -> Any:
    """A field whose value (each value, for a per-task map) must be a finite number >= ``minimum``."""
    if default is dict:
        return field(default_factory=dict, metadata={"min": minimum})
    return field(default=default, metadata={"min": minimum})


@dataclass
class RayRunnerConfig:
    replicas: dict[str, int] = _at_least(1, dict)  # fixed replica counts (the planner sizes the others)
    num_gpus: dict[str, float] = _at_least(0, dict)  # GPUs per replica; fractions share a card, 0: CPU
    num_cpus: dict[str, float] = _at_least(0, dict)  # CPUs reserved per replica
    batch_sizes: dict[str, int] = _at_least(1, dict)  # an expert's batch_size option, on this runner only
    shards_in_flight: int | None = _at_least(1)  # default: enough to keep >= 2 batches queued per replica
    shard_cpus: float | None = _at_least(0)  # CPUs reserved per shard task; default fits the cluster
    shard_attempts: int = _at_least(1, 3)  # a shard failing this many times is recorded as failed
    max_restarts: int = _at_least(-1, -1)  # restarts of a dead expert actor (-1: unlimited)
    batch_retries: int = _at_least(0, 2)  # resubmissions of a batch whose actor died while running it
    quarantine_after: int = _at_least(1, 2)  # actor deaths caused by one sample before it is given up on
    calibration_batches: int = _at_least(0, 2)  # timed batches per expert for the planner (0: no planning)
    calibrate_batch_size: bool | None = None  # None: for experts whose replica runs on CUDA
    max_replicas: int = _at_least(1, 64)  # per expert, for the planner
    actor_start_timeout_s: float = _at_least(1, 600.0)
    progress_interval_s: float = _at_least(0.1, 15.0)
    runtime_env: dict[str, Any] = field(default_factory=dict)  # passed to ray.init when joining

    def __post_init__(self) -> None:
        if self.calibrate_batch_size not in (None, True, False):
            raise ConfigError(
                f"runner.ray.calibrate_batch_size: expected true or false, got {self.calibrate_batch_size!r}"
            )
        check_fields(self, "runner.ray")
        for item in fields(self):
            value, minimum = getattr(self, item.name), item.metadata.get("min")
            numbers = value.items() if isinstance(value, dict) else [(None, value)]
            for key, number in numbers if minimum is not None else []:
                if number is not None and not (math.isfinite(number) and number >= minimum):
                    where = f"runner.ray.{item.name}" + (f".{key}" if key is not None else "")
                    raise ConfigError(f"{where}: must be >= {minimum:g}, got {number!r}")
        if self.quarantine_after > self.batch_retries + 1:
            raise ConfigError(
                "runner.ray.quarantine_after: must be <= batch_retries + 1 (a batch runs at most "
                f"{self.batch_retries + 1} times), got {self.quarantine_after}"
            )


def parse_ray_config(runner: Mapping[str, Any], known_tasks: Iterable[str]) -> RayRunnerConfig:
    """Validate ``manifest.runner``; per-task maps must name tasks the registry knows."""
    check_type(runner, dict[str, Any], "runner")
    _known_keys(runner, ["ray", *OTHER_RUNNERS], "runner")
    data = runner.get("ray") or {}
    check_type(data, dict[str, Any], "runner.ray")
    _known_keys(data, [f.name for f in fields(RayRunnerConfig)], "runner.ray")
    config = RayRunnerConfig(**{key: value for key, value in data.items() if value is not None})
    tasks = set(known_tasks)
    for name in PER_TASK:
        unknown = sorted(set(getattr(config, name)) - tasks)
        if unknown:
            raise ConfigError(f"runner.ray.{name}: unknown task(s) {unknown}; known tasks: {sorted(tasks)}")
    return config


def _known_keys(data: Mapping[str, Any], allowed: list[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        hint = did_you_mean(unknown[0], allowed)
        raise ConfigError(f"{where}: unknown key(s) {unknown}{hint}; allowed: {sorted(allowed)}")
