"""Official EfficientVLM pruning-stage checkpoints -> physically pruned models.

The official pruning scripts save the whole model's `state_dict()`: the task model's tensors plus the
hard-concrete log-alphas and Lagrange multipliers under `l0_module.*`. This turns the log-alphas into the
official deterministic masks (the `round(n - sum P(z = 0))` highest-scoring units of each layer kept, at 1) with
the same [`StructureMasker`] arithmetic the pruning trainer uses, and removes the masked heads and neurons.

Official layout (one row per layer, one column per unit):
- `vision_head_loga`, `text_head_loga`: heads; `vision_int_loga`, `text_int_loga`, `cross_int_loga`: FFN neurons;
- `cross_head_loga`: two rows per fusion layer, row 2k the self-attention heads and row 2k + 1 the
  cross-attention heads of fusion layer k;
- `decoder_head_loga` (two rows per decoder layer, as above), `decoder_int_loga`: the VQA answer decoder, pruned
  like the encoders (the `decoder` modality; its per-layer sizes go to `config.answer_decoder_*_per_layer`).
- `lambda_1`, `lambda_2`: the Lagrange multipliers, used only while training; reported, not converted.

Which rows a layer's masks come from is what the official forward does, not what the names say: VQA
(`EffXVLMForVQA`; captioning's `EffXVLMForCaptioning` calls its decoder alike) runs its question encoder in
`multi_modal` mode with `head_z = cat(text_head_z, cross_head_z)` and `mlp_z = cat(text_int_z, cross_int_z)`, and
the encoder indexes a fusion layer's rows from the start of those concatenations: fusion layer k masks its self- /
cross-attention heads with rows 2k / 2k + 1 of the concatenated head rows (text rows first) and its FFN with row k
of the concatenated FFN rows, so `cross_int_loga` and the last cross rows never mask anything. The models trained
and were evaluated with those masks, so they are the ones converted ([`official_forward_rows`]). (Captioning
checkpoints hold retrieval's log-alphas, no decoder ones.) Retrieval runs the fusion layers in `fusion` mode on the
cross rows alone, as named.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from modeling_efficientvlm.convert_efficientvlm_checkpoints import (
    model_from_official_state_dict,
    read_official_state_dict,
)
from modeling_efficientvlm.modeling_efficientvlm import StructureMasks

from ..evaluation.benchmarking import count_parameters
from .hard_concrete import HARD_CONCRETE_TEMPERATURE, StructureMasker
from .padding import PAD_TO_MULTIPLE_OF, prune_structures

L0_PREFIX = "l0_module."
# Official log-alpha tensor -> our structure-mask keys; with two keys, rows alternate between them.
ENCODER_LOG_ALPHAS = {
    "vision_head_loga": ("vision_heads",),
    "vision_int_loga": ("vision_ffn",),
    "text_head_loga": ("text_heads",),
    "text_int_loga": ("text_ffn",),
    "cross_head_loga": ("fusion_heads", "fusion_cross_heads"),
    "cross_int_loga": ("fusion_ffn",),
}
DECODER_LOG_ALPHAS = {
    "decoder_head_loga": ("decoder_heads", "decoder_cross_heads"),
    "decoder_int_loga": ("decoder_ffn",),
}
MULTIPLIERS = ("lambda_1", "lambda_2")
PRUNING_STAGE_TASKS = ("retrieval", "vqa", "captioning")
# Tasks whose official forward masks the fusion layers with rows of cat(text, cross) (see the module docstring).
CONCATENATED_ROW_TASKS = ("vqa", "captioning")


def split_pruning_state(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(model tensors, `l0_module` tensors without their prefix) of an official pruning-stage state dict."""
    weights = {name: tensor for name, tensor in state_dict.items() if not name.startswith(L0_PREFIX)}
    l0 = {name[len(L0_PREFIX) :]: tensor for name, tensor in state_dict.items() if name.startswith(L0_PREFIX)}
    if not l0:
        raise ValueError(
            "This state dict has no `l0_module.*` tensors: it is not a pruning-stage checkpoint (`efficientvlm "
            "convert` converts it as it is, processor and card included; in Python, `model_from_official_state_dict`)."
        )
    known = {*ENCODER_LOG_ALPHAS, *DECODER_LOG_ALPHAS, *MULTIPLIERS}
    unknown = sorted(set(l0) - known)
    if unknown:
        raise ValueError(f"Unknown `l0_module` tensors {[L0_PREFIX + n for n in unknown]}; expected {sorted(known)}.")
    return weights, l0


