"""
Building an EfficientVLM student from its teacher: a shallower config, then the teacher's weights.

Everything outside the layer stacks (embeddings, LayerNorms, projections, ITC temperature, task heads) is copied
under the same name; student layer `j` of each stack (vision, text, fusion) is copied from teacher layer
`mapping[j]` of the same stack. The default mapping is the official one, the last layer of each block of
`T / S` teacher layers (`2j + 1` for a 2x shrink: vision 12 -> 6 takes `[1, 3, 5, 7, 9, 11]`, text and fusion
6 -> 3 take `[1, 3, 5]` of their own stack). The copy renames state-dict keys, so it works for every task model
that holds the backbone as `self.efficientvlm`; other layer stacks of a task model (e.g. an answer decoder)
follow the same default mapping between their depths.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.utils import logging

from modeling_efficientvlm.configuration_efficientvlm import (
    EfficientVLMConfig,
    TextStackLayout,
    has_twin_fusion_layers,
    stack_depths,
)
from modeling_efficientvlm.modeling_efficientvlm import EfficientVLMModel, EfficientVLMPreTrainedModel

from .layer_mapping import LAYER_STACKS, default_layer_mapping, resolve_layer_mapping

logger = logging.get_logger(__name__)

LayerMapping = Mapping[str, Sequence[int]]


def resolve_layer_mappings(
    student_depths: Mapping[str, int], teacher_depths: Mapping[str, int], layer_mapping: LayerMapping | None = None
) -> dict[str, list[int]]:
    """Validated teacher layer (0-based, within its stack) for each student layer of each stack.

    `layer_mapping` may give any of "vision", "text", "fusion"; the others use [`default_layer_mapping`].
    """
    layer_mapping = dict(layer_mapping or {})
    unknown = sorted(set(layer_mapping) - set(LAYER_STACKS))
    if unknown:
        raise ValueError(f"Unknown layer-mapping keys {unknown}; expected some of {list(LAYER_STACKS)}.")
    return {
        stack: resolve_layer_mapping(
            layer_mapping.get(stack), student_depths[stack], teacher_depths[stack], f"{stack} layer mapping"
        )
        for stack in LAYER_STACKS
    }


def make_student_config(
    teacher_config: EfficientVLMConfig,
    num_vision_layers: int = 6,
    num_text_layers: int = 3,
    num_fusion_layers: int = 3,
    layer_mapping: LayerMapping | None = None,
) -> EfficientVLMConfig:
    """
    The teacher's config with fewer layers in each stack (same widths, vocabulary, image size, ...).

    When the teacher has per-layer sizes (a pruned teacher), the student takes those of the layers it is
    initialised from (`layer_mapping`, default [`default_layer_mapping`]). For a teacher with twin fusion
    layers (NLVR2), `num_fusion_layers` and the fusion mapping count twin pairs.
    """
    if not isinstance(teacher_config, EfficientVLMConfig):
        raise ValueError(f"`teacher_config` must be an EfficientVLMConfig; got {type(teacher_config).__name__}.")
    depths = {"vision": num_vision_layers, "text": num_text_layers, "fusion": num_fusion_layers}
    for stack, depth in depths.items():
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"The student needs at least one {stack} layer; got {depth!r}.")
    teacher_depths = stack_depths(teacher_config)
    mappings = resolve_layer_mappings(depths, teacher_depths, layer_mapping)

    values = copy.deepcopy(teacher_config.to_dict())
    for key in ("_name_or_path", "architectures", "transformers_version"):
        values.pop(key, None)
    vision, text = values["vision_config"], values["text_config"]
    teacher_layout = TextStackLayout.of(teacher_config)
    fusion_layers = teacher_layout.fusion_layer_mapping(mappings["fusion"])
    vision["num_hidden_layers"] = num_vision_layers
    text["num_hidden_layers"] = num_text_layers
    text["num_fusion_layers"] = len(fusion_layers)
    # Per-layer sizes of the chosen teacher layers (lists over the whole BERT stack: text layers first).
    stack_index = teacher_layout.stack_mapping(mappings["text"], mappings["fusion"])
    for key in ("num_attention_heads_per_layer", "intermediate_size_per_layer"):
        if vision.get(key) is not None:
            vision[key] = [vision[key][i] for i in mappings["vision"]]
        if text.get(key) is not None:
            text[key] = [text[key][i] for i in stack_index]
    if text.get("num_cross_attention_heads_per_layer") is not None:
        text["num_cross_attention_heads_per_layer"] = [
            text["num_cross_attention_heads_per_layer"][i] for i in fusion_layers
        ]
    # An answer decoder as deep as the teacher's fusion block stays as deep as the student's.
    if values.get("num_answer_decoder_layers") == teacher_depths["fusion"]:
        values["num_answer_decoder_layers"] = num_fusion_layers
    return type(teacher_config).from_dict(values)


def _backbone_prefix(model: torch.nn.Module) -> str:
    if isinstance(model, EfficientVLMModel):
        return ""
    if isinstance(getattr(model, "efficientvlm", None), EfficientVLMModel):
        return "efficientvlm."
    raise ValueError(
        f"{type(model).__name__} is neither an EfficientVLMModel nor a model holding one as `self.efficientvlm`."
    )


def _model_config(model: torch.nn.Module) -> EfficientVLMConfig:
    config = getattr(model, "config", None)
    if isinstance(config, EfficientVLMConfig):
        return config
    return model.efficientvlm.config


_LAYER_KEY = re.compile(r"^(?P<stack>.*?\.(?:layer|layers))\.(?P<index>\d+)\.(?P<rest>.+)$")


def _other_stack_depths(state_dict: Mapping[str, Any], skip: tuple[str, ...]) -> dict[str, int]:
    """Depth of every other `<...>.layer(s).<i>.` stack in a state dict (e.g. an answer decoder)."""
    depths: dict[str, int] = {}
    for key in state_dict:
        match = _LAYER_KEY.match(key)
        if match and match["stack"] not in skip:
            depths[match["stack"]] = max(depths.get(match["stack"], 0), int(match["index"]) + 1)
    return depths


def init_student_from_teacher(
    teacher: EfficientVLMPreTrainedModel,
    student: EfficientVLMPreTrainedModel,
    layer_mapping: LayerMapping | None = None,
) -> list[str]:
    """
    Copies the teacher's weights into `student` (in place, no gradient).

    Args:
        teacher: the teacher model (e.g. `EfficientVLMForPreTraining` or a task model).
        student: a model of the same class with fewer layers (see [`make_student_config`]).
        layer_mapping: optional `{"vision": [...], "text": [...], "fusion": [...]}`, the teacher layer (0-based,
            within its stack) of each student layer; missing stacks use [`default_layer_mapping`].

    Returns:
        The student's state-dict keys the teacher has no counterpart for (left as initialised); a warning
        lists them too.

    Raises:
        ValueError: bad mapping, or a teacher tensor whose shape differs from the student's (e.g. different
            widths or per-layer pruned sizes).
    """
    teacher_prefix, student_prefix = _backbone_prefix(teacher), _backbone_prefix(student)
    if teacher_prefix != student_prefix:
        raise ValueError(
            f"The teacher ({type(teacher).__name__}) and the student ({type(student).__name__}) hold the backbone "
            "under different names; use models of the same class."
        )
    prefix = student_prefix
    teacher_config, student_config = _model_config(teacher), _model_config(student)
    if has_twin_fusion_layers(teacher_config) != has_twin_fusion_layers(student_config):
        raise ValueError("The teacher and the student must both have twin fusion layers (NLVR2) or neither.")
    mappings = resolve_layer_mappings(stack_depths(student_config), stack_depths(teacher_config), layer_mapping)
    # Teacher stack index of each layer of the student's whole BERT stack (text layers, then fusion layers).
    stack_index = TextStackLayout.of(teacher_config).stack_mapping(mappings["text"], mappings["fusion"])
    vision_stack, text_stack = f"{prefix}vision_model.layers", f"{prefix}text_model.encoder.layer"

    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    skip = (vision_stack, text_stack)
    teacher_other, student_other = _other_stack_depths(teacher_state, skip), _other_stack_depths(student_state, skip)
    other_mappings = {
        stack: default_layer_mapping(depth, teacher_other[stack])
        if depth <= teacher_other.get(stack, 0)
        else list(range(depth))
        for stack, depth in student_other.items()
        if stack in teacher_other
    }

    def teacher_key(key: str) -> str:
        match = _LAYER_KEY.match(key)
        if match is None:
            return key
        stack, index, rest = match["stack"], int(match["index"]), match["rest"]
        if stack == vision_stack:
            source = mappings["vision"][index]
        elif stack == text_stack:
            source = stack_index[index]
        elif stack in other_mappings:
            source = other_mappings[stack][index]
        else:
            return key
        return f"{stack}.{source}.{rest}"

    not_initialized: list[str] = []
    with torch.no_grad():
        for key, target in student_state.items():
            source_key = teacher_key(key)
            source = teacher_state.get(source_key)
            if source is None:
                not_initialized.append(key)
                continue
            if source.shape != target.shape:
                raise ValueError(
                    f"Cannot initialise the student's `{key}` {tuple(target.shape)} from the teacher's "
                    f"`{source_key}` {tuple(source.shape)}: the shapes differ (different widths, or per-layer "
                    "sizes that do not match the chosen teacher layers)."
                )
            target.copy_(source.to(device=target.device, dtype=target.dtype))
    if not_initialized:
        logger.warning(
            f"{len(not_initialized)} student tensors have no counterpart in the teacher and keep their "
            f"initialisation: {not_initialized}"
        )
    return not_initialized


def build_student(
    teacher: EfficientVLMPreTrainedModel,
    num_vision_layers: int = 6,
    num_text_layers: int = 3,
    num_fusion_layers: int = 3,
    layer_mapping: LayerMapping | None = None,
) -> EfficientVLMPreTrainedModel:
    """A model of the teacher's class with `num_*_layers` layers, initialised from the teacher
    ([`make_student_config`] + [`init_student_from_teacher`]), on the teacher's device and dtype."""
    _backbone_prefix(teacher)  # a clear error for a model without the backbone
    config = make_student_config(
        _model_config(teacher), num_vision_layers, num_text_layers, num_fusion_layers, layer_mapping
    )
    parameter = next(teacher.parameters())
    student = type(teacher)(config).to(device=parameter.device, dtype=parameter.dtype)
    init_student_from_teacher(teacher, student, layer_mapping)
    return student


__all__ = [
    "build_student",
    "init_student_from_teacher",
    "make_student_config",
    "resolve_layer_mappings",
]
