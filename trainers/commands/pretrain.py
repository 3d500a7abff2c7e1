"""`efficientvlm pretrain`: ITC + ITM + MLM pre-training with the stock `transformers.Trainer`.

Starts from a preset (`--preset xvlm-base`, `efficientvlm-small`, `tiny`) or a saved model; every
`TrainingArguments` option works (`--help` lists them); `main(["config.json"])` reads all arguments from a JSON file.
"""

from __future__ import annotations

from transformers import TrainingArguments

from trainers.commands.common import (
    DataArguments,
    ModelArguments,
    check_no_eval_split,
    parse_arguments,
    train_task,
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """`efficientvlm pretrain`: parses `argv` (default: `sys.argv[1:]`), pre-trains and saves the model."""
    model_args, data_args, training_args = parse_arguments(
        "pretrain",
        (ModelArguments, DataArguments, TrainingArguments),
        argv,
        "Pre-train an EfficientVLM / X-VLM model: ITC, ITM, MLM.",
    )
    given = [flag for flag in ("eval_file", "answer_list") if getattr(data_args, flag)]
    if given:
        raise ValueError(
            f"pretrain evaluates nothing after training: --{' and --'.join(given)} would be ignored. Score the "
            "pre-trained model with `efficientvlm evaluate --task retrieval --eval_file ...` (zero-shot), or give "
            "the flags to finetune / prune."
        )
    check_no_eval_split("pretrain", training_args)
    return train_task("pretraining", model_args, data_args, training_args)


if __name__ == "__main__":
    main()
