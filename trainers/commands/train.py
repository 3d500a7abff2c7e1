"""`efficientvlm pretrain` and `efficientvlm finetune`: train a model with the stock `transformers.Trainer`.

Pre-training (ITC + ITM + MLM) starts from a preset (`--preset xvlm-base`, `efficientvlm-small`, `tiny`) or a
saved model; fine-tuning starts from any saved EfficientVLM folder (a pre-training checkpoint initialises the
task heads as X-VLM does). Every `TrainingArguments` option works (`--help` lists them).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, Trainer, TrainingArguments

from trainers.tasks import TASKS, build_collator, build_dataset, evaluate_task, save_with_processor, task_model_from


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
        metadata={"help": 'JSON of config fields for --preset, e.g. \'{"vision_config": {"image_size": 64}}\'.'},
    )
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Processor folder; defaults to --model_name_or_path."}
    )
    vocab_file: str | None = field(
        default=None, metadata={"help": "WordPiece vocab to build a processor when the model has none."}
    )


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "X-VLM JSON file of training records."})
    eval_file: str | None = field(default=None, metadata={"help": "X-VLM JSON file evaluated after training."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the records' image paths start from."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "A `datasets` folder (save_to_disk) instead of --train_file."}
    )
    answer_list: str | None = field(default=None, metadata={"help": "VQA: JSON list of candidate answers."})
    max_text_length: int | None = field(default=None, metadata={"help": "Token limit of texts (default: model's)."})


def parse_arguments(parser: HfArgumentParser, argv: list[str] | None) -> tuple:
    """Parses `argv` (default `sys.argv[1:]`), or the JSON file it names alone, into the parser's dataclasses."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def parse(argv: list[str] | None, description: str, extra: tuple = ()) -> tuple:
    parser = HfArgumentParser((*extra, ModelArguments, DataArguments, TrainingArguments), description=description)
    return parse_arguments(parser, argv)


def load_processor(model_args: ModelArguments, config: Any, max_text_length: int | None = None):
    """The processor saved with the model, or one built from `--vocab_file` for the model's image size."""
    from transformers import BertTokenizer

    from modeling_efficientvlm import EfficientVLMImageProcessor, EfficientVLMProcessor

    location = model_args.processor_name_or_path or model_args.model_name_or_path
    if model_args.vocab_file is None:
        if location is None:
            raise ValueError("No processor: give --processor_name_or_path or --vocab_file.")
        processor = EfficientVLMProcessor.from_pretrained(location)
    else:
        size = config.vision_config.image_size
        processor = EfficientVLMProcessor(
            EfficientVLMImageProcessor(size={"height": size, "width": size}),
            BertTokenizer(vocab=str(model_args.vocab_file), do_lower_case=True),
            max_length=max_text_length or config.max_text_length,
        )
    if max_text_length is not None:
        processor.max_length = max_text_length
    return processor


def build_model(task: str, model_args: ModelArguments) -> Any:
    """A `task` model from a saved folder or from a preset."""
    from modeling_efficientvlm import EfficientVLMConfig
    from trainers.tasks import task_model_class

    if (model_args.model_name_or_path is None) == (model_args.preset is None):
        raise ValueError("Give exactly one of --model_name_or_path and --preset.")
    if model_args.preset is not None:
        overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
        return task_model_class(task)(EfficientVLMConfig.from_preset(model_args.preset, **overrides))
    return task_model_from(task, model_args.model_name_or_path)


def load_data(task: str, data_args: DataArguments, processor: Any, split: str = "train"):
    if data_args.dataset_path is not None:
        import datasets

        data = datasets.load_from_disk(data_args.dataset_path)
        data = data[split] if isinstance(data, datasets.DatasetDict) else data
    else:
        data = data_args.train_file if split == "train" else data_args.eval_file
        if data is None:
            raise ValueError(f"Give --{split}_file (or --dataset_path) for the {task} data.")
    return build_dataset(task, data, data_args.image_root, processor)


def train(
    task: str,
    model: Any,
    processor: Any,
    train_dataset: Any,
    training_args: TrainingArguments,
    trainer_class: type[Trainer] = Trainer,
    **trainer_kwargs: Any,
) -> Trainer:
    """Trains `model` on `train_dataset` with the task's collator; our datasets yield raw items, so columns
    are never dropped."""
    training_args.remove_unused_columns = False
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=build_collator(task, processor),
        **trainer_kwargs,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return trainer


def run(
    task: str, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> dict[str, float]:
    """Builds, trains and saves a `task` model (with its processor); evaluates it when `--eval_file` is given."""
    model = build_model(task, model_args)
    processor = load_processor(model_args, model.config, data_args.max_text_length)
    train(task, model, processor, load_data(task, data_args, processor), training_args)
    save_with_processor(model, processor, training_args.output_dir)
    metrics: dict[str, float] = {}
    if data_args.eval_file is not None and task != "pretraining":
        answer_list = json.loads(Path(data_args.answer_list).read_text()) if data_args.answer_list else None
        result = evaluate_task(
            task, model, load_data(task, data_args, processor, "eval"), processor, answer_list=answer_list
        )
        metrics = result.metrics
        Path(training_args.output_dir, "eval_results.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))
    return metrics


@dataclass
class TaskArguments:
    task: str = field(metadata={"help": f"The downstream task: one of {TASKS[1:]}."})


def pretrain_main(argv: list[str] | None = None) -> dict[str, float]:
    """`efficientvlm pretrain`: ITC + ITM + MLM on image-text pairs."""
    model_args, data_args, training_args = parse(argv, "Pre-train an EfficientVLM / X-VLM model: ITC, ITM, MLM.")
    return run("pretraining", model_args, data_args, training_args)


def finetune_main(argv: list[str] | None = None) -> dict[str, float]:
    """`efficientvlm finetune --task vqa|nlvr2|retrieval|captioning ...`."""
    task_args, model_args, data_args, training_args = parse(
        argv, "Fine-tune an EfficientVLM model on a downstream task.", extra=(TaskArguments,)
    )
    if task_args.task not in TASKS[1:]:
        raise ValueError(f"--task must be one of {TASKS[1:]}, got {task_args.task!r}.")
    return run(task_args.task, model_args, data_args, training_args)


if __name__ == "__main__":
    finetune_main(sys.argv[1:])
