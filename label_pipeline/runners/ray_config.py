"""The ``runner: {ray: …}`` block of a manifest, strictly validated.

```yaml
runner:
  ray:
    replicas: {depth: 2}          # fixed replica counts (the planner decides the others)
    num_gpus: {edge: 0.25}        # GPUs per replica; fractions share a card, 0 runs on CPU
    num_cpus: {ocr_detection: 2}  # CPUs reserved per replica
    batch_sizes: {depth: 8}       # per-expert batch size (experts must be batch-invariant)
    calibrate_batch_size: true    # time a few synthetic batches to choose the others' (default: on CUDA)
    shards_in_flight: 8           # shards being labelled at once (backpressure bound)
```

Importing this module does not import Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from label_pipeline.config import ConfigError

OTHER_RUNNERS = ("local",)  # sibling blocks under ``runner:`` that this module leaves alone


@dataclass
class RayRunnerConfig:
    replicas: dict[str, int] = field(default_factory=dict)
    num_gpus: dict[str, float] = field(default_factory=dict)
    num_cpus: dict[str, float] = field(default_factory=dict)
    batch_sizes: dict[str, int] = field(default_factory=dict)
    shards_in_flight: int | None = None  # default: enough to keep >= 2 batches queued per replica
    shard_cpus: float | None = None  # CPUs reserved per shard task; default fits the cluster
    shard_attempts: int = 3  # a shard failing this many times is recorded as failed
    max_restarts: int = -1  # restarts of a dead expert actor (-1: unlimited)
    batch_retries: int = 2  # resubmissions of a batch whose actor died while running it
    quarantine_after: int = 2  # actor deaths caused by one sample before it is given up on
    calibration_batches: int = 2  # timed batches per expert for the planner (0: no calibration)
    calibrate_batch_size: bool | None = None  # None: for experts whose replica runs on CUDA
    max_replicas: int = 8  # per expert, for the planner
    actor_start_timeout_s: float = 600.0
    progress_interval_s: float = 15.0
    runtime_env: dict[str, Any] = field(default_factory=dict)  # passed to ray.init when joining


_INT_FIELDS = {
    "shards_in_flight": 1,
    "shard_attempts": 1,
    "max_restarts": -1,
    "batch_retries": 0,
    "quarantine_after": 1,
    "calibration_batches": 0,
    "max_replicas": 1,
}
_FLOAT_FIELDS = {"shard_cpus": 0.0, "actor_start_timeout_s": 1.0, "progress_interval_s": 0.1}
_PER_TASK = {
    "replicas": (int, 1),
    "num_gpus": (float, 0.0),
    "num_cpus": (float, 0.0),
    "batch_sizes": (int, 1),
}


def parse_ray_config(runner: Mapping[str, Any], known_tasks: Iterable[str]) -> RayRunnerConfig:
    """Validate ``manifest.runner``; per-task maps must name tasks the registry knows."""
    if not isinstance(runner, Mapping):
        raise ConfigError(f"runner: expected a mapping, got {type(runner).__name__}")
    unknown = sorted(set(runner) - {"ray", *OTHER_RUNNERS})
    if unknown:
        raise ConfigError(f"runner: unknown key(s) {unknown}; allowed: {sorted({'ray', *OTHER_RUNNERS})}")
    data = runner.get("ray") or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"runner.ray: expected a mapping, got {type(data).__name__}")
    allowed = {f.name for f in fields(RayRunnerConfig)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"runner.ray: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    tasks = set(known_tasks)
    values: dict[str, Any] = {}
    for name, (kind, minimum) in _PER_TASK.items():
        values[name] = _per_task(data.get(name) or {}, f"runner.ray.{name}", kind, minimum, tasks)
    for name, minimum in _INT_FIELDS.items():
        if data.get(name) is not None:
            values[name] = _number(data[name], f"runner.ray.{name}", int, minimum)
    for name, minimum in _FLOAT_FIELDS.items():
        if data.get(name) is not None:
            values[name] = _number(data[name], f"runner.ray.{name}", float, minimum)
    calibrate = data.get("calibrate_batch_size")
    if calibrate is not None:
        if not isinstance(calibrate, bool):
            raise ConfigError(f"runner.ray.calibrate_batch_size: expected true or false, got {calibrate!r}")
        values["calibrate_batch_size"] = calibrate
    if "runtime_env" in data:
        if not isinstance(data["runtime_env"], Mapping):
            raise ConfigError("runner.ray.runtime_env: expected a mapping (Ray's runtime_env)")
        values["runtime_env"] = dict(data["runtime_env"])
    config = RayRunnerConfig(**values)
    if config.quarantine_after > config.batch_retries + 1:
        raise ConfigError(
            "runner.ray.quarantine_after: must be <= batch_retries + 1 (a batch runs at most "
            f"{config.batch_retries + 1} times), got {config.quarantine_after}"
        )
    return config


def _per_task(
    data: Any, where: str, kind: type, minimum: float, tasks: set[str]
) -> dict[str, int] | dict[str, float]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping task → value, got {data!r}")
    unknown = sorted(set(data) - tasks)
    if unknown:
        raise ConfigError(f"{where}: unknown task(s) {unknown}; known tasks: {sorted(tasks)}")
    return {task: _number(value, f"{where}.{task}", kind, minimum) for task, value in data.items()}


def _number(value: Any, where: str, kind: type, minimum: float) -> Any:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (kind is int and not isinstance(value, int)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value!r}")
    return kind(value)
