"""
Knowledge-distillation loss functions of EfficientVLM, and the same as `nn.Module`s (open_clip's `loss.py` style);
each returns a tensor. [`trainers.distillation.objective.DistillationLoss`] combines them per task.

Choices, following the official EfficientVLM code (`GeneralDistill.py`), which itself follows TinyBERT:

- **Hidden states.** MSE between the mapped entries of the `hidden_states` tuples (the input of the first layer,
  then each layer's output). The input (embedding output, or the text states entering the fusion layers) is
  matched too, as in the official code. Padding tokens are left out of the mean (the official code averages
  over them; with no padding both agree).
- **Attention.** MSE between attention probabilities, summed over keys and averaged over batch, heads and
  queries, i.e. the official `MSELoss()(s, t) * k_len`. Padding keys and padding queries are left out. When a
  student layer has another number of heads than its teacher layer (after physical pruning), both maps are
  averaged over heads first (`head_mismatch="mean"`), or a `ValueError` is raised (`head_mismatch="error"`);
  a layer whose heads were all pruned (attention `None`) is skipped.
- **Logits.** `soft_cross_entropy` is the official `KLDivLoss(reduction="batchmean")` between
  `log_softmax(student / T)` and `softmax(teacher / T)` over flattened rows, *not* multiplied by `T**2`
  (official KD temperature: 1.0). It is the soft cross-entropy minus the teacher's entropy: the same
  gradients, and zero when the student matches the teacher.
- **ITC similarities**: the same KL on the image-to-text and text-to-image similarity distributions, averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layer_mapping import resolve_layer_mapping

HEAD_MISMATCH_MODES = ("mean", "error")


def check_kd_temperature(kd_temperature: float) -> float:
    """`kd_temperature`, or a ValueError when it is not positive."""
    if not kd_temperature > 0:
        raise ValueError(f"`kd_temperature` must be positive; got {kd_temperature}.")
    return kd_temperature


def _zero(reference: torch.Tensor) -> torch.Tensor:
    # Keeps the graph (and device/dtype) of `reference`, so a term without entries still back-propagates.
    return reference.sum() * 0.0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` (batch, ...) over the positions where `mask` (batch, ...) is non-zero."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    while mask.dim() < values.dim():
        mask = mask.unsqueeze(-1)
    mask = mask.expand_as(values)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _check_tuple(states: Any, name: str) -> tuple:
    if not isinstance(states, (tuple, list)):
        raise ValueError(f"`{name}` must be a tuple of per-layer tensors; got {type(states).__name__}.")
    return tuple(states)


def hidden_state_mse(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    mapping: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    include_input: bool = True,
    skip_last: bool = False,
) -> torch.Tensor:
    """
    Sum over mapped layers of the MSE between student and teacher hidden states.

    Args:
        student_states: the student's `hidden_states` tuple: the input of its first layer, then the output of
            each of its `S` layers, each (batch, seq, hidden).
        teacher_states: the teacher's tuple (`T + 1` entries).
        mapping: teacher layer (0-based) for each student layer; default [`default_layer_mapping`].
        attention_mask: (batch, seq), 1 for tokens and 0 for padding; padding is left out of the mean.
        include_input: also match the inputs (entry 0 of both tuples), as the official code does.
        skip_last: leave out the student's last layer (the official vision term does).
    """
    student_states = _check_tuple(student_states, "student_states")
    teacher_states = _check_tuple(teacher_states, "teacher_states")
    if len(student_states) < 1 or len(teacher_states) < 1:
        raise ValueError("Hidden-state tuples must hold at least the input of the first layer.")
    num_student, num_teacher = len(student_states) - 1, len(teacher_states) - 1
    mapping = resolve_layer_mapping(mapping, num_student, num_teacher, "hidden-state layer mapping")
    pairs = [(0, 0)] if include_input else []
    pairs += [(j + 1, t + 1) for j, t in enumerate(mapping)]
    if skip_last:
        pairs = [pair for pair in pairs if pair[0] != num_student]
    loss = _zero(student_states[0])
    for s, t in pairs:
        student, teacher = student_states[s], teacher_states[t].detach()
        if student.shape != teacher.shape:
            raise ValueError(
                f"Student hidden state {s} has shape {tuple(student.shape)} but teacher hidden state {t} has shape "
                f"{tuple(teacher.shape)}; hidden-state distillation needs equal widths and inputs."
            )
        squared = (student.float() - teacher.float()).pow(2).mean(dim=-1)
        loss = loss + _masked_mean(squared, attention_mask)
    return loss


def attention_mse(
    student_attentions: Sequence[torch.Tensor | None],
    teacher_attentions: Sequence[torch.Tensor | None],
    mapping: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    is_cross_attention: bool = False,
    head_mismatch: str = "mean",
) -> torch.Tensor:
    """
    Sum over mapped layers of the MSE between attention probabilities, summed over keys and averaged over
    batch, heads and queries (the official `MSELoss()(s, t) * k_len`).

    Args:
        student_attentions: one (batch, heads, q_len, k_len) map per student layer (`None` or no heads for a
            layer without heads, which is skipped).
        teacher_attentions: one map per teacher layer.
        mapping: teacher layer (0-based) for each student layer; default [`default_layer_mapping`].
        attention_mask: (batch, q_len) padding mask of the attending sequence (1 = token). For self-attention
            it masks the keys too.
        encoder_attention_mask: (batch, k_len) padding mask of the keys of a cross-attention (default: none).
        is_cross_attention: the maps are cross-attentions (keys are `encoder_attention_mask`'s sequence).
        head_mismatch: `"mean"` compares head-averaged maps when the head counts differ; `"error"` raises.
    """
    if head_mismatch not in HEAD_MISMATCH_MODES:
        raise ValueError(f"`head_mismatch` must be one of {HEAD_MISMATCH_MODES}; got {head_mismatch!r}.")
    student_attentions = _check_tuple(student_attentions, "student_attentions")
    teacher_attentions = _check_tuple(teacher_attentions, "teacher_attentions")
    mapping = resolve_layer_mapping(
        mapping, len(student_attentions), len(teacher_attentions), "attention layer mapping"
    )
    key_mask = encoder_attention_mask if is_cross_attention else attention_mask
    loss = None
    for j, t in enumerate(mapping):
        student, teacher = student_attentions[j], teacher_attentions[t]
        if student is None or teacher is None or (student.dim() == 4 and student.shape[1] == 0):
            continue
        teacher = teacher.detach()
        if student.dim() != 4 or teacher.dim() != 4:
            raise ValueError("Attention maps must have shape (batch, heads, q_len, k_len).")
        if student.shape[1] != teacher.shape[1]:
            if head_mismatch == "error":
                raise ValueError(
                    f"Student attention layer {j} has {student.shape[1]} heads but teacher layer {t} has "
                    f"{teacher.shape[1]}; use head_mismatch='mean' to compare head-averaged maps."
                )
            student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
        if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"Student attention layer {j} has shape {tuple(student.shape)} but teacher layer {t} has "
                f"{tuple(teacher.shape)}; both must see the same inputs."
            )
        squared = (student.float() - teacher.float()).pow(2)
        if key_mask is not None:
            squared = squared * key_mask[:, None, None, :].to(squared.dtype)
        per_query = squared.sum(dim=-1)  # (batch, heads, q_len)
        query_mask = None if attention_mask is None else attention_mask[:, None, :]
        term = _masked_mean(per_query, query_mask)
        loss = term if loss is None else loss + term
    if loss is None:
        references = [a for a in student_attentions if a is not None]
        return _zero(references[0]) if references else torch.zeros(())
    return loss


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kd_temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    KL(teacher || student) of the temperature-softened distributions, summed over classes and averaged over
    rows (all leading dimensions flattened), as the official `KLDivLoss(reduction="batchmean")`; not scaled by
    `kd_temperature**2`.

    Args:
        student_logits, teacher_logits: (..., classes).
        kd_temperature: the KD softmax temperature (> 0).
        mask: optional boolean (...) selecting the rows to compare (e.g. the masked MLM positions).
    """
    check_kd_temperature(kd_temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits have shape {tuple(student_logits.shape)} but teacher logits {tuple(teacher_logits.shape)}."
        )
    classes = student_logits.shape[-1]
    student = student_logits.float().reshape(-1, classes)
    teacher = teacher_logits.detach().float().reshape(-1, classes)
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"The mask has shape {tuple(mask.shape)}; expected {tuple(student_logits.shape[:-1])} (the logits "
                "without the class dimension)."
            )
        keep = mask.reshape(-1).bool()
        student, teacher = student[keep], teacher[keep]
    if student.shape[0] == 0:
        return _zero(student_logits)
    log_student = F.log_softmax(student / kd_temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / kd_temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def slotted_mlm_soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mlm_labels: torch.Tensor,
    slots: int,
    kd_temperature: float = 1.0,
) -> torch.Tensor:
    """
    The official MLM-logit KD: X-VLM gathers each text's logits at `slots` (`max_masks`) positions, its masked
    tokens and then position 0 ([CLS]) for the slots left empty, and averages the KL over all `batch x slots` rows.
    Here the same from the full logits: each masked row counts once, each text's [CLS] row `slots - masked` times.

    Args:
        student_logits, teacher_logits: (batch, seq, vocab).
        mlm_labels: (batch, seq), -100 where not masked; at most `slots` masked tokens per text.
        slots: the official `max_masks` (8).
    """
    check_kd_temperature(kd_temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != mlm_labels.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)}, teacher logits {tuple(teacher_logits.shape)} and "
            f"`mlm_labels` {tuple(mlm_labels.shape)} must agree (batch, seq[, vocab])."
        )
    masked = mlm_labels != -100
    counts = masked.sum(dim=1)
    if bool((counts > slots).any()):
        raise ValueError(f"A text has {int(counts.max())} masked tokens but `mlm_logit_slots` is {slots}.")
    weights = masked.float()
    weights[:, 0] += (slots - counts).float()
    log_student = F.log_softmax(student_logits.float() / kd_temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / kd_temperature, dim=-1)
    per_row = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(dim=-1)
    return (per_row * weights).sum() / (mlm_labels.shape[0] * slots)


