"""
Knowledge-distillation losses of EfficientVLM (general distillation and task-specific distillation).

Losses are `nn.Module`s kept apart from the models (open_clip's `loss.py` style); each returns a tensor, and
[`DistillationLoss`] returns a dict of named terms so a trainer can weight and log each one.

Choices, following the official EfficientVLM code (`GeneralDistill.py`), which itself follows TinyBERT:

- **Layer mapping.** Student layer `j` (0-based) learns from teacher layer `mapping[j]`; the default is the
  last layer of each block of `T / S` teacher layers, `(j + 1) * T // S - 1` (1, 3, 5, ... for a 2x shrink),
  the layers the student was initialised from ([`default_layer_mapping`]).
- **Hidden states.** MSE between the mapped entries of the `hidden_states` tuples (the input of the first layer,
  then each layer's output). The input (embedding output, or the text states entering the fusion layers) is
  matched too, as in the official code. The official vision term leaves out the student's last layer
  (`vision_skip_last_hidden`). Padding tokens are left out of the mean (the official code averages over them;
  with no padding both agree).
- **Attention.** MSE between attention probabilities, summed over keys and averaged over batch, heads and
  queries, i.e. the official `MSELoss()(s, t) * k_len`. Padding keys and padding queries are left out. When a
  student layer has another number of heads than its teacher layer (after physical pruning), both maps are
  averaged over heads first (`head_mismatch="mean"`), or a `ValueError` is raised (`head_mismatch="error"`);
  a layer whose heads were all pruned (attention `None`) is skipped.
- **Logits.** `soft_cross_entropy` is the official `KLDivLoss(reduction="batchmean")` between
  `log_softmax(student / T)` and `softmax(teacher / T)` over flattened rows, *not* multiplied by `T**2`
  (official temperature: 1.0). It is the soft cross-entropy minus the teacher's entropy: the same gradients,
  and zero when the student matches the teacher. MLM logits are compared at the masked positions only.
- **ITC similarities** (optional, weight 0 by default): the same KL on the image-to-text and text-to-image
  similarity distributions, averaged.

The official general-distillation objective is
`0.6 * (ITC + ITM + MLM) + 0.4 * KD` with
`KD = ITM-logit + MLM-logit + text (attn + hidden) + vision (attn + 0.1 * hidden) + fusion (attn + hidden)`, the
fusion terms summed over the ITM positive pass, the ITM negative pass and the MLM pass; [`DistillationConfig`]'s
defaults reproduce it. (The MLM pass's text layers are logged here under the text terms; the official code
counts them with the fusion terms. With both weights at 1 the total is the same.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LAYER_STACKS = ("vision", "text", "fusion")
HEAD_MISMATCH_MODES = ("mean", "error")


# --------------------------------------------------------------------------------------------------------------
# Layer mappings
# --------------------------------------------------------------------------------------------------------------


def default_layer_mapping(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Teacher layer (0-based) for each student layer: the last layer of each block of `T / S` teacher layers.

    `(j + 1) * T // S - 1`: `[1, 3, 5, 7, 9, 11]` for 12 -> 6, `[1, 3, 5]` for 6 -> 3, evenly spaced otherwise
    (12 -> 5 gives `[1, 3, 6, 8, 11]`). A student deeper than its teacher needs an explicit mapping.
    """
    if num_student_layers < 0 or num_teacher_layers < 0:
        raise ValueError(f"Layer counts must be non-negative; got {num_student_layers} and {num_teacher_layers}.")
    if num_student_layers > num_teacher_layers:
        raise ValueError(
            f"A student with {num_student_layers} layers has no default mapping onto a teacher with "
            f"{num_teacher_layers} layers; pass an explicit layer mapping."
        )
    return [(j + 1) * num_teacher_layers // num_student_layers - 1 for j in range(num_student_layers)]


def validate_layer_mapping(
    mapping: Sequence[int], num_student_layers: int, num_teacher_layers: int, name: str = "layer mapping"
) -> list[int]:
    """Checks that `mapping` has one teacher layer index in `[0, num_teacher_layers)` per student layer."""
    if isinstance(mapping, (str, bytes)) or not isinstance(mapping, Sequence):
        raise ValueError(f"The {name} must be a list of teacher layer indices; got {mapping!r}.")
    mapping = list(mapping)
    if len(mapping) != num_student_layers:
        raise ValueError(
            f"The {name} has {len(mapping)} entries but the student has {num_student_layers} layers; give one "
            "teacher layer index per student layer."
        )
    for j, index in enumerate(mapping):
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"The {name}[{j}] is {index!r}; teacher layer indices must be integers.")
        if not 0 <= index < num_teacher_layers:
            raise ValueError(
                f"The {name}[{j}] is {index}, outside the teacher's {num_teacher_layers} layers "
                f"(valid: 0 to {num_teacher_layers - 1})."
            )
    return mapping


