"""Named recipes: the settings of a training command kept in a JSON file shipped with the package.

`efficientvlm finetune --recipe paper-vqa ...` fills the options the recipe names (flags given on the command line
win); `efficientvlm recipes` lists them. A recipe is a JSON object:

    {"description": "one line",
     "source": {"<option(s)>": "where the numbers come from"}, "notes": ["..."],
     "shared": {<option>: value, ...},              # for every command below
     "commands": {"<command>": {<option>: value}}}  # the commands it is for, with their own options

Options are the commands' flag names (`learning_rate`, `target_sparsity`, ...); JSON options (`kd_term_weights`,
`config_overrides`) may be given as objects. Which option names a command takes is checked where the command's
parser is (`trainers.commands.common`); this module reads and checks the file's shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.json_files import read_json_file

RECIPE_DIR = Path(__file__).parent
# The commands a recipe can fill.
RECIPE_COMMANDS = ("pretrain", "finetune", "distill", "prune")
_KEYS = {"description": str, "source": (dict, str), "notes": (list, str), "shared": dict, "commands": dict}


@dataclass(frozen=True)
class Recipe:
    """One recipe file: `shared` options for every command in `commands`, plus each command's own."""

    name: str
    path: Path
    description: str
    shared: dict[str, Any]
    commands: dict[str, dict[str, Any]]

    def arguments(self, command: str) -> dict[str, Any]:
        """The options the recipe gives `command` (a `ValueError` naming the file when it is not for it)."""
        if command not in self.commands:
            raise ValueError(
                f"Recipe {self.name!r} ({self.path}) is for `efficientvlm {'/'.join(self.commands)}`, not "
                f"`efficientvlm {command}`."
            )
        return {**self.shared, **self.commands[command]}


def recipe_names() -> list[str]:
    """The names of the recipes shipped with the package."""
    return sorted(path.stem for path in RECIPE_DIR.glob("*.json"))


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """The shipped recipe `name_or_path`, or the recipe in that JSON file; errors name the file and the key."""
    path = Path(name_or_path)
    if not (str(name_or_path).endswith(".json") or path.is_file()):
        if str(name_or_path) not in recipe_names():
            raise ValueError(
                f"Unknown recipe {str(name_or_path)!r}: choose one of {recipe_names()} (in {RECIPE_DIR}) or give "
                "the path of a recipe JSON file."
            )
        path = RECIPE_DIR / f"{name_or_path}.json"
    data = read_json_file(path, f"Recipe file {path}", "a recipe: a JSON object of commands' options")
    if not isinstance(data, dict):
        raise ValueError(f"Recipe file {path} must hold a JSON object; got {type(data).__name__}.")
    for key, value in data.items():
        if key not in _KEYS:
            raise ValueError(f"Recipe file {path}: unknown key {key!r} (a recipe has {sorted(_KEYS)}).")
        if not isinstance(value, _KEYS[key]):
            raise ValueError(f"Recipe file {path}: {key!r} must be a JSON {_json_kind(_KEYS[key])}.")
    commands = data.get("commands") or {}
    if not commands:
        raise ValueError(f"Recipe file {path}: 'commands' must name at least one of {list(RECIPE_COMMANDS)}.")
    for command, options in commands.items():
        if command not in RECIPE_COMMANDS:
            raise ValueError(f"Recipe file {path}: unknown command {command!r} (one of {list(RECIPE_COMMANDS)}).")
        if not isinstance(options, dict):
            raise ValueError(f"Recipe file {path}: commands.{command} must be a JSON object of options.")
    return Recipe(
        name=path.stem,
        path=path,
        description=data.get("description", ""),
        shared=dict(data.get("shared") or {}),
        commands={command: dict(options) for command, options in commands.items()},
    )


def describe_recipes() -> str:
    """One line per shipped recipe: its name, the commands it fills and its description."""
    lines = ["Recipes (--recipe NAME on the commands listed, or --recipe path/to/recipe.json):", ""]
    for name in recipe_names():
        recipe = load_recipe(name)
        lines.append(f"  {name:<16} [{', '.join(recipe.commands)}] {recipe.description}")
    return "\n".join(lines)


def _json_kind(kinds: type | tuple[type, ...]) -> str:
    names = {dict: "object", list: "list", str: "string"}
    return " or ".join(names[kind] for kind in (kinds if isinstance(kinds, tuple) else (kinds,)))


__all__ = ["RECIPE_COMMANDS", "RECIPE_DIR", "Recipe", "describe_recipes", "load_recipe", "recipe_names"]
