"""
The distillation objective: [`DistillationConfig`] (which terms, with which weights) and [`DistillationLoss`],
which computes the KD terms each task declares in its [`KDSpec`] (in the task registry, `trainers.tasks`).

A [`KDSpec`] names, for one task model's output class, every field that is distilled and how:
- [`LogitKD`]: soft cross-entropy on a logits field (`itm_logit`, `mlm_logit` or `task_logit` weight), on all
  rows, on the masked MLM positions, on the rows with a label, or on the rows whose next token has a label;
- `similarity`: the ITC similarity field (`logits_per_image`), distilled both ways (`itc` weight);
- [`EncoderKD`]: one encoder pass (an `EncoderOutput` field): its hidden states and attention maps (and, in the
  fusion group, cross-attention maps), weighted by `<group>_hidden` / `<group>_attn`, over the layer mapping of
  its `stack` (`"multimodal"`: a pass through the whole BERT stack, text layers then fusion layers);
- `not_distilled`: fields deliberately left out (losses, labels, sampled indices, ...).
A student output with a field the spec does not name raises a `ValueError`, so no output silently goes without
its KD term.

The official general-distillation objective is
`0.6 * (ITC + ITM + MLM) + 0.4 * KD` with
`KD = ITM-logit + MLM-logit + text (attn + hidden) + vision (attn + 0.1 * hidden) + fusion (attn + hidden)`, the
fusion terms summed over the ITM positive pass, the ITM negative pass and the MLM pass; [`DistillationConfig`]'s
defaults and the pre-training spec reproduce it. The official vision hidden term leaves out the student's last
layer (`vision_skip_last_hidden`); the official captioning stage leaves out the student decoder's (the whole stack
run causally) last layer too (`text_skip_last_hidden`) and matches its cross-attention maps (`fusion_cross_attn`,
which covers the fusion layers' cross-attention in any pass). (The MLM pass's text layers are logged here under
the text terms; the official code counts them with the fusion terms. With both weights at 1 the total is the
same.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from modeling_efficientvlm.configuration_efficientvlm import TextStackLayout, has_twin_fusion_layers, stack_depths
from modeling_efficientvlm.loss_efficientvlm import distributed_world_size, gather_batch
from modeling_efficientvlm.modeling_efficientvlm import itm_pair_texts

from ..tasks import EncoderKD, KDSpec, LogitKD
from .layer_mapping import LAYER_STACKS, resolve_layer_mapping
from .losses import (
    HEAD_MISMATCH_MODES,
    AttentionMSELoss,
    ITCDistillationLoss,
    SoftCrossEntropyLoss,
    check_kd_temperature,
    hidden_state_mse,
    slotted_mlm_soft_cross_entropy,
)

# --------------------------------------------------------------------------------------------------------------
# Configuration
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
        kd_temperature: softmax temperature of the logit and ITC terms (official: 1.0).
        task_weight, kd_weight: weights of the student's own task loss and of the weighted sum of KD terms.
        itm_logit, mlm_logit, task_logit, itc, text_attn, text_hidden, vision_attn, vision_hidden, fusion_attn,
            fusion_hidden, fusion_cross_attn: per-term weights (a term with weight 0 is not computed).
            `task_logit` distils a task model's `logits`; `fusion_cross_attn` the fusion layers'
            cross-attention maps, in a fusion pass or a whole-stack pass (captioning's decoder), over the fusion
            layer mapping (used by the official task-specific stage, not by general distillation).
        hidden_include_input: also match the inputs of the stacks (official: yes).
        vision_skip_last_hidden: leave the student's last vision layer out of the hidden-state term (official).
        text_skip_last_hidden: leave the last layer of the student's text passes out of the hidden-state term: of a
            whole-stack pass, its last fusion layer (the official captioning stage does; its other stages do not).
        exclude_padding: leave padding tokens out of the hidden-state and attention terms.
        mlm_logit_slots: 0 averages the MLM-logit KD over the masked tokens; N > 0 averages it as the official code
            does over N slots per text (its `max_masks`, 8), the empty ones at [CLS]
            ([`slotted_mlm_soft_cross_entropy`]; about half the weight on texts with 4 masks).
        head_mismatch: `"mean"` or `"error"`, see [`attention_mse`].
    """

    vision_layer_mapping: list[int] | None = None
    text_layer_mapping: list[int] | None = None
    fusion_layer_mapping: list[int] | None = None
    kd_temperature: float = 1.0
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
    text_skip_last_hidden: bool = False
    exclude_padding: bool = True
    mlm_logit_slots: int = 0
    head_mismatch: str = "mean"

    def __post_init__(self) -> None:
        check_kd_temperature(self.kd_temperature)
        for name in ("task_weight", "kd_weight", *KD_TERMS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"The weight `{name}` must be a non-negative number; got {value!r}.")
        for name in ("hidden_include_input", "vision_skip_last_hidden", "text_skip_last_hidden", "exclude_padding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false; got {getattr(self, name)!r}.")
        slots = self.mlm_logit_slots
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise ValueError(f"`mlm_logit_slots` must be a non-negative integer; got {slots!r}.")
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


