"""`efficientvlm demo`: the whole EfficientVLM method, end to end, on built-in data, on a CPU.

1. write the demo corpus (shapes in a grid; captions, VQA, NLVR2) in the X-VLM JSON + image-folder format;
2. pre-train a small X-VLM-style teacher (ITC + ITM + MLM);
3. distil a student of half the depth from the pre-trained teacher (general distillation);
4. per task, the tasks at once in processes of their own (`--jobs`): fine-tune the teacher on the task, fine-tune
   the student with task distillation from it, then prune the student with modal-adaptive pruning (L0 masks over
   heads and FFN neurons of every modality, one global target) and remove the pruned structures for real;
   evaluate teacher / student / pruned on the same held-out split;
5. benchmark them side by side;
6. write every model (hub-ready, with processor and model card), `report.md` and plots.

Every stage goes through the same code a user runs on real data (`trainers.tasks`, the Trainers).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from modeling_efficientvlm.modeling_efficientvlm_retrieval import check_itm_score
from trainers.demo.processes import can_fork, console, run_in_processes
from trainers.distillation import DistillationConfig, DistillationTrainer
from trainers.pruning.hard_concrete import random_structure_masks
from trainers.pruning.padding import PAD_TO_MULTIPLE_OF
from trainers.recipes import load_recipe
from trainers.saving import check_output_folder
from trainers.tasks import (
    DEFAULT_DEMO_TASKS,
    DEMO_TASKS,
    build_dataset,
    evaluate_task,
    task_spec,
)

# The k `efficientvlm evaluate` (and `evaluate_task`) re-ranks with by default; the demo never uses a smaller one.
EVALUATE_K: int = inspect.signature(evaluate_task).parameters["k"].default

# The demo's model, training and pruning settings are the `small-cpu` recipe's (`--recipe small-cpu` on the
# commands gives the same): one source of truth.
SMALL_CPU = load_recipe("small-cpu")
_TRAINING = SMALL_CPU.shared
_MODEL = SMALL_CPU.commands["pretrain"]["config_overrides"]
_PRUNING = SMALL_CPU.commands["prune"]
_STUDENT_LAYERS = tuple(int(n) for n in SMALL_CPU.commands["distill"]["student_layers"].split(","))

# What a task pipeline adds to its `DemoRun` (per task or per training run): a pipeline run in its own process
# returns these, and the parent merges them.
TASK_STATE = (
    "teachers",
    "students",
    "pruned",
    "pruning_reports",
    "metrics",
    "ablation_models",
    "ablation_results",
    "histories",
    "run_timings",
    "run_steps",
    "run_learning_rates",
)

# Names of the ablation rows (beside "pruned", the learned masks) in the report.
ABLATIONS = {"random": "pruned, random masks", "uniform": "pruned, uniform split"}


@dataclass
class DemoSettings:
    """Sizes and schedule of a demo run (the defaults fit in about 15 minutes on 2 CPU cores)."""

    num_train_images: int = 1500
    num_eval_images: int = 300
    image_size: int = _MODEL["vision_config"]["image_size"]
    # Four patches per grid cell: with one, shape barely survived the linear patch embedding (see the recipe notes).
    patch_size: int = _MODEL["vision_config"]["patch_size"]
    hidden_size: int = _MODEL["vision_config"]["hidden_size"]
    num_heads: int = _MODEL["vision_config"]["num_attention_heads"]
    intermediate_size: int = _MODEL["vision_config"]["intermediate_size"]
    teacher_layers: tuple[int, int, int] = (  # vision, text, fusion
        _MODEL["vision_config"]["num_hidden_layers"],
        _MODEL["text_config"]["num_hidden_layers"],
        _MODEL["text_config"]["num_fusion_layers"],
    )
    student_layers: tuple[int, int, int] = _STUDENT_LAYERS
    # From scratch, BERT's 0.02 leaves the [CLS] tokens and cross-attention nearly blind to the image, and
    # a small model settles on the answer prior of each question type before it learns to look.
    initializer_range: float = _MODEL["initializer_range"]
    # Dropout of the text and fusion layers (BERT's default: 0.1 on the hidden states after each block and on the
    # attention probabilities, which also keeps the CPU's attention off its fused kernel). Off in the recipe: two
    # default runs (seed 0) with 0.1 / 0.0, teacher / student / pruned: VQA 0.827 / 0.816 / 0.820 -> 0.831 / 0.841 /
    # 0.835, retrieval 0.911 / 0.901 / 0.907 -> 0.950 / 0.943 / 0.944 (the ITM head alone 0.903 -> 0.947, now above
    # ITC), NLVR2 1.000 / 0.985 / 0.987 -> 1.000 / 0.993 / 0.993; a retrieval teacher step 1.25x faster (1 thread).
    text_hidden_dropout: float = _MODEL["text_config"]["hidden_dropout_prob"]
    text_attention_dropout: float = _MODEL["text_config"]["attention_probs_dropout_prob"]
    # "normal": drawn with std initializer_range, the position embeddings are ~25x smaller than the patch embeddings
    # and do not grow in training; "sincos_2d" starts them near the patch embeddings' scale. Alone it lifted
    # retrieval a little and cost VQA and NLVR2 more; with the vision layers started as the identity
    # (`vision_zero_init_residual`, so the positions reach the output tokens) every teacher gained (the recipe's notes).
    position_embedding_init: str = _MODEL["vision_config"]["position_embedding_init"]
    vision_zero_init_residual: bool = _MODEL["vision_config"]["zero_init_residual"]
    # The position embeddings added to the vision output tokens again, so the fusion layers read where things are:
    # the vision layers let an object's content swamp its position (`EfficientVLMVisionConfig`).
    vision_output_positions: bool = _MODEL["vision_config"]["output_position_embeddings"]
    # Share of ITM negatives drawn at random rather than by ITC similarity: from scratch, hard negatives alone
    # leave the ITM head at the class prior (p = 1/3 for every pair), so ITM re-ranking ruins retrieval.
    itm_random_negatives: float = _MODEL["itm_random_negatives"]
    # Pre-training captions such as "a picture of two shapes" repeat across images: never ITM negatives of each
    # other's images (they are true of both).
    itm_exclude_identical_texts: bool = _MODEL["itm_exclude_identical_texts"]
    # Share of ITM negative texts that are the pair's caption negative (the corpus writes one per caption): off in
    # pre-training, so for every task but retrieval, whose models set 1.0 (`task_config_overrides`).
    # With 0.5 in every stage the VQA run's teacher / student / pruned fell from 0.825 / 0.831 / 0.832 to 0.764 /
    # 0.788 / 0.781, and its existence questions from 0.87 to 0.74 (one run each, seed 0, the same corpus).
    itm_caption_negatives: float = _MODEL.get("itm_caption_negatives", 0.0)
    batch_size: int = _TRAINING["per_device_train_batch_size"]
    learning_rate: float = _TRAINING["learning_rate"]
    # 600, not 300: with a backbone pre-trained 300 steps, whose ITM barely told an image's object from another,
    # the VQA teacher learnt no yes/no question ("is there a red square ?" answered from the image alone: right on
    # 54% of its own training questions); from a backbone that had matched images and texts longer (the retrieval
    # teacher's) it answered existence questions at 0.85 VQA accuracy held out (0.69 before).
    # One default run each, teacher / student / pruned: VQA 0.741 / 0.749 / 0.745 -> 0.762 / 0.741 / 0.757,
    # retrieval 0.891 / 0.891 / 0.888 -> 0.884 / 0.863 / 0.869, NLVR2 0.998 / 0.993 / 0.997 -> 0.997 / 0.988 / 0.992:
    # the teacher ahead of its student on every task in that run (VQA a tie in the next: 0.750 / 0.751), for ~70 s.
    pretrain_steps: int = 600
    finetune_steps: dict[str, int] | None = None
    distill_steps: int = 150
    student_finetune_steps: dict[str, int] | None = None
    prune_steps: dict[str, int] | None = None
    # Per task, the teacher's and the student's fine-tuning learning rates (default: the task registry's, else
    # `learning_rate`).
    teacher_learning_rates: dict[str, float] | None = None
    student_learning_rates: dict[str, float] | None = None
    prune_warmup_fraction: float = _PRUNING["sparsity_warmup_fraction"]
    target_sparsity: float = _PRUNING["target_sparsity"]
    mask_learning_rate: float = _PRUNING["mask_learning_rate"]
    # In 160-300 mask-learning steps the multipliers lag or overshoot the target by task: the masks are brought to
    # it when they are fixed (`PruningConfig.snap_to_target`), so every task and ablation row prunes alike.
    snap_to_target: bool = _PRUNING["snap_to_target"]
    # ITC candidates re-ranked by ITM per query: the same k as `efficientvlm evaluate` (X-VLM's 128).
    retrieval_k: int = EVALUATE_K
    # What ranks them: the ITM match log-odds plus the pair's ITC logit (`efficientvlm evaluate --itm_score
    # log_odds+itc`; the report gives each head alone too). X-VLM ranks by the raw match logit, which is half the
    # log-odds plus half a projection of the ITM head's hidden features that the ITM loss never trains
    # (`itm_match_score`): on one default run's retrieval teacher, r_mean 0.822 by log-odds, 0.781 by logit. The
    # demo's ITM head alone still ranks below ITC (it trains on one negative per pair, ITC on the whole batch); with
    # the ITC logit added, re-ranking improves on ITC: on one default run's models, teacher / student / pruned
    # 0.898 / 0.884 / 0.880 against ITC-only 0.893 / 0.877 / 0.877 and log-odds alone 0.876 / 0.866 / 0.857.
    retrieval_itm_score: str = "log_odds+itc"
    # Of each task's pruning steps, the share at the end in which the pruned model trains with its masks fixed
    # (a fresh schedule, as every ablation row gets): the masks learn in the steps before it.
    fixed_mask_fraction: float = 1 / 3
    # Per task, their learning rate (a fresh schedule; default: the task registry's, else `learning_rate`).
    fixed_mask_learning_rates: dict[str, float] | None = None
    # Per task, config fields of how its models train (the task registry's `config_overrides`; a saved model
    # takes only `TRAINING_CONFIG_FIELDS`), set on the teacher and the student fine-tuned on it.
    task_config_overrides: dict[str, dict[str, Any]] | None = None
    # Also prune the same student to the same sparsity with random masks and with a uniform split, each trained
    # for the same fixed-mask steps; repeated with `ablation_seeds` seeds of the pruning stage (the run's seed,
    # then the next ones), so the report gives the spread of the differences.
    ablations: bool = False
    ablation_seeds: int = 3
    # Global targets the ablations also run at, beside the run's own: the higher the sparsity, the more it matters
    # which structures survive (at 0.5 this small model recovers from almost any mask).
    ablation_sparsities: tuple[float, ...] = (0.8,)
    # `efficientvlm benchmark`'s defaults (trainers.benchmark.BenchmarkSettings): encoders at batch 32, 16 tokens.
    benchmark_batch_size: int = 32
    benchmark_repeats: int = 10

    def __post_init__(self) -> None:
        # Per-task step counts default to each task's demo defaults in the task registry.
        self.finetune_steps = self.finetune_steps or _demo_defaults("finetune_steps")
        self.student_finetune_steps = self.student_finetune_steps or _demo_defaults("student_finetune_steps")
        self.prune_steps = self.prune_steps or _demo_defaults("prune_steps")
        for field_name, default in (
            ("teacher_learning_rates", "teacher_learning_rate"),
            ("student_learning_rates", "student_learning_rate"),
            ("fixed_mask_learning_rates", "fixed_mask_learning_rate"),
        ):
            rates = {task: rate or self.learning_rate for task, rate in _demo_defaults(default).items()}
            setattr(self, field_name, getattr(self, field_name) or rates)
        if self.task_config_overrides is None:
            self.task_config_overrides = {t: dict(o or {}) for t, o in _demo_defaults("config_overrides").items()}
        from trainers.training import check_training_overrides

        for task, overrides in self.task_config_overrides.items():
            check_training_overrides(overrides, f"the demo's pre-trained models ({task})")
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"`target_sparsity` must be in [0, 1); got {self.target_sparsity}.")
        check_itm_score(self.retrieval_itm_score, "`retrieval_itm_score`", rerank=True)
        if not 0 <= self.fixed_mask_fraction < 1:
            raise ValueError(f"`fixed_mask_fraction` must be in [0, 1); got {self.fixed_mask_fraction}.")
        if self.ablation_seeds < 1:
            raise ValueError(f"`ablation_seeds` must be at least 1; got {self.ablation_seeds}.")
        for sparsity in self.ablation_sparsities:
            if not 0 < sparsity < 1:
                raise ValueError(f"Every one of `ablation_sparsities` must be in (0, 1); got {sparsity}.")

    @property
    def ablation_targets(self) -> tuple[float, ...]:
        """The global targets the ablations run at: the run's own first."""
        return tuple(dict.fromkeys((self.target_sparsity, *self.ablation_sparsities)))

    def pruning_schedule(self, task: str) -> tuple[int, int]:
        """(steps in which the masks learn, steps trained with the masks fixed) of `task`'s pruning steps."""
        steps = self.prune_steps[task]
        fixed = int(round(self.fixed_mask_fraction * steps))
        return steps - fixed, fixed

    @classmethod
    def quick(cls) -> DemoSettings:
        """A smoke run of about two minutes: tiny data and few steps (the metrics mean little)."""
        return cls(
            num_train_images=120,
            num_eval_images=40,
            hidden_size=64,
            intermediate_size=128,
            batch_size=16,
            pretrain_steps=6,
            finetune_steps=dict.fromkeys(DEMO_TASKS, 6),
            distill_steps=6,
            student_finetune_steps=dict.fromkeys(DEMO_TASKS, 6),
            prune_steps=dict.fromkeys(DEMO_TASKS, 10),
            benchmark_batch_size=8,
            benchmark_repeats=3,
            ablation_seeds=2,
        )


