"""Load a saved folder with `trust_remote_code=True` in a fresh interpreter that cannot see this repository."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

_PROLOGUE = """
import importlib.abc, os, sys
repo = {repo!r}
# The repository root leaves the path; folders inside it stay (a virtual environment in `repo/.venv` is common).
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != repo]

class _Blocked(importlib.abc.MetaPathFinder):
    # An editable install would still find the package: make sure the copied code is what runs.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_efficientvlm", "trainers"):
            raise ImportError(f"{{name}} must not be importable here")
        return None

sys.meta_path.insert(0, _Blocked())
"""

_SCRIPT = _PROLOGUE + textwrap.dedent(
    """
    import torch, transformers
    payload = torch.load({inputs!r}, weights_only=False)  # our own file: PIL images and tuples
    model = getattr(transformers, {auto_class!r}).from_pretrained({folder!r}, trust_remote_code=True)
    if hasattr(model, "eval"):
        model.eval()
    result = {{"class": type(model).__name__, "module": type(model).__module__}}
    with torch.no_grad():
        if payload["method"] == "forward":
            output = model(**payload["inputs"])
            for name in payload["outputs"]:
                result[name] = getattr(output, name)
        else:
            output = getattr(model, payload["method"])(**payload["inputs"])
            result["output"] = dict(output) if hasattr(output, "keys") else output
            for name in payload["outputs"]:
                result[name] = getattr(model, name)
                result[name] = {{"class": type(result[name]).__name__, "module": type(result[name]).__module__}}
        for name, (method, kwargs) in payload["calls"].items():
            output = getattr(model, method)(**kwargs)
            result[name] = dict(output) if hasattr(output, "keys") else output
    torch.save(result, {result!r})
    """
)


def load_in_clean_subprocess(
    folder: str | Path,
    auto_class: str,
    inputs: dict,
    outputs: list[str] | None = None,
    method: str = "forward",
    calls: dict[str, tuple[str, dict]] | None = None,
) -> dict:
    """Loads `folder` with `transformers.<auto_class>.from_pretrained(..., trust_remote_code=True)` in a new
    Python process whose `sys.path` excludes this repository and that cannot import its packages, calls
    `model(**inputs)` and returns the requested output fields, plus the loaded `class` name and its `module`
    (a `transformers_modules...` module for remote code). With another `method` (e.g. `generate`, or
    `__call__` for a processor) its result is returned as `output`, and `outputs` name attributes of the
    loaded object whose class and module are reported. `calls` maps result names to further
    `(method, kwargs)` calls on the same loaded model (one load, several checks).
    """
    folder = Path(folder).resolve()
    work = folder.parent / f"{folder.name}_remote_check"
    work.mkdir(exist_ok=True)
    payload = {"inputs": inputs, "outputs": outputs or [], "method": method, "calls": calls or {}}
    torch.save(payload, work / "inputs.pt")
    script = _SCRIPT.format(
        repo=str(REPO),
        inputs=str(work / "inputs.pt"),
        auto_class=auto_class,
        folder=str(folder),
        result=str(work / "result.pt"),
    )
    _run(script, work)
    return torch.load(work / "result.pt")


def _run(script: str, work: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(work / "modules")
    env["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    if completed.returncode != 0:
        raise AssertionError(f"remote-code load failed:\n{completed.stderr[-4000:]}")


def run_in_clean_subprocess(code: str, work: str | Path, payload: dict | None = None) -> dict:
    """Runs `code` in a new Python process that cannot import this repository (as `load_in_clean_subprocess`),
    with `work` as its working directory. `code` sees `payload` (loaded with `torch.load`) as `payload` and fills
    the dict `result`, which is returned (it must hold only what `torch.save` can store)."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.save(payload or {}, work / "payload.pt")
    script = (
        _PROLOGUE.format(repo=str(REPO))
        + "import torch\n"
        + f"payload = torch.load({str(work / 'payload.pt')!r}, weights_only=False)\n"
        + "result = {}\n"
        + textwrap.dedent(code)
        + f"\ntorch.save(result, {str(work / 'result.pt')!r})\n"
    )
    _run(script, work)
    return torch.load(work / "result.pt", weights_only=False)
