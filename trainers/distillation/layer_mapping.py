"""
Layer mappings of distillation: which teacher layer each student layer learns from (and is initialised from).

Student layer `j` (0-based) learns from teacher layer `mapping[j]`; the default is the last layer of each block
of `T / S` teacher layers, `(j + 1) * T // S - 1` (1, 3, 5, ... for a 2x shrink), the layers the student was
initialised from ([`default_layer_mapping`]).
Which layers are text or fusion layers, and how NLVR2's twin fusion layers pair up, is the model's
`TextStackLayout`.
"""

from __future__ import annotations

from collections.abc import Sequence

LAYER_STACKS = ("vision", "text", "fusion")


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


def resolve_layer_mapping(
    mapping: Sequence[int] | None, num_student_layers: int, num_teacher_layers: int, name: str = "layer mapping"
) -> list[int]:
    """The validated `mapping`, or the default one when it is None."""
    if mapping is None:
        return default_layer_mapping(num_student_layers, num_teacher_layers)
    return validate_layer_mapping(mapping, num_student_layers, num_teacher_layers, name)


__all__ = [
    "LAYER_STACKS",
    "default_layer_mapping",
    "resolve_layer_mapping",
    "validate_layer_mapping",
]