def stack_depths(config: Any) -> dict[str, int] | None:
    """Layers per stack ("vision", "text", "fusion") of an `EfficientVLMConfig`; fusion layers that come in
    twin pairs (NLVR2's `twin_fusion_layers`) count once per pair. None for another kind of config."""
    vision, text = getattr(config, "vision_config", None), getattr(config, "text_config", None)
    if vision is None or text is None:
        return None
    fusion = text.num_fusion_layers // 2 if has_twin_fusion_layers(config) else text.num_fusion_layers
    return {"vision": vision.num_hidden_layers, "text": text.num_hidden_layers, "fusion": fusion}


def has_twin_fusion_layers(config: Any) -> bool:
    """Whether the fusion layers come in (left image, right image) twin pairs (NLVR2)."""
    return bool(getattr(config, "twin_fusion_layers", False))


def expand_twin_mapping(pair_mapping: Sequence[int]) -> list[int]:
    """Per-layer mapping of twin fusion layers from a per-pair mapping: student layer `2i + b` (b = 0 left,
    1 right) learns from teacher layer `2 * pair_mapping[i] + b`."""
    return [2 * pair + side for pair in pair_mapping for side in (0, 1)]


def resolve_layer_mapping(
    mapping: Sequence[int] | None, num_student_layers: int, num_teacher_layers: int, name: str = "layer mapping"
) -> list[int]:
    """The validated `mapping`, or the default one when it is None."""
    if mapping is None:
        return default_layer_mapping(num_student_layers, num_teacher_layers)
    return validate_layer_mapping(mapping, num_student_layers, num_teacher_layers, name)


