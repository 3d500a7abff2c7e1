"""Checks on what `from_pretrained` loaded, so that a checkpoint which does not fit its config fails loudly.

Transformers re-initialises a parameter missing from the checkpoint and only logs a load report, and a shape
mismatch raises a RuntimeError pointing at that report. For EfficientVLM, whose per-layer head counts and FFN
widths live in `config.json`, both usually mean a pruned checkpoint paired with an unpruned config (or the
reverse) or a damaged checkpoint: [`check_loaded_weights`] turns them into a [`CheckpointMismatchError`] naming
the parameters, their shapes and the folder. An unreadable weights file becomes a [`CorruptCheckpointError`]
naming the file.

What may legitimately be missing is left alone: tied weights and non-persistent buffers (transformers never
reports them), and the task heads of a model loaded from another task's checkpoint (a VQA model from a
pre-training checkpoint gets a fresh answer decoder). The backbone (`model.efficientvlm`, or the whole model
for the encoders themselves) must always be complete, and a checkpoint saved by the same class must fit fully.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

# At most this many parameter names per kind of problem in an error message.
_SHOWN = 8

# What `efficientvlm prune` saves beside the unpruned weights of each checkpoint while it learns its masks, and
# beside its pruned model once it is done. Named here, as this file ships as remote code; `trainers` imports them.
MASK_STATE_FILE = "masker.pt"
PRUNING_REPORT_FILE = "pruning_report.json"


class CheckpointMismatchError(ValueError):
    """The weights of a checkpoint do not fit the model its config describes (shapes or keys)."""


class CorruptCheckpointError(OSError):
    """A weights file of a checkpoint cannot be read (truncated, or not the format its name says)."""


def _backbone_scope(model: nn.Module) -> tuple[tuple[str, ...], frozenset[str]]:
    """(prefixes, exact names) of the state-dict keys that belong to the backbone: the `base_model_prefix`
    submodule of a task model, or every submodule and direct parameter / buffer of a model that is its own
    backbone (the key of a head of another task's checkpoint then matches neither)."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if isinstance(backbone, nn.Module) and backbone is not model:
        return (f"{prefix}.",), frozenset()
    prefixes = tuple(f"{name}." for name, _ in model.named_children())
    names = frozenset(name for name, _ in model.named_parameters(recurse=False))
    return prefixes, names | frozenset(name for name, _ in model.named_buffers(recurse=False))


def _listed(items: list[str], separator: str = ", ") -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return separator.join(items[:_SHOWN]) + more


def check_loaded_weights(
    model: nn.Module,
    loading_info: dict[str, Any],
    location: str | os.PathLike | None,
    ignore_mismatched_sizes: bool = False,
    config_given: bool = False,
) -> None:
    """Raises a [`CheckpointMismatchError`] when `loading_info` (the `output_loading_info` dict of
    `from_pretrained`) shows that the checkpoint at `location` does not fit the model built from its config:
    a parameter of another shape (unless `ignore_mismatched_sizes`), a backbone parameter missing from the
    checkpoint or a checkpoint parameter the backbone has no place for, or, for a checkpoint saved by the same
    class (`config.architectures`), any missing or unexpected parameter."""
    prefixes, names = _backbone_scope(model)
    same_class = type(model).__name__ in (getattr(model.config, "architectures", None) or [])

    def strict(key: str) -> bool:
        return same_class or key in names or key.startswith(prefixes)

    problems = []
    mismatched = sorted(loading_info.get("mismatched_keys") or ())
    if mismatched and not ignore_mismatched_sizes:
        shapes = [f"{key}: {tuple(found)} in the checkpoint, {tuple(want)} expected" for key, found, want in mismatched]
        problems.append(f"{len(mismatched)} parameter(s) of another shape: {_listed(shapes, '; ')}")
    missing = sorted(key for key in loading_info.get("missing_keys") or () if strict(key))
    if missing:
        problems.append(f"{len(missing)} parameter(s) missing from the checkpoint: {_listed(missing)}")
    unexpected = sorted(key for key in loading_info.get("unexpected_keys") or () if strict(key))
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint parameter(s) the model has no place for: {_listed(unexpected)}")
    if not problems:
        return
    where = f"the weights in {location}" if location is not None else "the given state dict"
    config = "the `config` given" if config_given or location is None else f"{Path(location) / 'config.json'}"
    raise CheckpointMismatchError(
        f"{type(model).__name__}: {where} do not fit the model described by {config}.\n- "
        + "\n- ".join(problems)
        + "\nA pruned checkpoint loads only with the config.json saved with it (its per-layer head counts and FFN "
        "widths); an unpruned one only with an unpruned config. Pass `ignore_mismatched_sizes=True` to re-initialise "
        "parameters of another shape on purpose."
    )


def mask_learning_checkpoint_message(location: str | os.PathLike | None, subfolder: str = "") -> str | None:
    """For a local folder that holds a pruning run's `masker.pt` and no `pruning_report.json` (a checkpoint of
    `efficientvlm prune` taken while it learned its masks), what it is and what to do instead of loading it as a
    model; None for any other folder or Hub id. Its weights are the unpruned student's: nothing applies the learned
    masks when they load."""
    if location is None:
        return None
    folder = Path(location) / subfolder
    # A pruned model (saved with its report) is what it says, whatever masks an earlier save left beside it.
    if not (folder / MASK_STATE_FILE).is_file() or (folder / PRUNING_REPORT_FILE).is_file():
        return None
    message = (
        f"{folder} is a checkpoint of `efficientvlm prune` taken while it learned its masks: its weights are the "
        f"unpruned student's and its learned masks are in {MASK_STATE_FILE}, which loading does not apply, so it "
        "loads as the unpruned model. To get the pruned model, finish the run: `efficientvlm prune` with the flags "
        f"it started with and `--resume_from_checkpoint {folder}` saves the pruned model to its --output_dir."
    )
    if (folder.parent / PRUNING_REPORT_FILE).is_file():  # the run finished: its pruned model is right there
        message += f" The run has finished already: its pruned model is {folder.parent}."
    return message


def read_torch_weights(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU, with errors that name the file: a missing file, and a
    [`CorruptCheckpointError`] for one torch cannot read (truncated, not a `torch.save` file, or holding objects
    other than tensors and plain containers: weights-only loading runs no code from the file)."""
    import pickle

    import torch

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give the checkpoint file in it (e.g. a .pth / .bin file).")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CorruptCheckpointError(
            f"Cannot read {path} as a checkpoint of tensors ({_first_line(error)}). It is damaged, not a torch.save "
            "file, or holds objects other than tensors and plain containers: it is read with weights_only=True, "
            "which runs no code from the file. If you trust the file, torch.load it with weights_only=False and "
            "give its state dict instead."
        ) from error
    except PermissionError:
        raise
    except Exception as error:  # torch's reader on other bytes: RuntimeError, EOFError, OSError, KeyError, IndexError
        raise CorruptCheckpointError(
            f"Cannot read {path} ({type(error).__name__}: {_first_line(error)}). The file is truncated or not a "
            "torch.save file; copy or download it again."
        ) from error


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def unreadable_weight_files(location: str | os.PathLike, subfolder: str = "") -> list[tuple[str, str]]:
    """(path, error) of every weights file (`*.safetensors`, `pytorch_model*.bin`) in the local folder `location`
    (/ `subfolder`) that cannot be read; [] for a folder that does not exist (a Hub id)."""
    from safetensors import safe_open

    folder = Path(location) / subfolder
    if not folder.is_dir():
        return []
    unreadable = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # any failure to read is what we report
            unreadable.append((str(path), str(error)))
    # Not `training_args.bin` & co. of an output folder.
    return unreadable + unreadable_torch_files(sorted(folder.glob("pytorch_model*.bin")))


def unreadable_torch_files(paths: Iterable[Path], weights_only: bool = True) -> list[tuple[str, str]]:
    """(path, first line of the error) of every `torch.save` file of `paths` that `torch.load` cannot read; a
    zip-format file is memory-mapped, so its tensors are not read into memory. `weights_only=False` for files that
    hold more than tensors (the Trainer's RNG state)."""
    import torch

    unreadable = []
    for path in paths:
        try:
            torch.load(path, map_location="cpu", weights_only=weights_only, mmap=zipfile.is_zipfile(path))
        except Exception as error:  # any failure to read is what we report
            unreadable.append((str(path), _first_line(error)))
    return unreadable


def corrupt_checkpoint_error(
    error: Exception, location: str | os.PathLike | None, subfolder: str = ""
) -> CorruptCheckpointError:
    """The error to raise for `error`, which reading the weights of `location` raised: it names the file(s)."""
    files = unreadable_weight_files(location, subfolder) if location is not None else []
    if files:
        named = "; ".join(f"{path} ({message})" for path, message in files)
    else:
        named = f"a weights file of {location} ({error})"
    return CorruptCheckpointError(
        f"Cannot read the weights: {named}. The file is truncated or damaged; copy or download it again, or save "
        "the model again."
    )


class OrdinaryFileModes:
    """Gives the weights files a save writes the mode any other file of the folder gets. safetensors >= 0.8 writes
    through a temporary file created 0600, whatever the umask (safetensors issue #782): a folder saved for a
    serving container or a shared directory had weights that no other user could read. A file the save replaced
    keeps its former mode; a new one gets `0o666 & ~umask`. POSIX only (elsewhere nothing is changed)."""

    def __init__(self, folder: str | os.PathLike, pattern: str = "*.safetensors") -> None:
        self.folder, self.pattern = Path(folder), pattern

    def __enter__(self) -> OrdinaryFileModes:
        self.before = {path.name: path.stat().st_mode & 0o777 for path in self.folder.glob(self.pattern)}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if os.name != "posix" or exc_info[0] is not None:
            return
        umask = os.umask(0o022)  # read it (the only way), then put it back
        os.umask(umask)
        for path in self.folder.glob(self.pattern):
            os.chmod(path, self.before.get(path.name, 0o666 & ~umask))


__all__ = [
    "CheckpointMismatchError",
    "MASK_STATE_FILE",
    "PRUNING_REPORT_FILE",
    "CorruptCheckpointError",
    "OrdinaryFileModes",
    "check_loaded_weights",
    "corrupt_checkpoint_error",
    "mask_learning_checkpoint_message",
    "read_torch_weights",
    "unreadable_torch_files",
    "unreadable_weight_files",
]