# Seconds per optimizer step of each kind relative to a teacher pre-training step (ITC + ITM + MLM), from a default
# run (2 cores, 2 threads: 0.267 s, 0.134 s, 0.227 s, 0.127 s): a distillation step also runs the teacher, a task
# step runs one model on one task's loss.
STEP_COST = {
    "pre-train teacher": 1.0,
    "distil student": 0.85,
    "fine-tune teacher": 0.5,
    "fine-tune + prune student": 0.47,
}
# The stage each kind of step runs in.
STAGE_OF_KIND = {
    "pre-train teacher": "pre-train teacher",
    "distil student": "distil student",
    "fine-tune teacher": "task pipelines",
    "fine-tune + prune student": "task pipelines",
}

# On 2 cores, a training step of the demo's models with 1 torch thread took 1.35x (VQA) to 1.5x (retrieval) the
# time of one with 2: small matrices leave the second thread little to do.
FEWER_THREADS_SLOWDOWN = 1.4


# The niceness of the task pipelines that do not keep a core of their own (`DemoRun.pipeline_niceness`): weight 335
# against 1024 in Linux's scheduler, so they take about a quarter of a core while the longest run beside them.
PIPELINE_NICENESS = 5


def pipelines_speedup(jobs: int, threads: int, cores: int) -> float:
    """About how many times faster the task pipelines run `jobs` at a time, 1 torch thread each, than one after
    another with `threads` (for the ETA)."""
    if jobs == 1:
        return 1.0
    return min(jobs, cores) / (FEWER_THREADS_SLOWDOWN if threads > 1 else 1.0)


