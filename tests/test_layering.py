"""The package layering of docs/ARCHITECTURE.md, checked on every import statement (function-local
imports included): the ground floor ``label_pipeline.core`` imports nothing above it; the expert zoo
and the trainer build on the ground floor only; nothing imports the trainer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("label_pipeline", "expert_zoo", "prismer_trainer")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
    return found


def layer_of(module: str) -> str | None:
    if module == "label_pipeline.core" or module.startswith("label_pipeline.core."):
        return "core"
    top = module.split(".")[0]
    return top if top in PACKAGES else None


# Which layers each layer may import (besides itself and third-party code).
ALLOWED = {
    "core": {"core"},
    "expert_zoo": {"core", "expert_zoo"},
    "prismer_trainer": {"core", "prismer_trainer"},
    "label_pipeline": {"core", "expert_zoo", "label_pipeline"},
}


def violations() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            layer = layer_of(module)
            for line, imported in imported_modules(path):
                target = layer_of(imported)
                if target is not None and target not in ALLOWED[layer]:
                    found.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {imported} ({target})")
    return found


def test_no_package_imports_against_the_layering():
    assert violations() == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from label_pipeline.config import Manifest\n", "(core) imports label_pipeline.config"),
        ("def f():\n    from expert_zoo.registry import available\n", "(core) imports expert_zoo.registry"),
        ("from .. import config\n", "(core) imports label_pipeline"),
    ],
)
def test_the_check_sees_upward_imports(tmp_path, monkeypatch, source, expected):
    """The checker itself: an upward import planted in the ground floor is reported."""
    planted = ROOT / "label_pipeline" / "core" / "_planted_for_test.py"
    planted.write_text(source)
    try:
        assert any(expected in v for v in violations()), violations()
    finally:
        planted.unlink()
