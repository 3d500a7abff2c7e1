"""
`DistillationTrainer`: a `transformers.Trainer` that trains a student on its own task loss plus knowledge
distillation from a frozen teacher.

`loss = task_weight * student loss + kd_weight * sum_k weight_k * KD_k` (see [`DistillationConfig`]).

The teacher is not part of `self.model`: it is never given to the optimizer, never saved in checkpoints and
never wrapped for distributed training; it is frozen (`requires_grad_(False)`), kept in eval mode, run under
`torch.no_grad()` (and the accelerator's autocast), and placed on the student's device. Under DeepSpeed ZeRO-3
or FSDP the teacher is therefore a full replica on every device.

Extension points for subclasses (the pruning trainer uses them):
- [`DistillationTrainer.student_forward_kwargs`]: extra keyword arguments for the student's forward only
  (e.g. `structure_masks`);
- [`DistillationTrainer.compute_distillation_terms`]: the named, unweighted KD terms;
- [`DistillationTrainer.log_loss_terms`]: accumulates named values that [`DistillationTrainer.log`] averages
  into the next training log (`loss_task`, `loss_kd`, `loss_itc`, `kd_vision_attn`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from ..data.epochs import follow_collator_epochs
from ..jit_checkpoint import use_step_boundary_jit_checkpoint
from ..sharding import prepare_model_for_engine
from ..tasks import KDSpec
from .objective import DistillationConfig, DistillationLoss

logger = logging.get_logger(__name__)


class DistillationTrainer(Trainer):
    """
    Trainer for knowledge distillation from `teacher_model` into `model`.

    Args:
        *args, **kwargs: the usual `Trainer` arguments (`model` is the student).
        teacher_model: the teacher; it must see the same inputs as the student.
        distillation_config: a [`DistillationConfig`] (or a dict of its fields); default: the official
            general-distillation recipe.

    Works with any student/teacher pair of a task in the registry (`trainers.tasks`): the student's outputs
    carry a `loss`, and the task's KD spec says which of their fields are distilled and how. For pre-training,
    the teacher reuses the student's hard ITM negatives.
    """

    # compute_loss returns a per-batch mean: Trainer divides it by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        teacher_model: nn.Module,
        distillation_config: DistillationConfig | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(teacher_model, nn.Module):
            raise ValueError(f"`teacher_model` must be a torch module; got {type(teacher_model).__name__}.")
        if isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            # The trainers read the student's task, masks and structures: it must be the model itself.
            raise ValueError(
                "The student is a torch.compile()d module: pass the model itself and set `torch_compile=True` in "
                "the TrainingArguments (--torch_compile true), which compiles it for training."
            )
        student = self.accelerator.unwrap_model(self.model)
        student_parameters = {id(p) for p in student.parameters()}
        if teacher_model is student or any(id(p) in student_parameters for p in teacher_model.parameters()):
            raise ValueError("The teacher shares parameters with the student; give a separate teacher model.")
        if distillation_config is None:
            distillation_config = DistillationConfig()
        elif isinstance(distillation_config, Mapping):
            distillation_config = DistillationConfig.from_dict(distillation_config)
        elif not isinstance(distillation_config, DistillationConfig):
            raise ValueError(
                f"`distillation_config` must be a DistillationConfig or a dict; got {type(distillation_config)}."
            )
        self.distillation_config = distillation_config
        # What the student's outputs distil is its task's KD spec, from the task registry; a model of no task
        # can only be trained without KD.
        if distillation_config.kd_weight > 0:
            from trainers.tasks import task_of_model

            spec = task_of_model(student).kd
        else:
            spec = KDSpec()
        self.distillation_loss = DistillationLoss(
            distillation_config,
            student_config=getattr(student, "config", None),
            teacher_config=getattr(teacher_model, "config", None),
            spec=spec,
        )
        teacher_model.requires_grad_(False)
        teacher_model.eval()
        self.teacher_model = teacher_model.to(self.args.device)
        prepare_model_for_engine(self)  # the student, under DeepSpeed / FSDP (the teacher is not wrapped)
        self._loss_term_sums: dict[str, torch.Tensor] = {}
        self._loss_term_counts: dict[str, int] = {}
        follow_collator_epochs(self)
        use_step_boundary_jit_checkpoint(self)  # a SIGTERM checkpoint on a step boundary: resumes exactly

    # -- extension points ---------------------------------------------------------------------------------
    def student_forward_kwargs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments for the student's forward (not the teacher's). Default: none."""
        return {}

    def teacher_forward_kwargs(self, inputs: Mapping[str, Any], student_outputs: Any) -> dict[str, Any]:
        """Extra keyword arguments for the teacher's forward: the student's hard ITM negatives, when it
        sampled some, so both models score the same pairs."""
        negative_text_index = getattr(student_outputs, "negative_text_index", None)
        negative_image_index = getattr(student_outputs, "negative_image_index", None)
        if negative_text_index is not None and negative_image_index is not None:
            return {"itm_negatives": (negative_text_index, negative_image_index)}
        return {}

    def compute_distillation_terms(
        self, student_outputs: Any, teacher_outputs: Any, inputs: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Named, unweighted KD terms (`kd_itm_logit`, `kd_vision_attn`, ...); see [`DistillationLoss`].
        Weighted with `self.distillation_config.weight(name)` and summed in [`compute_loss`].

        In multi-process training the ITC similarity term covers the global batch (the ITC temperatures let it
        recompute the similarities over the gathered embeddings)."""
        temperatures = None
        if self.model.training and self.args.world_size > 1 and self.distillation_config.itc > 0:
            # Each model's temperature as its forward read it: under FSDP / ZeRO-3 the student's weight is whole
            # only inside the forward.
            student = getattr(student_outputs, "itc_temperature", None)
            teacher = getattr(teacher_outputs, "itc_temperature", None)
            temperatures = (student, teacher) if student is not None and teacher is not None else None
        return self.distillation_loss(
            student_outputs,
            teacher_outputs,
            attention_mask=inputs.get("attention_mask"),
            mlm_labels=inputs.get("mlm_labels"),
            labels=inputs.get("labels"),
            itc_temperatures=temperatures,
            itm_negative_attention_mask=inputs.get("itm_negative_attention_mask"),
        )

    def log_loss_terms(self, terms: Mapping[str, float | torch.Tensor]) -> None:
        """Accumulates named scalar values; the next training log reports the mean of each since the last log."""
        for name, value in terms.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.detach().float().reshape(())
            else:
                value = torch.tensor(float(value))
            value = value.to(self.args.device)
            self._loss_term_sums[name] = self._loss_term_sums[name] + value if name in self._loss_term_sums else value
            self._loss_term_counts[name] = self._loss_term_counts.get(name, 0) + 1

    # -- Trainer overrides -----------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the averaged loss terms (see [`log_loss_terms`]) to training logs (those with a `loss`)."""
        if self._loss_term_sums and "loss" in logs:
            names = sorted(self._loss_term_sums)
            means = torch.stack([self._loss_term_sums[n] / self._loss_term_counts[n] for n in names])
            if self.args.world_size > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            logs.update(zip(names, means.tolist()))
            self._loss_term_sums, self._loss_term_counts = {}, {}
        super().log(logs, start_time)

    @torch.no_grad()
    def teacher_forward(self, inputs: Mapping[str, Any], student_outputs: Any) -> Any:
        """Runs the frozen teacher on the student's inputs (eval mode, no gradient)."""
        if self.teacher_model.training:  # someone called .train() on it: dropout would make the targets noisy
            self.teacher_model.eval()
        config = self.distillation_config
        with self.accelerator.autocast():
            return self.teacher_model(
                **inputs,
                **self.teacher_forward_kwargs(inputs, student_outputs),
                output_attentions=config.needs_attentions,
                output_hidden_states=config.needs_hidden_states,
            )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        config = self.distillation_config
        student_outputs = model(
            **inputs,
            **self.student_forward_kwargs(inputs),
            output_attentions=config.needs_attentions,
            output_hidden_states=config.needs_hidden_states,
        )
        task_loss = getattr(student_outputs, "loss", None)
        if task_loss is None:
            raise ValueError(
                "The student returned no `loss`; give it the inputs of its task loss (e.g. `mlm_labels`, `labels`)."
            )
        loss = config.task_weight * task_loss
        logged: dict[str, Any] = {"loss_task": task_loss}
        if config.kd_weight > 0:
            teacher_outputs = self.teacher_forward(inputs, student_outputs)
            terms = self.compute_distillation_terms(student_outputs, teacher_outputs, inputs)
            kd_loss = self.distillation_loss.combine(terms).to(loss.device)
            loss = loss + config.kd_weight * kd_loss
            logged.update(terms)
            logged["loss_kd"] = kd_loss
        if model.training:
            for name, value in student_outputs.items():
                if name.startswith("loss_") and isinstance(value, torch.Tensor):
                    logged.setdefault(name, value)
            self.log_loss_terms(logged)
        return (loss, student_outputs) if return_outputs else loss


__all__ = ["DistillationTrainer"]
