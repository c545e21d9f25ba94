"""Dataset manifests: typed, strictly validated, with ``${VAR}`` / ``${VAR:-default}`` expansion."""

from __future__ import annotations

import functools
import logging
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import yaml

from label_pipeline.core.decode import DEFAULT_MAX_PIXELS
from label_pipeline.core.errors import ConfigError
from label_pipeline.core.expert_request import ExpertRequest
from label_pipeline.core.validation import check_type, did_you_mean

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# The dataset manifests: package data (a link to the top-level manifests/ in a source checkout).
MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SOURCE_FORMATS = ("webdataset", "coco", "vg", "folder", "demo")


def expand_vars(value: str, env: Mapping[str, str], where: str) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is an error."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable ${{{name}}} is not set")

    return _VAR.sub(replace, value)


def _check_keys(data: Mapping[str, Any], allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed, key=str)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}{did_you_mean(unknown[0], sorted(allowed))} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )
    missing = sorted(required - set(data))
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj: DataclassInstance, where: str = "") -> None:
    """Check every field of a config dataclass against its annotation (bools are bools, paths are
    strings, numbers are numbers); the error names the key path, e.g. ``source.skip_missing``."""
    types = _field_types(type(obj))
    for item in fields(obj):
        check_type(getattr(obj, item.name), types[item.name], f"{where}.{item.name}" if where else item.name)


def _check_positive(value: int, where: str) -> None:
    if value < 1:
        raise ConfigError(f"{where}: must be >= 1, got {value}")


@dataclass
class SourceConfig:
    format: str
    path: str | None = None  # webdataset / folder / demo
    images: str | None = None  # coco / vg: image root
    annotations: list[str] = field(default_factory=list)  # coco caption files
    image_data: str | None = None  # vg
    captions: str | None = None  # vg (optional)
    shard_size: int = 1000  # non-sharded sources are cut into shards of this many samples
    skip_missing: bool = False  # webdataset: ignore listed shards that don't exist (partial downloads)
    transform: dict[str, Any] = field(default_factory=dict)  # how the inputs were made (recorded only)

    def __post_init__(self) -> None:
        if isinstance(self.annotations, str):  # one file may be given without a list
            self.annotations = [self.annotations]
        check_fields(self, "source")
        if self.format not in SOURCE_FORMATS:
            raise ConfigError(
                f"source.format: {self.format!r} is not one of {list(SOURCE_FORMATS)}"
                f"{did_you_mean(self.format, SOURCE_FORMATS)}"
            )
        needs = {
            "webdataset": ["path"],
            "folder": ["path"],
            "demo": ["path"],
            "coco": ["images", "annotations"],
            "vg": ["images", "image_data"],
        }[self.format]
        for name in needs:
            if not getattr(self, name):
                raise ConfigError(f"source.{name}: required for format {self.format!r}")
        _check_positive(self.shard_size, "source.shard_size")

    def required(self, name: str) -> str:
        """The value of path field ``name`` (``path``, ``images``, ``image_data``) this format needs."""
        value = getattr(self, name)
        if not value:
            raise ConfigError(f"source.{name}: required for format {self.format!r}")
        return str(value)


@dataclass
class DecodeConfig:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 1
    # Decoded pixels (H×W×3 bytes per image) held at once per shard, read ahead or being labelled.
    # Only memory and speed depend on it, never the bytes written.
    max_bytes_in_flight: int = 1 << 30

    def __post_init__(self) -> None:
        check_fields(self, "decode")  # types of every field, before the range checks below
        if self.max_pixels < 1 or self.min_side < 1:
            raise ConfigError("decode.max_pixels and decode.min_side must be >= 1")
        if self.max_bytes_in_flight < 1:
            raise ConfigError("decode.max_bytes_in_flight must be >= 1")


