"""
General distillation: build a shallow student from a pre-trained teacher and train it on image-text pairs with
ITC + ITM + MLM plus knowledge distillation from the teacher, then save the student and the processor.

    efficientvlm distill --teacher_model_name_or_path TEACHER --train_file pairs.json --image_root IMAGES \
        --output_dir student --student_layers 6,3,3 --per_device_train_batch_size 32 --learning_rate 1e-4

The output folder holds the student, its processor and a model card; `--push_to_hub` (`--hub_model_id`) uploads
these files and nothing else of it. Any `TrainingArguments` option works (`--max_steps`, `--save_steps`,
`--resume_from_checkpoint`, `--bf16`, ...);
`main(["config.json"])` reads all arguments from a JSON file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments, set_seed
from transformers.utils import logging

from trainers.commands.common import KDArguments, check_no_eval_split, parse_arguments, parse_json_option
from trainers.evaluation.benchmarking import count_parameters

logger = logging.get_logger(__name__)


@dataclass
class DistillArguments(KDArguments):
    """Teacher, student shape, data and distillation weights of `efficientvlm distill`."""

    teacher_model_name_or_path: str = field(
        metadata={"help": "Folder (or Hub id) of the teacher, an EfficientVLMForPreTraining checkpoint."}
    )
    student_layers: str = field(
        default="6,3,3",
        metadata={"help": "Student depth as 'vision,text,fusion' layer counts (the paper's student: 6,3,3)."},
    )
    num_vision_layers: int | None = field(
        default=None, metadata={"help": "Student vision layers (overrides the first number of --student_layers)."}
    )
    num_text_layers: int | None = field(
        default=None, metadata={"help": "Student text layers (overrides the second number of --student_layers)."}
    )
    num_fusion_layers: int | None = field(
        default=None, metadata={"help": "Student fusion layers (overrides the third number of --student_layers)."}
    )
    layer_mapping: str | None = field(
        default=None,
        metadata={
            "help": "Teacher layer (0-based, within its stack) of each student layer, as JSON or a JSON file, e.g. "
            '\'{"vision": [1,3,5,7,9,11], "text": [1,3,5], "fusion": [1,3,5]}\'. Used to initialise the student and '
            "to pair layers in the KD losses. Default: the last layer of each block (2i+1 for a 2x shrink)."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "X-VLM image-text JSON: a list of {'image': path, 'caption': str or [str], 'image_id'?}."},
    )
    image_root: str | None = field(default=None, metadata={"help": "Folder the image paths of --train_file are in."})
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "A `datasets` dataset saved with save_to_disk, with 'image' and 'caption' (or 'text')."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` Hub dataset with 'image' and 'caption' (or 'text') columns."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset_name / --dataset_path."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Folder of the EfficientVLMProcessor (default: the teacher's folder)."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Longest text in tokens (default: the processor's max_length)."}
    )
    mlm_probability: float = field(default=0.25, metadata={"help": "Fraction of tokens masked for MLM."})
    max_masks: int = field(default=8, metadata={"help": "At most this many masked tokens per text."})
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "JSON of how the student trains (its config; the teacher's otherwise): the ITM negatives "
            "(itm_random_negatives, itm_exclude_identical_texts, itm_caption_negatives, itm_negatives_per_pair), "
            "itc_local_gradient, label_smoothing and head_learning_rate_multiplier, e.g. "
            "'{\"itc_local_gradient\": true}'."
        },
    )


def _parse_layers(args: DistillArguments) -> tuple[int, int, int]:
    value = args.student_layers
    parts = [p.strip() for p in value.replace(" ", ",").split(",") if p.strip()]
    try:
        layers = [int(p) for p in parts]
    except ValueError:
        layers = []
    if len(layers) != 3:
        raise ValueError(f"--student_layers must be three positive integers 'vision,text,fusion'; got {value!r}.")
    for position, name in enumerate(("num_vision_layers", "num_text_layers", "num_fusion_layers")):
        if getattr(args, name) is not None:
            layers[position] = getattr(args, name)
    if min(layers) < 1:
        raise ValueError(f"The student needs at least one layer per stack; got vision, text, fusion = {layers}.")
    return tuple(layers)


def _check_student_depths(
    layers: tuple[int, int, int], teacher_depths: dict[str, int], layer_mapping: dict, teacher: str
) -> None:
    """Raises, naming the stack and the flags, when the student is deeper than the teacher in a stack that has no
    explicit mapping (a default one maps each student layer onto a different teacher layer)."""
    for stack, depth in zip(("vision", "text", "fusion"), layers):
        if depth > teacher_depths[stack] and stack not in layer_mapping:
            raise ValueError(
                f"The student's {stack} stack has {depth} layers (--student_layers {','.join(map(str, layers))}; the "
                f"default is 6,3,3) but the teacher's ({teacher}) has {teacher_depths[stack]}: give --student_layers "
                f"with at most {teacher_depths[stack]} {stack} layers (the teacher has "
                f"{','.join(str(teacher_depths[s]) for s in ('vision', 'text', 'fusion'))}), or --layer_mapping "
                f"'{{\"{stack}\": [...]}}' naming a teacher layer for each of its {depth}."
            )


def _check_data_source(args: DistillArguments) -> None:
    sources = [name for name in ("train_file", "dataset_path", "dataset_name") if getattr(args, name)]
    if len(sources) != 1:
        raise ValueError(f"Give exactly one of --train_file, --dataset_path, --dataset_name (got {sources or 'none'}).")


def _train_dataset(args: DistillArguments, processor: Any) -> Any:
    import datasets
    from torch.utils.data import Subset

    from ..data import PretrainingDataset
    from ..training import check_training_images

    _check_data_source(args)
    if args.train_file:
        data: Any = args.train_file
    elif args.dataset_path:
        data = datasets.load_from_disk(args.dataset_path)
        if isinstance(data, datasets.DatasetDict):
            if args.dataset_split not in data:
                raise ValueError(f"{args.dataset_path} has no split {args.dataset_split!r} (splits: {list(data)}).")
            data = data[args.dataset_split]
    else:
        data = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split)
    dataset = PretrainingDataset(data, image_root=args.image_root, processor=processor, max_length=args.max_length)
    check_training_images(dataset)
    if args.max_train_samples is not None:
        dataset = Subset(dataset, range(min(args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("The training set is empty.")
    return dataset


def run(args: DistillArguments, training_args: TrainingArguments) -> None:
    """Builds the student, trains it with [`DistillationTrainer`] and saves it with the processor and a model
    card (pushed with `--push_to_hub`)."""
    from modeling_efficientvlm.configuration_efficientvlm import stack_depths
    from modeling_efficientvlm.modeling_efficientvlm import EfficientVLMForPreTraining
    from trainers.model_card import ModelCardInfo, local_name
    from trainers.optimization import head_learning_rate_optimizer
    from trainers.saving import hub_target_from, save_model_folder
    from trainers.sharding import whole_model, whole_weights_on_load
    from trainers.training import (
        check_image_size,
        check_text_limit,
        check_training_overrides,
        run_training,
        saved_processor,
    )

    from ..data import PretrainingCollator
    from ..distillation.objective import DistillationConfig
    from ..distillation.student_init import build_student
    from ..distillation.trainer import DistillationTrainer

    # Argument errors first, before any model is loaded.
    _check_data_source(args)
    check_no_eval_split("distill", training_args)
    layers = _parse_layers(args)
    layer_mapping = parse_json_option(args.layer_mapping, "layer_mapping")
    overrides = parse_json_option(args.config_overrides, "config_overrides")
    check_training_overrides(
        overrides,
        "the student, built from --teacher_model_name_or_path",
        "The student's shape is the teacher's with --student_layers' depths.",
    )
    distillation_config = DistillationConfig.from_dict(
        args.distillation_config_values(
            **{f"{stack}_layer_mapping": mapping for stack, mapping in layer_mapping.items()}
        )
    )
    # The collator gets raw items (PIL images, strings): Trainer must not drop their columns.
    training_args.remove_unused_columns = False
    hub = hub_target_from(training_args)  # the Trainer never pushes: only the student's folder goes up
    set_seed(training_args.seed)

    with whole_weights_on_load(training_args):  # the teacher is never partitioned (nor wrapped)
        teacher, loading = EfficientVLMForPreTraining.from_pretrained(
            args.teacher_model_name_or_path, output_loading_info=True
        )
    if loading["missing_keys"]:  # e.g. a retrieval checkpoint: no MLM head, whose logits KD would distil at random
        missing = sorted(loading["missing_keys"])
        raise ValueError(
            f"--teacher_model_name_or_path {args.teacher_model_name_or_path} lacks {len(missing)} parameter(s) of a "
            f"pre-training model (e.g. {', '.join(missing[:3])}), which would teach freshly initialised: give a "
            "pre-training checkpoint (`efficientvlm pretrain`'s output, or a converted X-VLM one)."
        )
    flag = "--processor_name_or_path" if args.processor_name_or_path else "--teacher_model_name_or_path"
    processor = saved_processor(args.processor_name_or_path or args.teacher_model_name_or_path, flag)
    check_image_size(processor, teacher.config.vision_config.image_size)
    # The student keeps the teacher's position table.
    check_text_limit(
        processor, teacher.config.text_config.max_position_embeddings, length=args.max_length, flag="--max_length"
    )
    _check_student_depths(layers, stack_depths(teacher.config), layer_mapping, args.teacher_model_name_or_path)
    student = build_student(teacher, *layers, layer_mapping=layer_mapping or None)
    for name, value in overrides.items():  # how it trains, checked above
        setattr(student.config, name, value)
    teacher_size = count_parameters(teacher)
    student_size = count_parameters(student)
    logger.warning(
        f"Student {layers} has {student_size / 1e6:.2f}M parameters ({100 * student_size / teacher_size:.1f}% of the "
        f"teacher's {teacher_size / 1e6:.2f}M)."
    )

    dataset = _train_dataset(args, processor)
    collator = PretrainingCollator(
        processor,
        mlm_probability=args.mlm_probability,
        max_masks=args.max_masks,
        max_length=args.max_length,
        seed=training_args.seed,
    )
    head_optimizer = head_learning_rate_optimizer(training_args, student, "pretraining")
    trainer = DistillationTrainer(
        model=student,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        teacher_model=teacher,
        distillation_config=distillation_config,
        **({"optimizer_cls_and_kwargs": head_optimizer} if head_optimizer is not None else {}),
    )
    result = run_training(trainer)
    # Every process: under FSDP / ZeRO-3 this gathers the weights into process 0 (None in the others).
    student = whole_model(trainer)
    if training_args.should_save and student is not None:
        teacher_name = local_name(args.teacher_model_name_or_path)
        card = ModelCardInfo(
            task="pretraining",
            stage="distill",
            base_model=teacher_name,
            teacher_model=teacher_name,
            datasets=[args.dataset_name or Path(args.dataset_path or args.train_file).name],
        )
        save_model_folder(student, processor, training_args.output_dir, card, push=hub)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()


def main(argv: list[str] | None = None) -> None:
    """`efficientvlm distill`: parses `argv` (default: `sys.argv[1:]`) and runs general distillation."""
    distill_args, training_args = parse_arguments(
        "distill",
        (DistillArguments, TrainingArguments),
        argv,
        "General distillation (EfficientVLM, arXiv 2210.07795): initialise a student with fewer layers from "
        "the teacher's alternate layers and train it with 0.6 * (ITC + ITM + MLM) + 0.4 * KD (logits, "
        "hidden states and attention maps of every modality). Saves the student and the processor to "
        "--output_dir.",
    )
    run(distill_args, training_args)


if __name__ == "__main__":
    main()
