"""The package's folders form layers (see gfa_peft/__init__.py): no module imports from a layer below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gfa_peft"

LAYERS = [
    {"layout", "scatter", "weight_ops", "internals", "registration", "defaults", "__version__"},
    {"targets", "tuner", "introspect"},
    {"io"},
    {"data"},
    {"adapters"},
    {"analysis"},
    {"training"},
    {"bench"},
    {"cli"},
]
"""Top to bottom: a module may import from its own layer and the layers above it (`__version__`, the package's
own attribute, is at the top)."""


def layer_of(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else ""
    for index, members in enumerate(LAYERS):
        if part in members:
            return index
    raise AssertionError(f"gfa_peft.{part} belongs to no layer: add it to LAYERS and to gfa_peft/__init__.py")


def imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gfa_peft"):
            names += [f"{node.module}.{alias.name}" if node.module == "gfa_peft" else node.module
                      for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.startswith("gfa_peft.")]
    return names


MODULES = sorted(path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py" or path.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=[str(path.relative_to(PACKAGE)) for path in MODULES])
def test_no_module_imports_from_a_lower_layer(path):
    own = layer_of("gfa_peft." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    for name in imports_of(path):
        assert layer_of(name) <= own, f"{path.relative_to(PACKAGE)} imports {name}, from a lower layer"
