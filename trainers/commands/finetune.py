"""`efficientvlm finetune --task vqa|nlvr2|retrieval|captioning`: fine-tune with the stock `transformers.Trainer`.

Starts from any saved EfficientVLM folder (a pre-training checkpoint initialises the task heads as X-VLM does)
or a preset; evaluates on `--eval_file` when given. Every `TrainingArguments` option works (`--help` lists them);
`main(["config.json"])` reads all arguments from a JSON file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from trainers.commands.common import DataArguments, ModelArguments, parse_arguments, train_task
from trainers.tasks import TASKS


@dataclass
class TaskArguments:
    task: str = field(metadata={"help": f"The downstream task: one of {TASKS[1:]}."})


def main(argv: list[str] | None = None) -> dict[str, float]:
    """`efficientvlm finetune`: parses `argv` (default: `sys.argv[1:]`), fine-tunes, saves and evaluates."""
    task_args, model_args, data_args, training_args = parse_arguments(
        "finetune",
        (TaskArguments, ModelArguments, DataArguments, TrainingArguments),
        argv,
        "Fine-tune an EfficientVLM model on a downstream task.",
    )
    if task_args.task not in TASKS[1:]:
        raise ValueError(f"--task must be one of {TASKS[1:]}, got {task_args.task!r}.")
    return train_task(task_args.task, model_args, data_args, training_args)


if __name__ == "__main__":
    main()
