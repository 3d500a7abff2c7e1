"""Modal-adaptive pruning: task fine-tuning with distillation, hard-concrete masks and a sparsity Lagrangian.

[`ModalAdaptivePruningTrainer`] trains the student, a [`StructureMasker`] over the heads and FFN neurons of
every modality and the Lagrange multipliers of a [`SparsityLagrangian`] together:

    loss = task_weight x task loss + kd_weight x KD   (from `DistillationTrainer`)
         + lambda_1 (s - t) + lambda_2 (s - t)^2       (s: expected sparsity of all prunable parameters)

One global target t (warmed up linearly) leaves the split between vision, text and fusion to the task.
The masker and the multipliers live on the trainer, not in the model, so checkpoints of the student hold
no mask weights. They have their own AdamW optimizer (as in CoFi: constant learning rates, no weight decay; the
multipliers ascend through a reversed gradient), stepped right after the Trainer's. Keeping them out of the
Trainer's optimizer keeps them out of DeepSpeed's and FSDP's optimizer wrappers (a ZeRO optimizer refuses
parameters that are not the model's). Their values and optimizer state are saved as `masker.pt` next to the
weights by `save_model` (so in every Trainer checkpoint, under DDP, DeepSpeed or FSDP alike) and restored by
`train(resume_from_checkpoint=...)` before the Trainer loads the rest, so a resume continues exactly. After
training, [`prune_and_save`] removes the masked structures for real and writes the smaller model as a complete
folder (weights, processor, `pruning_report.json`, model card) with `trainers.saving.save_model_folder`.

Only public `Trainer` hooks are used: a `TrainerCallback` (warm-up, gradient averaging, the masks' optimizer
step, clamping, the best checkpoint's masks), `save_model`, `train`, `compute_loss` and `prediction_step`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from modeling_efficientvlm.loading_efficientvlm import MASK_STATE_FILE, read_torch_weights
from modeling_efficientvlm.modeling_efficientvlm import StructureMasks, check_pad_multiple

from ..distillation import DistillationConfig, DistillationTrainer
from ..evaluation.benchmarking import count_parameters
from ..sharding import broadcast_from_first_process, whole_model
from .hard_concrete import DROPRATE_INIT, HARD_CONCRETE_TEMPERATURE, HEAD_LOG_ALPHA_INIT, StructureMasker
from .ladder import LadderOutputs, SparsityLadder, parse_sparsity_ladder
from .lagrangian import SparsityLagrangian, one_epoch_warmup_steps
from .padding import PAD_TO_MULTIPLE_OF, drop_silent_ffn_neurons, prune_structures

logger = logging.get_logger(__name__)

_MASK_GROUP, _LAGRANGIAN_GROUP = "structure_masks", "lagrange_multipliers"


# The share of the training's last steps over which `ModalAdaptivePruningTrainer.settling` judges the sparsity.
SETTLING_WINDOW = 0.05


def run_length(args: Any) -> str:
    """The flag that sets how long `args` trains: `--max_steps N`, or `--num_train_epochs E`, whose optimizer steps
    follow the batch settings (processes, per-device batch, gradient accumulation) and the data."""
    return f"--max_steps {args.max_steps}" if args.max_steps > 0 else f"--num_train_epochs {args.num_train_epochs:g}"


def fixed_mask_step(schedule_steps: int, mask_freeze_fraction: float) -> int:
    """The first step of the fixed-mask phase: the last `mask_freeze_fraction` of `schedule_steps` fix the masks."""
    return schedule_steps - int(round(mask_freeze_fraction * schedule_steps))


@dataclass
class PruningConfig:
    """Settings of modal-adaptive pruning.

    Args:
        target_sparsity: fraction of all prunable parameters (heads and FFN neurons of every modality) to
            remove; the paper uses 0.35 for VQA. `None` only with `target_sparsity_per_modality`.
        sparsity_warmup_steps: optimizer steps over which the target grows linearly from 0; `None` means
            one epoch (the paper's choice).
        sparsity_warmup_fraction: or the fraction of the training's optimizer steps over which it grows
            (`int(fraction * max_steps)`; the demo warms up over 30%; with a `sparsity_ladder`, each rung over that
            fraction of its share, `int(fraction * max_steps / rungs)`); not with `sparsity_warmup_steps`.
        target_sparsity_per_modality: optional extra targets, e.g. `{"vision": 0.5}`, each enforced by its
            own pair of multipliers on that modality's expected sparsity.
        mask_learning_rate: learning rate of the mask log-alphas (official EfficientVLM: 0.01).
        lagrangian_learning_rate: learning rate of the multipliers (ascent); `None` means `mask_learning_rate`.
        droprate_init: initial drop probability of FFN neurons (log-alpha = log(1 - p) - log(p)).
        head_log_alpha_init: initial log-alpha of attention heads (official: 10, heads start kept).
        hard_concrete_temperature: temperature (beta) of the hard-concrete distribution of the masks.
        binary_masks: keep surviving units at 1 when pruning (official EfficientVLM) instead of folding
            their deterministic score into the weights (CoFi). Evaluation during and after pruning uses the
            same masks, so what is evaluated is what is saved.
        mask_freeze_fraction: fraction of the training steps, at the end, in which the masks are fixed (the
            official `stop_prune_epoch`: VQA learns masks for 10 of 20 epochs): the model then trains with the
            exact deterministic masks it will be pruned with, and the Lagrangian is off. 0: masks learn to the end.
        sparsity_ladder: increasing global targets in (0, 1) (rungs), instead of `target_sparsity`: the target
            climbs rung by rung in one run, and when the sparsity has settled on a rung the trainer saves
            a physically pruned copy (see `trainers/pruning/ladder.py`), then trains on toward the next.
        ladder_tolerance, ladder_patience: a rung has settled once the target is warmed up and the sparsity of
            the deterministic masks (what is saved) stays within `ladder_tolerance` of it for `ladder_patience`
            consecutive optimizer steps; a rung not settled by the end of its share of the steps is saved there.
        pad_to_multiple_of: physical pruning rounds each pruned FFN's kept width up to a multiple of this with
            all-zero neurons (the outputs do not change; CPU GEMMs are faster at such widths), never above the
            unpruned width; an emptied FFN stays removed. 1: no padding. See `trainers/pruning/padding.py`.
        prune_decoder: also mask and prune the heads and FFN neurons of VQA's answer decoder (the `decoder`
            modality), as the official VQA pruning does: its parameters count in the global target and it is
            reported per modality as `decoder`. Only for models with an answer decoder.
        snap_to_target: when the masks are fixed (at the fixed-mask phase's start, else at pruning), bring their
            sparsity to `target_sparsity` (as near as whole heads and neurons allow) by counting every unit's
            zero probability with its log-alpha shifted by one common offset
            ([`StructureMasker.offset_for_sparsity`]): the learned ranking within and across modalities stays, only
            how many units go changes. For runs too short for the multipliers to settle on the target (they lag
            or overshoot it); the report's `snap_to_target` gives the offset and the sparsity before. With a
            `sparsity_ladder`, each rung's folder is snapped to its rung and the run climbs on with the masks it
            learned. Off by default (the paper keeps the sparsity the Lagrangian reached).
    """

    target_sparsity: float | None = None
    sparsity_warmup_steps: int | None = None
    sparsity_warmup_fraction: float | None = None
    target_sparsity_per_modality: dict[str, float] | None = None
    mask_learning_rate: float = 0.01
    lagrangian_learning_rate: float | None = None
    droprate_init: float = DROPRATE_INIT
    head_log_alpha_init: float = HEAD_LOG_ALPHA_INIT
    hard_concrete_temperature: float = HARD_CONCRETE_TEMPERATURE
    binary_masks: bool = False
    mask_freeze_fraction: float = 0.0
    prune_decoder: bool = False
    sparsity_ladder: tuple[float, ...] | None = None
    ladder_tolerance: float = 0.01
    ladder_patience: int = 3
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF
    snap_to_target: bool = False

    def __post_init__(self) -> None:
        check_pad_multiple(self.pad_to_multiple_of)
        if self.snap_to_target and self.target_sparsity is None and self.sparsity_ladder is None:
            raise ValueError("`snap_to_target` brings the masks to the global target: give `target_sparsity`.")
        if self.snap_to_target and self.target_sparsity_per_modality:
            raise ValueError(
                "`snap_to_target` shifts every modality's masks alike to the global target, so the targets of "
                f"`target_sparsity_per_modality` ({self.target_sparsity_per_modality}) would not be kept: give one."
            )
        if not 0.0 <= self.mask_freeze_fraction < 1.0:
            raise ValueError(f"`mask_freeze_fraction` must be in [0, 1); got {self.mask_freeze_fraction}.")
        if self.sparsity_ladder is not None:
            self.sparsity_ladder = parse_sparsity_ladder(self.sparsity_ladder)
            if self.target_sparsity is not None:
                raise ValueError(
                    "`sparsity_ladder` and `target_sparsity` conflict: the ladder's rungs are the targets; give one."
                )
            if self.mask_freeze_fraction > 0:
                raise ValueError(
                    "`sparsity_ladder` and `mask_freeze_fraction` conflict: the masks learn on every rung."
                )
            if not 0.0 < self.ladder_tolerance < 1.0:
                raise ValueError(f"`ladder_tolerance` must be in (0, 1); got {self.ladder_tolerance}.")
            if self.ladder_patience < 1:
                raise ValueError(f"`ladder_patience` must be >= 1; got {self.ladder_patience}.")
        if self.target_sparsity is None and not self.target_sparsity_per_modality and self.sparsity_ladder is None:
            raise ValueError(
                "Pruning needs a `target_sparsity` (or `sparsity_ladder` or `target_sparsity_per_modality`)."
            )
        if self.sparsity_warmup_steps is not None and self.sparsity_warmup_steps < 0:
            raise ValueError(f"`sparsity_warmup_steps` must be >= 0; got {self.sparsity_warmup_steps}.")
        if self.sparsity_warmup_fraction is not None:
            if self.sparsity_warmup_steps is not None:
                raise ValueError("Give one of `sparsity_warmup_steps` and `sparsity_warmup_fraction`, not both.")
            if not 0.0 <= self.sparsity_warmup_fraction <= 1.0:
                raise ValueError(f"`sparsity_warmup_fraction` must be in [0, 1]; got {self.sparsity_warmup_fraction}.")
        for name in ("mask_learning_rate", "lagrangian_learning_rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"`{name}` must be positive; got {value}.")
        # Validates the targets (each in [0, 1), known modalities) with the same messages as training.
        SparsityLagrangian(self.target_sparsity, 0, self.target_sparsity_per_modality, self.sparsity_ladder)


class _NoTeacher(nn.Module):
    """Placeholder teacher when pruning without distillation: `kd_weight=0` means it is never run."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("No teacher model was given; distillation is disabled.")


class _MaskOptimizationCallback(TrainerCallback):
    """Keeps the masks and multipliers in step with the Trainer's optimizer loop."""

    def __init__(self, trainer: ModalAdaptivePruningTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # A resume keeps the schedule the checkpoint was on; only a run of another length (on purpose) moves it.
        trainer, config = self.trainer, self.trainer.pruning_config
        restored = trainer.restored_schedule or {}
        trainer.schedule_steps = self.schedule_steps(args, state.max_steps, restored)
        trainer.mask_freeze_step = fixed_mask_step(trainer.schedule_steps, config.mask_freeze_fraction)
        snap = trainer.snap
        if snap is not None and trainer.ladder is None and snap["step"] < trainer.mask_freeze_step:
            # Restored from a run with fewer steps: the masks learn on past it, and snap again when this run fixes them.
            trainer.snap = None
        derived = self.derived_warmup_steps(args, state.max_steps, train_dataloader)
        if derived is None:
            return  # --sparsity_warmup_steps: set with the Lagrangian (a resume that gives another one is refused)
        steps, how = derived
        saved = restored.get("warmup_steps")
        if saved is not None and saved != steps:
            # One epoch's (or a fraction's) steps change with the processes, per-device batch and gradient
            # accumulation: recomputed, the target would drop back mid-run.
            logger.warning(
                f"Resumed with the checkpoint's sparsity warm-up over {saved} optimizer steps, the schedule it was on; "
                f"this run's settings would make it {steps} ({how})."
            )
        trainer.lagrangian.warmup_steps = steps if saved is None else saved

    def schedule_steps(self, args, max_steps: int, restored: dict[str, Any]) -> int:
        """The optimizer steps the fixed-mask phase and the ladder's step budgets are laid on: this run's `max_steps`,
        or on a resume the checkpoint's, when only the batch settings (or the data) changed the number of steps of the
        same `--num_train_epochs`. A resume that would end before that schedule does raises a ValueError."""
        config = self.trainer.pruning_config
        saved = restored.get("schedule_steps")
        timed = config.mask_freeze_fraction > 0 or config.sparsity_ladder is not None
        if not timed or saved is None or saved == max_steps or restored.get("run_length") != run_length(args):
            return max_steps  # a new length (--max_steps, --num_train_epochs) lays the schedule on its steps
        if config.sparsity_ladder is not None:
            rungs = len(config.sparsity_ladder)
            budgets = ", ".join(str(round(saved * (rung + 1) / rungs)) for rung in range(rungs))
            schedule = f"the rungs of --sparsity_ladder saved by steps {budgets}"
        else:
            step = fixed_mask_step(saved, config.mask_freeze_fraction)
            schedule = f"the masks fixed from step {step} (--mask_freeze_fraction {config.mask_freeze_fraction:g})"
        if saved > max_steps:
            raise ValueError(
                f"The checkpoint being resumed was saved by a pruning run that lays {schedule} on its {saved} "
                f"optimizer steps ({run_length(args)}); this run's batch settings (processes x "
                f"--per_device_train_batch_size x --gradient_accumulation_steps) make {max_steps}, so it would end "
                f"before that schedule does. Resume with the batch settings the run was started with, or give "
                f"--max_steps {saved}."
            )
        logger.warning(
            f"Resumed on the checkpoint's pruning schedule, {schedule} of its {saved} optimizer steps ("
            f"{run_length(args)}); this run's batch settings make {max_steps} steps, which would have moved it."
        )
        return saved

    def derived_warmup_steps(self, args, max_steps: int, train_dataloader: Any = None) -> tuple[int, str] | None:
        """(steps, how they were found) of the target's warm-up this run would have, unless `sparsity_warmup_steps`
        gives it (None)."""
        config = self.trainer.pruning_config
        schedule_steps = self.trainer.schedule_steps
        if config.sparsity_warmup_fraction is not None:
            # With a ladder every rung warms up, so the fraction is of a rung's share of the steps: of the whole run,
            # 0.3 would leave 3 rungs 10% of their share to settle (and 4 rungs none).
            steps = schedule_steps / len(config.sparsity_ladder) if config.sparsity_ladder else schedule_steps
            how = f"--sparsity_warmup_fraction {config.sparsity_warmup_fraction:g} of {steps:g} steps"
            return int(config.sparsity_warmup_fraction * steps), how
        if config.sparsity_warmup_steps is not None:
            return None
        if config.sparsity_ladder:
            # One epoch per rung would leave no time to settle: each rung warms up over half its share of steps.
            return max(1, schedule_steps // (2 * len(config.sparsity_ladder))), "half of each rung's share of the steps"
        # The paper warms the target up over one epoch.
        batches = len(train_dataloader) if hasattr(train_dataloader, "__len__") else None
        return one_epoch_warmup_steps(batches, args.gradient_accumulation_steps, max_steps), "one epoch"

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.masks_frozen:
            return  # no mask gradients: the masks and multipliers keep their values (no momentum steps either)
        # The masker is not inside the (DDP / FSDP / DeepSpeed-wrapped) model: average its gradients across
        # processes ourselves.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
            if world_size > 1:
                for parameter in self.trainer.pruning_parameters():
                    if parameter.grad is None:
                        parameter.grad = torch.zeros_like(parameter)
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad.div_(world_size)
        # Under fp16 autocast the loss was scaled: unscale with the scale the model's step uses (before it
        # updates the scale).
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        if scaler is not None:
            scaler.unscale_(self.trainer.pruning_optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        # Skipped with the model's step (fp16 overflow), and in the fixed-mask phase (no gradients).
        if not trainer.masks_frozen and not trainer.accelerator.optimizer_step_was_skipped:
            trainer.pruning_optimizer.step()
        # CoFi clamps log-alphas after every step.
        trainer.masker.constrain_()
        for parameter in trainer.pruning_parameters():
            parameter.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.ladder is None and trainer.lagrangian.targets.get("overall") is not None:
            # Where the multipliers have brought the masks (what a save now would achieve, unless they are
            # snapped to the target), for the report's `settling` (a ladder watches its rungs itself).
            sparsity = trainer.masker.sparsity_of(trainer.masker.deterministic_masks())
            window = max(trainer.pruning_config.ladder_patience, math.ceil(SETTLING_WINDOW * state.max_steps))
            trainer.sparsity_trace = [*trainer.sparsity_trace, (state.global_step, sparsity)][-window:]
        if trainer.masks_frozen:
            trainer.snap_to_target()  # the fixed-mask phase trains with the masks it will be pruned with

    def on_train_end(self, args, state, control, **kwargs):
        # `load_best_model_at_end` has just loaded the best checkpoint's weights: its masks belong with them.
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            self.trainer.load_pruning_checkpoint(state.best_model_checkpoint, required=False)
            self.trainer.sparsity_trace = []  # the last steps' sparsity no longer describes the masks kept


class ModalAdaptivePruningTrainer(DistillationTrainer):
    """`DistillationTrainer` + hard-concrete structure masks over all modalities + a sparsity Lagrangian.

    Args:
        pruning_config: the [`PruningConfig`] (target sparsity, warm-up, mask learning rate, ...).
        teacher_model: a frozen task-fine-tuned teacher for knowledge distillation, or `None` for the task
            loss alone.
        distillation_config: passed to `DistillationTrainer` (loss weights, terms, layer mappings); only
            with a teacher.
        masker: an existing [`StructureMasker`] to continue from (it must fit the model); by default a new
            one is built with `StructureMasker.from_model(model)`.
        ladder_outputs: with `pruning_config.sparsity_ladder`, how each rung's folder is evaluated and carded
            ([`LadderOutputs`]); by default rungs are saved without evaluation, with a default card.
        *args, **kwargs: the usual `Trainer` arguments (`model`, `args`, datasets, collator, ...).

    While training, every student forward gets sampled `structure_masks`; evaluation uses the deterministic
    masks, so it measures the model that [`finalize_pruning`] will produce. The logs add the expected
    sparsity overall and per modality, the target(s), the multipliers and the Lagrangian term.
    """

    def __init__(
        self,
        *args,
        pruning_config: PruningConfig,
        teacher_model: nn.Module | None = None,
        distillation_config: Any = None,
        masker: StructureMasker | None = None,
        ladder_outputs: LadderOutputs | None = None,
        **kwargs,
    ) -> None:
        if not isinstance(pruning_config, PruningConfig):
            raise ValueError(f"`pruning_config` must be a PruningConfig; got {type(pruning_config).__name__}.")
        if teacher_model is None:
            # Task loss alone: a KD weight of 0 means the (placeholder) teacher is never run.
            if distillation_config is not None:
                raise ValueError("`distillation_config` was given without a `teacher_model` to distil from.")
            teacher_model, distillation_config = _NoTeacher(), DistillationConfig(task_weight=1.0, kd_weight=0.0)
        super().__init__(*args, teacher_model=teacher_model, distillation_config=distillation_config, **kwargs)
        if self.args.activation_checkpointing and (self.args.activation_checkpointing_kwargs or {}).get(
            "use_reentrant"
        ):
            # Reentrant checkpointing re-runs each layer in its own backward pass, and every pass would go back
            # through the one sampled mask graph ("Trying to backward through the graph a second time").
            raise ValueError(
                "Gradient checkpointing with use_reentrant=True cannot train the structure masks, which every layer "
                "reads from one sampled graph: leave `use_reentrant` at False (--activation_checkpointing_kwargs "
                "'{\"use_reentrant\": false}', transformers' default) or train without --activation_checkpointing."
            )
        self.pruning_config = pruning_config
        # The zero FFN neurons an earlier pruning padded with (all-zero fc1 and fc2) are removed first: masks
        # over them would count their parameters as prunable and their removal as sparsity.
        self.silent_neurons_dropped: dict[str, int] | None = None
        if masker is None:
            before = count_parameters(self.model)
            neurons = drop_silent_ffn_neurons(self.model, include_decoder=pruning_config.prune_decoder)
            if neurons:
                self.silent_neurons_dropped = {"neurons": neurons, "parameters": before - count_parameters(self.model)}
                logger.warning(
                    f"Removed {neurons} FFN neurons whose output weights are all zero (an earlier pruning's padding; "
                    "the outputs do not change) before pruning, so that they do not count as prunable."
                )
            masker = StructureMasker.from_model(
                self.model,
                include_decoder=pruning_config.prune_decoder,
                droprate_init=pruning_config.droprate_init,
                head_log_alpha_init=pruning_config.head_log_alpha_init,
                hard_concrete_temperature=pruning_config.hard_concrete_temperature,
            )
        else:
            if masker.includes_decoder != pruning_config.prune_decoder:
                raise ValueError(
                    f"The given masker {'covers' if masker.includes_decoder else 'does not cover'} the answer "
                    f"decoder but `prune_decoder` is {pruning_config.prune_decoder}."
                )
            masker.check_fits(self.model)
        self.masker = masker.to(self.args.device)
        self.lagrangian = SparsityLagrangian(
            pruning_config.target_sparsity,
            pruning_config.sparsity_warmup_steps or 0,
            pruning_config.target_sparsity_per_modality,
            pruning_config.sparsity_ladder,
        ).to(self.args.device)
        for modality in self.lagrangian.targets:
            if modality != "overall" and modality not in self.masker.modalities:
                raise ValueError(
                    f"`target_sparsity_per_modality` names {modality!r}, but the model has no prunable "
                    f"{modality} structures (it has {self.masker.modalities})."
                )
        if self.is_deepspeed_enabled and self.args.fp16:
            raise ValueError(
                "Pruning under DeepSpeed with --fp16 is not supported: DeepSpeed's loss scale would reach the mask "
                "gradients, which it does not unscale. Use --bf16 (or fp32)."
            )
        self.pruning_optimizer = self.create_pruning_optimizer()
        self.pruned = False
        # After `finalize_pruning`: the pruned whole model (None in the other processes under FSDP / ZeRO-3).
        self.pruned_model: nn.Module | None = None
        # First step of the fixed-mask phase (set when training starts; None: masks learn throughout).
        self.mask_freeze_step: int | None = None
        # The optimizer steps the fixed-mask phase and the ladder's budgets are laid on (set when training starts).
        self.schedule_steps: int | None = None
        # On a resume, the schedule of the checkpoint (its warm-up, steps and length flag), which training keeps.
        self.restored_schedule: dict[str, Any] | None = None
        # (step, sparsity of the deterministic masks) after each optimizer step of the last `SETTLING_WINDOW`.
        self.sparsity_trace: list[tuple[int, float]] = []
        # With `snap_to_target`, once the masks are fixed: the log-alpha offset and the sparsity before it.
        self.snap: dict[str, float] | None = None
        self.add_callback(_MaskOptimizationCallback(self))
        # The rungs saved so far (a `SparsityLadder` adds them; empty without a ladder).
        self.ladder: SparsityLadder | None = None
        if pruning_config.sparsity_ladder is not None:
            self.ladder = SparsityLadder(self, ladder_outputs)
            self.add_callback(self.ladder)

    # -- masks in the forward passes ----------------------------------------------------------------------
    def pruning_parameters(self) -> list[nn.Parameter]:
        """The mask log-alphas and the Lagrange multipliers: trained by this trainer, not part of the model."""
        return [*self.masker.parameters(), *self.lagrangian.parameters()]

    @property
    def masks_frozen(self) -> bool:
        """Whether training is in the fixed-mask phase ([`PruningConfig.mask_freeze_fraction`])."""
        return self.mask_freeze_step is not None and self.state.global_step >= self.mask_freeze_step

    def final_masks(self) -> StructureMasks:
        """The deterministic masks the model will be pruned with (and is evaluated with)."""
        offset = self.snap["offset"] if self.snap else 0.0
        return self.masker.deterministic_masks(binary=self.pruning_config.binary_masks, offset=offset)

    def snap_to_target(self) -> None:
        """With `pruning_config.snap_to_target`, once: the offset that brings the final masks' sparsity to the target
        (see [`PruningConfig`]); [`final_masks`] use it from then on."""
        if not self.pruning_config.snap_to_target or self.snap is not None:
            return
        target = self.lagrangian.targets["overall"]
        before = self.masker.sparsity_of(self.final_masks())
        offset = self.masker.offset_for_sparsity(target)
        self.snap = {"offset": offset, "sparsity_before": before, "step": self.state.global_step}
        after = self.masker.sparsity_of(self.final_masks())
        self.snap["sparsity_after"] = after
        logger.info(f"Masks snapped to the target {target}: sparsity {before:.4f} -> {after:.4f}, offset {offset:+.2f}")

    def student_forward_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(super().student_forward_kwargs(inputs))
        if not self.pruned:
            # Sampled masks while learning them; the final masks for evaluation and in the fixed-mask phase.
            learning = self.model.training and not self.masks_frozen
            kwargs["structure_masks"] = self.masker.sample() if learning else self.final_masks()
        return kwargs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training or self.pruned or self.masks_frozen:
            return result
        loss, outputs = result if return_outputs else (result, None)
        lagrangian, logs = self.lagrangian(self.masker, self.state.global_step)
        self.log_loss_terms(logs)
        loss = loss + lagrangian.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    @contextmanager
    def _deterministic_masks_in_forward(self) -> Iterator[None]:
        """Gives the student the deterministic masks in forwards that the Trainer makes itself (evaluation
        of models without labels calls `model(**inputs)` directly)."""
        if self.pruned:
            yield
            return
        masks = self.final_masks()

        def add_masks(module, args, kwargs):
            if kwargs.get("structure_masks") is None:
                kwargs["structure_masks"] = masks
            return args, kwargs

        handle = self.model.register_forward_pre_hook(add_masks, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with self._deterministic_masks_in_forward():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # -- optimizer: the masks and multipliers get their own ------------------------------------------------
    def create_pruning_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the log-alphas and the multipliers (the Trainer's betas and epsilon, fused when the Trainer's
        AdamW is, no weight decay), each with its own constant learning rate: the model's schedule (warm-up, decay
        to 0) would stop enforcing the target at the end of training (CoFi / EfficientVLM keep them constant too)."""
        mask_lr = self.pruning_config.mask_learning_rate
        lagrangian_lr = self.pruning_config.lagrangian_learning_rate or mask_lr
        groups = [
            {"params": list(self.masker.parameters()), "lr": mask_lr, "name": _MASK_GROUP},
            {"params": list(self.lagrangian.parameters()), "lr": lagrangian_lr, "name": _LAGRANGIAN_GROUP},
        ]
        betas = (self.args.adam_beta1, self.args.adam_beta2)
        optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args)
        fused = optimizer_kwargs.get("fused") if optimizer_class is torch.optim.AdamW else None
        return torch.optim.AdamW(groups, betas=betas, eps=self.args.adam_epsilon, weight_decay=0.0, fused=fused)

    # -- checkpoints --------------------------------------------------------------------------------------
    def pruning_state_dict(self) -> dict[str, Any]:
        """What `masker.pt` holds: the log-alphas, the multipliers, their optimizer state and the settings they
        belong to."""
        return {
            "masker": self.masker.state_dict(),
            "lagrangian": self.lagrangian.state_dict(),
            "optimizer": self.pruning_optimizer.state_dict(),
            "structure_sizes": self.masker.structure_sizes,
            "targets": self.lagrangian.targets,
            "warmup_steps": self.lagrangian.warmup_steps,
            "sparsity_warmup_fraction": self.pruning_config.sparsity_warmup_fraction,
            "schedule_steps": self.schedule_steps,
            "run_length": run_length(self.args),
            "rung": self.lagrangian.rung,
            "rung_start_step": self.lagrangian.rung_start_step,
            "steps_in_tolerance": self.lagrangian.steps_in_tolerance,
            "ladder": self.lagrangian.ladder,
            "snap": self.snap,
            "sparsity_trace": self.sparsity_trace,  # a resumed run's report describes the same last steps
        }

    def load_pruning_state_dict(self, state: dict[str, Any]) -> None:
        """Restores [`pruning_state_dict`]; a state for other structures or constraints raises a ValueError."""
        if not isinstance(state, dict) or "masker" not in state or "lagrangian" not in state:
            raise ValueError("The pruning state must be a dict with `masker` and `lagrangian` entries.")
        sizes = state.get("structure_sizes")
        if sizes is not None and sizes != self.masker.structure_sizes:
            raise ValueError(
                f"The mask state was saved for structure sizes {sizes}, but this model has "
                f"{self.masker.structure_sizes}."
            )
        self._check_resumed_settings(state)
        self.masker.load_state_dict(state["masker"])
        own = set(self.lagrangian.state_dict())
        if set(state["lagrangian"]) != own:
            raise ValueError(
                f"The saved multipliers {sorted(state['lagrangian'])} do not match this run's constraints "
                f"{sorted(own)}."
            )
        self.lagrangian.load_state_dict(state["lagrangian"])
        if "warmup_steps" in state:
            self.lagrangian.warmup_steps = int(state["warmup_steps"])
        # Kept when training starts: the batch settings of a resume must not move the schedule mid-run.
        self.restored_schedule = {
            "warmup_steps": int(state["warmup_steps"]) if "warmup_steps" in state else None,
            "schedule_steps": state.get("schedule_steps"),
            "run_length": state.get("run_length"),
        }
        if self.lagrangian.ladder is not None:
            # The rung the checkpoint was on (the rungs below it were saved before it).
            for _ in range(int(state.get("rung", 0)) - self.lagrangian.rung):
                self.lagrangian.advance_rung(0)
            self.lagrangian.rung_start_step = int(state.get("rung_start_step", 0))
            self.lagrangian.steps_in_tolerance = int(state.get("steps_in_tolerance", 0))
        if state.get("optimizer") is not None:  # the optimizer's moments: a resume continues exactly
            self.pruning_optimizer.load_state_dict(state["optimizer"])
        self.snap = state.get("snap")  # a resume in the fixed-mask phase keeps the masks it trained with
        self.sparsity_trace = [(int(step), float(value)) for step, value in state.get("sparsity_trace", [])]

    def _check_resumed_settings(self, state: dict[str, Any]) -> None:
        """Raises when the run resuming `state` asks for other targets (a ladder, its rungs, the global or a
        modality's target) or another explicit warm-up (`sparsity_warmup_steps`, `sparsity_warmup_fraction`) than the
        run that saved it: the masks, multipliers and schedule in the checkpoint belong to those settings. A warm-up
        the run derived (one epoch, a fraction of the steps) is kept when training starts. (Checkpoints of older
        versions hold fewer of these.)"""
        saved_ladder, own_ladder = state.get("ladder", self.lagrangian.ladder), self.lagrangian.ladder
        mismatch = None
        if (saved_ladder is None) != (own_ladder is None) or (
            saved_ladder is not None and tuple(saved_ladder) != tuple(own_ladder)
        ):
            mismatch = f"sparsity ladder {saved_ladder}, this run {own_ladder}"
        elif own_ladder is None and "targets" in state and dict(state["targets"]) != self.lagrangian.targets:
            mismatch = f"targets {dict(state['targets'])}, this run {self.lagrangian.targets}"
        else:
            warmup = self.pruning_config.sparsity_warmup_steps
            fraction = self.pruning_config.sparsity_warmup_fraction
            if warmup is not None and "warmup_steps" in state and int(state["warmup_steps"]) != warmup:
                mismatch = f"sparsity warm-up over {int(state['warmup_steps'])} steps, this run {warmup}"
            elif "sparsity_warmup_fraction" in state and state["sparsity_warmup_fraction"] != fraction:
                mismatch = f"sparsity warm-up fraction {state['sparsity_warmup_fraction']}, this run {fraction}"
        if mismatch is not None:
            raise ValueError(
                f"The checkpoint being resumed was saved by a pruning run with {mismatch}: resume with the flags it "
                "was started with (or start a new run in another --output_dir)."
            )

    def load_pruning_checkpoint(self, checkpoint: str, required: bool = True) -> None:
        """Restores the masks and multipliers saved in `checkpoint`; a missing `masker.pt` raises a ValueError
        unless `required=False`."""
        path = os.path.join(checkpoint, MASK_STATE_FILE)
        if os.path.isfile(path):
            # Read onto the CPU and copied into the parameters: under torchrun `args.device` can read `cpu:0`, which
            # torch.load cannot restore storages to. A damaged file raises a CorruptCheckpointError naming it.
            state = read_torch_weights(path)
            self.load_pruning_state_dict(state)
        elif required:
            raise ValueError(
                f"{checkpoint} has no {MASK_STATE_FILE}: it is not a checkpoint of a pruning run, "
                "so the masks and multipliers cannot be resumed."
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus `masker.pt` next to the weights while the model is not pruned yet (the
        Trainer saves every checkpoint through here, so each one holds the masks that go with its weights)."""
        if self.args.should_save and not self.pruned:
            # Written first, so that a save pushed to the Hub includes it.
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.pruning_state_dict(), os.path.join(output_dir, MASK_STATE_FILE))
        super().save_model(output_dir, _internal_call=_internal_call)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; resuming from a checkpoint also restores its masks and multipliers (`masker.pt`)."""
        if resume_from_checkpoint is True:
            # Resolved as `Trainer.train` does; without a checkpoint it raises its own error.
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        self.restored_schedule = None  # a new run lays its own schedule
        if isinstance(resume_from_checkpoint, (str, os.PathLike)) and os.path.isdir(resume_from_checkpoint):
            # Before the Trainer loads the rest: the optimizer state it restores refers to these same tensors.
            self.load_pruning_checkpoint(str(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # -- the end: physical pruning ------------------------------------------------------------------------
    def finalize_pruning(self) -> dict[str, Any]:
        """Prunes the whole trained student with the deterministic masks, keeps it as `pruned_model` and returns
        the pruning report (the same in every process).

        Without sharded weights the student is pruned in place. Under FSDP or ZeRO-3 its full weights are gathered
        into the world's first process and a copy is pruned there (`trainers.sharding.whole_model`); the other
        processes keep `pruned_model = None`. A collective then: every process calls it. The trainer is done
        afterwards: fine-tune the pruned model further with a new Trainer.
        """
        if self.pruned:
            raise ValueError("The model is already pruned.")
        model = whole_model(self)
        report = self.prune_with_final_masks(model) if model is not None else None
        self.pruned_model = model
        self.pruned = True
        return broadcast_from_first_process(report)

    def prune_with_final_masks(self, model: nn.Module) -> dict[str, Any]:
        """Prunes `model` (the student, or a copy of it) in place with [`final_masks`]; returns the pruning report."""
        self.masker.check_fits(model)
        masker = self.masker
        self.snap_to_target()
        masks = self.final_masks()
        parameters_before = count_parameters(model)
        report: dict[str, Any] = {
            "target_sparsity": self.lagrangian.targets.get("overall"),
            "target_sparsity_per_modality": self.pruning_config.target_sparsity_per_modality,
            "sparsity": masker.sparsity_of(masks),
            "sparsity_per_modality": {m: masker.sparsity_of(masks, m) for m in masker.modalities},
            "expected_sparsity": masker.expected_sparsity().item(),
            "prunable_parameters": masker.total_parameters(),
            "remaining_prunable_parameters": masker.remaining_parameters(masks),
            "prunable_parameters_per_modality": {m: masker.total_parameters(m) for m in masker.modalities},
            "parameters_before": parameters_before,
        }
        kept = masker.kept_structures(masks)
        report["structures_before"] = masker.structure_sizes
        report["structures_kept"] = kept
        report["kept_per_modality"] = {
            modality: {key: sizes for key, sizes in kept.items() if key.startswith(f"{modality}_")}
            for modality in masker.modalities
        }
        report["padding"] = prune_structures(model, masks, kept, self.pruning_config.pad_to_multiple_of)
        report["parameters_after"] = count_parameters(model)
        if self.silent_neurons_dropped is not None:
            report["silent_ffn_neurons_dropped"] = self.silent_neurons_dropped  # before `parameters_before`
        report["pruning_config"] = asdict(self.pruning_config)
        settling = self.settling()
        if settling is not None:
            report["settling"] = settling
        if self.snap is not None:
            report["snap_to_target"] = {key: round(value, 4) for key, value in self.snap.items()}
            if self.ladder is not None:
                self.snap = None  # a rung's snap is for its folder: the run climbs on with the masks it learned
        return report

    def settling(self) -> dict[str, Any] | None:
        """How the sparsity of the deterministic masks (what is saved, unless snapped to the target) behaved over the
        last steps of training (the last 5% of them, at least `ladder_patience`): `settled` if it moved by at most
        `ladder_tolerance` there, `on_target` if it ended within `ladder_tolerance` of the target. A run that had
        not settled, or settled off target, is logged as a warning (unless its masks were snapped to the target):
        its saved sparsity is a moment of a moving target, or not the one asked for. None without an overall
        target, with a ladder (its rungs say it), or before any step."""
        target = self.lagrangian.targets.get("overall")
        if target is None or self.ladder is not None or not self.sparsity_trace:
            return None
        tolerance = self.pruning_config.ladder_tolerance
        steps = [step for step, _ in self.sparsity_trace]
        sparsities = [sparsity for _, sparsity in self.sparsity_trace]
        low, high, last = min(sparsities), max(sparsities), sparsities[-1]
        settled = high - low <= tolerance
        on_target = abs(last - target) <= tolerance
        if self.snap is not None:
            pass  # the saved masks were brought to the target: the report's `snap_to_target` says from where
        elif not self.lagrangian.warmed_up(steps[-1]):
            reached = self.lagrangian.target(steps[-1])
            logger.warning(
                f"The sparsity warm-up ({self.lagrangian.warmup_steps} steps) outlasted the run ({steps[-1]} steps): "
                f"the target had grown to {reached:.4f} of {target} when training ended, so the masks never aimed at "
                "it. Warm up over fewer steps (--sparsity_warmup_steps / --sparsity_warmup_fraction) or train longer."
            )
        elif not settled:
            logger.warning(
                f"The sparsity had not settled when training ended: over steps {steps[0]}-{steps[-1]} the masks' "
                f"sparsity moved between {low:.4f} and {high:.4f} (target {target}; tolerance {tolerance}), so the "
                f"saved {last:.4f} is a moment of a moving value. Train longer (--max_steps), warm the target up over "
                "more steps, or lower --mask_learning_rate / --lagrangian_learning_rate."
            )
        elif not on_target:
            logger.warning(
                f"The sparsity settled at {last:.4f}, not at the target {target} (tolerance {tolerance}): with few "
                "prunable units per layer the saved masks round far from the expected sparsity, or the run was too "
                "short for the multipliers to pull it there."
            )
        return {
            "settled": settled,
            "on_target": on_target,
            "steps": [steps[0], steps[-1]],
            "sparsity_range": [round(low, 4), round(high, 4)],
            "final_sparsity": round(last, 4),
            "tolerance": tolerance,
        }

    def prune_and_save(
        self,
        output_dir: str | os.PathLike | None = None,
        processor: Any = None,
        card: Any = None,
        *,
        answer_candidates: list[str] | None = None,
        push: Any = None,
    ) -> dict[str, Any]:
        """[`finalize_pruning`], then writes the smaller model as a complete folder in `output_dir` (default:
        `args.output_dir`) with `trainers.saving.save_model_folder`: weights, config with `auto_map`, code,
        `processor` (default: the trainer's `processing_class`), `pruning_report.json` and a model card
        (`card`, a `ModelCardInfo`; by default one for the model's task). `answer_candidates` (VQA) are saved
        in the config; `push` (a `HubTarget`) uploads the folder. Returns the report."""
        from trainers.saving import default_card, save_model_folder

        processor = processor if processor is not None else self.processing_class
        if processor is None:
            raise ValueError(
                "prune_and_save needs the processor to save with the model (so the folder can be evaluated and "
                "used): pass `processing_class=` to the trainer or `processor=` here."
            )
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        report = self.finalize_pruning()
        model = self.pruned_model
        if self.args.should_save and model is not None:
            save_model_folder(
                model,
                processor,
                output_dir,
                card if card is not None else default_card(model, stage="prune"),
                pruning_report=report,
                answer_candidates=answer_candidates,
                push=push,
            )
        logger.info(
            f"Pruned to sparsity {report['sparsity']:.4f} ({report['parameters_before']:,} -> "
            f"{report['parameters_after']:,} parameters); saved to {output_dir}."
        )
        return report


__all__ = ["ModalAdaptivePruningTrainer", "PruningConfig"]