@dataclass
class Manifest:
    name: str
    source: SourceConfig
    output: str
    experts: list[ExpertRequest]
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    batch_size: int | None = None  # deprecated: applied as each expert's batch_size option where unset
    runner: dict[str, Any] = field(default_factory=dict)  # runner-specific settings (e.g. ray replicas)

    def __post_init__(self) -> None:
        check_fields(self)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"name: {self.name!r} must be a plain identifier")
        if not self.output.strip():
            raise ConfigError("output: must not be empty")
        if not self.experts:
            raise ConfigError("experts: at least one expert is required")
        tasks = [e.task for e in self.experts]
        duplicated = sorted({t for t in tasks if tasks.count(t) > 1})
        if duplicated:
            raise ConfigError(f"experts: task(s) {duplicated} listed more than once")
        if self.batch_size is not None:
            _check_positive(self.batch_size, "batch_size")
            logging.getLogger(__name__).warning(
                "batch_size: a manifest-wide batch_size is deprecated; it is applied as options.batch_size "
                "of each expert that sets none. Set it per expert (docs/ARCHITECTURE.md, 'Batch sizes')"
            )

    def runnable_experts(self) -> list[ExpertRequest]:
        """The expert entries as the runners build them: the deprecated manifest-wide ``batch_size``
        is the ``batch_size`` option of each expert that sets none."""
        if self.batch_size is None:
            return list(self.experts)
        return [replace(r, options={"batch_size": self.batch_size, **r.options}) for r in self.experts]

    def with_experts(self, names: list[str]) -> Manifest:
        """The same manifest with a different expert list (``--experts``)."""
        return Manifest(
            **{
                **{f.name: getattr(self, f.name) for f in fields(self)},
                "experts": parse_experts(names, "--experts"),
            }
        )


def parse_experts(items: Any, where: str) -> list[ExpertRequest]:
    """Expert entries, each remembering its key path (``experts[2]``) for later errors."""
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a list of expert names, got {items!r}")
    return [ExpertRequest.parse(item, f"{where}[{i}]") for i, item in enumerate(items)]


def _expand_tree(value: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(value, str):
        return expand_vars(value, env, where)
    if isinstance(value, list):
        return [_expand_tree(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand_tree(v, env, f"{where}.{k}") for k, v in value.items()}
    return value


def manifest_from_dict(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Manifest:
    """Validate a parsed manifest; every error names the offending key."""
    env = os.environ if env is None else env
    allowed = {"name", "source", "output", "experts", "decode", "batch_size", "runner", "description"}
    _check_keys(data, allowed, {"name", "source", "output", "experts"}, "manifest")
    source_data = _expand_tree(
        dict(data["source"]) if isinstance(data["source"], Mapping) else data["source"], env, "source"
    )
    _check_keys(source_data, {f.name for f in fields(SourceConfig)}, {"format"}, "source")
    decode_data = data.get("decode") or {}
    _check_keys(decode_data, {f.name for f in fields(DecodeConfig)}, set(), "decode")
    check_type(data.get("runner"), dict[str, Any] | None, "runner")
    check_type(data.get("description"), str | None, "description")
    try:
        # No str() around values: a list given as ``output`` is an error, not a folder named "[1, 2]".
        return Manifest(
            name=data["name"],
            source=SourceConfig(**source_data),
            output=_expand_tree(data["output"], env, "output"),
            experts=parse_experts(data["experts"], "experts"),
            decode=DecodeConfig(**decode_data),
            batch_size=data.get("batch_size"),
            runner=dict(data.get("runner") or {}),
        )
    except TypeError as exc:
        raise ConfigError(f"manifest: {exc}") from exc


def check_output_root(url: str) -> None:
    """Refuse an output root that is an existing file, or lies under one, before anything is written.

    Only local paths are walked up: on an object store a "parent" is just a key prefix.
    """
    fs, path = fsspec.core.url_to_fs(url.rstrip("/") or url)
    if fs.isfile(path):
        raise ConfigError(f"output {url}: is a file, not a directory; choose another output path")
    if "file" not in fs.protocol:
        return
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output {url}: {parent} is a file, so no directory can be made under it")
            return


def find_manifest(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of one in ``manifests/``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"manifest file {path} does not exist")
        return path
    candidate = MANIFEST_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in MANIFEST_DIR.glob("*.yaml"))
        raise ConfigError(f"no manifest named {name_or_path!r}; known: {known} (or pass a .yaml path)")
    return candidate


def load_manifest(name_or_path: str, env: Mapping[str, str] | None = None) -> Manifest:
    path = find_manifest(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return manifest_from_dict(data, env)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
