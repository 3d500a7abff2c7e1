"""The task registry: one [`TaskSpec`] per task holds every fact about it (model, dataset, collator,
evaluation routine, primary metric, model-card facts, whether it is prunable, demo defaults, and what
distillation does with its model's outputs).

Every stage (`finetune`, `distill`, `prune`, `evaluate`, `demo`, the Trainers, model cards) reads these facts
from here, so a task behaves the same whichever stage runs it, and a new task is one new entry.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainers.evaluation.tasks import (
    EvaluationOptions,
    EvaluationResult,
    evaluate_captioning,
    evaluate_nlvr2,
    evaluate_retrieval,
    evaluate_vqa,
)

# --------------------------------------------------------------------------------------------------------------
# What a task distils (read by `trainers.distillation.objective.DistillationLoss`)
# --------------------------------------------------------------------------------------------------------------

LOGIT_TERMS = ("itm_logit", "mlm_logit", "task_logit")
# Rows of a logits tensor a `LogitKD` compares: all; the masked MLM positions (`mlm_labels != -100`); the rows
# whose label (`labels`, shaped like the logits without classes) is not -100; the rows whose next token's label
# is not -100 (causal LM logits: row t predicts label t + 1).
LOGIT_ROWS = ("all", "mlm_labels", "labels", "next_token_labels")
ENCODER_GROUPS = ("vision", "text", "fusion")
# The layer mappings an encoder pass can use (`multimodal`: the whole BERT stack, text then fusion layers).
MAPPING_STACKS = ("vision", "text", "fusion", "multimodal")
# Padding mask of an encoder pass: none (image patches); the text's `attention_mask`; or ITM pairs (positives,
# negative texts, negative images: 3 * batch rows, distilled as a positive and a negative term, as officially;
# a pass without such pairs uses the text mask when it fits).
ENCODER_MASKS = (None, "text", "itm_pairs")


def _check_choice(value: Any, choices: Sequence[Any], name: str) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}; got {value!r}.")


@dataclass(frozen=True)
class LogitKD:
    """Soft cross-entropy between the student's and the teacher's `field` logits, as the term `kd_<term>`."""

    field: str
    term: str
    rows: str = "all"

    def __post_init__(self) -> None:
        _check_choice(self.term, LOGIT_TERMS, "term")
        _check_choice(self.rows, LOGIT_ROWS, "rows")


@dataclass(frozen=True)
class EncoderKD:
    """Hidden-state and attention terms (`kd_<group>_hidden`, `kd_<group>_attn`, and `kd_fusion_cross_attn`
    in the fusion group) of the encoder pass in `field`, over the layer mapping of `stack`. `match_input`:
    whether the pass's input may be matched too (with `hidden_include_input`); off when another pass already
    matches it."""

    field: str
    group: str
    stack: str
    mask: str | None = None
    match_input: bool = True

    def __post_init__(self) -> None:
        _check_choice(self.group, ENCODER_GROUPS, "group")
        _check_choice(self.stack, MAPPING_STACKS, "stack")
        _check_choice(self.mask, ENCODER_MASKS, "mask")


@dataclass(frozen=True)
class KDSpec:
    """Every output field of a task model and what distillation does with it (see the module docstring)."""

    logits: tuple[LogitKD, ...] = ()
    similarity: str | None = None
    encoders: tuple[EncoderKD, ...] = ()
    not_distilled: tuple[str, ...] = ()

    @property
    def declared_fields(self) -> set[str]:
        distilled = [kd.field for kd in (*self.logits, *self.encoders)]
        return {*distilled, *([self.similarity] if self.similarity else []), *self.not_distilled}

    def check_outputs(self, outputs: Any) -> None:
        """Raises a `ValueError` naming every field of `outputs` (a `ModelOutput`) the spec does not declare."""
        if not isinstance(outputs, Mapping):
            return
        undeclared = sorted(set(outputs.keys()) - self.declared_fields)
        if undeclared:
            raise ValueError(
                f"{type(outputs).__name__} has field(s) {undeclared} that its task's KD spec does not declare; "
                "declare each in the task's `KDSpec` (trainers/tasks.py): as a KD term, or in `not_distilled`."
            )


@dataclass(frozen=True)
class DemoDefaults:
    """How `efficientvlm demo` runs a task: optimizer steps per stage, and whether a default run includes it."""

    finetune_steps: int
    student_finetune_steps: int
    prune_steps: int
    in_default_run: bool = True
    # The teacher's and the student's fine-tuning learning rates on this task (None: the demo recipe's shared one).
    teacher_learning_rate: float | None = None
    student_learning_rate: float | None = None
    # The learning rate of the pruned model's fixed-mask steps (None: the demo recipe's shared one).
    fixed_mask_learning_rate: float | None = None
    # How the task models train beyond the pre-trained config (`--config_overrides` of `efficientvlm finetune` /
    # `prune` on a saved model: `TRAINING_CONFIG_FIELDS` only), for the teacher, the student and its pruning.
    config_overrides: Mapping[str, Any] | None = None
    # Seconds of one of its training steps against one of VQA's (which pipeline runs longest, for its priority).
    relative_step_cost: float = 1.0


@dataclass(frozen=True)
class TaskSpec:
    """
    Everything the stages need to know about one task.

    Args:
        name: the task's name on the command line.
        model_class_name: its `PreTrainedModel` class in `modeling_efficientvlm` (resolved lazily).
        dataset_class_name, collator_class_name: its dataset and collator classes in `trainers.data`.
        evaluate: its evaluation routine (`trainers.evaluation.tasks`), or None (no evaluation).
        primary_metric, primary_metric_label: the metric key the demo and reports compare, and how to say it.
        auto_class: the `transformers` Auto class that loads a saved model (for model cards).
        pipeline_tag: the Hub pipeline tag of its model cards (the `transformers` pipeline that runs it), or None
            (NLVR2: no pipeline takes two images; pre-training: its forward takes image-text pairs, which no
            pipeline gives, and a saved folder names no class for the zero-shot pipeline's Auto class).
        card_description: what the model does, in a model card's words.
        prunable: whether `efficientvlm prune` accepts it.
        demo: its demo defaults, or None when the demo does not run it.
        kd: what distillation does with each field of its model's outputs ([`KDSpec`]).
        fresh_head: name prefixes of the parameters X-VLM initialises afresh for this task and trains at `lr_mult`
            times the learning rate (its models' `init_params`): what `config.head_learning_rate_multiplier`
            multiplies. Empty where the official model lists none (retrieval, VQA at base size, captioning).
    """

    name: str
    model_class_name: str
    dataset_class_name: str
    collator_class_name: str
    evaluate: Callable[..., EvaluationResult] | None
    primary_metric: str | None
    primary_metric_label: str | None
    auto_class: str
    pipeline_tag: str | None
    card_description: str
    prunable: bool
    kd: KDSpec
    demo: DemoDefaults | None = None
    fresh_head: tuple[str, ...] = ()

    @property
    def model_class(self) -> type:
        import modeling_efficientvlm

        return getattr(modeling_efficientvlm, self.model_class_name)

    @property
    def dataset_class(self) -> type:
        from trainers import data

        return getattr(data, self.dataset_class_name)

    @property
    def collator_class(self) -> type:
        from trainers import data

        return getattr(data, self.collator_class_name)


# -- what distillation reads from each task model's outputs -----------------------------------------------------
VISION_KD = EncoderKD("vision_output", group="vision", stack="vision")
TEXT_KD = EncoderKD("text_output", group="text", stack="text", mask="text")
# Fields that are never distilled: the losses, ITM labels and sampled negatives, the ITC embeddings and
# temperature (their similarities are).
MATCHING_FIELDS = (
    "loss_itc",
    "loss_itm",
    "itm_labels",
    "negative_text_index",
    "negative_image_index",
    "image_embeds",
    "text_embeds",
    "itc_temperature",
)

PRETRAINING_KD = KDSpec(
    logits=(LogitKD("itm_logits", "itm_logit"), LogitKD("mlm_logits", "mlm_logit", rows="mlm_labels")),
    similarity="logits_per_image",
    encoders=(
        VISION_KD,
        TEXT_KD,
        # The ITM passes: positives and negatives, two terms each, as officially.
        EncoderKD("itm_fusion_output", group="fusion", stack="fusion", mask="itm_pairs"),
        # The MLM pass: the text layers on the masked text, then the fusion layers (whose input, the last
        # text state, the text pass already matches).
        EncoderKD("mlm_text_output", group="text", stack="text", mask="text"),
        EncoderKD("mlm_fusion_output", group="fusion", stack="fusion", mask="text", match_input=False),
    ),
    not_distilled=("loss", "loss_mlm", "loss_bbox", "loss_giou", *MATCHING_FIELDS),
)
RETRIEVAL_KD = KDSpec(
    logits=(LogitKD("itm_logits", "itm_logit"),),
    similarity="logits_per_image",
    encoders=(VISION_KD, TEXT_KD, EncoderKD("fusion_output", group="fusion", stack="fusion", mask="itm_pairs")),
    # `logits` are the ITM logits again: distilled once, as `itm_logits`; `logits_per_text` is the transpose of
    # `logits_per_image`, distilled as the similarity.
    not_distilled=("loss", "logits", "logits_per_text", *MATCHING_FIELDS),
)
# VQA and NLVR2 run text and fusion layers as one multimodal stack: officially its hidden states are split into the
# text layers' (embedding included) and the fusion layers' outputs, so the fusion layers' input, the last text
# state, is matched once (by TEXT_KD), not again here.
FUSION_KD = EncoderKD("fusion_output", group="fusion", stack="fusion", mask="text", match_input=False)
VQA_KD = KDSpec(
    # The answer decoder's logits on the given answers (all positions, as the official task KD).
    logits=(LogitKD("logits", "task_logit"),),
    encoders=(VISION_KD, TEXT_KD, FUSION_KD),
    # The answer decoder's states: its logits carry its KD.
    not_distilled=("loss", "decoder_output"),
)
NLVR2_KD = KDSpec(
    logits=(LogitKD("logits", "task_logit", rows="labels"),),
    # Twin fusion layers (one per image) map pair to pair.
    encoders=(VISION_KD, TEXT_KD, FUSION_KD),
    not_distilled=("loss",),
)
CAPTIONING_KD = KDSpec(
    logits=(LogitKD("logits", "task_logit", rows="next_token_labels"),),
    # Captioning runs the whole BERT stack (text, then fusion layers) causally as its `text_output`.
    encoders=(VISION_KD, EncoderKD("text_output", group="text", stack="multimodal", mask="text")),
    not_distilled=("loss",),
)

# -- the registry (order: pre-training, then the downstream tasks in the demo's order) ----------------------------
TASK_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="pretraining",
            model_class_name="EfficientVLMForPreTraining",
            dataset_class_name="PretrainingDataset",
            collator_class_name="PretrainingCollator",
            evaluate=None,
            primary_metric=None,
            primary_metric_label=None,
            auto_class="AutoModelForPreTraining",
            # None: `image-feature-extraction` calls forward with the image alone (it needs the texts too).
            pipeline_tag=None,
            card_description="vision-language pre-training: image-text contrast (ITC), matching (ITM) and masked "
            "language modelling (MLM)",
            prunable=False,
            kd=PRETRAINING_KD,
            # X-VLM's pre-training model: the ITC projections and temperature, the ITM and box heads.
            fresh_head=(
                "efficientvlm.vision_proj.",
                "efficientvlm.text_proj.",
                "efficientvlm.temp",
                "itm_head.",
                "bbox_head.",
            ),
        ),
        TaskSpec(
            name="vqa",
            model_class_name="EfficientVLMForQuestionAnswering",
            dataset_class_name="VQADataset",
            collator_class_name="VQACollator",
            evaluate=evaluate_vqa,
            primary_metric="vqa_accuracy",
            primary_metric_label="VQA accuracy",
            auto_class="AutoModelForVisualQuestionAnswering",
            pipeline_tag="image-text-to-text",
            card_description="visual question answering: an answer decoder ranks the candidate answers",
            prunable=True,
            kd=VQA_KD,
            # The teacher 2000 steps at 3e-4, where it levels off (from one default run's pre-trained teacher, text
            # dropout off, seed 0, 1 thread: 1500 steps 0.831, 2000 0.845, 2500 0.840; 1500 at 5e-4 0.805; its
            # student, 1000 steps with KD, 0.841 / 0.860 from the 1500 / 2000-step teacher: ahead of it either way).
            # Its fixed-mask steps at 2e-4: at the shared 5e-4 the re-warmed rate undid part of what mask learning had
            # reached (seed 0: 0.710 right after masking, 0.693 after the fixed-mask steps, 0.704 at 2e-4; seed 1:
            # 0.697, 0.706, 0.704; over seeds 0-2, 0.705 -> 0.700 at 5e-4; with another run's models at 2e-4, 0.698 ->
            # 0.700: within the spread of a VQA score either way). Retrieval's pruned model gained from the shared
            # rate (r_mean 0.778 -> 0.790; 0.781 at 2e-4), NLVR2's alike (0.998 / 0.997).
            # The student 1000 steps at 5e-4, where it levels off (with vision output positions, from one default run's
            # distilled student and VQA teacher 0.744, seed 0, 2 threads: 500 steps 0.712, 750 0.726, 1000 0.743, 1250
            # 0.738; 1000 at 3e-4 0.738; pruned from the 750 / 1000-step students 0.729 / 0.741): at 500 it was still
            # far from trained, which made distillation look costly.
            demo=DemoDefaults(
                finetune_steps=2000,
                student_finetune_steps=1000,
                prune_steps=450,
                teacher_learning_rate=3e-4,
                fixed_mask_learning_rate=2e-4,
            ),
        ),
        TaskSpec(
            name="retrieval",
            model_class_name="EfficientVLMForImageTextRetrieval",
            dataset_class_name="ImageTextDataset",
            collator_class_name="ImageTextCollator",
            evaluate=evaluate_retrieval,
            primary_metric="r_mean",
            primary_metric_label="mean recall (text and image retrieval, R@1/5/10)",
            auto_class="AutoModelForZeroShotImageClassification",
            pipeline_tag="zero-shot-image-classification",
            card_description="image-text retrieval: contrastive candidates re-ranked by image-text matching",
            prunable=True,
            kd=RETRIEVAL_KD,
            # The teacher 750 steps at 5e-4, the student 500 at 2e-3. With 16-pixel patches (measured from one
            # pre-trained teacher, k = 128, r_mean re-ranked / ITC-only after 500 steps): 1e-3 0.641 / 0.706, 5e-4
            # 0.675 / 0.768, 2e-4 0.640 / 0.733; 750 steps at 5e-4 0.786 / 0.838: at 500 the teacher was still far
            # from trained (a student fine-tuned 500 steps reached it), which flattered the retained share (small-cpu
            # recipe notes).
            # Its student (250 steps, KD from that teacher): 5e-4 0.652 / 0.694, 1e-3 0.661 / 0.722, 2e-3 0.676 /
            # 0.728, 3e-3 0.676 / 0.706, 4e-3 0.676 / 0.686. It fine-tunes 500 steps: ranked by ITM log-odds, a
            # default run's teacher 0.822, its student at 250 steps 0.728 (89%), at 500 0.796 (97%).
            demo=DemoDefaults(
                finetune_steps=750,
                student_finetune_steps=500,
                prune_steps=250,
                teacher_learning_rate=5e-4,
                student_learning_rate=2e-3,
                # Every image's ITM negative text is its caption negative (the same caption with one colour, shape,
                # cell or count changed; the corpus writes one per caption), its negative image still drawn by
                # ITC. One run's pre-trained teacher, 750 steps, 1 thread, r_mean re-ranked / ITC-only: 0.9067 /
                # 0.9072 without, 0.9072 / 0.9033 at 0.5, 0.9108 / 0.9072 at 1.0 (its student, 500 steps with KD:
                # 0.9022 at 0.5, 0.9008 at 1.0; 0.9078 without, ahead of its teacher). Re-ranking then improves on
                # ITC, and the teacher leads its student. A step costs 1.16x (the negatives' own text pass).
                config_overrides={"itm_caption_negatives": 1.0},
                # The teacher's steps, one default run: 0.515 s against VQA's 0.211 (ITC + ITM over three passes).
                relative_step_cost=2.4,
            ),
        ),
        TaskSpec(
            name="nlvr2",
            model_class_name="EfficientVLMForVisualReasoning",
            dataset_class_name="NLVR2Dataset",
            collator_class_name="NLVR2Collator",
            evaluate=evaluate_nlvr2,
            primary_metric="nlvr2_accuracy",
            primary_metric_label="NLVR2 accuracy",
            auto_class="AutoModelForSequenceClassification",
            pipeline_tag=None,
            card_description="visual reasoning (NLVR2): whether a sentence is true of a pair of images",
            prunable=True,
            kd=NLVR2_KD,
            fresh_head=("cls_head.",),  # EffXVLMForNLVR.init_params
            # On the demo corpus's "both images contain a <colour> shape" statements (trainers/demo/corpus.py). The
            # teacher 700 steps at 4e-4 (one default run's pre-trained teacher; teacher / student / pruned): 400 at
            # 2e-4 0.943 / 0.955 / 0.942, 700 at 2e-4 0.988 / 0.990 / 0.997, 700 at 4e-4 1.000 / 0.995 / 0.993; 400
            # steps at 4e-4 0.853 (too short a schedule for that rate).
            demo=DemoDefaults(
                finetune_steps=700,
                student_finetune_steps=200,
                prune_steps=240,
                teacher_learning_rate=4e-4,
                relative_step_cost=1.2,  # the teacher's steps, one default run: 0.259 s against VQA's 0.211
            ),
        ),
        TaskSpec(
            name="captioning",
            model_class_name="EfficientVLMForConditionalGeneration",
            dataset_class_name="ImageTextDataset",
            collator_class_name="CaptioningCollator",
            evaluate=evaluate_captioning,
            primary_metric="cider",
            primary_metric_label="CIDEr",
            auto_class="AutoModelForImageTextToText",
            pipeline_tag="image-text-to-text",
            card_description="image captioning",
            prunable=True,
            kd=CAPTIONING_KD,
        ),
    )
}

TASKS = tuple(TASK_SPECS)
PRUNABLE_TASKS = tuple(name for name, spec in TASK_SPECS.items() if spec.prunable)
DEMO_TASKS = tuple(name for name, spec in TASK_SPECS.items() if spec.demo is not None)
DEFAULT_DEMO_TASKS = tuple(name for name in DEMO_TASKS if TASK_SPECS[name].demo.in_default_run)


def task_spec(task: str) -> TaskSpec:
    """The [`TaskSpec`] of `task` (a `ValueError` naming the tasks for an unknown one)."""
    if task not in TASK_SPECS:
        raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
    return TASK_SPECS[task]


def task_of_model(model: Any) -> TaskSpec:
    """The [`TaskSpec`] whose model class `model` is (by class name, so remote-code classes match too)."""
    for cls in type(model).__mro__:
        for spec in TASK_SPECS.values():
            if spec.model_class_name == cls.__name__:
                return spec
    known = [spec.model_class_name for spec in TASK_SPECS.values()]
    raise ValueError(
        f"{type(model).__name__} is the model of no registered task (known: {known}); add a `TaskSpec` with its "
        "KD spec to trainers/tasks.py to distil it."
    )


def task_model_class(task: str) -> type:
    """The `PreTrainedModel` class of `task`."""
    return task_spec(task).model_class


def task_model_from(task: str, source: Any) -> Any:
    """A `task` model initialised from `source`: a model or a saved folder, of the same task or of another
    (typically a pre-training checkpoint), as X-VLM initialises its fine-tuning.

    Backbone weights always carry over; the pre-training MLM head initialises the captioning LM head and the
    VQA answer decoder's head; the VQA answer decoder starts from the fusion layers; both twins of every NLVR2
    fusion layer start from the single one; the ITM head carries over to retrieval; NLVR2's classifier starts
    fresh, as X-VLM's does.
    """
    model_class = task_model_class(task)
    if isinstance(source, (str, os.PathLike)):
        from modeling_efficientvlm import EfficientVLMConfig
        from modeling_efficientvlm.configuration_efficientvlm import has_twin_fusion_layers

        saved = EfficientVLMConfig.from_pretrained(source)
        if model_class.__name__ in (saved.architectures or []):
            return model_class.from_pretrained(source)
        if has_twin_fusion_layers(saved):
            raise ValueError(
                f"{source} is an NLVR2 checkpoint, whose fusion layers come in twins (one per image of a pair): a "
                f"{task} model cannot start from it. Start from a pre-training checkpoint or one of another task."
            )
        from transformers import AutoModelForPreTraining

        source = (
            AutoModelForPreTraining.from_pretrained(source)
            if "EfficientVLMForPreTraining" in (saved.architectures or [])
            else task_model_class("retrieval").from_pretrained(source)
        )
    if isinstance(source, model_class):
        return source
    if task == "nlvr2":
        return model_class.from_pretraining(source)
    # A config of its own: a setting changed on the task model (a task's ITM negatives) must not reach the source.
    model = model_class(copy.deepcopy(source.config))
    model.load_state_dict(source.state_dict(), strict=False)  # shared names: backbone, ITM head
    mlm_head = getattr(source, "mlm_head", None)
    if task == "captioning" and mlm_head is not None:
        model.lm_head.load_state_dict(mlm_head.state_dict())
    if task == "vqa":
        model.init_answer_decoder_from_fusion(mlm_head)
    model.tie_weights()
    return model


def load_task_teacher(task: str, name_or_path: str | os.PathLike) -> Any:
    """The `task` teacher saved at `name_or_path`, which must hold every weight of a `task` model: a teacher of
    another task (a retrieval folder for VQA) would distil its freshly initialised task head into the student."""
    return load_whole_task_model(
        task,
        name_or_path,
        "--teacher_model_name_or_path",
        f"which would teach freshly initialised: give a teacher fine-tuned for {task}.",
    )


def load_whole_task_model(task: str, name_or_path: str | os.PathLike, flag: str, refusal: str, **kwargs: Any) -> Any:
    """The `task` model saved at `name_or_path` (`from_pretrained` with `kwargs`), which must hold every one of its
    weights; otherwise a ValueError naming `flag`, the folder's own class and the missing weights, ending in
    `refusal` (what the fresh weights would do, what to give instead). What transformers logs while loading (its
    load report, a table of every missing key; a "checkpoint seem corrupted" line about the missing tied weights) is
    held back: dropped when this error replaces it, logged as usual otherwise."""
    from transformers.utils import logging

    held = _HeldRecords()
    logger = logging.get_logger("transformers.modeling_utils")
    logger.addFilter(held)
    try:
        model, loading = task_model_class(task).from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    finally:
        logger.removeFilter(held)
    if loading["missing_keys"]:
        from modeling_efficientvlm import EfficientVLMConfig

        saved_as = EfficientVLMConfig.from_pretrained(name_or_path).architectures or ["another model"]
        missing = sorted(loading["missing_keys"])
        raise ValueError(
            f"{flag} {name_or_path} is a checkpoint of {', '.join(saved_as)}, without the {task} weights "
            f"({len(missing)} missing, e.g. {', '.join(missing[:3])}), {refusal}"
        )
    for record in held.records:  # a complete model: what transformers said stands
        logger.handle(record)
    return model


class _HeldRecords:
    """A logging filter that keeps every record back, in `records`."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def filter(self, record: Any) -> bool:
        self.records.append(record)
        return False


def build_dataset(task: str, data: Any, image_root: str | os.PathLike | None, processor: Any = None):
    """The dataset of `task` over an X-VLM JSON file, a list of records or a `datasets.Dataset`."""
    return task_spec(task).dataset_class(data, image_root=image_root, processor=processor)


def build_collator(task: str, processor: Any, seed: int | None = None, **kwargs: Any):
    """The collator turning dataset items of `task` into model inputs. `seed` seeds a collator that draws its own
    randomness (pre-training's MLM masks); the other tasks' collators draw none and ignore it."""
    collator_class = task_spec(task).collator_class
    if seed is not None and "seed" in inspect.signature(collator_class).parameters:
        kwargs["seed"] = seed
    return collator_class(processor, **kwargs)


@torch.no_grad()
def evaluate_task(
    task: str,
    model: Any,
    dataset: Any,
    processor: Any,
    batch_size: int = 32,
    answer_list: list[str] | None = None,
    k: int = 128,
    structure_masks: dict | None = None,
    max_new_tokens: int = 20,
    caption_level_recall: bool = False,
    itm_score: str = "logit",
    xvlm_scoring: bool = False,
    num_beams: int = 1,
    min_new_tokens: int = 0,
) -> EvaluationResult:
    """Runs `task`'s evaluation routine (see `trainers.evaluation.tasks`) and returns its metrics (and
    per-example predictions); retrieval with `caption_level_recall` also reports recall with identical captions
    counted as one (keys ending in `_caption`); `itm_score` is what ranks retrieval's re-ranked candidates;
    `xvlm_scoring` scores VQA's answers as the official code does (see `rank_answers`); captions are decoded with
    `num_beams` beams (1: greedy) into `min_new_tokens` to `max_new_tokens` tokens after the prompt."""
    spec = task_spec(task)
    if spec.evaluate is None:
        raise ValueError(f"The {task} task has no evaluation routine here; evaluate a downstream task instead.")
    model.eval()
    if caption_level_recall and task != "retrieval":
        raise ValueError(f"Caption-level recall (--caption_level_recall) is a retrieval metric, not one of {task}.")
    from modeling_efficientvlm.modeling_efficientvlm_retrieval import check_itm_score

    check_itm_score(itm_score, "`itm_score` (--itm_score)", rerank=True)
    if xvlm_scoring and task != "vqa":
        raise ValueError(f"--xvlm_scoring scores VQA answers; the {task} task ranks none.")
    if num_beams < 1 or max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"Captions need num_beams >= 1 and 0 <= min_new_tokens <= max_new_tokens, max_new_tokens >= 1; got "
            f"num_beams={num_beams}, min_new_tokens={min_new_tokens}, max_new_tokens={max_new_tokens}."
        )
    options = EvaluationOptions(
        batch_size,
        answer_list,
        k,
        structure_masks,
        max_new_tokens,
        caption_level_recall,
        itm_score,
        xvlm_scoring,
        num_beams,
        min_new_tokens,
    )
    return spec.evaluate(model, dataset, processor, options)
