"""What the subcommands share: the model and data arguments of the training commands, the parser that reads
them from the command line or a JSON file, and the JSON-option reader."""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from trainers.json_files import read_json_file


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Saved EfficientVLM folder (or Hub id) to start from."}
    )
    preset: str | None = field(
        default=None, metadata={"help": "Start from random weights of a preset: xvlm-base, efficientvlm-small, tiny."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": 'JSON of config fields for --preset, e.g. \'{"vision_config": {"image_size": 64}}\'; on a saved '
            "model only how it trains: the ITM negatives (itm_random_negatives, itm_exclude_identical_texts, "
            "itm_caption_negatives, itm_negatives_per_pair), itc_local_gradient, label_smoothing and "
            "head_learning_rate_multiplier (X-VLM's lr_mult), e.g. '{\"itm_negatives_per_pair\": 2}'."
        },
    )
    processor_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Processor folder (`efficientvlm processor` writes one); defaults to --model_name_or_path. A "
            "--preset model takes its vocab_size and [PAD] / [CLS] / [SEP] ids from the processor's tokenizer."
        },
    )
    vocab_file: str | None = field(
        default=None,
        metadata={"help": "Or a WordPiece vocab.txt to build the processor from (the vocab_size follows it too)."},
    )


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "X-VLM JSON file of training records."})
    eval_file: str | None = field(default=None, metadata={"help": "X-VLM JSON file evaluated after training."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the records' image paths start from."})
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "A `datasets` folder (save_to_disk; of a DatasetDict, its 'train' split) instead of --train_file; "
            "--eval_file stays the eval split."
        },
    )
    answer_list: str | None = field(
        default=None,
        metadata={
            "help": 'VQA: the candidate answers the model ranks, a JSON list file (e.g. ["yes", "no", "2"]), or '
            "`auto`: the 3,129 most frequent training answers (counted in the official normalisation, each written "
            "as the records most often write it). Saved with the model."
        },
    )
    max_text_length: int | None = field(default=None, metadata={"help": "Token limit of texts (default: model's)."})


def itm_score_field() -> Any:
    """`--itm_score` of the commands that score retrieval (`evaluate`, `export`): one declaration, one default
    (checked by `check_itm_score(value, "--itm_score", rerank=True)`)."""
    return field(
        default="logit",
        metadata={
            "help": "Retrieval: what ranks the re-ranked candidates: 'logit', the ITM head's raw match logit (X-VLM's "
            "protocol), 'log_odds' / 'probability', its match log-odds / probability (one order; the raw logit "
            "also carries a direction of the head that the ITM loss never trains), or 'log_odds+itc', the "
            "log-odds plus the pair's ITC logit (cosine / temperature; BLIP-style; the log-odds alone are then "
            "reported too, as itm_r_mean, ...)."
        },
    )


def answer_list_field() -> Any:
    """`--answer_list` of the commands that score VQA (`evaluate`, `export`); read by `read_answer_list`."""
    return field(
        default=None,
        metadata={"help": "VQA: JSON list file of candidate answers (default: those saved with the model)."},
    )


@dataclass(kw_only=True)
class KDArguments:
    """The distillation weights shared by `distill` and `prune` (the fields of [`DistillationConfig`])."""

    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the logit KD terms."})
    task_weight: float = field(
        default=0.6, metadata={"help": "Weight of the student's own loss (ITC + ITM + MLM, or the task loss)."}
    )
    kd_weight: float = field(default=0.4, metadata={"help": "Weight of the sum of the weighted KD terms."})
    kd_term_weights: str | None = field(
        default=None,
        metadata={
            "help": "JSON (or a JSON file) overriding DistillationConfig fields, e.g. '{\"vision_hidden\": 0.1}' "
            "(terms: itm_logit, mlm_logit, task_logit, itc, text_attn, text_hidden, vision_attn, vision_hidden, "
            "fusion_attn, fusion_hidden, fusion_cross_attn; attention terms force the slower eager attention; "
            "other fields: vision_skip_last_hidden, text_skip_last_hidden, hidden_include_input, exclude_padding, "
            "mlm_logit_slots, head_mismatch, the layer mappings)."
        },
    )

    def distillation_config_values(self, **extra: Any) -> dict[str, Any]:
        """The `DistillationConfig.from_dict` values these flags give (`kd_term_weights` overrides `extra`)."""
        return {
            "kd_temperature": self.kd_temperature,
            "task_weight": self.task_weight,
            "kd_weight": self.kd_weight,
            **extra,
            **parse_json_option(self.kd_term_weights, "kd_term_weights"),
        }


