"""An expert named in a manifest, before it is resolved to a class: ``task[:backend]``, options, plugin."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from label_pipeline.core.errors import ConfigError
from label_pipeline.core.validation import check_type, did_you_mean, short_repr


@dataclass
class ExpertRequest:
    """An expert named in a manifest: ``task`` or ``task:backend`` plus backend options.

    ``where`` is the entry's key path (``experts[0]``), so errors found later (an unknown option,
    once the backend is resolved) still point at the line to fix.
    """

    task: str
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    where: str = field(default="", compare=False, repr=False)
    target: str | None = None  # a plugin's class as ``module:Class`` (manifest key ``class``)

    @property
    def options_where(self) -> str:
        """The key path of this entry's options, e.g. ``experts[0].options``."""
        name = self.task if self.backend is None else f"{self.task}:{self.backend}"
        return f"{self.where or name}.options"

    @classmethod
    def parse(cls, item: str | Mapping[str, Any], where: str = "") -> ExpertRequest:
        """A manifest entry: ``"task[:backend]"`` or ``{name: "task[:backend]", options: {...}}``."""
        here = where or "expert entry"
        if isinstance(item, str):
            task, _, backend = item.partition(":")
            if not task.strip() or (":" in item and not backend.strip()):
                raise ConfigError(f"{here}: expected 'task' or 'task:backend', got {item!r}")
            return cls(task=task.strip(), backend=backend.strip() or None, where=where)
        if not isinstance(item, Mapping) or "name" not in item:
            raise ConfigError(
                f"{here}: an expert entry must be 'task[:backend]' or a mapping with 'name', "
                f"got {short_repr(item)}"
            )
        unknown = sorted(set(item) - {"name", "options", "class"})
        if unknown:
            hint = did_you_mean(unknown[0], ["name", "options", "class"])
            raise ConfigError(f"{here}: unknown key(s) {unknown} in expert entry{hint}")
        check_type(item["name"], str, f"{here}.name")
        request = cls.parse(item["name"], where)
        options = item.get("options")
        check_type(options, dict[str, Any] | None, f"{here}.options")
        bad_keys = [k for k in options or {} if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"{here}.options: option names must be strings, got {bad_keys[0]!r}")
        request.options = dict(options or {})
        if "class" in item:
            request.target = _plugin_target(item["class"], request, f"{here}.class")
        return request


def _plugin_target(value: Any, request: ExpertRequest, where: str) -> str:
    """Check a plugin entry: ``class: "module.path:ClassName"`` with a ``task:backend`` name."""
    check_type(value, str, where)
    module, _, name = value.partition(":")
    if not module or not name or not all(part.isidentifier() for part in [*module.split("."), name]):
        raise ConfigError(f"{where}: expected 'module.path:ClassName', got {value!r}")
    if request.backend is None:
        raise ConfigError(f"{where}: a plugin needs a full 'task:backend' name, got {request.task!r}")
    return value