def training_minutes_left(costs: dict[str, float], done: list[str], seconds: float) -> float | None:
    """Minutes the training stages of `costs` (each stage's steps weighted by [`STEP_COST`], divided by what running
    its parts at once gains) not in `done` should take, at the pace of the `done` ones (`seconds` in all): so the
    first estimate, after pre-training alone, does not take every later step for one as slow. None before any
    training or after the last stage."""
    done_cost = sum(costs[name] for name in done)
    left_cost = sum(cost for name, cost in costs.items() if name not in done)
    if not done_cost or not left_cost:
        return None
    return seconds / done_cost * left_cost / 60


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS tells it; else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_threads() -> int:
    """The demo's torch threads: every available core, at most 8 (its small matrices gain little from more)."""
    return max(1, min(available_cores(), 8))


def default_jobs(tasks: tuple[str, ...]) -> int:
    """Task pipelines run at once by default: every task where there are 2 cores or more and processes can fork."""
    return len(tasks) if available_cores() >= 2 and can_fork() else 1


def _demo_defaults(name: str) -> dict[str, Any]:
    """The `DemoDefaults` field `name` (steps of a stage, the teacher's learning rate) of every demo task."""
    return {task: getattr(task_spec(task).demo, name) for task in DEMO_TASKS}


def _say(message: str) -> None:
    print(f"[efficientvlm demo] {message}", file=console(), flush=True)


def teacher_config(settings: DemoSettings, vocab_size: int):
    from modeling_efficientvlm import EfficientVLMConfig

    vision_layers, text_layers, fusion_layers = settings.teacher_layers
    width = dict(
        hidden_size=settings.hidden_size,
        num_attention_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size,
    )
    return EfficientVLMConfig(
        vision_config=dict(
            **width,
            num_hidden_layers=vision_layers,
            image_size=settings.image_size,
            patch_size=settings.patch_size,
            initializer_range=settings.initializer_range,
            position_embedding_init=settings.position_embedding_init,
            zero_init_residual=settings.vision_zero_init_residual,
            output_position_embeddings=settings.vision_output_positions,
        ),
        text_config=dict(
            **width,
            vocab_size=vocab_size,
            num_hidden_layers=text_layers,
            num_fusion_layers=fusion_layers,
            max_position_embeddings=_MODEL["text_config"]["max_position_embeddings"],
            initializer_range=settings.initializer_range,
            # The fusion layers start as the identity: random ones wash the text out of the fused [CLS].
            fusion_zero_init_residual=_MODEL["text_config"]["fusion_zero_init_residual"],
            hidden_dropout_prob=settings.text_hidden_dropout,
            attention_probs_dropout_prob=settings.text_attention_dropout,
        ),
        embed_dim=_MODEL["embed_dim"],
        max_text_length=_MODEL["max_text_length"],
        initializer_range=settings.initializer_range,
        itm_random_negatives=settings.itm_random_negatives,
        itm_exclude_identical_texts=settings.itm_exclude_identical_texts,
        itm_caption_negatives=settings.itm_caption_negatives,
    )


def _training_args(output_dir: Path, settings: DemoSettings, steps: int, seed: int, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=_TRAINING["weight_decay"],
        warmup_steps=_TRAINING["warmup_steps"],
        lr_scheduler_type=_TRAINING["lr_scheduler_type"],
        max_steps=steps,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=_TRAINING["use_cpu"],
        dataloader_num_workers=_TRAINING["dataloader_num_workers"],
        seed=seed,
        disable_tqdm=False,
        remove_unused_columns=False,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _losses(trainer: Any) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry or "train_loss" in entry]


