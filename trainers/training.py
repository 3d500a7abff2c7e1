"""Training a task model with the stock `transformers.Trainer` (or a subclass): the loop every stage shares.

The command line (`efficientvlm pretrain / finetune / prune`) and the demo call these functions; they take plain
parameters, never argument dataclasses, so a script uses them just as well:

    model, processor = build_model_and_processor("vqa", preset="tiny", vocab_file="vocab.txt")
    train("vqa", model, processor, task_dataset("vqa", "vqa_train.json", "images/", processor), training_args)

Every folder is written by `trainers.saving.save_model_folder` (weights, config, code, processor, model card) and
pushed by it with `--push_to_hub` (the model's files only, never the Trainer's `runs/` or checkpoints).
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from modeling_efficientvlm.loading_efficientvlm import MASK_STATE_FILE
from trainers.data.epochs import follow_collator_epochs
from trainers.jit_checkpoint import use_step_boundary_jit_checkpoint
from trainers.json_files import read_json_file
from trainers.model_card import ModelCardInfo, local_name
from trainers.optimization import head_learning_rate_optimizer
from trainers.saving import PROCESSOR_FILES, hub_target_from, publish_model_folder, save_model_folder
from trainers.sharding import check_engine, prepare_model_for_engine, whole_model, whole_weights_on_load
from trainers.tasks import build_collator, build_dataset, evaluate_task, load_task_teacher, task_model_from

logger = logging.get_logger(__name__)

# Config fields that set how a model trains (its ITM negatives, its captioning label smoothing), not the shape of any
# weight: `--config_overrides` may change them on a saved model too.
TRAINING_CONFIG_FIELDS = (
    "itm_random_negatives",
    "itm_exclude_identical_texts",
    "itm_caption_negatives",
    "itm_negatives_per_pair",
    "itc_local_gradient",
    "label_smoothing",
    "head_learning_rate_multiplier",
)


def check_training_overrides(
    overrides: dict[str, Any], source: str, fix: str = "Start from --preset to change the rest."
) -> None:
    """Raises a `ValueError` unless every key of `overrides` is a [`TRAINING_CONFIG_FIELDS`] field with a valid
    value: a saved model (`source`) keeps every field that shapes its weights (`fix`: how to change those)."""
    from modeling_efficientvlm import EfficientVLMConfig

    shaping = sorted(set(overrides) - set(TRAINING_CONFIG_FIELDS))
    if shaping:
        raise ValueError(
            f"--config_overrides {shaping} would change the config a saved model ({source}) was built with; on a "
            f"saved model it may set only how it trains: {', '.join(TRAINING_CONFIG_FIELDS)}. {fix}"
        )
    EfficientVLMConfig.from_preset("tiny", **overrides)  # the config's own checks of each value


def build_task_model(
    task: str,
    model_name_or_path: str | os.PathLike | None = None,
    preset: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> Any:
    """A `task` model from a saved folder (or Hub id), or with random weights from a preset (whose config fields
    `config_overrides` replaces); exactly one of the two. On a saved model `config_overrides` may set the
    [`TRAINING_CONFIG_FIELDS`] only.

    With a `tokenizer`, a preset model takes its `vocab_size` (`len(tokenizer)`; an explicit
    `text_config.vocab_size` override wins only when at least that) and its [PAD] / [CLS] / [SEP] ids from it; a
    saved model whose vocabulary is smaller than the tokenizer's is a `ValueError` before any weight is loaded."""
    from modeling_efficientvlm import EfficientVLMConfig
    from trainers.tasks import task_model_class

    if (model_name_or_path is None) == (preset is None):
        raise ValueError("Give exactly one of --model_name_or_path and --preset.")
    if preset is not None:
        overrides = copy.deepcopy(config_overrides or {})
        if tokenizer is not None:
            overrides["text_config"] = vocabulary_overrides(tokenizer, overrides.get("text_config"))
        return task_model_class(task)(EfficientVLMConfig.from_preset(preset, **overrides))
    source = f"--model_name_or_path {model_name_or_path}"
    check_training_overrides(config_overrides or {}, source)
    if tokenizer is not None:
        saved = EfficientVLMConfig.from_pretrained(model_name_or_path)
        check_vocabulary(tokenizer, saved.text_config.vocab_size, source)
    return task_model_with_overrides(task, model_name_or_path, config_overrides or {})


def task_model_with_overrides(task: str, source: Any, overrides: dict[str, Any]) -> Any:
    """`task`'s model from `source` (a saved folder, Hub id or pre-trained model, see `task_model_from`), with
    `overrides` ([`TRAINING_CONFIG_FIELDS`], checked by the caller with [`check_training_overrides`]) set on its
    config, which is its own."""
    model = task_model_from(task, source)
    for name, value in overrides.items():
        setattr(model.config, name, value)
    return model