@dataclass
class RuntimeArguments:
    """Options every command takes."""

    num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads of torch (torch.set_num_threads); default: torch's choice."}
    )


@dataclass
class RecipeArguments:
    """`--recipe` of the training commands (read before the other flags: it sets their defaults)."""

    recipe: str | None = field(
        default=None,
        metadata={
            "help": "A named recipe shipped with the package (`efficientvlm recipes` lists them: paper-vqa, "
            "small-cpu, ...) or a recipe JSON file: it fills the options it names; flags given here win. "
            "`--recipe list` lists the recipes."
        },
    )


def parse_arguments(command: str, dataclass_types: tuple, argv: list[str] | None, description: str) -> tuple:
    """Parses `argv` (default `sys.argv[1:]`), or the JSON file it names alone, into `dataclass_types` with the
    parser of `efficientvlm <command>` (so its usage line names the subcommand).

    Every command also takes `--num_threads` (applied here), and on a machine without CUDA the DataLoader does
    not pin memory (which only warns there). A command that runs in one process refuses a launch of several
    ([`check_single_process`]). The training commands take `--recipe`: its options become the
    parser's defaults, so a flag given on the command line overrides them; the names of the options a parsed
    dataclass took from the recipe are in [`recipe_fields`]."""
    import torch

    from trainers.saving import check_output_folder

    own_threads = any("num_threads" in {f.name for f in fields(kind)} for kind in dataclass_types)
    extra = () if own_threads else (RuntimeArguments,)
    takes_recipe = command in _recipe_commands()
    if takes_recipe:
        extra = (*extra, RecipeArguments)
    argv = sys.argv[1:] if argv is None else list(argv)
    check_single_process(command, argv)  # before any other error: the launch itself is wrong

    def build_parser() -> HfArgumentParser:
        return HfArgumentParser((*dataclass_types, *extra), prog=f"efficientvlm {command}", description=description)

    parser = build_parser()
    recipe_values: dict[str, Any] = {}
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = _parse_arguments_file(parser, argv[0])
        if takes_recipe and parsed[-1].recipe is not None:
            raise ValueError(
                f"{argv[0]}: 'recipe' is not applied in a JSON arguments file; give --recipe on the command line "
                "(with the other flags), or write the recipe's options into the file."
            )
    else:
        recipe = _recipe_flag(argv) if takes_recipe else None
        if recipe is not None:
            recipe_values = _apply_recipe(parser, command, recipe, argv, build_parser())
        parsed = parser.parse_args_into_dataclasses(args=argv)
    if takes_recipe:
        parsed = parsed[:-1]  # the RecipeArguments, applied above
    if not own_threads:
        runtime, parsed = parsed[-1], parsed[:-1]
        if runtime.num_threads is not None:
            if runtime.num_threads < 1:
                raise ValueError(f"--num_threads must be at least 1; got {runtime.num_threads}.")
            torch.set_num_threads(runtime.num_threads)
    for arguments in parsed:
        names = {f.name for f in fields(arguments)} if is_dataclass(arguments) else set()
        object.__setattr__(arguments, _RECIPE_FIELDS, frozenset(names & set(recipe_values)))
        for name in sorted(n for n in names if n.endswith("_name_or_path")):
            value = getattr(arguments, name)
            if isinstance(value, str):
                check_folder_or_hub_id(value, f"--{name}")
                if name.endswith("model_name_or_path"):  # not --processor_name_or_path: a processor has no config
                    check_model_folder(value, f"--{name}")
    for arguments in parsed:
        if isinstance(getattr(arguments, "output_dir", None), str):
            check_output_folder(arguments.output_dir)
        if isinstance(arguments, TrainingArguments):
            check_training_sizes(arguments)
            check_launched_processes(arguments)
            if not torch.cuda.is_available():
                arguments.dataloader_pin_memory = False
    return tuple(parsed)


