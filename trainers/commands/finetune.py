"""`efficientvlm finetune --task vqa|nlvr2|retrieval|captioning`: fine-tune with the stock `transformers.Trainer`.

Starts from any saved EfficientVLM folder (a pre-training checkpoint initialises the task heads as X-VLM does)
or a preset; evaluates on `--eval_file` when given. With `--teacher_model_name_or_path` (a fine-tuned teacher of
the same task) it fine-tunes with task distillation, as the paper's students are before pruning. Every
`TrainingArguments` option works (`--help` lists them); `main(["config.json"])` reads all arguments from a JSON
file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from trainers.commands.common import DataArguments, KDArguments, ModelArguments, parse_arguments, train_task
from trainers.tasks import TASKS


@dataclass
class TaskArguments(KDArguments):
    task: str = field(metadata={"help": f"The downstream task: one of {TASKS[1:]}."})
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A fine-tuned teacher of the same task: fine-tune with task distillation (the KD terms the task "
            "registry declares, weighted by --task_weight / --kd_weight / --kd_term_weights)."
        },
    )


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
    return train_task(
        task_args.task, model_args, data_args, training_args, task_args.teacher_model_name_or_path, task_args
    )


if __name__ == "__main__":
    main()
