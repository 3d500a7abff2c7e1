"""Saving a model folder, and pushing it: the one path every stage writes through.

[`save_model_folder`] writes a complete, hub-ready folder: the weights (safetensors), the config with its
`auto_map`, the modeling code, the processor, and a model card (`README.md`). Before saving it makes the
special-token ids of the config and generation config those of the tokenizer saved with the model, and the
tokenizer's `model_max_length` the model's text limit. [`push_model_folder`] uploads exactly the files of
such a folder ([`model_folder_files`]): never `runs/`, `checkpoint-*`, `training_args.bin` or trainer state.

`finetune`, `pretrain`, `distill`, `prune`, `ModalAdaptivePruningTrainer.prune_and_save` and the demo all save
with it:

    save_model_folder(model, processor, "pruned_vqa", card=ModelCardInfo(task="vqa", stage="prune", ...),
                      pruning_report=report, push=HubTarget("you/pruned-vqa"))
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.utils import logging

from modeling_efficientvlm.loading_efficientvlm import PRUNING_REPORT_FILE
from trainers.model_card import ModelCardInfo, write_model_card

logger = logging.get_logger(__name__)

EVAL_RESULTS_FILE = "eval_results.json"
# A processor's own file (`ProcessorMixin` writes the first; an image processor saved alone, the second): a model
# folder without either holds no processor.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")

# The top-level files a saved model folder consists of. Anything else in an output folder (TensorBoard `runs/`,
# `checkpoint-*`, `training_args.bin`, `trainer_state.json`, `*_results.json` of the Trainer, logs, masks) is
# not part of the model and is never uploaded.
MODEL_FOLDER_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "*.py",
    *PROCESSOR_FILES,
    "image_processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "chat_template.json",
    "chat_template.jinja",
    "README.md",
    PRUNING_REPORT_FILE,
    EVAL_RESULTS_FILE,
)


@dataclass
class HubTarget:
    """Where [`save_model_folder`] pushes a folder: a Hub repo id (a bare name goes to the token's user) and
    the options of `HfApi.create_repo` / `upload_folder`."""

    repo_id: str
    token: str | None = None
    private: bool | None = None
    revision: str | None = None
    commit_message: str | None = None


def hub_target_from(training_args: Any, output_dir: str | os.PathLike | None = None) -> HubTarget | None:
    """The [`HubTarget`] that `--push_to_hub` / `--hub_model_id` (and `--hub_token`, `--hub_private_repo`,
    `--hub_revision`) of `training_args` describe, or None without `--push_to_hub`.

    Switches the Trainer's own push off (`training_args.push_to_hub = False`): it would upload the whole output
    folder (`runs/`, checkpoints, `training_args.bin`); the model folder is pushed by [`save_model_folder`].
    Call it before building the Trainer. The repo defaults to the output folder's name, as the Trainer's.
    """
    if not getattr(training_args, "push_to_hub", False):
        return None
    training_args.push_to_hub = False
    output_dir = output_dir if output_dir is not None else training_args.output_dir
    return HubTarget(
        repo_id=training_args.hub_model_id or Path(output_dir).absolute().name,
        token=training_args.hub_token,
        private=training_args.hub_private_repo,
        revision=getattr(training_args, "hub_revision", None),
    )


# -- special tokens -------------------------------------------------------------------------------------------
def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """The `bos` / `eos` / `pad` / `sep` ids a model saved with `tokenizer` must use. BERT vocabularies have no
    [BOS] / [EOS]: X-VLM decodes from [CLS] and stops at [SEP]."""

    def first(*names: str) -> int | None:
        for name in names:
            value = getattr(tokenizer, f"{name}_token_id", None)
            if value is not None:
                return int(value)
        return None

    return {
        "bos_token_id": first("bos", "cls"),
        "eos_token_id": first("eos", "sep"),
        "pad_token_id": first("pad"),
        "sep_token_id": first("sep", "eos"),
    }


def text_limit(config: Any, processor_length: int | None = None) -> int:
    """The longest text, in tokens, the model takes: `max_text_length`, or the processor's own `max_length`
    (`processor_length`) where that is longer (the texts it trained on were), never above the position table."""
    text_config = getattr(config, "text_config", config)
    positions = getattr(text_config, "max_position_embeddings", None)
    limit = getattr(config, "max_text_length", None) or positions
    if processor_length and (limit is None or processor_length > limit):
        limit = processor_length
    return min(limit, positions) if positions and limit else limit


def sync_special_tokens(model: Any, tokenizer: Any) -> dict[str, int | None]:
    """Sets the special-token ids of `model`'s config, text config and generation config to those of
    `tokenizer` (only where a config holds that field), and returns them."""
    ids = special_token_ids(tokenizer)
    configs = [model.config]
    if getattr(model.config, "text_config", None) is not None:
        configs.append(model.config.text_config)
    generation_config = getattr(model, "generation_config", None)
    for name, value in ids.items():
        if value is None:
            continue
        for config in configs:
            if name in config.to_dict() and getattr(config, name, None) != value:
                setattr(config, name, value)
        if generation_config is not None and (name != "sep_token_id" or hasattr(generation_config, name)):
            setattr(generation_config, name, value)
    return ids


def processor_for_saving(processor: Any, config: Any) -> Any:
    """A copy of `processor` whose tokenizer's `model_max_length` is the model's text limit (not 1e30): a
    processor that cuts texts longer than the model's `max_text_length` keeps its length (transformers would warn
    of "indexing errors" at every text between the two)."""
    processor = copy.deepcopy(processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    limit = text_limit(config, getattr(processor, "max_length", None) if tokenizer is not processor else None)
    if tokenizer is not None and limit:
        tokenizer.model_max_length = limit
        if hasattr(tokenizer, "init_kwargs"):
            tokenizer.init_kwargs["model_max_length"] = limit
    return processor


# -- the folder -----------------------------------------------------------------------------------------------
def model_folder_files(folder: str | os.PathLike) -> list[str]:
    """The files of the saved model in `folder` (top level only, matching `MODEL_FOLDER_PATTERNS`), sorted."""
    folder = Path(folder)
    return sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file() and any(fnmatch.fnmatchcase(path.name, pattern) for pattern in MODEL_FOLDER_PATTERNS)
    )


def save_model_folder(
    model: Any,
    processor: Any,
    output_dir: str | os.PathLike,
    card: ModelCardInfo | None = None,
    *,
    pruning_report: dict[str, Any] | None = None,
    answer_candidates: list[str] | None = None,
    push: HubTarget | None = None,
) -> Path:
    """Writes `model` and `processor` to `output_dir` as a complete, hub-ready folder, and pushes it.

    Args:
        model: the (unwrapped) model; its config and generation config get the tokenizer's special-token ids.
        processor: the processor saved with it (its tokenizer's ids are the ones used); required.
        output_dir: the folder (created if needed). The files of a model saved there before are replaced; those
            this save does not write (another task's module, a pruning report) are removed, with a warning.
        card: the facts of the model card; without it, a card with the task and stage the model's class tells.
        pruning_report: written to `pruning_report.json` (the card reads the sparsity per modality from it).
        answer_candidates: VQA: the answers the model ranks, saved in its config (when the model supports it).
        push: upload the folder's model files ([`model_folder_files`]) to this repo; the card names it.

    Returns the folder.
    """
    if processor is None:
        raise ValueError("A model folder needs its processor: pass the processor the model was trained with.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    sync_special_tokens(model, tokenizer)
    # The VQA answer candidates travel in the config once the model can hold them.
    saves_candidates = bool(answer_candidates) and hasattr(model, "set_answer_candidates")
    if saves_candidates:
        model.set_answer_candidates(list(answer_candidates), tokenizer)
    # Written beside the folder first, then moved in: a model saved over another one (another task, an unpruned
    # model over a pruned one) must not keep the other's modules, pruning report or vocabulary.
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=output_dir))
    try:
        model.save_pretrained(staging)
        processor_for_saving(processor, model.config).save_pretrained(staging)
        if pruning_report is not None:
            (staging / PRUNING_REPORT_FILE).write_text(json.dumps(pruning_report, indent=2), encoding="utf-8")
        card = card if card is not None else default_card(model, stage="save")
        if card is None:
            logger.warning(
                f"{type(model).__name__} is the model of no registered task: {output_dir} gets no model card."
            )
        else:
            if saves_candidates and card.answer_candidates is None:
                card.answer_candidates = len(answer_candidates)
            write_model_card(staging, card, model=model, repo_id=output_dir.absolute().name)
        _replace_saved_files(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if push is not None:
        publish_model_folder(output_dir, model, card, push, pruning_report=pruning_report)
    return output_dir


def check_output_folder(path: str | os.PathLike, flag: str = "--output_dir") -> None:
    """Raises for an output folder that names an existing file (saving into it would fail on errno's "File exists",
    for some commands only after the model had loaded)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {str(path)!r} is a file; give a folder (created when missing).")


def publish_model_folder(
    output_dir: str | os.PathLike,
    model: Any,
    card: ModelCardInfo | None,
    push: HubTarget | None = None,
    *,
    pruning_report: dict[str, Any] | None = None,
) -> None:
    """Rewrites the model card of a folder [`save_model_folder`] wrote (`card`: its facts now, e.g. with the metrics
    of an evaluation that ran after the save) and, with `push`, creates the Hub repo, names it in the card and
    uploads the folder's model files."""
    repo_id = None
    if push is not None:
        from huggingface_hub import HfApi

        url = HfApi().create_repo(push.repo_id, token=push.token, private=push.private, exist_ok=True)
        # `create_repo` resolves a bare name to the token's user.
        repo_id = getattr(url, "repo_id", None) or push.repo_id
    if card is not None:
        write_model_card(output_dir, card, model=model, repo_id=repo_id)
    if push is not None:
        message = push.commit_message or (card.commit_message(pruning_report) if card else "efficientvlm: save model")
        push_model_folder(output_dir, repo_id, commit_message=message, hub=push)


def _saved_module_names() -> set[str]:
    """The Python files a save can write: the modules of `modeling_efficientvlm` (the remote code)."""
    import modeling_efficientvlm

    return {path.name for path in Path(modeling_efficientvlm.__file__).parent.glob("*.py")}


def _replace_saved_files(staging: Path, output_dir: Path) -> None:
    """Moves the files of a save from `staging` into `output_dir`, after removing (with a warning) the files of a
    model saved there before that this save does not write (its `eval_results.json` too: the commands evaluate after
    saving). Only files a save writes are candidates: never training outputs or a Python file of the user's own. A file
    replaced keeps its mode; a new one gets the umask's."""
    written = {path.name for path in staging.iterdir()}
    ours = _saved_module_names()
    stale = [
        name
        for name in model_folder_files(output_dir)
        if name not in written and (not name.endswith(".py") or name in ours)
    ]
    for name in stale:
        (output_dir / name).unlink()
    if stale:
        logger.warning(
            f"Removed from {output_dir} the files of the model saved there before that this one does not have: "
            f"{', '.join(stale)}."
        )
    for name in sorted(written):
        target = output_dir / name
        if target.is_file():  # a replaced file keeps the mode its owner gave it (group-writable in a shared folder)
            shutil.copymode(target, staging / name)
        os.replace(staging / name, target)


def default_card(model: Any, stage: str) -> ModelCardInfo | None:
    """A card with what the model's class tells (its task) and `stage`; None for a model of no registered task."""
    from trainers.tasks import task_of_model

    try:
        return ModelCardInfo(task=task_of_model(model).name, stage=stage)
    except ValueError:
        return None


def push_model_folder(
    folder: str | os.PathLike, repo_id: str, commit_message: str, hub: HubTarget | None = None
) -> list[str]:
    """Uploads the model files of `folder` ([`model_folder_files`], nothing else) to `repo_id` in one commit;
    returns their names."""
    from huggingface_hub import HfApi

    files = model_folder_files(folder)
    HfApi().upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        allow_patterns=files,
        commit_message=commit_message,
        token=hub.token if hub else None,
        revision=hub.revision if hub else None,
    )
    logger.warning(f"Pushed {len(files)} files of {folder} to https://huggingface.co/{repo_id} ({commit_message!r}).")
    return files


__all__ = [
    "HubTarget",
    "check_output_folder",
    "default_card",
    "MODEL_FOLDER_PATTERNS",
    "PROCESSOR_FILES",
    "hub_target_from",
    "model_folder_files",
    "processor_for_saving",
    "publish_model_folder",
    "push_model_folder",
    "save_model_folder",
    "special_token_ids",
    "sync_special_tokens",
]