def check_training_sizes(arguments: TrainingArguments) -> None:
    """Raises, naming the flag, for batch sizes or accumulation steps below 1 (0 reached torch's DataLoader, "batch_size
    should be a positive integer", or divided by zero) and when the run would train no step: `--max_steps 0`
    (Transformers reads it as unset and trained a stray step), or `--num_train_epochs` 0 or less without
    `--max_steps` (it saved the model untrained, as if trained)."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(arguments, name) < 1:
            raise ValueError(f"--{name} must be at least 1; got {getattr(arguments, name)}.")
    if arguments.max_steps == 0:
        raise ValueError(
            "--max_steps 0 trains no step: give a positive number of optimizer steps (or leave it unset, -1, to "
            "train --num_train_epochs)."
        )
    if arguments.max_steps < 0 and arguments.num_train_epochs <= 0:
        raise ValueError(
            f"--num_train_epochs {arguments.num_train_epochs:g} trains no step: give a positive number of epochs "
            "(fractions train part of one), or --max_steps."
        )


def launched_processes() -> int:
    """How many processes a launcher (torchrun, accelerate launch) started for this command: `WORLD_SIZE`, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


# The commands that join a launcher's processes (DDP through the Trainer); the others run in one.
MULTI_PROCESS_COMMANDS = ("pretrain", "finetune", "distill", "prune")


def check_single_process(command: str, argv: Sequence[str] = ()) -> None:
    """Raises when a launcher (torchrun, accelerate launch) started several processes for a command that runs in
    one: each would do the whole job and write the same files at the same time. `argv` asking for `--help` passes."""
    launched = launched_processes()
    if launched > 1 and command not in MULTI_PROCESS_COMMANDS and not {"-h", "--help"} & set(argv):
        raise ValueError(
            f"{command} runs in one process; it was launched as {launched} (WORLD_SIZE={launched}), each of which "
            "would do the whole job and write the same files: run it without torchrun / accelerate launch (only "
            f"{', '.join(MULTI_PROCESS_COMMANDS)} run in several)."
        )


def check_launched_processes(training_args: TrainingArguments) -> None:
    """Raises when a launcher started several processes (`WORLD_SIZE` > 1: torchrun, accelerate launch) but the
    Trainer would run each alone: on CPUs without `--use_cpu`, Transformers sets up no process group, and every
    process trains its own copy and writes the same output folder."""
    launched = launched_processes()
    if launched > 1 and training_args.world_size == 1:
        raise ValueError(
            f"Launched as {launched} processes (WORLD_SIZE={launched}), but each would train alone, all writing "
            f"{training_args.output_dir}: on CPUs add --use_cpu, which makes the Trainer join them (DDP over gloo)."
        )


def check_no_eval_split(command: str, training_args: TrainingArguments) -> None:
    """Raises, before any model is loaded, when `--eval_strategy` asks `command` (pre-training, general distillation:
    no `--eval_file`) to evaluate during training, which the Trainer would refuse only after loading."""
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if strategy != "no":
        raise ValueError(
            f"--eval_strategy {strategy}: {command} has no eval split to evaluate during training (only finetune and "
            "prune take --eval_file); leave --eval_strategy at no."
        )


_RECIPE_FIELDS = "_recipe_fields"


def _parse_arguments_file(parser: HfArgumentParser, path: str) -> tuple:
    """The dataclasses of a JSON arguments file (every flag a key; JSON-object options such as `config_overrides`
    as objects or strings), with errors that name the file."""
    values = read_json_file(path, path, "an arguments file: a JSON object of the command's options")
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of options; got a {type(values).__name__}.")
    # As a command line, so that every value is converted and checked as a flag's would be.
    actions = {action.dest: action for action in parser._actions}
    argv = []
    for key, value in values.items():
        if key not in actions or key == "help":
            raise ValueError(f"{path}: unknown key {key!r}: the command has no --{key} option.")
        if value is not None:
            tokens = command_line_value(value, actions[key])
            argv += [f"--{key}", *([tokens] if isinstance(tokens, str) else tokens)]
    return parser.parse_args_into_dataclasses(args=argv)