# --------------------------------------------------------------------------------------------------------------
# The combined loss
# --------------------------------------------------------------------------------------------------------------


def _num_layers(encoder_output: Any) -> int | None:
    hidden = getattr(encoder_output, "hidden_states", None)
    if hidden is not None:
        return len(hidden) - 1
    attentions = getattr(encoder_output, "attentions", None)
    return None if attentions is None else len(attentions)


class DistillationLoss(nn.Module):
    """
    The KD terms a task's [`KDSpec`] declares, between a student's and a teacher's outputs, as a dict of
    *unweighted* named terms (`kd_itm_logit`, `kd_mlm_logit`, `kd_task_logit`, `kd_itc`,
    `kd_{text,vision,fusion}_{attn,hidden}`, `kd_fusion_cross_attn`); [`DistillationLoss.combine`] weights and
    sums them. A term with weight 0, or whose inputs are missing in either output, is left out.

    Args:
        config: the [`DistillationConfig`].
        student_config, teacher_config: the models' `EfficientVLMConfig`s (optional). With them, the layer
            mappings are checked at construction, a `"multimodal"` pass (captioning's `text_output`) uses the
            text mapping followed by the fusion mapping, and twin fusion layers (NLVR2) map pair to pair:
            student layer `2i + b` learns from teacher layer `2 * fusion_mapping[i] + b`. Without them, each
            mapping is resolved from the number of layers an output holds.
        spec: the task's [`KDSpec`]; default: the pre-training one (general distillation). The trainers take it
            from the task registry (`trainers.tasks.task_of_model`).
    """

    def __init__(
        self,
        config: DistillationConfig | None = None,
        student_config: Any = None,
        teacher_config: Any = None,
        spec: KDSpec | None = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else DistillationConfig()
        if spec is None:
            from trainers.tasks import task_spec

            spec = task_spec("pretraining").kd
        self.spec = spec
        self.logit_loss = SoftCrossEntropyLoss(self.config.kd_temperature)
        self.itc_loss = ITCDistillationLoss(self.config.kd_temperature)
        self.attention_loss = AttentionMSELoss(self.config.head_mismatch)
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
            teacher_layout = TextStackLayout.of(teacher_config)
            fusion_units = self.layer_mappings["fusion"]
            self.layer_mappings["fusion"] = teacher_layout.fusion_layer_mapping(fusion_units)
            # A pass through the whole BERT stack (text layers, then fusion layers).
            self.layer_mappings["multimodal"] = teacher_layout.stack_mapping(self.layer_mappings["text"], fusion_units)

    def combine(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of KD terms (without `kd_weight`)."""
        total = None
        for name, value in terms.items():
            term = self.config.weight(name) * value
            total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    # -- per-field terms --------------------------------------------------------------------------------------
    def _mapping(self, stack: str, num_student: int | None, num_teacher: int | None) -> list[int] | None:
        """Teacher layer of each of the `num_student` layers of a student pass through `stack`."""
        if num_student is None or num_teacher is None:
            return None
        if self.layer_mappings is None:
            config_stack = "text" if stack == "multimodal" else stack
            return resolve_layer_mapping(
                self.config.layer_mapping(config_stack), num_student, num_teacher, f"{config_stack}_layer_mapping"
            )
        mapping = self.layer_mappings[stack]
        if len(mapping) != num_student or (mapping and max(mapping) >= num_teacher):
            raise ValueError(
                f"A {stack} pass of the student has {num_student} layers and the teacher's has {num_teacher}, which "
                f"the {stack} layer mapping {mapping} does not fit."
            )
        return mapping

    def _logit_rows(
        self, kd: LogitKD, logits: torch.Tensor, mlm_labels: torch.Tensor | None, labels: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Boolean mask of the rows of `logits` that `kd` compares (None: all rows)."""
        if kd.rows == "all":
            return None
        if kd.rows == "mlm_labels":
            return None if mlm_labels is None else mlm_labels != -100
        if not isinstance(labels, torch.Tensor):
            return None
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"`labels` of shape {tuple(labels.shape)} cannot select the rows of `{kd.field}` of shape "
                f"{tuple(logits.shape)}: they must have the logits' shape without the class dimension."
            )
        mask = labels != -100
        if kd.rows == "next_token_labels":  # row t predicts label t + 1
            mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
        return mask

    def _encoder_terms(
        self,
        terms: dict[str, torch.Tensor],
        kd: EncoderKD,
        student: Any,
        teacher: Any,
        attention_mask: torch.Tensor | None,
        rows: slice | None = None,
    ) -> None:
        """Adds the hidden/attention terms of one encoder pass to `terms[kd_<group>_*]`."""
        config, group = self.config, kd.group
        mapping = self._mapping(kd.stack, _num_layers(student), _num_layers(teacher))
        if mapping is None:
            return
        mask = attention_mask if config.exclude_padding else None
        if rows is not None and mask is not None:
            mask = mask[rows]

        def pick(states):
            return tuple(s if (s is None or rows is None) else s[rows] for s in states)

        include_input = config.hidden_include_input and kd.match_input
        skip_last = getattr(config, f"{group}_skip_last_hidden", False)
        if (
            getattr(config, f"{group}_hidden") > 0
            and student.hidden_states is not None
            and teacher.hidden_states is not None
        ):
            value = hidden_state_mse(
                pick(student.hidden_states), pick(teacher.hidden_states), mapping, mask, include_input, skip_last
            )
            _add(terms, f"kd_{group}_hidden", value)
        if getattr(config, f"{group}_attn") > 0 and student.attentions is not None and teacher.attentions is not None:
            value = self.attention_loss(pick(student.attentions), pick(teacher.attentions), mapping, mask)
            _add(terms, f"kd_{group}_attn", value)
        student_cross, teacher_cross = (getattr(o, "cross_attentions", None) for o in (student, teacher))
        if config.fusion_cross_attn > 0 and student_cross is not None and teacher_cross is not None:
            # One map per fusion layer, in a fusion pass or a whole-stack one: the fusion mapping.
            cross_mapping = self._mapping("fusion", len(student_cross), len(teacher_cross))
            value = self.attention_loss(
                pick(student_cross), pick(teacher_cross), cross_mapping, mask, is_cross_attention=True
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
        itc_temperatures: tuple[torch.Tensor, torch.Tensor] | None = None,
        itm_negative_attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            student_outputs, teacher_outputs: model outputs of the same inputs (same ITM negatives).
            attention_mask: (batch, seq) padding mask of the (clean and masked) texts.
            mlm_labels: (batch, seq) MLM targets, -100 where not masked: selects the `"mlm_labels"` rows.
            labels: task labels, shaped like the logits without the class dimension: select the `"labels"` and
                `"next_token_labels"` rows.
            itc_temperatures: the student's and the teacher's ITC temperatures. Given (the trainer does, in
                training) under `torch.distributed`, the ITC similarity term compares the similarities over the
                global batch: both models' `image_embeds` / `text_embeds` are gathered from every process (with
                gradients for the student), as the ITC loss does, and every process computes the same term.
                Otherwise the local `logits_per_image` are compared.
            itm_negative_attention_mask: (batch, seq) padding mask of the caption negatives of a retrieval batch
                (`itm_negative_input_ids`), which ITM negative text indices >= batch name.
        """
        config, spec = self.config, self.spec
        spec.check_outputs(student_outputs)
        terms: dict[str, torch.Tensor] = {}
        for kd in spec.logits:
            student, teacher = getattr(student_outputs, kd.field, None), getattr(teacher_outputs, kd.field, None)
            if getattr(config, kd.term) > 0 and student is not None and teacher is not None:
                if kd.rows == "mlm_labels" and config.mlm_logit_slots and mlm_labels is not None:
                    terms[f"kd_{kd.term}"] = slotted_mlm_soft_cross_entropy(
                        student, teacher, mlm_labels, config.mlm_logit_slots, config.kd_temperature
                    )
                    continue
                rows = self._logit_rows(kd, student, mlm_labels, labels)
                terms[f"kd_{kd.term}"] = self.logit_loss(student, teacher, rows)
        if spec.similarity is not None and config.itc > 0:
            student = getattr(student_outputs, spec.similarity, None)
            teacher = getattr(teacher_outputs, spec.similarity, None)
            if student is not None and teacher is not None:
                if itc_temperatures is not None and distributed_world_size() > 1:
                    student = _gathered_similarity(student_outputs, itc_temperatures[0], student)
                    teacher = _gathered_similarity(teacher_outputs, itc_temperatures[1], teacher)
                terms["kd_itc"] = self.itc_loss(student, teacher)
        for kd in spec.encoders:
            student, teacher = getattr(student_outputs, kd.field, None), getattr(teacher_outputs, kd.field, None)
            if student is None or teacher is None:
                continue
            masks = _pass_masks(kd, attention_mask, student_outputs, student, itm_negative_attention_mask)
            for mask, rows in masks:
                self._encoder_terms(terms, kd, student, teacher, mask, rows)
        return terms


def _gathered_similarity(outputs: Any, temperature: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """ITC logits (global batch, global batch) over the embeddings of every process (see [`gather_batch`])."""
    image_embeds, text_embeds = getattr(outputs, "image_embeds", None), getattr(outputs, "text_embeds", None)
    if image_embeds is None or text_embeds is None:
        raise ValueError(
            "Distilling ITC similarities over the global batch needs the outputs' `image_embeds` and `text_embeds`; "
            f"{type(outputs).__name__} has none."
        )
    logits = gather_batch(image_embeds) @ gather_batch(text_embeds).t() / temperature
    return logits.to(local.dtype)


def _add(terms: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    terms[name] = value if name not in terms else terms[name] + value


def _pass_masks(
    kd: EncoderKD,
    attention_mask: torch.Tensor | None,
    outputs: Any,
    encoder_output: Any,
    negative_attention_mask: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor | None, slice | None]]:
    """(padding mask, rows) of each term of an encoder pass; ITM pairs give a positive and a negative term,
    as in the official code."""
    if kd.mask is None:
        return [(None, None)]
    if kd.mask == "text":
        return [(attention_mask, None)]
    itm_mask = _itm_attention_mask(attention_mask, outputs, encoder_output, negative_attention_mask)
    if itm_mask is None:
        return [(_text_mask(attention_mask, encoder_output), None)]
    batch = attention_mask.shape[0]
    return [(itm_mask, slice(0, batch)), (itm_mask, slice(batch, None))]


def _text_mask(attention_mask: torch.Tensor | None, encoder_output: Any) -> torch.Tensor | None:
    """The text padding mask, when the encoder output has the text's batch size and length."""
    states = getattr(encoder_output, "last_hidden_state", None)
    if attention_mask is None or states is None:
        return None
    return attention_mask if tuple(states.shape[:2]) == tuple(attention_mask.shape) else None


def _itm_attention_mask(
    attention_mask: torch.Tensor | None,
    outputs: Any,
    encoder_output: Any,
    negative_attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Padding mask of the (1 + 2n) * batch ITM pairs (positives, negative texts, negative images), when the encoder
    output holds such pairs; else None. Negative text indices >= batch name caption negatives
    (`negative_attention_mask`)."""
    negative_text_index = getattr(outputs, "negative_text_index", None)
    states = getattr(encoder_output, "last_hidden_state", None)
    if attention_mask is None or negative_text_index is None or states is None:
        return None
    batch = attention_mask.shape[0]
    if states.shape[0] != batch + 2 * negative_text_index.shape[0]:
        return None
    return itm_pair_texts(attention_mask, negative_text_index, negative_attention_mask)


__all__ = [
    "KD_TERMS",
    "DistillationConfig",
    "DistillationLoss",
]
