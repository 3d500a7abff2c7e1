"""
`efficientvlm prune`: modal-adaptive pruning of a task model with task distillation, then physical pruning.

    efficientvlm prune --task vqa --model_name_or_path student_vqa --teacher_model_name_or_path teacher_vqa \
        --train_file vqa_train.json --image_root images --target_sparsity 0.35 --mask_learning_rate 0.01 \
        --output_dir pruned_vqa --num_train_epochs 20 --learning_rate 5e-5

The student is fine-tuned on its task (0.6 x task loss + 0.4 x KD from the teacher; without a teacher, the
task loss alone) while hard-concrete masks over the heads and FFN neurons of every modality learn which
structures to drop under one global target sparsity (warmed up over `--sparsity_warmup_steps`, default one
epoch); for VQA, `--prune_decoder` masks the answer decoder too (the official VQA pruning), reported as the
`decoder` modality. The output folder holds the physically pruned model (`save_pretrained`), its processor,
`pruning_report.json` and a model card; `--push_to_hub` (`--hub_model_id`) uploads these files and nothing else
of the output folder. Any `TrainingArguments` option works (`--resume_from_checkpoint` resumes masks too);
`main(["config.json"])` reads all arguments from a JSON file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import TrainingArguments, set_seed
from transformers.utils import logging

from trainers.commands.common import (
    DataArguments,
    KDArguments,
    ModelArguments,
    model_options,
    parse_arguments,
    parse_json_option,
    processor_options,
    recipe_fields,
)
from trainers.tasks import PRUNABLE_TASKS

logger = logging.get_logger(__name__)


@dataclass
class PruneArguments(KDArguments):
    """Task, teacher, sparsity targets and distillation weights of `efficientvlm prune`."""

    task: str = field(metadata={"help": f"The downstream task: one of {PRUNABLE_TASKS}."})
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Task-fine-tuned teacher for distillation (a saved folder); none: the task loss alone."},
    )
    target_sparsity: float | None = field(
        default=None,
        metadata={"help": "Fraction of the prunable parameters (heads + FFN neurons of all modalities) to remove."},
    )
    sparsity_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Steps over which the target grows from 0 (default: one epoch; with --sparsity_ladder, half of "
            "each rung's share of the steps)."
        },
    )
    sparsity_warmup_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Or the fraction of the training steps over which the target grows from 0 (e.g. 0.3); with "
            "--sparsity_ladder, of each rung's share of the steps."
        },
    )
    target_sparsity_per_modality: str | None = field(
        default=None,
        metadata={"help": 'Optional extra targets as JSON (or a JSON file), e.g. \'{"vision": 0.5, "text": 0.3}\'.'},
    )
    mask_learning_rate: float = field(default=0.01, metadata={"help": "Learning rate of the mask log-alphas."})
    lagrangian_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the Lagrange multipliers (default: --mask_learning_rate)."}
    )
    droprate_init: float = field(default=0.5, metadata={"help": "Initial drop probability of FFN neurons."})
    binary_masks: bool = field(
        default=False,
        metadata={"help": "Keep surviving units at weight 1 instead of folding their mask score into the weights."},
    )
    mask_freeze_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the steps, at the end, with the masks fixed: the model trains with the exact masks "
            "it is pruned with (the official VQA recipe fixes them for the last half). 0: masks learn to the end."
        },
    )
    sparsity_ladder: str | None = field(
        default=None,
        metadata={
            "help": "Several targets in one run, e.g. 0.2,0.35,0.5 (increasing, each in (0, 1); not with "
            "--target_sparsity): a pruned model is saved in OUTPUT/rung_0.20/ ... as each rung settles, with a "
            "table (ladder.md, ladder.json) and a plot (ladder.png) of metric vs speedup."
        },
    )
    ladder_tolerance: float = field(
        default=0.01, metadata={"help": "A rung has settled when the expected sparsity is this close to it ..."}
    )
    ladder_patience: int = field(
        default=3, metadata={"help": "... for this many consecutive optimizer steps (after its warm-up)."}
    )
    prune_pad_multiple: int | None = field(
        default=None,
        metadata={
            "help": "Physical pruning rounds each pruned FFN's width up to a multiple of this with all-zero neurons "
            "(same outputs; CPU matmuls are faster at such widths; listed in pruning_report.json under `padding`). "
            "Default: `trainers.pruning.padding.PAD_TO_MULTIPLE_OF` (8); 1: no padding."
        },
    )
    prune_decoder: bool = field(
        default=False,
        metadata={
            "help": "VQA: also prune the answer decoder's heads and FFN neurons (reported as the 'decoder' modality; "
            "its parameters count in --target_sparsity), as the official VQA pruning does."
        },
    )
    snap_to_target: bool = field(
        default=False,
        metadata={
            "help": "When the masks are fixed, bring their sparsity to --target_sparsity by one common shift of every "
            "log-alpha (the learned ranking stays; pruning_report.json: `snap_to_target`). For runs too short for the "
            "multipliers to settle on the target."
        },
    )


def pruning_config_from(args: PruneArguments):
    """The [`PruningConfig`] the arguments describe (raises a ValueError for bad targets)."""
    from trainers.pruning import PruningConfig

    return PruningConfig(
        target_sparsity=args.target_sparsity,
        sparsity_warmup_steps=args.sparsity_warmup_steps,
        sparsity_warmup_fraction=args.sparsity_warmup_fraction,
        target_sparsity_per_modality=parse_json_option(
            args.target_sparsity_per_modality, "target_sparsity_per_modality"
        )
        or None,
        mask_learning_rate=args.mask_learning_rate,
        lagrangian_learning_rate=args.lagrangian_learning_rate,
        droprate_init=args.droprate_init,
        binary_masks=args.binary_masks,
        mask_freeze_fraction=args.mask_freeze_fraction,
        prune_decoder=args.prune_decoder,
        snap_to_target=args.snap_to_target,
        sparsity_ladder=args.sparsity_ladder,
        ladder_tolerance=args.ladder_tolerance,
        ladder_patience=args.ladder_patience,
        **({} if args.prune_pad_multiple is None else {"pad_to_multiple_of": args.prune_pad_multiple}),
    )


def distillation_config_from(args: PruneArguments):
    """The [`DistillationConfig`] of the task-distillation terms, or None without a teacher."""
    from trainers.distillation.objective import DistillationConfig

    if args.teacher_model_name_or_path is None:
        # A recipe's KD weights simply go unused without a teacher; a flag given for nothing is a mistake.
        if args.kd_term_weights is not None and "kd_term_weights" not in recipe_fields(args):
            raise ValueError("--kd_term_weights needs a --teacher_model_name_or_path to distil from.")
        return None
    return DistillationConfig.from_dict(args.distillation_config_values())


def run(
    prune_args: PruneArguments, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> dict:
    """Prunes the student, evaluates it on `--eval_file` (when given) and saves the pruned model as a complete
    folder (weights, processor, `pruning_report.json`, model card; pushed with `--push_to_hub`); returns the
    report (with the evaluation metrics under `eval`)."""
    from trainers.model_card import ModelCardInfo, local_name
    from trainers.pruning import ModalAdaptivePruningTrainer
    from trainers.saving import hub_target_from
    from trainers.sharding import whole_weights_on_load
    from trainers.tasks import load_task_teacher
    from trainers.training import (
        build_model_and_processor,
        data_names,
        evaluate_and_save,
        save_evaluate_and_publish,
        task_inputs,
        train,
    )

    if prune_args.task not in PRUNABLE_TASKS:
        raise ValueError(f"--task must be one of {PRUNABLE_TASKS}; got {prune_args.task!r}.")
    # Argument errors first, before any model is loaded.
    if prune_args.sparsity_ladder is not None:
        # A recipe's single target and fixed-mask second half give way to the ladder given as a flag.
        from_recipe = recipe_fields(prune_args)
        if "target_sparsity" in from_recipe:
            prune_args.target_sparsity = None
        if "mask_freeze_fraction" in from_recipe:
            prune_args.mask_freeze_fraction = 0.0
    if prune_args.sparsity_ladder is not None and prune_args.target_sparsity is not None:
        raise ValueError(
            "--sparsity_ladder and --target_sparsity conflict: the ladder's rungs are the targets; give one."
        )
    try:
        pruning_config = pruning_config_from(prune_args)
    except ValueError as error:
        if prune_args.sparsity_ladder is not None and "sparsity_ladder" in str(error):
            raise ValueError(f"--sparsity_ladder {prune_args.sparsity_ladder!r}: {error}") from error
        if "pad_to_multiple_of" in str(error):
            raise ValueError(f"--prune_pad_multiple {prune_args.prune_pad_multiple!r}: {error}") from error
        raise
    distillation_config = distillation_config_from(prune_args)
    hub = hub_target_from(training_args)  # the Trainer never pushes: only the pruned folder goes up
    if hub is not None and pruning_config.sparsity_ladder is not None:
        raise ValueError(
            "--sparsity_ladder writes one folder per rung; --push_to_hub pushes one folder: push a rung's folder."
        )
    set_seed(training_args.seed)

    task = prune_args.task
    with whole_weights_on_load(training_args):  # under ZeRO-3 too; the engine partitions the student later
        model, processor = build_model_and_processor(
            task, **model_options(model_args), **processor_options(model_args, data_args)
        )
        teacher = None
        if prune_args.teacher_model_name_or_path is not None:
            teacher = load_task_teacher(task, prune_args.teacher_model_name_or_path)
    train_dataset, eval_dataset, answers = task_inputs(
        task, model, processor, data_args.train_file, data_args.eval_file, data_args.image_root,
        data_args.dataset_path, data_args.answer_list,
    )  # fmt: skip

    def card_for(metrics: dict) -> ModelCardInfo:
        return ModelCardInfo(
            task=task,
            stage="prune",
            base_model=local_name(model_args.model_name_or_path),
            teacher_model=local_name(prune_args.teacher_model_name_or_path),
            datasets=data_names(data_args.dataset_path or data_args.train_file),
            metrics=metrics,
            eval_dataset=data_names(data_args.eval_file)[0] if metrics else None,
        )

    ladder_kwargs = {}
    if pruning_config.sparsity_ladder is not None:
        from trainers.pruning import LadderOutputs

        def evaluate_rung(pruned_copy, rung_dir: str) -> dict:
            # The pruned copy that is saved is the model evaluated; the first process evaluates it (unsharded).
            if eval_dataset is None or training_args.process_index != 0:
                return {}
            return evaluate_and_save(task, pruned_copy, processor, eval_dataset, rung_dir, answers)

        outputs = LadderOutputs(evaluate=evaluate_rung, card=card_for, processor=processor, answer_candidates=answers)
        ladder_kwargs["ladder_outputs"] = outputs
    trainer = train(
        task,
        model,
        processor,
        train_dataset,
        training_args,
        ModalAdaptivePruningTrainer,
        eval_dataset,
        processing_class=processor,
        teacher_model=teacher,
        distillation_config=distillation_config,
        pruning_config=pruning_config,
        **ladder_kwargs,
    )
    if pruning_config.sparsity_ladder is not None:
        return _ladder_results(trainer, task, training_args)
    report = trainer.finalize_pruning()  # every process: under FSDP / ZeRO-3 it gathers the weights into process 0
    pruned = trainer.pruned_model
    output_dir = training_args.output_dir if training_args.should_save else None
    metrics = save_evaluate_and_publish(
        task,
        pruned,
        processor,
        output_dir,
        card_for({}),
        eval_dataset,
        training_args,
        data_args.eval_file,
        answers=answers,
        pruning_report=report,
        push=hub,
    )
    if output_dir is not None:
        logger.warning(
            f"Pruned {task} model: sparsity {report['sparsity']:.4f} of the prunable parameters (per modality "
            f"{ {m: round(v, 4) for m, v in report['sparsity_per_modality'].items()} }), "
            f"{report['parameters_before']:,} -> {report['parameters_after']:,} parameters; saved to "
            f"{training_args.output_dir}."
        )
    if metrics:  # printed as finetune prints them (`train_task`)
        print(json.dumps(metrics, indent=2))
    return {**report, "eval": metrics} if metrics else report


def _ladder_results(trainer, task: str, training_args: TrainingArguments) -> dict:
    """After a `--sparsity_ladder` run: benchmarks the saved rungs against the unpruned student, writes the table
    (`ladder.md`, `ladder.json`) and plot (`ladder.png`) to the output folder and returns the rows."""
    from trainers.pruning.ladder import format_ladder_table, ladder_table, write_ladder_table
    from trainers.sharding import whole_model
    from trainers.tasks import task_spec

    rungs = trainer.ladder.rungs
    student = whole_model(trainer)  # every process: under FSDP / ZeRO-3 it gathers the weights into process 0
    if not training_args.should_save:
        return {"rungs": [rung.output_dir for rung in rungs]}
    rows = ladder_table(student, rungs, metric=task_spec(task).primary_metric)
    paths = write_ladder_table(rows, training_args.output_dir)
    logger.warning(f"Sparsity ladder of {len(rungs)} rungs:\n{format_ladder_table(rows)}Written to {paths['md']}.")
    return {"rows": rows, "table": str(paths["md"]), "json": str(paths["json"]), "plot": str(paths["png"])}


def main(argv: list[str] | None = None) -> dict:
    """`efficientvlm prune`: parses `argv` (default: `sys.argv[1:]`), prunes and saves; returns the report."""
    arguments = parse_arguments(
        "prune",
        (PruneArguments, ModelArguments, DataArguments, TrainingArguments),
        argv,
        "Modal-adaptive pruning (EfficientVLM, arXiv 2210.07795): fine-tune a student on its task with "
        "distillation from a task teacher while L0 masks over the attention heads and FFN neurons of the "
        "vision, text and fusion encoders learn, under one global target sparsity, which structures to "
        "remove; then remove them for real. The student is --model_name_or_path (or --preset).",
    )
    return run(*arguments)


if __name__ == "__main__":
    main()
