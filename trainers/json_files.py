"""Reading the small JSON files users hand the commands (arguments files, recipes, answer lists), with errors that
name the file and what it was given as."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json_file(path: str | os.PathLike, what: str, holds: str) -> Any:
    """The JSON value in the file at `path` (UTF-8, a byte-order mark allowed). Errors start with `what` (e.g.
    "--answer_list answers.json") and say what the file `holds` ("a JSON list of candidate answers")."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what}: no such file ({holds}).")
    try:
        return json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON: {error}") from error


__all__ = ["read_json_file"]