def itc_distillation(
    student_logits_per_image: torch.Tensor, teacher_logits_per_image: torch.Tensor, kd_temperature: float = 1.0
) -> torch.Tensor:
    """Mean of [`soft_cross_entropy`] over the image-to-text rows and the text-to-image columns of the
    (batch, batch) ITC similarity logits."""
    image_to_text = soft_cross_entropy(student_logits_per_image, teacher_logits_per_image, kd_temperature)
    text_to_image = soft_cross_entropy(student_logits_per_image.t(), teacher_logits_per_image.t(), kd_temperature)
    return (image_to_text + text_to_image) / 2


# --------------------------------------------------------------------------------------------------------------
# Loss modules
# --------------------------------------------------------------------------------------------------------------


class HiddenStateMSELoss(nn.Module):
    """[`hidden_state_mse`] as a module."""

    def __init__(self, include_input: bool = True, skip_last: bool = False) -> None:
        super().__init__()
        self.include_input = include_input
        self.skip_last = skip_last

    def forward(self, student_states, teacher_states, mapping=None, attention_mask=None) -> torch.Tensor:
        return hidden_state_mse(
            student_states, teacher_states, mapping, attention_mask, self.include_input, self.skip_last
        )


class AttentionMSELoss(nn.Module):
    """[`attention_mse`] as a module."""

    def __init__(self, head_mismatch: str = "mean") -> None:
        super().__init__()
        if head_mismatch not in HEAD_MISMATCH_MODES:
            raise ValueError(f"`head_mismatch` must be one of {HEAD_MISMATCH_MODES}; got {head_mismatch!r}.")
        self.head_mismatch = head_mismatch

    def forward(
        self,
        student_attentions,
        teacher_attentions,
        mapping=None,
        attention_mask=None,
        encoder_attention_mask=None,
        is_cross_attention: bool = False,
    ) -> torch.Tensor:
        return attention_mse(
            student_attentions,
            teacher_attentions,
            mapping,
            attention_mask,
            encoder_attention_mask,
            is_cross_attention,
            self.head_mismatch,
        )


