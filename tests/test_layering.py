"""The architecture's one-way flow: commands -> stages -> task registry -> data / evaluation -> model.

Every import in `trainers/` (module level or inside a function) is checked against the layer of the module it
imports, so an arrow pointing back up fails here instead of growing into an import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Higher layers may import lower (or equal) ones, never higher ones.
LAYERS = {
    "trainers.commands": 4,
    "trainers.demo": 4,
    "trainers.training": 3,
    "trainers.distillation": 3,
    "trainers.pruning": 3,
    "trainers.benchmark": 3,
    "trainers.model_card": 3,
    "trainers.saving": 3,
    "trainers.app": 3,
    "trainers.sharding": 3,
    "trainers.deployment": 3,
    "trainers.tasks": 2,
    "trainers.recipes": 2,
    "trainers.data": 1,
    "trainers.evaluation": 1,
    "modeling_efficientvlm": 0,
}


def _layer(module: str) -> int | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(source: str, module: str, is_package: bool = False) -> list[str]:
    """Absolute names of every module (or module attribute) that `source`, the code of `module`, imports."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            origin = ".".join([*base, *([node.module] if node.module else [])])
            # `from trainers import commands` imports the submodule `trainers.commands`.
            names += [origin, *(f"{origin}.{alias.name}" for alias in node.names)]
    return names


def _imports_of(path: Path) -> list[str]:
    return _imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py")


def _violations(module: str, imported: list[str]) -> list[str]:
    own = _layer(module)
    return [
        f"{module} (layer {own}) imports {name} (layer {_layer(name)})"
        for name in imported
        if own is not None and _layer(name) is not None and _layer(name) > own
    ]


def test_imports_point_one_way() -> None:
    violations = []
    for path in sorted((ROOT / "trainers").rglob("*.py")):
        violations += _violations(_module_name(path), _imports_of(path))
    assert violations == []


def test_the_model_package_imports_nothing_from_trainers() -> None:
    offenders = [
        f"{path.name} imports {name}"
        for path in sorted((ROOT / "modeling_efficientvlm").glob("*.py"))
        for name in _imports_of(path)
        if name.split(".")[0] == "trainers"
    ]
    assert offenders == []


def test_the_check_catches_upward_imports() -> None:
    """The checker itself: function-level, relative and `from package import module` imports are all seen."""
    source = (
        "def f():\n    from ..pruning import trainer\n    from trainers import commands\n    import trainers.tasks\n"
    )
    found = _violations("trainers.evaluation.retrieval", _imported_modules(source, "trainers.evaluation.retrieval"))
    assert len(found) >= 3
    assert any("trainers.pruning.trainer" in v for v in found) and any("trainers.commands" in v for v in found)
    assert _violations("trainers.commands.prune", _imported_modules(source, "trainers.commands.prune")) == []