def official_forward_rows(l0: Mapping[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """`l0` with `cross_head_loga` / `cross_int_loga` replaced by the rows the official forward of `task` masks the
    fusion layers with (see the module docstring): for VQA and captioning, the first 2 x (fusion layers) rows of
    `cat(text_head_loga, cross_head_loga)` and the first (fusion layers) rows of `cat(text_int_loga,
    cross_int_loga)`; other tasks unchanged."""
    if task not in CONCATENATED_ROW_TASKS or "cross_head_loga" not in l0 or "cross_int_loga" not in l0:
        return dict(l0)
    fusion_layers = l0["cross_int_loga"].shape[0]
    rows = dict(l0)
    for name, taken in (("head", 2 * fusion_layers), ("int", fusion_layers)):
        text, cross = l0[f"text_{name}_loga"], l0[f"cross_{name}_loga"]
        if text.dim() != 2 or cross.dim() != 2 or text.shape[1] != cross.shape[1]:
            raise ValueError(
                f"`{L0_PREFIX}text_{name}_loga` {tuple(text.shape)} and `{L0_PREFIX}cross_{name}_loga` "
                f"{tuple(cross.shape)}: the official {task} forward concatenates them, so they need rows of one width."
            )
        rows[f"cross_{name}_loga"] = torch.cat([text, cross])[:taken]
    return rows


def _per_layer(
    l0: Mapping[str, torch.Tensor], table: Mapping[str, tuple[str, ...]], sizes: Mapping[str, list[int]]
) -> dict[str, list[torch.Tensor]]:
    """Official log-alpha rows -> one log-alpha vector per layer for each of our keys, shapes checked."""
    per_key: dict[str, list[torch.Tensor]] = {}
    for name, keys in table.items():
        if name not in l0:
            continue
        rows = l0[name]
        if not torch.isfinite(rows).all():
            raise ValueError(f"`{L0_PREFIX}{name}` holds NaN or inf log-alphas: the checkpoint is damaged.")
        expected_rows = sum(len(sizes[key]) for key in keys)
        if rows.dim() != 2 or rows.shape[0] != expected_rows:
            raise ValueError(
                f"`{L0_PREFIX}{name}` has shape {tuple(rows.shape)}; the model needs {expected_rows} rows "
                f"({' / '.join(keys)}: {[len(sizes[key]) for key in keys]} layers)."
            )
        for offset, key in enumerate(keys):
            layers = rows[offset :: len(keys)]
            for layer, (row, units) in enumerate(zip(layers, sizes[key])):
                if row.numel() != units:
                    raise ValueError(
                        f"`{L0_PREFIX}{name}` row {layer * len(keys) + offset} ({key} layer {layer}) has "
                        f"{row.numel()} units; the model has {units}."
                    )
            per_key[key] = [row.float() for row in layers]
    return per_key


def _masks(masker: StructureMasker, log_alphas: Mapping[str, list[torch.Tensor]], binary: bool) -> StructureMasks:
    return {
        key: [masker.deterministic_mask(log_alpha, binary=binary) if log_alpha.numel() else None for log_alpha in rows]
        for key, rows in log_alphas.items()
    }


def prune_official_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    task: str,
    binary: bool = True,
    hard_concrete_temperature: float = HARD_CONCRETE_TEMPERATURE,
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF,
) -> tuple[Any, dict[str, Any]]:
    """An official pruning-stage state dict -> (physically pruned task model, report).

    `binary=True` keeps survivors at 1, as the official evaluation does; `False` folds the survivors' scores
    into the weights (CoFi). The report has the pruning trainer's keys (sparsity overall and per modality,
    units kept per layer, parameters before and after); a VQA checkpoint that masks its answer decoder has it
    pruned too, reported as the `decoder` modality. FFN widths are padded with zero neurons to multiples of
    `pad_to_multiple_of` (`trainers/pruning/padding.py`; the outputs do not change), reported under `padding`.
    """
    if task not in PRUNING_STAGE_TASKS:
        raise ValueError(f"Pruning-stage checkpoints convert for {PRUNING_STAGE_TASKS}; got task {task!r}.")
    weights, l0 = split_pruning_state(state_dict)
    l0 = official_forward_rows(l0, task)
    model = model_from_official_state_dict(weights, task)
    masks_decoder = any(name in l0 for name in DECODER_LOG_ALPHAS)
    if masks_decoder and getattr(model, "answer_decoder", None) is None:
        raise ValueError(f"The checkpoint masks an answer decoder, which the {task} model does not have.")
    masker = StructureMasker.from_model(
        model, include_decoder=masks_decoder, hard_concrete_temperature=hard_concrete_temperature
    )
    tables = {**ENCODER_LOG_ALPHAS, **(DECODER_LOG_ALPHAS if masks_decoder else {})}
    log_alphas = _per_layer(l0, tables, masker.structure_sizes)
    missing = sorted(set(masker.structure_sizes) - set(log_alphas))
    if missing:
        raise ValueError(f"The checkpoint's `l0_module` has no log-alphas for {missing}.")
    masks = _masks(masker, log_alphas, binary)
    report: dict[str, Any] = {
        "task": task,
        "binary_masks": binary,
        "sparsity": masker.sparsity_of(masks),
        "sparsity_per_modality": {modality: masker.sparsity_of(masks, modality) for modality in masker.modalities},
        "structures_before": masker.structure_sizes,
        "structures_kept": masker.kept_structures(masks),
        "prunable_parameters": masker.total_parameters(),
        "remaining_prunable_parameters": masker.remaining_parameters(masks),
        "parameters_before": count_parameters(model),
        "lagrange_multipliers": {name: float(l0[name]) for name in MULTIPLIERS if name in l0},
        "fusion_mask_rows": f"official {task} forward: rows of cat(text, cross) log-alphas"
        if task in CONCATENATED_ROW_TASKS
        else "cross log-alphas",
    }
    report["padding"] = prune_structures(model, masks, report["structures_kept"], pad_to_multiple_of)
    report["parameters_after"] = count_parameters(model)
    return model, report


def load_official_pruning_checkpoint(path: str, task: str, binary: bool = True) -> tuple[Any, dict[str, Any]]:
    """[`prune_official_state_dict`] for a `.pth` file (a state dict, or a dict holding it under `model`)."""
    return prune_official_state_dict(read_official_state_dict(path), task, binary=binary)


__all__ = [
    "load_official_pruning_checkpoint",
    "official_forward_rows",
    "prune_official_state_dict",
    "split_pruning_state",
]