def command_line_value(value: Any, action: Any) -> str | list[str]:
    """A JSON value (of an arguments file or a recipe) as the command line would give it to `action`: booleans as
    true / false, objects as JSON, lists as separate values for an option that takes several and comma-separated
    otherwise (`--sparsity_ladder 0.2,0.35`), anything else as its text."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list):
        if action.nargs in ("+", "*"):
            return [command_line_value(item, action) for item in value]
        return ",".join(str(item) for item in value)
    return str(value)


def check_folder_or_hub_id(value: str, flag: str) -> None:
    """Raises for a local path that does not exist, before Transformers reads it as a Hub id (and, offline, retries
    the Hub for half a minute before saying it cannot connect). An EfficientVLM checkpoint on the Hub is
    'namespace/name'; a path starts with '/', '.' or '~', has more than one '/', is a bare name, or starts with a
    folder that exists here ('runs/teacher' with a 'runs' folder)."""
    if os.path.exists(os.path.expanduser(value)):
        return
    parts = value.split("/")
    local = (
        value.startswith(("/", ".", "~"))
        or len(parts) != 2
        or (os.sep != "/" and os.sep in value)
        or os.path.isdir(parts[0])
    )
    if not local:
        return
    parent = os.path.dirname(os.path.expanduser(value)) or "."
    siblings = os.listdir(parent) if os.path.isdir(parent) else []
    close = difflib.get_close_matches(os.path.basename(value.rstrip("/")), siblings, n=3)
    names = ", ".join(repr(os.path.join(os.path.dirname(value), name)) for name in close)
    hint = f" Did you mean {names}?" if close else ""
    raise ValueError(
        f"{flag} {value!r}: no such folder here ({os.getcwd()}), and a Hub id has the form 'namespace/name'.{hint}"
    )


def check_model_folder(value: str, flag: str) -> None:
    """Raises for a local folder that holds no `config.json` (an empty or mistaken output folder, a folder of images
    or of weights alone), which Transformers reports by the first file it misses (a model type, the weights)."""
    path = os.path.expanduser(value)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"{flag} {value!r} holds no config.json, so it is not a saved model folder (what `save_pretrained` and "
            "the commands' --output_dir write: config.json, the weights and the processor's files)."
        )


def check_not_mask_checkpoint(value: str, flag: str) -> None:
    """Raises for a checkpoint of `efficientvlm prune` taken while it learned its masks (`masker.pt` beside the
    unpruned weights), which the commands that score, export or serve a model would take as the unpruned model."""
    from modeling_efficientvlm.loading_efficientvlm import mask_learning_checkpoint_message

    message = mask_learning_checkpoint_message(os.path.expanduser(value))
    if message is not None:
        raise ValueError(f"{flag} {message}")


def recipe_fields(arguments: Any) -> frozenset[str]:
    """The fields of a dataclass from [`parse_arguments`] whose value came from `--recipe` (not given as flags)."""
    return getattr(arguments, _RECIPE_FIELDS, frozenset())


def _recipe_commands() -> tuple[str, ...]:
    from trainers.recipes import RECIPE_COMMANDS

    return RECIPE_COMMANDS


def _recipe_flag(argv: list[str]) -> str | None:
    """The value of `--recipe` in `argv` (None without one); `--recipe list` prints the recipes and exits."""
    import argparse

    from trainers.recipes import describe_recipes

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe")
    known, _ = pre.parse_known_args(argv)
    if known.recipe == "list":
        print(describe_recipes())
        raise SystemExit(0)
    return known.recipe


def _apply_recipe(
    parser: HfArgumentParser, command: str, name: str, argv: list[str], probe: HfArgumentParser
) -> dict[str, Any]:
    """Sets the options recipe `name` gives `command` as the defaults of `parser` (so flags in `argv` win) and
    returns those the command line did not give. An option the command does not take is a `ValueError` naming
    the recipe file and the key."""
    import argparse

    from transformers.utils import logging

    from trainers.recipes import load_recipe

    recipe = load_recipe(name)
    values = recipe.arguments(command)
    actions = {action.dest: action for action in parser._actions}
    for key in values:
        if key not in actions or key in ("help", "recipe"):
            raise ValueError(
                f"Recipe {recipe.name!r} ({recipe.path}): unknown key {key!r}: `efficientvlm {command}` has no "
                f"--{key} option."
            )
    # As the command line gives them: argparse converts (and checks) a string default as it would the flag.
    values = {
        key: value if value is None or actions[key].nargs in ("+", "*") else command_line_value(value, actions[key])
        for key, value in values.items()
    }
    parser.set_defaults(**values)
    for key in values:
        actions[key].required = False
    # The flags given explicitly: parse once with every default suppressed (and nothing required), so only what
    # the command line says lands in the namespace.
    for action in probe._actions:
        action.default, action.required = argparse.SUPPRESS, False
    explicit = set(vars(probe.parse_known_args(argv)[0]))
    taken = {key: value for key, value in values.items() if key not in explicit}
    overridden = sorted(set(values) & explicit)
    logging.get_logger(__name__).warning(
        f"Recipe {recipe.name} ({recipe.path.name}): "
        + ", ".join(f"{key}={value}" for key, value in taken.items())
        + (f"; given on the command line instead: {', '.join(overridden)}" if overridden else "")
    )
    return taken


def parse_json_option(value: str | dict[str, Any] | None, name: str) -> dict[str, Any]:
    """The JSON object given inline or as a file to `--<name>` (an object already, from an arguments file or a
    recipe; {} when not given)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = Path(value).read_text(encoding="utf-8") if os.path.isfile(value) else value
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--{name} is neither valid JSON nor a JSON file: {error}") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"--{name} must be a JSON object; got {type(parsed).__name__}.")
    return parsed