# --------------------------------------------------------------------------------------------------------------
# Functional losses
# --------------------------------------------------------------------------------------------------------------


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
        student_attentions: one (batch, heads, q_len, k_len) map per student layer (`None` for a layer without
            heads, which is skipped).
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
        if student is None or teacher is None:
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
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    KL(teacher || student) of the temperature-softened distributions, summed over classes and averaged over
    rows (all leading dimensions flattened), as the official `KLDivLoss(reduction="batchmean")`; not scaled by
    `temperature**2`.

    Args:
        student_logits, teacher_logits: (..., classes).
        temperature: softmax temperature (> 0).
        mask: optional boolean (...) selecting the rows to compare (e.g. the masked MLM positions).
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be positive; got {temperature}.")
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
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def itc_distillation(
    student_logits_per_image: torch.Tensor, teacher_logits_per_image: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean of [`soft_cross_entropy`] over the image-to-text rows and the text-to-image columns of the
    (batch, batch) ITC similarity logits."""
    image_to_text = soft_cross_entropy(student_logits_per_image, teacher_logits_per_image, temperature)
    text_to_image = soft_cross_entropy(student_logits_per_image.t(), teacher_logits_per_image.t(), temperature)
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
    """[`soft_cross_entropy`] as a module with a fixed temperature."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"`temperature` must be positive; got {temperature}.")
        self.temperature = temperature

    def forward(self, student_logits, teacher_logits, mask=None) -> torch.Tensor:
        return soft_cross_entropy(student_logits, teacher_logits, self.temperature, mask)


class ITCDistillationLoss(nn.Module):
    """[`itc_distillation`] as a module with a fixed temperature."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"`temperature` must be positive; got {temperature}.")
        self.temperature = temperature

    def forward(self, student_logits_per_image, teacher_logits_per_image) -> torch.Tensor:
        return itc_distillation(student_logits_per_image, teacher_logits_per_image, self.temperature)


# --------------------------------------------------------------------------------------------------------------
# Configuration and the combined loss
# --------------------------------------------------------------------------------------------------------------

# Per-term weights of `DistillationConfig`; the term `kd_<name>` is weighted by `config.<name>`.
KD_TERMS = (
    "itm_logit",
    "mlm_logit",
    "task_logit",
    "itc",
    "text_attn",
    "text_hidden",
    "vision_attn",
    "vision_hidden",
    "fusion_attn",
    "fusion_hidden",
    "fusion_cross_attn",
)


@dataclass
class DistillationConfig:
    """
    What to distil and how to weight it. Defaults are the official general-distillation recipe:
    `total = 0.6 * task loss + 0.4 * KD`,
    `KD = itm_logit + mlm_logit + text_attn + text_hidden + vision_attn + 0.1 * vision_hidden + fusion_attn +
    fusion_hidden`.

    Args:
        vision_layer_mapping, text_layer_mapping, fusion_layer_mapping: teacher layer (0-based, within that
            stack) for each student layer; None = [`default_layer_mapping`] (last layer of each block).
        temperature: softmax temperature of the logit terms (official: 1.0).
        task_weight, kd_weight: weights of the student's own task loss and of the weighted sum of KD terms.
        itm_logit, mlm_logit, task_logit, itc, text_attn, text_hidden, vision_attn, vision_hidden, fusion_attn,
            fusion_hidden, fusion_cross_attn: per-term weights (a term with weight 0 is not computed).
            `task_logit` distils a task model's `logits`; `fusion_cross_attn` the fusion layers'
            cross-attention maps (used by the official task-specific stage, not by general distillation).
        hidden_include_input: also match the inputs of the stacks (official: yes).
        vision_skip_last_hidden: leave the student's last vision layer out of the hidden-state term (official).
        exclude_padding: leave padding tokens out of the hidden-state and attention terms.
        head_mismatch: `"mean"` or `"error"`, see [`attention_mse`].
    """

    vision_layer_mapping: list[int] | None = None
    text_layer_mapping: list[int] | None = None
    fusion_layer_mapping: list[int] | None = None
    temperature: float = 1.0
    task_weight: float = 0.6
    kd_weight: float = 0.4
    itm_logit: float = 1.0
    mlm_logit: float = 1.0
    task_logit: float = 1.0
    itc: float = 0.0
    text_attn: float = 1.0
    text_hidden: float = 1.0
    vision_attn: float = 1.0
    vision_hidden: float = 0.1
    fusion_attn: float = 1.0
    fusion_hidden: float = 1.0
    fusion_cross_attn: float = 0.0
    hidden_include_input: bool = True
    vision_skip_last_hidden: bool = True
    exclude_padding: bool = True
    head_mismatch: str = "mean"

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be positive; got {self.temperature}.")
        for name in ("task_weight", "kd_weight", *KD_TERMS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"The weight `{name}` must be a non-negative number; got {value!r}.")
        if self.head_mismatch not in HEAD_MISMATCH_MODES:
            raise ValueError(f"`head_mismatch` must be one of {HEAD_MISMATCH_MODES}; got {self.head_mismatch!r}.")
        for stack in LAYER_STACKS:
            mapping = getattr(self, f"{stack}_layer_mapping")
            if mapping is None:
                continue
            # Lengths and upper bounds are checked against the models once their depths are known.
            if isinstance(mapping, (str, bytes)) or not isinstance(mapping, Sequence):
                raise ValueError(f"`{stack}_layer_mapping` must be a list of teacher layer indices; got {mapping!r}.")
            for j, index in enumerate(mapping):
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise ValueError(
                        f"`{stack}_layer_mapping[{j}]` is {index!r}; teacher layer indices are integers >= 0."
                    )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DistillationConfig:
        """Builds a config from a dict, naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown distillation settings {unknown}; expected some of {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def weight(self, term: str) -> float:
        """Weight of a KD term, named `kd_<name>` or `<name>` (see `KD_TERMS`)."""
        name = term[3:] if term.startswith("kd_") else term
        if name not in KD_TERMS:
            raise ValueError(f"Unknown KD term {term!r}; expected one of {['kd_' + t for t in KD_TERMS]}.")
        return float(getattr(self, name))

    def layer_mapping(self, stack: str) -> list[int] | None:
        if stack not in LAYER_STACKS:
            raise ValueError(f"Unknown layer stack {stack!r}; expected one of {LAYER_STACKS}.")
        return getattr(self, f"{stack}_layer_mapping")

    @property
    def needs_attentions(self) -> bool:
        """Whether any active term reads attention maps (forcing the eager attention path)."""
        return self.kd_weight > 0 and any(
            getattr(self, name) > 0 for name in ("text_attn", "vision_attn", "fusion_attn", "fusion_cross_attn")
        )

    @property
    def needs_hidden_states(self) -> bool:
        """Whether any active term reads hidden states."""
        return self.kd_weight > 0 and any(
            getattr(self, name) > 0 for name in ("text_hidden", "vision_hidden", "fusion_hidden")
        )


def _num_layers(encoder_output: Any) -> int | None:
    hidden = getattr(encoder_output, "hidden_states", None)
    if hidden is not None:
        return len(hidden) - 1
    attentions = getattr(encoder_output, "attentions", None)
    return None if attentions is None else len(attentions)


class DistillationLoss(nn.Module):
    """
    All KD terms between a student's and a teacher's outputs, as a dict of *unweighted* named terms
    (`kd_itm_logit`, `kd_mlm_logit`, `kd_task_logit`, `kd_itc`, `kd_{text,vision,fusion}_{attn,hidden}`,
    `kd_fusion_cross_attn`); [`DistillationLoss.combine`] weights and sums them.

    Reads the fields the outputs have:
    - pre-training outputs: `itm_logits`, `mlm_logits` (masked positions from `mlm_labels`), `logits_per_image`,
      and the `EncoderOutput`s `vision_output`, `text_output` (text group), `itm_fusion_output` (fusion group,
      the positive and the negative pairs as two terms, as officially), `mlm_text_output` (text group: the
      text layers on the masked text) and `mlm_fusion_output` (fusion group; its input, the last text state,
      is already matched by `mlm_text_output`);
    - task models: `logits` (rows whose label is not -100 when `labels` has the logits' leading shape; for
      (batch, seq) labels the label of row t is `labels[:, t + 1]`, the next token, as in captioning; skipped
      when it is the `itm_logits` tensor, as for retrieval), `vision_output`, `text_output`, `fusion_output`
      (split into positive and negative pairs like `itm_fusion_output` when it holds 3 * batch ITM pairs).
    Terms whose inputs are missing in either output are left out.

    Args:
        config: the [`DistillationConfig`].
        student_config, teacher_config: the models' `EfficientVLMConfig`s (optional). With them, the layer
            mappings are checked at construction, a pass through the whole BERT stack (captioning's
            `text_output`) uses the text mapping followed by the fusion mapping, and twin fusion layers (NLVR2)
            map pair to pair: student layer `2i + b` learns from teacher layer `2 * fusion_mapping[i] + b`.
            Without them, each mapping is resolved from the number of layers an output holds.
    """

    def __init__(
        self, config: DistillationConfig | None = None, student_config: Any = None, teacher_config: Any = None
    ) -> None:
        super().__init__()
        self.config = config if config is not None else DistillationConfig()
        self.logit_loss = SoftCrossEntropyLoss(self.config.temperature)
        self.itc_loss = ITCDistillationLoss(self.config.temperature)
        self.attention_loss = AttentionMSELoss(self.config.head_mismatch)
        # With both model configs the per-stack mappings are checked now and apply to whole-stack passes
        # (e.g. captioning's text + fusion pass) and twin fusion layers; without them, mappings are resolved
        # from the number of layers each output holds.
        self.layer_mappings: dict[str, list[int]] | None = None
        student_depths, teacher_depths = stack_depths(student_config), stack_depths(teacher_config)
        if student_depths is not None and teacher_depths is not None:
            twin = has_twin_fusion_layers(student_config)
            if twin != has_twin_fusion_layers(teacher_config):
                raise ValueError("The student and the teacher must both have twin fusion layers (NLVR2) or neither.")
            self.layer_mappings = {
                stack: resolve_layer_mapping(
                    self.config.layer_mapping(stack),
                    student_depths[stack],
                    teacher_depths[stack],
                    f"{stack}_layer_mapping",
                )
                for stack in LAYER_STACKS
            }
            fusion = self.layer_mappings["fusion"]
            fusion = expand_twin_mapping(fusion) if twin else fusion
            self.layer_mappings["fusion"] = fusion
            # A pass through the whole BERT stack (text layers, then fusion layers).
            self.layer_mappings["multimodal"] = self.layer_mappings["text"] + [
                teacher_depths["text"] + index for index in fusion
            ]
            self._teacher_stack_length = teacher_depths["text"] + (2 if twin else 1) * teacher_depths["fusion"]

    def combine(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of KD terms (without `kd_weight`)."""
        total = None
        for name, value in terms.items():
            term = self.config.weight(name) * value
            total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    # -- per-encoder terms ------------------------------------------------------------------------------
    def _mapping(self, stack: str, student: Any, teacher: Any) -> list[int] | None:
        num_student, num_teacher = _num_layers(student), _num_layers(teacher)
        if num_student is None or num_teacher is None:
            return None
        if self.layer_mappings is None:
            return resolve_layer_mapping(
                self.config.layer_mapping(stack), num_student, num_teacher, f"{stack}_layer_mapping"
            )
        mapping = self.layer_mappings[stack]
        whole_stack = self.layer_mappings["multimodal"]
        if stack == "text" and num_student == len(whole_stack) and num_teacher == self._teacher_stack_length:
            mapping = whole_stack
        if len(mapping) != num_student or (mapping and max(mapping) >= num_teacher):
            raise ValueError(
                f"A {stack} pass of the student has {num_student} layers and the teacher's has {num_teacher}, which "
                f"the {stack} layer mapping {mapping} does not fit."
            )
        return mapping

    def _encoder_terms(
        self,
        terms: dict[str, torch.Tensor],
        group: str,
        stack: str,
        student: Any,
        teacher: Any,
        attention_mask: torch.Tensor | None,
        include_input: bool | None = None,
        skip_last: bool = False,
        rows: slice | None = None,
    ) -> None:
        """Adds the hidden/attention terms of one encoder pass to `terms[kd_<group>_*]`."""
        if student is None or teacher is None:
            return
        config = self.config
        mapping = self._mapping(stack, student, teacher)
        if mapping is None:
            return
        mask = attention_mask if config.exclude_padding else None
        if rows is not None and mask is not None:
            mask = mask[rows]

        def pick(states):
            return tuple(s if (s is None or rows is None) else s[rows] for s in states)

        include_input = config.hidden_include_input if include_input is None else include_input
        has_hidden = student.hidden_states is not None and teacher.hidden_states is not None
        if getattr(config, f"{group}_hidden") > 0 and has_hidden:
            value = hidden_state_mse(
                pick(student.hidden_states), pick(teacher.hidden_states), mapping, mask, include_input, skip_last
            )
            _add(terms, f"kd_{group}_hidden", value)
        if getattr(config, f"{group}_attn") > 0 and student.attentions is not None and teacher.attentions is not None:
            value = self.attention_loss(pick(student.attentions), pick(teacher.attentions), mapping, mask)
            _add(terms, f"kd_{group}_attn", value)
        if (
            group == "fusion"
            and config.fusion_cross_attn > 0
            and getattr(student, "cross_attentions", None) is not None
            and getattr(teacher, "cross_attentions", None) is not None
        ):
            value = self.attention_loss(
                pick(student.cross_attentions), pick(teacher.cross_attentions), mapping, mask, is_cross_attention=True
            )
            _add(terms, "kd_fusion_cross_attn", value)

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(
        self,
        student_outputs: Any,
        teacher_outputs: Any,
        attention_mask: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            student_outputs, teacher_outputs: model outputs of the same inputs (same ITM negatives).
            attention_mask: (batch, seq) padding mask of the (clean and masked) texts.
            mlm_labels: (batch, seq) MLM targets, -100 where not masked: selects the MLM-logit rows.
            labels: task labels; when shaped like the logits without the class dimension, rows with -100 are
                left out of the task-logit term.
        """
        config = self.config
        terms: dict[str, torch.Tensor] = {}

        def both(name: str) -> tuple[Any, Any]:
            return getattr(student_outputs, name, None), getattr(teacher_outputs, name, None)

        # logits
        student, teacher = both("itm_logits")
        if config.itm_logit > 0 and student is not None and teacher is not None:
            terms["kd_itm_logit"] = self.logit_loss(student, teacher)
        student, teacher = both("mlm_logits")
        if config.mlm_logit > 0 and student is not None and teacher is not None:
            mask = None if mlm_labels is None else mlm_labels != -100
            terms["kd_mlm_logit"] = self.logit_loss(student, teacher, mask)
        student, teacher = both("logits")
        # Retrieval models return their ITM logits as `logits` too: count them once.
        aliases = [getattr(student_outputs, name, None) for name in ("itm_logits", "mlm_logits")]
        if any(student is alias for alias in aliases):
            student = None
        if config.task_logit > 0 and isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor):
            mask = None
            if isinstance(labels, torch.Tensor) and labels.shape == student.shape[:-1]:
                mask = labels != -100
                if labels.dim() == 2:
                    # Sequence labels are next-token labels (captioning): row t predicts label t + 1.
                    mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
            terms["kd_task_logit"] = self.logit_loss(student, teacher, mask)
        student, teacher = both("logits_per_image")
        if config.itc > 0 and student is not None and teacher is not None:
            terms["kd_itc"] = self.itc_loss(student, teacher)

        # encoders
        self._encoder_terms(
            terms, "vision", "vision", *both("vision_output"), None, skip_last=config.vision_skip_last_hidden
        )
        self._encoder_terms(terms, "text", "text", *both("text_output"), attention_mask)
        for name in ("fusion_output", "itm_fusion_output"):
            student, teacher = both(name)
            if student is None or teacher is None:
                continue
            itm_mask = _itm_attention_mask(attention_mask, student_outputs, student)
            if itm_mask is None:
                self._encoder_terms(terms, "fusion", "fusion", student, teacher, _text_mask(attention_mask, student))
                continue
            # ITM pairs: the positives and the negatives are two terms each, as in the official code.
            batch = attention_mask.shape[0]
            for rows in (slice(0, batch), slice(batch, None)):
                self._encoder_terms(terms, "fusion", "fusion", student, teacher, itm_mask, rows=rows)
        self._encoder_terms(terms, "text", "text", *both("mlm_text_output"), attention_mask)
        self._encoder_terms(terms, "fusion", "fusion", *both("mlm_fusion_output"), attention_mask, include_input=False)
        return terms


def _add(terms: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    terms[name] = value if name not in terms else terms[name] + value


def _text_mask(attention_mask: torch.Tensor | None, encoder_output: Any) -> torch.Tensor | None:
    """The text padding mask, when the encoder output has the text's batch size and length."""
    states = getattr(encoder_output, "last_hidden_state", None)
    if attention_mask is None or states is None:
        return None
    return attention_mask if tuple(states.shape[:2]) == tuple(attention_mask.shape) else None


def _itm_attention_mask(attention_mask: torch.Tensor | None, outputs: Any, encoder_output: Any) -> torch.Tensor | None:
    """Padding mask of the 3 * batch ITM pairs (positives, negative texts, negative images), when the encoder
    output holds such pairs; else None."""
    negative_text_index = getattr(outputs, "negative_text_index", None)
    states = getattr(encoder_output, "last_hidden_state", None)
    if attention_mask is None or negative_text_index is None or states is None:
        return None
    if states.shape[0] != 3 * attention_mask.shape[0]:
        return None
    return torch.cat([attention_mask, attention_mask[negative_text_index], attention_mask])


__all__ = [
    "KD_TERMS",
    "LAYER_STACKS",
    "AttentionMSELoss",
    "DistillationConfig",
    "DistillationLoss",
    "HiddenStateMSELoss",
    "ITCDistillationLoss",
    "SoftCrossEntropyLoss",
    "attention_mse",
    "default_layer_mapping",
    "expand_twin_mapping",
    "has_twin_fusion_layers",
    "hidden_state_mse",
    "itc_distillation",
    "resolve_layer_mapping",
    "soft_cross_entropy",
    "stack_depths",
    "validate_layer_mapping",
]