def check_vocabulary(tokenizer: Any, vocab_size: int, source: str, fix: str | None = None) -> None:
    """Raises a `ValueError` naming `source` when `tokenizer` has more tokens than the embedding table's
    `vocab_size` rows (its last ids would index past the table mid-training)."""
    size = len(tokenizer)
    if size > vocab_size:
        fix = fix or (
            "use the model's own processor (leave --processor_name_or_path / --vocab_file out), a tokenizer of at "
            f"most {vocab_size} tokens, or start from --preset, whose vocab_size follows the tokenizer"
        )
        raise ValueError(
            f"the tokenizer has {size} tokens but the model's vocab_size is {vocab_size} ({source}); token ids "
            f"from {vocab_size} up would index past its embedding table: {fix}."
        )


def vocabulary_overrides(tokenizer: Any, text_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `text_config` overrides of a preset built for `tokenizer`: `vocab_size` = `len(tokenizer)` (an explicit
    `vocab_size` in `text_overrides` is kept when at least that, else a `ValueError`) and the tokenizer's pad /
    bos ([CLS]) / eos ([SEP]) ids."""
    from trainers.saving import special_token_ids

    text_overrides = dict(text_overrides or {})
    explicit = text_overrides.get("vocab_size")
    if explicit is not None:
        check_vocabulary(
            tokenizer,
            int(explicit),
            "--config_overrides text_config.vocab_size",
            f"drop the override (the preset then takes the tokenizer's size) or give at least {len(tokenizer)}",
        )
    text_overrides["vocab_size"] = len(tokenizer) if explicit is None else int(explicit)
    ids = special_token_ids(tokenizer)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if ids[name] is not None:
            text_overrides[name] = ids[name]
    return text_overrides


def build_model_and_processor(
    task: str,
    model_name_or_path: str | os.PathLike | None = None,
    preset: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    processor_name_or_path: str | os.PathLike | None = None,
    vocab_file: str | os.PathLike | None = None,
    max_text_length: int | None = None,
) -> tuple[Any, Any]:
    """(model, processor): the processor first (`processor_name_or_path`, else `vocab_file`, else the model's own),
    then the model built for its tokenizer (see [`build_task_model`]), so a preset's embedding table fits the
    vocabulary and a saved model too small for it fails before any weight is loaded."""
    from modeling_efficientvlm import EfficientVLMConfig

    if (model_name_or_path is None) == (preset is None):
        raise ValueError("Give exactly one of --model_name_or_path and --preset.")
    if preset is not None:
        config = EfficientVLMConfig.from_preset(preset, **copy.deepcopy(config_overrides or {}))
    else:
        config = EfficientVLMConfig.from_pretrained(model_name_or_path)
    processor = load_processor(
        config,
        processor_name_or_path or model_name_or_path,
        vocab_file,
        max_text_length=max_text_length,
        flag="--processor_name_or_path" if processor_name_or_path else "--model_name_or_path",
    )
    check_image_size(processor, config.vision_config.image_size, preset is not None)
    check_text_limit(processor, config.text_config.max_position_embeddings, preset is not None)
    tokenizer = getattr(processor, "tokenizer", None)
    model = build_task_model(task, model_name_or_path, preset, config_overrides, tokenizer=tokenizer)
    return model, processor


def check_image_size(processor: Any, image_size: int, from_preset: bool = False, fix: str | None = None) -> None:
    """Raises a `ValueError` naming both sizes when `processor` resizes images to another size than the model's
    `vision_config.image_size` (the model would refuse every batch at the first training step); `fix`: what the
    message tells the user to do instead of the default advice."""
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    height, width = size.get("height"), size.get("width")
    if height is None or width is None or (height, width) == (image_size, image_size):
        return
    fix = fix or (
        f'set the model\'s size with --config_overrides \'{{"vision_config": {{"image_size": {height}}}}}\' '
        f"or give a processor for {image_size}x{image_size} images"
        if from_preset
        else f"give a processor for {image_size}x{image_size} images (--processor_name_or_path) or leave "
        "--processor_name_or_path / --vocab_file out to use the model's own"
    )
    raise ValueError(
        f"The processor resizes images to {height}x{width} but the model's vision_config.image_size is "
        f"{image_size}: {fix}."
    )


def check_text_limit(
    processor: Any,
    positions: int,
    from_preset: bool = False,
    fix: str | None = None,
    length: int | None = None,
    flag: str | None = "--max_text_length",
    processor_folder: str | os.PathLike | None = None,
) -> None:
    """Raises a `ValueError` naming both numbers when texts may be longer (the processor's `max_length`, or
    `length`: the command's own limit, its option `flag`; None: it has none) than the model's position table
    (`positions`, `text_config.max_position_embeddings`) holds: the first batch with a text that long would stop
    training, possibly hours in. Every task's texts ([CLS], [SEP] and the captioning prompt included) are cut to
    that limit, so it may reach the table's size; `fix`: what the message tells the user to do instead of the
    default advice (for a processor saved in `processor_folder`: to lower its `max_length` there)."""
    length = length or getattr(processor, "max_length", None)
    if length is None or length <= positions:
        return
    if fix is None and processor_folder is not None:
        fix = f"set max_length to at most {positions} in {processor_folder}'s processor_config.json"
    if fix is None:
        fix = f"give {flag or '--max_text_length'} <= {positions}"
        if from_preset:
            fix += (
                f' or a larger table: --config_overrides \'{{"text_config": {{"max_position_embeddings": {length}}}}}\''
            )
    source = f"{flag}, else the processor's max_length" if flag else "the processor's max_length"
    raise ValueError(
        f"Texts of up to {length} tokens ({source}) do not fit the model's position table of {positions} "
        f"(text_config.max_position_embeddings): the first batch with a text longer than {positions} tokens would "
        f"stop training; {fix}."
    )


def saved_processor(path: str | os.PathLike, flag: str) -> Any:
    """The processor saved at `path` (a folder or a Hub id); a local folder without one (weights only, or a Trainer
    checkpoint of a run from before checkpoints held it) is a `ValueError` naming `flag` and the files it lacks."""
    from modeling_efficientvlm import EfficientVLMProcessor

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise ValueError(
            f"{flag} {path} holds no processor ({' or '.join(PROCESSOR_FILES)} and the tokenizer files a processor's "
            "save_pretrained writes): a folder of weights only, or a checkpoint of a run from before checkpoints "
            "held it. Copy those files from the run's output folder (or from the folder it started from) into it."
        )
    return EfficientVLMProcessor.from_pretrained(path)


def load_processor(
    config: Any,
    processor_name_or_path: str | os.PathLike | None = None,
    vocab_file: str | os.PathLike | None = None,
    max_text_length: int | None = None,
    flag: str = "--processor_name_or_path",
) -> Any:
    """The processor saved at `processor_name_or_path` (named `flag` in errors), or one built from a WordPiece
    `vocab_file` for the image size of `config`."""
    from transformers import BertTokenizer

    from modeling_efficientvlm import EfficientVLMImageProcessor, EfficientVLMProcessor

    if vocab_file is None:
        if processor_name_or_path is None:
            raise ValueError("No processor: give --processor_name_or_path or --vocab_file.")
        processor = saved_processor(processor_name_or_path, flag)
    else:
        if not Path(vocab_file).is_file():
            raise FileNotFoundError(
                f"--vocab_file {vocab_file}: no such file (a WordPiece vocab.txt, one token a line)."
            )
        size = config.vision_config.image_size
        processor = EfficientVLMProcessor(
            EfficientVLMImageProcessor(size={"height": size, "width": size}),
            BertTokenizer(vocab=str(vocab_file), do_lower_case=True),
            max_length=max_text_length or config.max_text_length,
        )
    if max_text_length is not None:
        processor.max_length = max_text_length
    return processor


def task_dataset(
    task: str,
    data: Any,
    image_root: str | os.PathLike | None,
    processor: Any,
    dataset_path: str | os.PathLike | None = None,
    split: str = "train",
) -> Any:
    """The `task` dataset over `data` (an X-VLM JSON file or records), or over the `split` of the `datasets`
    folder `dataset_path` (saved with `save_to_disk`) when one is given instead."""
    if dataset_path is not None:
        import datasets

        if data is not None:
            raise ValueError(
                f"Give one of --{split}_file ({data}) and --dataset_path ({dataset_path}) for the {task} {split} "
                "data, not both."
            )
        data = datasets.load_from_disk(dataset_path)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"--dataset_path {dataset_path} has no {split!r} split; it has {list(data)}.")
            data = data[split]
    elif data is None:
        raise ValueError(f"Give --{split}_file (or --dataset_path) for the {task} data.")
    return build_dataset(task, data, image_root, processor)


def train(
    task: str,
    model: Any,
    processor: Any,
    train_dataset: Any,
    training_args: TrainingArguments,
    trainer_class: type[Trainer] = Trainer,
    eval_dataset: Any = None,
    **trainer_kwargs: Any,
) -> Trainer:
    """Trains `model` on `train_dataset` with the task's collator; our datasets yield raw items, so columns
    are never dropped. Under DeepSpeed or FSDP the model is made wrappable first (`trainers.sharding`); under
    sharded weights (FSDP, ZeRO-3) the caller gets the whole trained model with `trainers.sharding.whole_model`.
    `eval_dataset` (the `--eval_file` split) is the Trainer's during training when `--eval_strategy` asks for
    evaluations: its loss is logged as `eval_loss` (what `--load_best_model_at_end` compares by default). A model
    whose config sets `head_learning_rate_multiplier` trains its task's fresh head at that multiple of the rate
    (`trainers.optimization`)."""
    training_args.remove_unused_columns = False
    evaluating = training_args.eval_strategy != "no"
    if evaluating and eval_dataset is None:
        strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
        raise ValueError(f"--eval_strategy {strategy} evaluates during training: give --eval_file.")
    head_optimizer = head_learning_rate_optimizer(training_args, model, task)
    if head_optimizer is not None:
        trainer_kwargs.setdefault("optimizer_cls_and_kwargs", head_optimizer)
    trainer_kwargs.setdefault("processing_class", processor)  # saved in every checkpoint: each one loads as a model
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if evaluating else None,
        data_collator=build_collator(task, processor, seed=training_args.seed),
        **trainer_kwargs,
    )
    run_training(trainer)
    return trainer


def run_training(trainer: Trainer) -> Any:
    """`trainer.train()` (resuming `--resume_from_checkpoint`) with the checks every training command runs around it,
    and its `TrainOutput`: new MLM masks each epoch, `--enable_jit_checkpoint` saved at a step boundary, the engine
    (DeepSpeed / FSDP) checked and the model made wrappable, the checkpoint to resume checked (or earlier runs'
    checkpoints in `--output_dir` named), a training split with no batch refused ([`check_training_batches`]) and a
    run that stopped early refused ([`check_training_finished`])."""
    args = trainer.args
    check_training_batches(trainer)
    warn_on_unused_caption_negatives(trainer)
    follow_collator_epochs(trainer)
    use_step_boundary_jit_checkpoint(trainer)  # --enable_jit_checkpoint: a checkpoint that resumes exactly
    check_engine(trainer)
    prepare_model_for_engine(trainer)
    stop_at_max_steps(trainer)
    if args.resume_from_checkpoint:
        check_resumed_checkpoint(args.resume_from_checkpoint, trainer.model)
    else:
        warn_on_earlier_checkpoints(args.output_dir)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    check_training_finished(trainer)
    return result


def check_resumed_head_rate(checkpoint: Any, saved_config: dict[str, Any], model: Any) -> None:
    """Refuses to resume an optimizer state saved under another `head_learning_rate_multiplier` than `model`'s: the
    state holds the head's rate in parameter groups of its own layout, which the Trainer would load silently (the old
    rate kept by the optimizer and the schedule) or fail on (`loaded state dict has a different number of parameter
    groups`)."""
    current = getattr(getattr(model, "config", None), "head_learning_rate_multiplier", None)
    if current is None:
        return
    saved = saved_config.get("head_learning_rate_multiplier", 1.0)
    if float(saved) != float(current):
        # A pruning checkpoint is no model folder (its masks are not applied): it only resumes.
        weights = (
            ""
            if (Path(checkpoint) / MASK_STATE_FILE).exists()
            else f", or start a new run from the checkpoint's weights (--model_name_or_path {checkpoint})"
        )
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} was trained with head_learning_rate_multiplier {saved:g}, but "
            f"this run sets {current:g}: the checkpoint's optimizer and schedule keep the rates of {saved:g}. Resume "
            f"with head_learning_rate_multiplier {saved:g}{weights}."
        )


def stop_at_max_steps(trainer: Trainer) -> None:
    """Makes a run resumed from a checkpoint of its last step end there. Transformers 5 starts the resumed epoch's
    remaining update steps before it compares the step with `max_steps`, so resuming `checkpoint-3` of a 3-step run
    (mid-epoch) trained a 4th step and saved `checkpoint-4`; an epoch now starts only below `max_steps`."""
    run_epoch = getattr(trainer, "_run_epoch", None)
    if run_epoch is None:  # another Trainer version: its own loop
        return

    def run_epoch_below_max_steps(*args: Any, **kwargs: Any) -> Any:
        state = trainer.state
        if 0 < state.max_steps <= state.global_step:
            trainer.control.should_training_stop = True
            return None
        return run_epoch(*args, **kwargs)

    trainer._run_epoch = run_epoch_below_max_steps


def warn_on_unused_caption_negatives(trainer: Trainer) -> None:
    """Warns when the model is set to draw ITM negatives from caption negatives (`itm_caption_negatives` > 0) but
    the training records give none (`negative_caption`): the setting then changes nothing."""
    rate = getattr(getattr(trainer.model, "config", None), "itm_caption_negatives", 0.0) or 0.0
    dataset = trainer.train_dataset
    if rate > 0 and hasattr(dataset, "negative_texts") and dataset.negative_texts is None:
        source = getattr(dataset, "source", None)
        records = f"the records of {source}" if source else "the training records"
        logger.warning(
            f"itm_caption_negatives is {rate:g}, but {records} give no `negative_caption`: every ITM negative is "
            "another image's text, as with 0. Give each record its caption negatives (see README, Your own data)."
        )


def check_training_batches(trainer: Trainer) -> None:
    """Raises a `ValueError` before training when `--dataloader_drop_last` leaves the training split no batch: it
    holds fewer examples than one global batch (per-device batch x processes), and transformers then said only
    "args.max_steps must be set to a positive value if dataloader does not have a length, was -1" (or, with
    --max_steps, trained on nothing)."""
    args, dataset = trainer.args, trainer.train_dataset
    if not args.dataloader_drop_last or dataset is None or not hasattr(dataset, "__len__"):
        return
    size, processes = len(dataset), args.world_size
    batch = args.train_batch_size * processes
    if size >= batch:
        return
    source = getattr(dataset, "source", None)
    split = "The training split" + (f" ({source})" if source else "")
    across = f" x {processes} processes" if processes > 1 else ""
    smaller = (
        f"give --per_device_train_batch_size {size // processes} or less"
        if size >= processes
        else "train in fewer processes"
    )
    raise ValueError(
        f"{split} has {size} examples, fewer than one global batch of {batch} (--per_device_train_batch_size "
        f"{args.per_device_train_batch_size}{across}), and --dataloader_drop_last drops the incomplete batch: no "
        f"step would train. Leave --dataloader_drop_last out, {smaller}, or train on more examples."
    )


def _checkpoints(output_dir: str | os.PathLike | None) -> list[tuple[int, Path]]:
    """(step, folder) of the Trainer's `checkpoint-<step>` folders in `output_dir`, by step."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = [path for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.is_dir()]
    steps = [path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-") for path in found]
    return sorted((int(step), path) for step, path in zip(steps, found) if step.isdigit())


def warn_on_earlier_checkpoints(output_dir: str | os.PathLike | None) -> None:
    """Warns when a run that does not resume starts in an `--output_dir` that holds checkpoints already: its own are
    saved beside them, and the newest folder (what "resume from the last checkpoint" picks) may be the other run's."""
    earlier = _checkpoints(output_dir)
    if earlier:
        names = ", ".join(path.name for _, path in earlier[-3:])
        logger.warning(
            f"--output_dir {output_dir} holds {len(earlier)} checkpoint folder(s) of an earlier run (... {names}); "
            "this run saves its own beside them, and resuming from the newest may resume that run instead. Use a new "
            "--output_dir, or resume the earlier run with --resume_from_checkpoint."
        )


# Files of a checkpoint folder the Trainer restores on resume, besides the weights (one per process for the RNG).
CHECKPOINT_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_*.pth", "scaler.pt")


def check_resumed_checkpoint(checkpoint: Any, model: Any = None) -> None:
    """Checks the checkpoint folder to resume from before the Trainer reads it, raising `CorruptCheckpointError`
    naming the file for one it cannot read (a weights file, `trainer_state.json`, the optimizer, scheduler or RNG
    state: a save cut short) and a `ValueError` when it holds another model class than `model`'s (another task's
    run, which the Trainer would load half of, with warnings). A checkpoint without optimizer state (saved with
    `--save_only_model`) resumes with a fresh optimizer: said in a warning."""
    from modeling_efficientvlm.loading_efficientvlm import (
        CorruptCheckpointError,
        unreadable_torch_files,
        unreadable_weight_files,
    )

    if not isinstance(checkpoint, (str, os.PathLike)):
        return
    folder = Path(checkpoint)
    states = [path for pattern in CHECKPOINT_STATE_FILES for path in sorted(folder.glob(pattern))]
    files = unreadable_weight_files(folder) + unreadable_torch_files(states, weights_only=False)
    state = folder / "trainer_state.json"
    if folder.is_dir() and not state.is_file():
        files.append((str(state), "missing"))
    elif state.is_file():
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            files.append((str(state), str(error)))
    if files:
        named = "; ".join(f"{path} ({message})" for path, message in files)
        raise CorruptCheckpointError(
            f"--resume_from_checkpoint {checkpoint}: cannot read {named}; the checkpoint was cut short or damaged. "
            "Resume from an earlier checkpoint."
        )
    config_file = folder / "config.json"
    saved_config = None
    if model is not None and config_file.is_file():
        saved_config = json.loads(config_file.read_text(encoding="utf-8"))
        saved = (saved_config.get("architectures") or [None])[0]
        if saved is not None and saved != type(model).__name__:
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint} is a checkpoint of {saved}, but this run trains "
                f"{type(model).__name__}: resume from a checkpoint of this run (of the same task and command)."
            )
    optimizer_state = ("optimizer.pt", "optimizer.bin", "optimizer_0", "global_step*")
    has_optimizer_state = any(any(folder.glob(name)) for name in optimizer_state)
    if has_optimizer_state and saved_config is not None:
        check_resumed_head_rate(checkpoint, saved_config, model)
    if folder.is_dir() and not has_optimizer_state:
        logger.warning(
            f"--resume_from_checkpoint {checkpoint} holds no optimizer state (saved with --save_only_model?): the "
            "run resumes the weights with a fresh optimizer and learning-rate schedule state, not where it stopped."
        )


class TrainingStopped(RuntimeError):
    """Training ended before its last step without meaning to (a SIGTERM under `--enable_jit_checkpoint`): the
    command saves no final model; a checkpoint resumes it."""


def check_training_finished(trainer: Trainer) -> None:
    """Raises [`TrainingStopped`] when `trainer` stopped before its last step, other than a sparsity ladder that
    saved every rung: what it holds is not the model the run was asked for, and a scheduler must not read the exit
    as done."""
    state = trainer.state
    ladder = getattr(trainer, "ladder", None)
    # A ladder is done when its last rung is saved (its run may stop before max_steps), and only then.
    if ladder.finished if ladder is not None else state.global_step >= state.max_steps:
        return
    # This run's newest checkpoint: the highest-numbered folder may be an earlier run's, past this run's last step.
    own = [path for step, path in _checkpoints(trainer.args.output_dir) if step <= state.global_step]
    last = own[-1] if own else None
    resume = f"resume with --resume_from_checkpoint {last}" if last else "no checkpoint was saved to resume from"
    raise TrainingStopped(
        f"Training stopped at step {state.global_step} of {state.max_steps} (a SIGTERM under --enable_jit_checkpoint, "
        "a callback that stops training, or an iterable dataset that ran out first): no final model was saved; "
        f"{resume}."
    )


def task_inputs(
    task: str,
    model: Any,
    processor: Any,
    train_file: Any = None,
    eval_file: Any = None,
    image_root: str | os.PathLike | None = None,
    dataset_path: str | os.PathLike | None = None,
    answer_list: str | os.PathLike | None = None,
) -> tuple[Any, Any, list[str] | None]:
    """(train dataset, eval dataset or None, VQA answer list or None), every one checked before the first training
    step rather than after training: the records and images of both splits, and the answers a VQA evaluation
    ranks (`answer_list` or the candidates saved with the model)."""
    check_answer_list_task(answer_list, task)
    train_dataset = task_dataset(task, train_file, image_root, processor, dataset_path)
    check_training_images(train_dataset)
    answers = None
    if task == "vqa":
        if len(train_dataset.unanswered) == len(train_dataset):
            # A test split, or a misspelt key: said here, not by the collator at the first batch (naming no file).
            raise ValueError(
                f"{train_dataset.source or 'The training data'}: none of its {len(train_dataset)} questions has "
                f"answers (the fields of record 0: {sorted(train_dataset.records[0])}); VQA trains on each question's "
                "`answer` list (`answers` is read too)."
            )
        auto = str(answer_list) == ANSWER_LIST_AUTO
        answers = training_answer_list(train_dataset) if auto else read_answer_list(answer_list)
        if answers:  # checked now: they are saved with the model after training
            from modeling_efficientvlm.modeling_efficientvlm_vqa import answer_candidate_ids

            try:
                answer_candidate_ids(answers, processor, model.answer_decoder.config.max_position_embeddings)
            except ValueError as error:
                raise ValueError(f"--answer_list {answer_list}: {error}") from error
    eval_dataset = None
    if eval_file is not None and task != "pretraining":
        # --dataset_path holds the training data; the eval split is always --eval_file.
        source = f"--answer_list {answer_list}" + (
            ": the training answers" if str(answer_list) == ANSWER_LIST_AUTO else ""
        )
        eval_dataset = checked_eval_dataset(
            task, eval_file, image_root, processor, model, answers, answers_source=source
        )
    return train_dataset, eval_dataset, answers


def checked_eval_dataset(
    task: str,
    eval_file: Any,
    image_root: str | os.PathLike | None,
    processor: Any,
    model: Any,
    answers: list[str] | None = None,
    model_name: str = "the model",
    answers_source: str = "--answer_list",
) -> Any:
    """The `--eval_file` split of `task`, checked before anything runs (training, an export) rather than when it is
    scored: its records, its image files' headers and, for VQA, candidates to rank (`answers`, named
    `answers_source` in a warning, or those saved with `model`, named `model_name`) and answers for every question;
    a warning says how many questions those candidates can answer when not all (see [`warn_on_answer_coverage`])."""
    dataset = task_dataset(task, eval_file, image_root, processor, split="eval")
    dataset.check_image_headers()
    if task == "vqa":
        if not (answers or getattr(model.config, "answer_candidates", None)):
            raise ValueError(
                f"--eval_file: VQA ranks candidate answers, and {model_name} has none saved "
                "(`config.answer_candidates`); give --answer_list (a JSON list file of answers; finetune / prune: "
                "or `auto`, the most frequent training answers)."
            )
        check_vqa_references(dataset, "--eval_file")  # the record names the file
        source = answers_source if answers else f"saved with {model_name}"
        warn_on_answer_coverage(dataset, answers or model.config.answer_candidates, source, eval_file)
    return dataset


# Training splits up to this many records have their image files identified before training (a header read each).
MAX_CHECKED_TRAINING_RECORDS = 200_000


def check_training_images(dataset: Any) -> None:
    """Identifies the image files of a training split before the first step (a bad file would stop the run where
    a batch first reads it), unless the split is larger than `MAX_CHECKED_TRAINING_RECORDS`: then it says so."""
    if len(dataset.records) <= MAX_CHECKED_TRAINING_RECORDS:
        dataset.check_image_headers()
    elif not dataset.lazy_image_column:  # images stored in the dataset are never identified ahead
        logger.warning(
            f"{len(dataset.records):,} training records: their image files are not identified before training (over "
            f"{MAX_CHECKED_TRAINING_RECORDS:,}); an unreadable one stops the run when a batch reads it."
        )


def check_answer_list_task(answer_list: Any, task: str) -> None:
    """Raises when `--answer_list` is given to a task other than VQA, which has no candidate answers to rank."""
    if answer_list is not None and task != "vqa":
        raise ValueError(f"--answer_list is the candidate answers of VQA; the {task} task has none.")


def check_vqa_references(dataset: Any, what: str) -> None:
    """Raises, naming the first such record, when a question of a VQA split scored by accuracy has no answers (a
    test split: `efficientvlm evaluate --predictions_file` answers its questions without scoring them)."""
    missing = dataset.unanswered
    if missing:
        raise ValueError(
            f"{what}: {dataset._where(missing[0])} has no answers ({len(missing)} of {len(dataset)} questions have "
            "none); VQA accuracy scores a prediction against its question's answers. For a split without answers, "
            "`efficientvlm evaluate --predictions_file` writes the predictions unscored."
        )


def warn_on_answer_coverage(dataset: Any, answers: list[str], source: str, eval_file: Any = "--eval_file") -> None:
    """Logs a warning when some questions of the VQA split `dataset` (`eval_file`) have none of their gold answers
    among the candidates `answers` (`source`: where they come from), with the accuracy the split can reach at best
    (each question's best candidate): ranking only those candidates, the model cannot answer the others, and an
    answer list made for another split scored 0.0 without a word. A split without answers (a test split) is
    answered unscored: nothing to warn about."""
    from trainers.evaluation.metrics import normalize_answer, vqa_accuracy_per_question

    normalized: dict[str, str] = {}  # the splits repeat their answers: each is normalised once

    def key(answer: str) -> str:
        if answer not in normalized:
            normalized[answer] = normalize_answer(answer)
        return normalized[answer]

    candidates = {key(answer): answer for answer in answers}
    scored = [references for references in dataset.references if references]
    covered, best = 0, 0.0
    for references in scored:
        hits = {key(reference) for reference in references} & candidates.keys()
        if hits:
            covered += 1
            best += max(vqa_accuracy_per_question(candidates[hit], references) for hit in hits)
    if not scored or covered == len(scored):
        return
    where = eval_file if isinstance(eval_file, (str, os.PathLike)) else "the eval split"
    among = f"among the {len(answers)} candidate answers ({source})"
    if covered == 0:
        logger.warning(
            f"None of the {len(scored)} eval questions ({where}) has a gold answer {among}: VQA accuracy will be 0.0 "
            "whatever the model does. Give candidates that hold the split's answers (an --answer_list file; "
            "finetune / prune: --answer_list auto takes the training answers)."
        )
    else:
        logger.warning(
            f"{covered} of {len(scored)} eval questions ({where}) have a gold answer {among}: VQA accuracy cannot "
            f"exceed {best / len(scored):.4f}."
        )


def evaluate_and_save(
    task: str,
    model: Any,
    processor: Any,
    eval_dataset: Any,
    output_dir: str | os.PathLike | None,
    answers: list[str] | None = None,
) -> dict[str, float]:
    """The task metrics of `model` on `eval_dataset`, also written to `output_dir/eval_results.json` (unless
    `output_dir` is None); `answers`: the VQA candidate answers (default: those saved with the model)."""
    metrics = evaluate_task(task, model, eval_dataset, processor, answer_list=answers).metrics
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        Path(output_dir, "eval_results.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# `--answer_list auto`: the most frequent training answers, at most VQAv2's standard answer-vocabulary size.
ANSWER_LIST_AUTO = "auto"
MAX_AUTO_ANSWERS = 3129


def training_answer_list(dataset: Any, limit: int = MAX_AUTO_ANSWERS) -> list[str]:
    """The `limit` most frequent answers of a VQA training set (every annotator's answer counts once), counted in
    the official normalisation (so "two", "2" and "Two." are one answer) and each written as the training records
    most often write it, the form the answer decoder learns to generate ("two", not the normalised "2", which a
    vocabulary trained on the records may not have); most frequent first (ties: first seen first)."""
    from trainers.evaluation.metrics import normalize_answer

    counts: Counter[str] = Counter()
    spellings: dict[str, Counter[str]] = {}
    for answers in dataset.references:
        for answer in answers:
            key = normalize_answer(answer)
            if key:
                counts[key] += 1
                spellings.setdefault(key, Counter())[answer.strip()] += 1
    if not counts:
        raise ValueError("--answer_list auto: the training records have no answers to build candidates from.")
    return [spellings[key].most_common(1)[0][0] for key, _ in counts.most_common(limit)]


def read_answer_list(answer_list: str | os.PathLike | None) -> list[str] | None:
    """The VQA answer candidates in the JSON list file `answer_list` (None without one); errors name the file."""
    if not answer_list:
        return None
    path = Path(answer_list)
    answers = read_json_file(path, f"--answer_list {path}", "a JSON list of candidate answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f'--answer_list {path} must hold a non-empty JSON list of strings, e.g. ["yes", "no", "2"].')
    return answers


def data_names(*sources: Any) -> list[str]:
    """The names of the data files / folders in `sources` for a model card's `datasets` (None skipped)."""
    return [
        Path(source).name if os.path.exists(source) else str(source)
        for source in sources
        if isinstance(source, (str, os.PathLike))
    ]


def train_task_model(
    task: str,
    training_args: TrainingArguments,
    *,
    model_name_or_path: str | os.PathLike | None = None,
    preset: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    processor_name_or_path: str | os.PathLike | None = None,
    vocab_file: str | os.PathLike | None = None,
    train_file: Any = None,
    eval_file: Any = None,
    image_root: str | os.PathLike | None = None,
    dataset_path: str | os.PathLike | None = None,
    answer_list: str | os.PathLike | None = None,
    max_text_length: int | None = None,
    teacher_model_name_or_path: str | os.PathLike | None = None,
    distillation_config: Any = None,
) -> dict[str, float]:
    """Builds, trains and saves a `task` model with its processor (the model's own unless
    `processor_name_or_path` or `vocab_file` says otherwise) to `training_args.output_dir`, with a model card;
    evaluates it on `eval_file` when one is given (not for pre-training) and returns the metrics (empty without).
    With `teacher_model_name_or_path` (a fine-tuned teacher of the same task) it trains with task distillation:
    [`DistillationTrainer`] with the KD terms the task registry declares, weighted by `distillation_config`.
    With `training_args.push_to_hub`, the saved folder (and nothing else) goes to `training_args.hub_model_id`."""
    if distillation_config is not None and teacher_model_name_or_path is None:
        raise ValueError("Distillation settings were given without a --teacher_model_name_or_path to distil from.")
    hub = hub_target_from(training_args)
    set_seed(training_args.seed)  # a model built from a preset, or a new task head, starts the same every run
    with whole_weights_on_load(training_args):  # under ZeRO-3 too: the engine partitions the student later
        model, processor = build_model_and_processor(
            task, model_name_or_path, preset, config_overrides, processor_name_or_path, vocab_file, max_text_length
        )
        teacher = load_task_teacher(task, teacher_model_name_or_path) if teacher_model_name_or_path else None
    train_dataset, eval_dataset, answers = task_inputs(
        task, model, processor, train_file, eval_file, image_root, dataset_path, answer_list
    )
    trainer_class, distillation = Trainer, {}
    if teacher is not None:
        from trainers.distillation import DistillationTrainer

        trainer_class = DistillationTrainer
        distillation = {"teacher_model": teacher, "distillation_config": distillation_config}
    trainer = train(task, model, processor, train_dataset, training_args, trainer_class, eval_dataset, **distillation)
    # Every process: under FSDP / ZeRO-3 this gathers the weights into process 0 (None in the others).
    model = whole_model(trainer)
    output_dir = training_args.output_dir if training_args.should_save and model is not None else None
    card = ModelCardInfo(
        task=task,
        stage="pretrain" if task == "pretraining" else "finetune",
        base_model=local_name(model_name_or_path),
        teacher_model=local_name(teacher_model_name_or_path),
        datasets=data_names(dataset_path or train_file),
    )
    return save_evaluate_and_publish(
        task, model, processor, output_dir, card, eval_dataset, training_args, eval_file, answers=answers, push=hub
    )


def save_evaluate_and_publish(
    task: str,
    model: Any,
    processor: Any,
    output_dir: str | os.PathLike | None,
    card: ModelCardInfo,
    eval_dataset: Any,
    training_args: TrainingArguments,
    eval_file: Any = None,
    *,
    answers: list[str] | None = None,
    pruning_report: dict[str, Any] | None = None,
    push: Any = None,
) -> dict[str, float]:
    """The end of a training command: saves the model folder to `output_dir` (None: this process does not save)
    first, so that an evaluation that fails (an image that cannot be decoded) loses nothing; then evaluates it on
    `eval_dataset` once, in the world's first process, on the whole model (the other processes return no metrics),
    writes the metrics into `eval_results.json` and the card, and pushes the folder (`push`, a `HubTarget`)."""
    if output_dir is not None:
        save_model_folder(model, processor, output_dir, card, pruning_report=pruning_report, answer_candidates=answers)
    metrics: dict[str, float] = {}
    if eval_dataset is not None and training_args.process_index == 0:
        metrics = evaluate_and_save(task, model, processor, eval_dataset, output_dir, answers)
    if output_dir is not None and (metrics or push is not None):
        card.metrics = metrics
        card.eval_dataset = data_names(eval_file)[0] if eval_file and metrics else None
        publish_model_folder(output_dir, model, card, push, pruning_report=pruning_report)
    return metrics
