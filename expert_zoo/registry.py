"""Registry: ``task:backend`` → expert class, resolved lazily so unused backends import nothing."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

from expert_zoo.base import Expert, ExpertOptions
from label_pipeline.core.errors import ConfigError, ExpertUnavailable
from label_pipeline.core.expert_request import ExpertRequest
from label_pipeline.core.weights import WeightSource

logger = logging.getLogger(__name__)
PLUGIN_GROUP = "label_pipeline.experts"  # entry points: name "task:backend", value "module:Class"

# "task:backend" -> "module:Class". The first backend listed for a task is its default.
_REGISTRY: dict[str, str] = {
    "depth:dpt_hybrid": "expert_zoo.depth:DPTHybridDepth",
    "normal:nll_angmf": "expert_zoo.normal:NLLAngMFNormal",
    "edge:dexined": "expert_zoo.edge:DexiNedEdge",
    "edge:canny": "expert_zoo.canny:CannyEdge",
    "seg_coco:mask2former": "expert_zoo.segmentation:Mask2FormerCOCO",
    "obj_detection:owlv2": "expert_zoo.detection:OWLv2Detection",
    "ocr_detection:charnet": "expert_zoo.ocr:CharNetOCR",
    "ocr_detection:ppocr": "expert_zoo.ppocr:PPOCRDetection",
    "ocr_features:clip_pca": "expert_zoo.text_features:ClipPcaWordFeatures",
}
_DEFAULTS: dict[str, str] = {}
_BUILTIN = frozenset(_REGISTRY)
_plugins_loaded = False


def register(name: str, target: str, default: bool = False) -> None:
    """Add ``task:backend`` → ``module:Class``; ``default`` makes it the task's default backend."""
    task, _, backend = name.partition(":")
    if not task or not backend or ":" not in target:
        raise ValueError(f"register('task:backend', 'module:Class'), got {name!r}, {target!r}")
    _REGISTRY[name] = target
    if default or task not in _DEFAULTS:
        _DEFAULTS[task] = name


for _name in list(_REGISTRY):
    _DEFAULTS.setdefault(_name.partition(":")[0], _name)


def load_plugins() -> None:
    """Register the experts that installed packages declare in the ``label_pipeline.experts``
    entry-point group (once per process; a built-in name cannot be taken over)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        if entry.name in _BUILTIN:
            logger.warning("ignoring plugin %s = %s: that name is built in", entry.name, entry.value)
            continue
        try:
            register(entry.name, entry.value)
        except ValueError as exc:
            logger.warning("ignoring plugin entry point %s = %s: %s", entry.name, entry.value, exc)


def builtin_names() -> frozenset[str]:
    """The ``task:backend`` names this package ships (plugins and test registrations excluded)."""
    return _BUILTIN


def available() -> list[str]:
    """Every registered ``task:backend`` name, plugins included."""
    load_plugins()
    return sorted(_REGISTRY)


def resolve_name(request: ExpertRequest) -> str:
    """Turn ``task`` or ``task:backend`` into a registered full name, or raise with the choices.

    A request with a ``class`` (a plugin named in the manifest) registers it under its name here."""
    load_plugins()
    if request.target is not None:
        return _register_manifest_plugin(request)
    if request.backend is None:
        if request.task not in _DEFAULTS:
            raise ExpertUnavailable(f"unknown expert task {request.task!r}; known tasks: {sorted(_DEFAULTS)}")
        return _DEFAULTS[request.task]
    name = f"{request.task}:{request.backend}"
    if name not in _REGISTRY:
        choices = [n for n in _REGISTRY if n.startswith(request.task + ":")]
        raise ExpertUnavailable(
            f"unknown expert {name!r}; backends for {request.task!r}: {choices or 'none'}"
        )
    return name


def _register_manifest_plugin(request: ExpertRequest) -> str:
    name = f"{request.task}:{request.backend}"
    known = _REGISTRY.get(name)
    if known is not None and known != request.target:
        raise ConfigError(
            f"{request.where or name}.class: {name!r} is already registered as {known}; "
            "give the plugin another backend name"
        )
    _REGISTRY[name] = str(request.target)
    return name


def expert_class(name: str) -> type[Expert]:
    """Import and return the class registered under ``task:backend``; it must be an ``Expert``
    whose spec is for that task and backend."""
    cls = _import_class(name)
    if not (isinstance(cls, type) and issubclass(cls, Expert)) or not hasattr(cls, "spec"):
        raise ExpertUnavailable(
            f"expert {name!r}: {_REGISTRY[name]} is not a subclass of expert_zoo.base.Expert with a spec"
        )
    if cls.spec.name != name:
        raise ExpertUnavailable(
            f"expert {name!r}: {_REGISTRY[name]} declares spec {cls.spec.name!r}; the name and the "
            "spec's task:backend must agree (the task names the output member)"
        )
    return cls


def _import_class(name: str) -> Any:
    module_name, _, class_name = _REGISTRY[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if name not in _BUILTIN:
            raise ExpertUnavailable(
                f"expert {name!r}: cannot import {module_name} ({exc}); install the plugin's package "
                "or put it on PYTHONPATH (on every Ray node too)"
            ) from exc
        raise _missing_dependency(name, exc) from exc
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ExpertUnavailable(f"expert {name!r}: module {module_name} has no {class_name!r}") from None


def _missing_dependency(name: str, exc: ImportError) -> ExpertUnavailable:
    """The error for a built-in expert whose module cannot be imported."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if missing and missing.split(".")[0] in ("expert_zoo", "label_pipeline"):
        return ExpertUnavailable(f"expert {name!r} is registered but its module is missing: {exc}")
    what = (
        f"the package {missing!r}, which is not installed"
        if missing
        else f"a package that is not installed ({exc})"
    )
    return ExpertUnavailable(
        f"expert {name!r} needs {what}; install the project with its extras: pip install -e '.[experts]'"
    )


