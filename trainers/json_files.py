"""Reading the JSON files users hand the commands (records, arguments files, recipes, answer lists), with errors that
name the file, what it was given as and what it should hold."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json_file(path: str | os.PathLike, what: str, holds: str, folder_hint: str = "") -> Any:
    """The JSON value in the file at `path` (UTF-8, a byte-order mark allowed). Errors start with `what` (e.g.
    "--answer_list answers.json") and say what the file `holds` ("a JSON list of candidate answers"); `folder_hint`
    is added when `path` is a folder (where such a folder may belong instead)."""
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"{what} is a folder: give the file ({holds}){folder_hint}.")
    if not file.is_file():
        raise FileNotFoundError(f"{what}: no such file ({holds}) here ({os.getcwd()}).")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} is not UTF-8 text: {error}") from error
    if not text.strip():
        raise ValueError(f"{what} is empty: expected {holds}.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        hint = f" (a JSON Lines file? The file must hold one JSON value: {holds})" if error.msg == "Extra data" else ""
        raise ValueError(
            f"{what} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}{hint}."
        ) from error


__all__ = ["read_json_file"]