def model_options(model_args: ModelArguments) -> dict[str, Any]:
    """`ModelArguments` as the keyword arguments of `trainers.training.build_task_model`. `--config_overrides`
    shapes a `--preset`; on a saved model it may set how the model trains (`TRAINING_CONFIG_FIELDS`, checked when
    the model is built), and of a recipe's overrides only those apply (not a preset's shape)."""
    from trainers.training import TRAINING_CONFIG_FIELDS

    overrides = parse_json_option(model_args.config_overrides, "config_overrides")
    if overrides and model_args.model_name_or_path is not None and "config_overrides" in recipe_fields(model_args):
        overrides = {key: value for key, value in overrides.items() if key in TRAINING_CONFIG_FIELDS}
    return {
        "model_name_or_path": model_args.model_name_or_path,
        "preset": model_args.preset,
        "config_overrides": overrides,
    }


def processor_options(model_args: ModelArguments, data_args: DataArguments) -> dict[str, Any]:
    """The keyword arguments of `trainers.training.load_processor` (after the config)."""
    return {
        "processor_name_or_path": model_args.processor_name_or_path or model_args.model_name_or_path,
        "vocab_file": model_args.vocab_file,
        "max_text_length": data_args.max_text_length,
    }


def train_task(
    task: str,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    teacher_model_name_or_path: str | None = None,
    distillation: KDArguments | None = None,
) -> dict[str, float]:
    """`trainers.training.train_task_model` with the command's arguments (task distillation from
    `teacher_model_name_or_path` with the `distillation` weights); prints the metrics, if any."""
    from trainers.training import train_task_model

    distillation_config = None
    if teacher_model_name_or_path is None and distillation is not None:
        given = [
            f"--{f.name}"
            for f in fields(KDArguments)
            if getattr(distillation, f.name) != f.default and f.name not in recipe_fields(distillation)
        ]
        if given:
            raise ValueError(f"{', '.join(given)} weigh(s) distillation terms: give --teacher_model_name_or_path too.")
    if teacher_model_name_or_path is not None and distillation is not None:
        from trainers.distillation import DistillationConfig

        distillation_config = DistillationConfig.from_dict(distillation.distillation_config_values())
    metrics = train_task_model(
        task,
        training_args,
        **model_options(model_args),
        processor_name_or_path=model_args.processor_name_or_path,
        vocab_file=model_args.vocab_file,
        **asdict(data_args),
        teacher_model_name_or_path=teacher_model_name_or_path,
        distillation_config=distillation_config,
    )
    if metrics:
        print(json.dumps(metrics, indent=2))
    return metrics