class SoftCrossEntropyLoss(nn.Module):
    """[`soft_cross_entropy`] as a module with a fixed KD temperature."""

    def __init__(self, kd_temperature: float = 1.0) -> None:
        super().__init__()
        self.kd_temperature = check_kd_temperature(kd_temperature)

    def forward(self, student_logits, teacher_logits, mask=None) -> torch.Tensor:
        return soft_cross_entropy(student_logits, teacher_logits, self.kd_temperature, mask)


class ITCDistillationLoss(nn.Module):
    """[`itc_distillation`] as a module with a fixed KD temperature."""

    def __init__(self, kd_temperature: float = 1.0) -> None:
        super().__init__()
        self.kd_temperature = check_kd_temperature(kd_temperature)

    def forward(self, student_logits_per_image, teacher_logits_per_image) -> torch.Tensor:
        return itc_distillation(student_logits_per_image, teacher_logits_per_image, self.kd_temperature)


__all__ = [
    "HEAD_MISMATCH_MODES",
    "AttentionMSELoss",
    "HiddenStateMSELoss",
    "ITCDistillationLoss",
    "SoftCrossEntropyLoss",
    "attention_mse",
    "check_kd_temperature",
    "hidden_state_mse",
    "itc_distillation",
    "slotted_mlm_soft_cross_entropy",
    "soft_cross_entropy",
]