@dataclass(frozen=True)
class ResolvedExpert:
    """A manifest entry checked against its backend, before anything is loaded."""

    task: str
    name: str  # task:backend
    cls: type[Expert]
    options: dict[str, Any]  # as given (what the fingerprint and ``_run.json`` hold)
    settings: ExpertOptions  # the same, typed, with defaults filled in

    def build(self, device: str = "cpu") -> Expert:
        """Construct (and so load) the expert."""
        return self.cls(self.options, device=device)

    def weight_sources(self) -> list[WeightSource]:
        """The files and model directories this entry will load (see :func:`weight_sources`)."""
        return weight_sources(self.cls, self.options)


def weight_sources(cls: type[Expert], options: Mapping[str, Any] | None = None) -> list[WeightSource]:
    """What ``cls`` loads with ``options`` as given (an option not given takes its default): one source
    per ``WEIGHT_FIELDS`` entry of its ``Options`` that names one; empty for an expert without weights.

    Read from the options alone, nothing is constructed, so an expert with a required option (no
    default) still lists its other sources.
    """
    given = dict(options or {})
    defaults = {f.name: f.default for f in fields(cls.Options) if f.default is not MISSING}
    sources = []
    for source_key, sha_key in getattr(cls.Options, "WEIGHT_FIELDS", ()):
        source = given.get(source_key, defaults.get(source_key))
        if source:
            sha256 = given.get(sha_key, defaults.get(sha_key))
            default = source == defaults.get(source_key)
            sources.append(WeightSource(cls.spec.name, str(source), sha256, default=default))
    return sources


def resolve_expert(request: ExpertRequest) -> ResolvedExpert:
    """The backend ``request`` names, its class imported and its options checked; no weights are read.

    Raises :class:`ExpertUnavailable` (unknown name, missing package) or :class:`ConfigError` (unknown or
    ill-typed option, with the option's key path and a did-you-mean).
    """
    name = resolve_name(request)
    cls = expert_class(name)
    settings = cls.check_options(request.options, request.options_where)
    return ResolvedExpert(request.task, name, cls, dict(request.options), settings)


def resolve_experts(requests: Sequence[ExpertRequest]) -> dict[str, ResolvedExpert]:
    """Every entry resolved and checked, task → expert, so a typo in the last one is reported before
    the first one's model is loaded."""
    return {request.task: resolve_expert(request) for request in requests}


def build_expert(
    request: ExpertRequest | str, device: str = "cpu", options: Mapping[str, Any] | None = None
) -> Expert:
    """Construct (and so load) the expert a manifest entry names; ``options`` override the entry's."""
    if isinstance(request, str):
        request = ExpertRequest.parse(request)
    if options:
        request = replace(request, options={**request.options, **options})
    return resolve_expert(request).build(device)