def machine_description() -> dict[str, Any]:
    """The CPU model, its core count and the torch thread count a run used (for the report)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def uniform_structure_masks(model: Any, log_alpha: dict[tuple[str, int], torch.Tensor], sparsity: float) -> dict:
    """0/1 masks cutting the same fraction `sparsity` of every kind of structure in every layer of every
    modality (the lowest mask scores `log_alpha[(key, layer)]` go first), i.e. no modal-adaptive split."""
    masks = {key: [torch.ones(n) if n else None for n in sizes] for key, sizes in model.structure_sizes().items()}
    for key, per_layer in masks.items():
        for layer, mask in enumerate(per_layer):
            if mask is None:
                continue
            drop = min(int(round(sparsity * mask.numel())), mask.numel() - 1)
            scores = log_alpha.get((key, layer))
            order = scores.argsort() if scores is not None else torch.randperm(mask.numel())
            mask[order[:drop]] = 0.0
    return masks


def encoder_gflops(model: Any) -> float:
    """GFLOPs of the encoders (vision, text, fusion) on `efficientvlm benchmark`'s default batch (32 images and
    texts of 16 tokens), the figure the results table reports."""
    from trainers.benchmark import BenchmarkModel
    from trainers.benchmark.workloads import WorkloadShape, build_workloads
    from trainers.evaluation.benchmarking import count_flops

    shape = WorkloadShape(batch_size=32, image_size=model.config.vision_config.image_size)
    workload = build_workloads(BenchmarkModel("model", "efficientvlm", prebuilt=model), "encoders", shape)
    was_training = model.training
    flops = count_flops(workload["encoders"]) / 1e9
    model.train(was_training)
    return flops


class ProgressLines(TrainerCallback):
    """Says how far training run `name` has got at each quarter of its steps, and how long the rest should take."""

    def __init__(self, name: str):
        self.name, self.quarter, self.start = name, 0, time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        quarter = 4 * state.global_step // max(state.max_steps, 1)
        if quarter > self.quarter and state.global_step < state.max_steps and state.max_steps >= 20:
            self.quarter = quarter
            pace = (time.perf_counter() - self.start) / state.global_step
            left = pace * (state.max_steps - state.global_step) / 60
            _say(f"{self.name}: {state.global_step}/{state.max_steps} steps, {left:.1f} min to go")


@dataclass
class LearnedPruning:
    """What modal-adaptive pruning of one student produced: the pruned model (after its fixed-mask steps), the
    pruning report, the masks' final log-alphas per (key, layer), and the primary metric right after pruning
    (None unless measured)."""

    model: Any
    report: dict[str, Any]
    scores: dict[tuple[str, int], torch.Tensor]
    after_masking: float | None


@dataclass
class AblationRow:
    """One ablation row of one seed: how its masks were chosen (`learned`, `random`, `uniform`), the sparsity of
    the prunable parameters and the encoders' GFLOPs they leave, and the compared metric right after masking and
    after the fixed-mask steps."""

    kind: str
    seed: int
    sparsity: float
    gflops: float
    after_masking: float | None
    after_training: float | None = None
    target: float | None = None  # the global target the learned masks of this row's comparison were trained to


def retrieval_recalls(model: Any, dataset: Any, processor: Any, k: int, score: str = "logit") -> dict[str, float]:
    """Retrieval recall with ITM re-ranking (by `score`, see `itm_rerank_scores`) of the top-`k` ITC candidates
    (`r_mean`, ...), and of ITC alone (`itc_r_mean`, ...) from the same pass, so the report can show what
    re-ranking adds (with `"log_odds+itc"`, also of the ITM log-odds alone: `itm_r_mean`, ...)."""
    from trainers.evaluation.retrieval import retrieval_evaluate

    model.eval()
    images = processor.image_processor([dataset.get_image(i) for i in range(dataset.num_images)], return_tensors="pt")
    texts = processor.tokenizer(dataset.texts, padding="longest", truncation=True, return_tensors="pt")
    result = retrieval_evaluate(
        model,
        images["pixel_values"],
        texts["input_ids"],
        texts["attention_mask"],
        text_to_image=dataset.text_to_image,
        k=k,
        score=score,
    )
    return result.metrics_with_itc()


class DemoRun:
    """One demo run: holds the settings, the output folder and what each stage produced."""

    def __init__(
        self,
        output_dir: Path,
        settings: DemoSettings,
        seed: int = 0,
        tasks: tuple[str, ...] = DEFAULT_DEMO_TASKS,
        hub_prefix: str | None = None,
        jobs: int = 1,
    ):
        unknown = set(tasks) - set(DEMO_TASKS)
        if unknown:
            raise ValueError(f"Unknown demo task(s) {sorted(unknown)}; choose from {DEMO_TASKS}.")
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.seed = seed
        self.tasks = tasks
        self.hub_prefix = hub_prefix  # push every model folder to `<hub_prefix>-<role>_<task>` as it is saved
        self.jobs = max(1, min(jobs, len(tasks)))  # task pipelines at once, 1 thread each (`task_pipelines`)
        self.pipeline_priorities: dict[str, int] = {}  # each pipeline's niceness, once they have run at once
        self.in_job = False  # True in a task pipeline's own process
        self.teachers: dict[str, Any] = {}
        self.students: dict[str, Any] = {}
        self.pruned: dict[str, Any] = {}
        self.histories: dict[str, list[dict[str, float]]] = {}
        self.run_timings: dict[str, float] = {}  # one entry per training run (inside the stages)
        self.run_steps: dict[str, int] = {}  # optimizer steps each training run took
        self.run_learning_rates: dict[str, float] = {}  # the peak learning rate of each training run
        self.timings: dict[str, float] = {}  # one entry per stage, then "total"
        self.stage_steps: dict[str, int] = {}
        self.metrics: dict[str, dict[str, dict[str, float]]] = {}
        self.pruning_reports: dict[str, dict[str, Any]] = {}
        self.benchmarks: dict[str, list[dict[str, Any]]] = {}
        self.model_dirs: dict[str, Path] = {}
        self.ablation_models: dict[str, dict[str, Any]] = {}
        self.ablation_results: dict[str, list[AblationRow]] = {}
        self.machine = machine_description()

    # -- stages -------------------------------------------------------------------------------------------
    def make_data(self) -> None:
        from transformers import BertTokenizer

        from modeling_efficientvlm import EfficientVLMImageProcessor, EfficientVLMProcessor
        from trainers.demo.corpus import generate_demo_data, write_demo_vocab

        s = self.settings
        self.data = generate_demo_data(
            self.output_dir / "data",
            seed=self.seed,
            image_size=s.image_size,
            num_train_images=s.num_train_images,
            num_eval_images=s.num_eval_images,
        )
        vocab = write_demo_vocab(self.output_dir / "data" / "vocab.txt")
        tokenizer = BertTokenizer(vocab=str(vocab), do_lower_case=True)
        self.processor = EfficientVLMProcessor(
            EfficientVLMImageProcessor(size={"height": s.image_size, "width": s.image_size}), tokenizer, max_length=40
        )
        self.answer_list = json.loads(Path(self.data.answer_list).read_text())
        self.stats = json.loads(Path(self.data.stats).read_text())

    def _dataset(self, task: str, split: str):
        # The corpus writes `pretrain` and `<task>_<split>` for every demo task.
        data = self.data.pretrain if task == "pretraining" else getattr(self.data, f"{task}_{split}")
        return build_dataset(task, data, self.data.image_root, self.processor)

    def _train(
        self,
        name: str,
        task: str,
        model: Any,
        steps: int,
        trainer_class=None,
        seed: int | None = None,
        learning_rate: float | None = None,
        **kwargs,
    ) -> Any:
        from transformers import Trainer

        from trainers.training import train

        start = time.perf_counter()
        seed = self.seed if seed is None else seed
        args = _training_args(
            self.output_dir / "runs" / name,
            self.settings,
            steps,
            seed,
            learning_rate=learning_rate or self.settings.learning_rate,
        )
        if self.in_job:  # its progress bar goes to the job's log: a line per quarter on the terminal instead
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), ProgressLines(name)]
        trainer = train(
            task, model, self.processor, self._dataset(task, "train"), args, trainer_class or Trainer, **kwargs
        )
        self.run_timings[name] = time.perf_counter() - start
        self.run_steps[name] = trainer.state.global_step
        self.run_learning_rates[name] = args.learning_rate
        self.histories[name] = _losses(trainer)
        final = next((e["train_loss"] for e in reversed(trainer.state.log_history) if "train_loss" in e), float("nan"))
        _say(f"{name}: {trainer.state.global_step} steps in {self.run_timings[name]:.0f}s, mean train loss {final:.3f}")
        return trainer

    def _hub_name(self, name: str) -> str:
        """The Hub id of folder `name` when pushing (`--hub_prefix`), otherwise the folder's name."""
        return f"{self.hub_prefix}-{name}" if self.hub_prefix else name

    def _save(self, name: str, model: Any, card: Any, pruning_report: dict | None = None) -> Path:
        """Saves `model` as a complete folder `models/<name>` (weights, config + auto_map, code, processor, card,
        the pruning report of a pruned model), pushed to `<hub_prefix>-<name>` with `--push_to_hub`."""
        from trainers.saving import HubTarget, save_model_folder

        folder = save_model_folder(
            model,
            self.processor,
            self.output_dir / "models" / name,
            card,
            pruning_report=pruning_report,
            answer_candidates=self.answer_list if card.task == "vqa" else None,
            push=HubTarget(self._hub_name(name)) if self.hub_prefix else None,
        )
        self.model_dirs[name] = folder
        return folder

    def _card(self, task: str, role: str, base: str | None = None, teacher: str | None = None, **facts: Any) -> Any:
        from trainers.model_card import ModelCardInfo, describe_hardware

        return ModelCardInfo(
            task=task,
            stage="demo",
            role=role,
            base_model=self._hub_name(base) if base else None,
            teacher_model=self._hub_name(teacher) if teacher else None,
            synthetic_data=True,
            hardware=describe_hardware(),
            answer_candidates_source="the answer list of the demo corpus" if task == "vqa" else None,
            **facts,
        )

    def pretrain_teacher(self) -> None:
        from modeling_efficientvlm import EfficientVLMForPreTraining

        torch.manual_seed(self.seed)
        config = teacher_config(self.settings, len(self.processor.tokenizer))
        self.teacher_pretrained = EfficientVLMForPreTraining(config)
        self._train("teacher_pretrain", "pretraining", self.teacher_pretrained, self.settings.pretrain_steps)
        # Saved now, before any later stage starts from it: a user can redo any later stage from this folder.
        self._save("teacher_pretrained", self.teacher_pretrained, self._card("pretraining", "teacher"))

    def _task_model(self, task: str, source: Any) -> Any:
        """`task`'s model from a pre-trained one, with the task's training settings in its (own) config."""
        from trainers.training import task_model_with_overrides

        return task_model_with_overrides(task, source, self.settings.task_config_overrides.get(task, {}))

    def finetune_teacher(self, task: str) -> None:
        torch.manual_seed(self.seed)
        model = self._task_model(task, self.teacher_pretrained)
        rate = self.settings.teacher_learning_rates[task]
        self._train(f"teacher_{task}", task, model, self.settings.finetune_steps[task], learning_rate=rate)
        self.teachers[task] = model.eval()

    def distill_student(self) -> None:
        from trainers.distillation import DistillationTrainer
        from trainers.distillation.student_init import build_student

        torch.manual_seed(self.seed)
        self.student_pretrained = build_student(self.teacher_pretrained, *self.settings.student_layers)
        self._train(
            "student_distill",
            "pretraining",
            self.student_pretrained,
            self.settings.distill_steps,
            DistillationTrainer,
            teacher_model=self.teacher_pretrained,
        )
        card = self._card("pretraining", "student", base="teacher_pretrained", teacher="teacher_pretrained")
        self._save("student_distilled", self.student_pretrained, card)

    def finetune_and_prune_student(self, task: str) -> None:
        teacher = self.teachers[task]
        torch.manual_seed(self.seed)
        student = self._task_model(task, self.student_pretrained)
        # Task-stage KD on logits and hidden states; attention maps would force the slow eager path.
        kd = DistillationConfig(**SMALL_CPU.commands["finetune"]["kd_term_weights"])
        self._train(
            f"student_{task}",
            task,
            student,
            self.settings.student_finetune_steps[task],
            DistillationTrainer,
            learning_rate=self.settings.student_learning_rates[task],
            teacher_model=teacher,
            distillation_config=kd,
        )
        self.students[task] = student.eval()
        learned = self._prune_with_learned_masks(task, student, teacher, self.seed, f"pruned_{task}")
        self.pruned[task], self.pruning_reports[task] = learned.model, learned.report
        report = learned.report
        split = ", ".join(f"{m} {v:.2f}" for m, v in report["sparsity_per_modality"].items())
        _say(f"pruned_{task}: sparsity {report['sparsity']:.3f} (target {self.settings.target_sparsity}); {split}")
        if self.settings.ablations:
            self._ablations(task, student, teacher, learned)

    def run_task(self, task: str) -> None:
        """The pipeline of one task: its teacher fine-tuned, the distilled student fine-tuned and pruned (and the
        ablations), every model evaluated. It reads only the pre-trained teacher and the distilled student."""
        self.finetune_teacher(task)
        self.finetune_and_prune_student(task)
        self.evaluate(task)

    def task_pipelines(self) -> None:
        """Every task's [`run_task`]: one after another in this process, or with `jobs` > 1 that many at once, each
        in a forked process with 1 torch thread (its output in `runs/<task>.log`)."""
        if self.jobs == 1:
            for task in self.tasks:
                self.run_task(task)
            return
        log_dir = self.output_dir / "runs"
        log_dir.mkdir(parents=True, exist_ok=True)
        _say(
            f"{len(self.tasks)} task pipelines, {self.jobs} at a time, 1 torch thread each; their training logs: "
            f"{log_dir}/<task>.log"
        )
        jobs = {task: (lambda task=task: self._task_job(task)) for task in self.tasks}
        niceness = self.pipeline_priorities = self.pipeline_niceness()
        if any(niceness.values()):
            first = ", ".join(task for task, n in niceness.items() if not n)
            _say(
                f"{first} (the longest, one per core) at normal CPU priority, the rest at niceness {PIPELINE_NICENESS}"
            )
        results = run_in_processes(jobs, log_dir, max_running=self.jobs, niceness=niceness)
        for changes in results.values():
            for name, entries in changes.items():
                getattr(self, name).update(entries)

    def _task_job(self, task: str) -> dict[str, dict[str, Any]]:
        """[`run_task`] in a task's own process: returns what it added to this run's state (`TASK_STATE`)."""
        self.in_job = True
        before = {name: set(getattr(self, name)) for name in TASK_STATE}
        self.run_task(task)
        return {name: {k: v for k, v in getattr(self, name).items() if k not in before[name]} for name in TASK_STATE}

    def _prune_with_learned_masks(
        self, task: str, student: Any, teacher: Any, seed: int, name: str, target: float | None = None
    ) -> LearnedPruning:
        """Modal-adaptive pruning of a copy of `student`: the masks learn (with the weights) for the first steps of
        the task's pruning steps, the copy is pruned with them, then trains with its masks fixed for the rest
        ([`_train_with_fixed_masks`], as every ablation row does). `target`: the global target (default: the run's).
        With ablations, the compared metric right after pruning (before the fixed-mask steps) is kept."""
        from trainers.pruning import ModalAdaptivePruningTrainer, PruningConfig

        learn_steps, fixed_steps = self.settings.pruning_schedule(task)
        torch.manual_seed(seed)
        trainer = self._train(
            name,
            task,
            copy.deepcopy(student).train(),
            learn_steps,
            ModalAdaptivePruningTrainer,
            seed=seed,
            teacher_model=teacher,
            distillation_config=DistillationConfig(**_PRUNING["kd_term_weights"]),
            pruning_config=PruningConfig(
                target_sparsity=self.settings.target_sparsity if target is None else target,
                sparsity_warmup_steps=int(learn_steps * self.settings.prune_warmup_fraction),
                mask_learning_rate=self.settings.mask_learning_rate,
                snap_to_target=self.settings.snap_to_target,
            ),
        )
        scores = {(key, layer): p.detach().clone() for key, layer, p in trainer.masker.layers()}
        report = trainer.finalize_pruning()
        report["fixed_mask_steps_after_pruning"] = fixed_steps
        model = trainer.pruned_model
        after_masking = self._ablation_score(task, model) if self.settings.ablations else None
        self._train_with_fixed_masks(f"{name}_fixed_masks", task, model, teacher, seed)
        return LearnedPruning(model.eval(), report, scores, after_masking)

    def _train_with_fixed_masks(self, name: str, task: str, model: Any, teacher: Any, seed: int) -> None:
        """Trains an already pruned `model` (its masks fixed: the structures are gone) for the fixed-mask steps of
        `task`, distilling from `teacher`: one routine, so the learned masks and every ablation row get the same
        steps, schedule, learning rate and distillation."""
        _, fixed_steps = self.settings.pruning_schedule(task)
        if fixed_steps == 0:
            return
        model.train()
        torch.manual_seed(seed)
        self._train(
            name,
            task,
            model,
            fixed_steps,
            DistillationTrainer,
            seed=seed,
            learning_rate=self.settings.fixed_mask_learning_rates[task],
            teacher_model=teacher,
            distillation_config=DistillationConfig(**_PRUNING["kd_term_weights"]),
        )

    def _ablation_score(self, task: str, model: Any) -> float:
        """The metric the ablations compare: the task's primary metric; for retrieval, ITC-only mean recall (ITM
        re-ranking of the top k of every query costs about a minute per model; the results table re-ranks)."""
        if task == "retrieval":
            return retrieval_recalls(model, self._dataset(task, "test"), self.processor, k=0)["itc_r_mean"]
        result = evaluate_task(task, model, self._dataset(task, "test"), self.processor, answer_list=self.answer_list)
        return result.metrics[task_spec(task).primary_metric]

    def _ablations(self, task: str, student: Any, teacher: Any, learned: LearnedPruning) -> None:
        """At each of the ablation targets, the same student pruned to the sparsity the learned masks reached with
        random masks and with a uniform split, each then trained for the same fixed-mask steps as the learned masks;
        every row is measured right after masking and after that training, with `ablation_seeds` seeds of the
        pruning stage. The run's own pruned model is the learned row of its target and first seed; the random and
        uniform models of that target and seed join the results table."""
        from trainers.pruning.hard_concrete import StructureMasker

        masker = StructureMasker.from_model(student)  # counts the sparsity of every row the same way
        self.ablation_models[task], self.ablation_results[task] = {}, []
        for target in self.settings.ablation_targets:
            own_target = target == self.settings.target_sparsity
            for offset in range(self.settings.ablation_seeds):
                seed = self.seed + offset
                if not (own_target and offset == 0):
                    name = f"ablation_learned_{task}_{target:g}_seed{seed}"
                    learned = self._prune_with_learned_masks(task, student, teacher, seed, name, target=target)
                sparsity = learned.report["sparsity"]
                generator = torch.Generator().manual_seed(seed)
                masks = {
                    "random": random_structure_masks(student, sparsity, generator=generator),
                    "uniform": uniform_structure_masks(student, learned.scores, sparsity),
                }
                first = AblationRow(
                    "learned", seed, sparsity, encoder_gflops(learned.model), learned.after_masking, target=target
                )
                first.after_training = self._ablation_score(task, learned.model)
                rows = [first]
                for kind, kind_masks in masks.items():
                    model = copy.deepcopy(student)
                    model.prune(kind_masks, pad_to_multiple_of=PAD_TO_MULTIPLE_OF)  # as the learned model
                    row = AblationRow(
                        kind,
                        seed,
                        masker.sparsity_of(kind_masks),
                        encoder_gflops(model),
                        self._ablation_score(task, model),
                        target=target,
                    )
                    name = f"ablation_{kind}_{task}_{target:g}_seed{seed}"
                    self._train_with_fixed_masks(name, task, model, teacher, seed)
                    row.after_training = self._ablation_score(task, model)
                    rows.append(row)
                    if own_target and offset == 0:
                        self.ablation_models[task][ABLATIONS[kind]] = model.eval()
                self.ablation_results[task] += rows
                _say(
                    f"ablations of {task} at target {target:g}, seed {seed}: "
                    + ", ".join(f"{r.kind} {r.after_masking:.4f} -> {r.after_training:.4f}" for r in rows)
                )

    def _roles(self, task: str) -> dict[str, Any]:
        roles = {"teacher": self.teachers[task], "student": self.students[task], "pruned": self.pruned[task]}
        return {**roles, **self.ablation_models.get(task, {})}

    def evaluate(self, task: str) -> None:
        """Every model of `task` (teacher, student, pruned, ablation rows) on its held-out split."""
        dataset = self._dataset(task, "test")
        self.metrics[task] = {}
        for role, model in self._roles(task).items():
            if task == "retrieval":
                k, score = self.settings.retrieval_k, self.settings.retrieval_itm_score
                self.metrics[task][role] = retrieval_recalls(model, dataset, self.processor, k, score)
                continue
            result = evaluate_task(task, model, dataset, self.processor, answer_list=self.answer_list)
            self.metrics[task][role] = result.metrics
        spec = task_spec(task)
        scores = ", ".join(f"{role} {m[spec.primary_metric]:.3f}" for role, m in self.metrics[task].items())
        line = f"{spec.primary_metric_label}: {scores}"
        if task == "retrieval":
            line += f" (ITM re-ranking of the top {self.settings.retrieval_k}); ITC alone: " + ", ".join(
                f"{role} {m['itc_r_mean']:.3f}" for role, m in self.metrics[task].items()
            )
            if "itm_r_mean" in self.metrics[task]["teacher"]:
                line += "; ITM log-odds alone: " + ", ".join(
                    f"{role} {m['itm_r_mean']:.3f}" for role, m in self.metrics[task].items()
                )
        _say(f"{task} on the held-out split: {line}")

    def benchmark(self) -> None:
        # The same function and defaults as `efficientvlm benchmark`, so both print the same speedups.
        from trainers.benchmark import BenchmarkSettings, prebuilt_models, run_benchmark

        s = self.settings
        settings = BenchmarkSettings(batch_sizes=(s.benchmark_batch_size,), repeats=s.benchmark_repeats)
        for task in self.tasks:
            rows = run_benchmark(prebuilt_models(self._roles(task)), settings).results
            self.benchmarks[task] = [row.as_dict() for row in rows]
            _say(f"{task} speed: " + ", ".join(f"{r.name} {r.median_ms:.1f} ms ({r.speedup:.2f}x)" for r in rows))

    # -- outputs ------------------------------------------------------------------------------------------
    def save_models(self) -> None:
        origins = {  # (the model it started from, the teacher it learned from)
            "teacher": ("teacher_pretrained", None),
            "student": ("student_distilled", "teacher_{task}"),
            "pruned": ("student_{task}", "teacher_{task}"),
        }
        for task in self.tasks:
            for role, (base, teacher) in origins.items():
                model = self._roles(task)[role]
                base, teacher = (name.format(task=task) if name else None for name in (base, teacher))
                card = self._card(
                    task,
                    role,
                    base=base,
                    teacher=teacher,
                    metrics=self.metrics[task][role],
                    eval_split="test",
                    benchmark=next(r for r in self.benchmarks[task] if r["name"] == role),
                )
                report = self.pruning_reports[task] if role == "pruned" else None
                self._save(f"{role}_{task}", model, card, pruning_report=report)

    def write_report(self) -> Path:
        from trainers.demo.report import write_plots, write_report

        plots = write_plots(self.output_dir, self.histories, self.pruning_reports)
        if self.ablation_results:
            self.write_ablations()
        return write_report(self, plots)

    def write_ablations(self) -> Path:
        """`ablations.json`: per task, every ablation row of every seed, and the optimizer steps and learning rate of
        every fixed-mask training run (the learned masks' and the ablations')."""
        fixed = [name for name in self.run_steps if "fixed_masks" in name or "ablation_" in name]
        fixed_runs = {name: self.run_steps[name] for name in fixed}
        fixed_rates = {name: self.run_learning_rates[name] for name in fixed}
        data = {
            task: {
                "fixed_mask_steps": self.settings.pruning_schedule(task)[1],
                "rows": [asdict(row) for row in rows],
            }
            for task, rows in self.ablation_results.items()
        }
        path = self.output_dir / "ablations.json"
        path.write_text(
            json.dumps({"tasks": data, "run_steps": fixed_runs, "run_learning_rates": fixed_rates}, indent=2)
        )
        return path

    def steps_by_kind(self, tasks: tuple[str, ...] | None = None) -> dict[str, int]:
        """Optimizer steps of each kind of step ([`STEP_COST`]) the run will take (with `tasks`: its stages and the
        pipelines of those tasks only)."""
        s, tasks = self.settings, self.tasks if tasks is None else tasks
        # With ablations, per target and seed: random and uniform masks train the fixed-mask steps, and the learned
        # masks are learned again (all but the run's own pruning).
        fixed = sum(s.pruning_schedule(t)[1] for t in tasks)
        prune = sum(s.prune_steps[t] for t in tasks)
        if s.ablations:
            runs = len(s.ablation_targets) * s.ablation_seeds
            prune += runs * 2 * fixed + (runs - 1) * prune
        return {
            "pre-train teacher": s.pretrain_steps,
            "distil student": s.distill_steps,
            "fine-tune teacher": sum(s.finetune_steps[t] for t in tasks),
            "fine-tune + prune student": sum(s.student_finetune_steps[t] for t in tasks) + prune,
        }

    def pipeline_niceness(self) -> dict[str, int]:
        """CPU priority of each task pipeline's process: where more run at once than there are cores, the longest
        pipelines (by planned steps x [`STEP_COST`] x the task's `relative_step_cost`), one per core, keep the
        normal priority and the others run at niceness [`PIPELINE_NICENESS`]: the long ones, which end the stage,
        keep a core each rather than a share of one, and the short ones take what the long ones leave (results are
        the same: 1 thread each). Measured on 2 cores (task pipelines stage): all alike 690 s, retrieval alone at
        normal priority 690 s (VQA, sharing a core with NLVR2, ended it instead), retrieval and VQA 674 s on a host
        that had slowed down meanwhile (pre-training 195 s against 179 s)."""
        cores = self.machine["cores"]
        if self.jobs <= cores:
            return {task: 0 for task in self.tasks}

        def cost(task: str) -> float:
            return self.stage_costs((task,))["task pipelines"] * task_spec(task).demo.relative_step_cost

        longest = sorted(self.tasks, key=cost, reverse=True)[:cores]
        return {task: 0 if task in longest else PIPELINE_NICENESS for task in self.tasks}

    def planned_steps(self) -> dict[str, int]:
        """Optimizer steps of each training stage (for the progress lines and the ETA)."""
        steps: dict[str, int] = {}
        for kind, n in self.steps_by_kind().items():
            steps[STAGE_OF_KIND[kind]] = steps.get(STAGE_OF_KIND[kind], 0) + n
        return steps

    def stage_costs(self, tasks: tuple[str, ...] | None = None) -> dict[str, float]:
        """Each training stage's steps weighted by [`STEP_COST`] (with `tasks`: those tasks' pipelines only)."""
        costs: dict[str, float] = {}
        for kind, n in self.steps_by_kind(tasks).items():
            costs[STAGE_OF_KIND[kind]] = costs.get(STAGE_OF_KIND[kind], 0.0) + STEP_COST[kind] * n
        return costs

    def planned_costs(self) -> dict[str, float]:
        """[`stage_costs`], the task pipelines' divided by what running them at once gains ([`pipelines_speedup`]):
        the ETA's units."""
        costs = self.stage_costs()
        costs["task pipelines"] /= pipelines_speedup(self.jobs, self.machine["torch_threads"], self.machine["cores"])
        return costs

    def run(self) -> Path:
        start = time.perf_counter()
        stages = [
            ("data", self.make_data),
            ("pre-train teacher", self.pretrain_teacher),
            ("distil student", self.distill_student),
            ("task pipelines", self.task_pipelines),
            ("benchmark", self.benchmark),
            ("save models", self.save_models),
        ]
        planned, costs = self.planned_steps(), self.planned_costs()
        self.stage_steps = planned
        total_steps = sum(planned.values())
        at_once = f"; task pipelines {self.jobs} at a time, 1 thread each" if self.jobs > 1 else ""
        _say(
            f"{len(stages)} stages, {total_steps} optimizer steps in all; on {self.machine['cpu']} "
            f"({self.machine['cores']} cores), {self.machine['torch_threads']} torch thread(s){at_once}"
        )
        # With more than one thread some sums came out in an order that varied from run to run (the pre-training
        # losses of two runs parted within 10 steps, and training amplifies it); torch's deterministic algorithms
        # fix it at about 4% of the pre-training's time, so a run on the same machine reproduces its figures.
        previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            self._run_stages(stages, planned, costs, start)
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        self.timings["total"] = time.perf_counter() - start
        report = self.write_report()
        _say(f"done in {self.timings['total'] / 60:.1f} min; report: {report}")
        return report

    def _run_stages(
        self, stages: list[tuple[str, Any]], planned: dict[str, int], costs: dict[str, float], start: float
    ) -> None:
        """Runs `stages` in order, each announced with its optimizer steps, the time so far and the ETA."""
        train_seconds, done = 0.0, []
        for index, (name, stage) in enumerate(stages, 1):
            elapsed = time.perf_counter() - start
            steps = planned.get(name)
            eta = ""
            left = training_minutes_left(costs, done, train_seconds)
            if left:
                eta = f"; ETA of the training still to come {left:.1f} min (+ evaluation)"
            what = f" ({steps} optimizer steps)" if steps else ""
            _say(f"stage {index}/{len(stages)}: {name}{what}; {elapsed / 60:.1f} min elapsed{eta}")
            stage_start = time.perf_counter()
            stage()
            self.timings[name] = time.perf_counter() - stage_start
            if steps:
                done.append(name)
                train_seconds += self.timings[name]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="efficientvlm demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output_dir", default="efficientvlm_demo", help="where everything is written")
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke run (tiny data, few steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target_sparsity", type=float, default=None, help="global pruning target (default 0.5)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_DEMO_TASKS), help=f"comma-separated, from {DEMO_TASKS}")
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch threads (default: the CPU cores this process may use, at most 8); with --jobs above 1 the task "
        "pipelines run 1 thread each",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="task pipelines (fine-tune the teacher, fine-tune and prune the student, evaluate) run at once, each in "
        "its own process with 1 torch thread; default: every task at once where there are 2 cores or more (Linux), "
        "else 1. The demo's small models leave a second thread little to do: on 2 cores 3 pipelines of 1 thread "
        "finish well before 3 of 2 threads one after another",
    )
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also prune the same student to the same sparsity with random masks and with a uniform split, at the "
        "run's target and at 0.8, each trained for the same fixed-mask steps, over --ablation_seeds seeds",
    )
    parser.add_argument("--ablation_seeds", type=int, default=None, help="seeds of the ablations (default 3)")
    parser.add_argument("--push_to_hub", action="store_true", help="push every model folder (its files only)")
    parser.add_argument(
        "--hub_prefix",
        "--hub_model_id",
        dest="hub_prefix",
        default=None,
        help="repo prefix for --push_to_hub: `user/evlm-demo` pushes `user/evlm-demo-pruned_vqa`, ...",
    )
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_prefix:
        parser.error("--push_to_hub needs --hub_prefix (e.g. your-user/efficientvlm-demo)")
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.target_sparsity is not None:
        settings = replace(settings, target_sparsity=args.target_sparsity)
    if args.ablation_seeds is not None and not args.ablations:
        parser.error("--ablation_seeds needs --ablations")
    if args.ablations:
        seeds = settings.ablation_seeds if args.ablation_seeds is None else args.ablation_seeds
        settings = replace(settings, ablations=True, ablation_seeds=seeds)
    hf_logging.set_verbosity_warning()
    if args.num_threads is not None and args.num_threads < 1:
        parser.error(f"--num_threads must be at least 1, got {args.num_threads}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        check_output_folder(args.output_dir)
    except ValueError as error:
        parser.error(str(error))
    threads = args.num_threads or default_num_threads()
    torch.set_num_threads(threads)
    tasks = tuple(args.tasks.split(","))
    jobs = default_jobs(tasks) if args.jobs is None else min(args.jobs, len(tasks))
    if jobs > 1 and not can_fork():
        parser.error(f"--jobs {jobs} runs the task pipelines in forked processes, which this platform lacks; give 1")
    hub_prefix = args.hub_prefix if args.push_to_hub else None
    run = DemoRun(
        Path(args.output_dir),
        settings,
        seed=args.seed,
        tasks=tasks,
        hub_prefix=hub_prefix,
        jobs=jobs,
    )
    report = run.run()
    (run.output_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    return report
