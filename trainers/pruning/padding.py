"""Kernel-friendly FFN widths for physically pruned models.

Masks keep any number of FFN neurons per layer (1563, 1537, ...), and CPU GEMMs whose output or inner size is not
a multiple of 8 run off their fast path. So every path that physically prunes (`efficientvlm prune` and its
ladder rungs, the demo, the benchmark's random pruning, official checkpoints) rounds each pruned FFN's width up to
a multiple of `PAD_TO_MULTIPLE_OF` with all-zero neurons (`model.prune(masks, pad_to_multiple_of=...)`): the
outputs are those of the masked model, and the pruning report lists the padding and counts its parameters.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.utils import logging

from .hard_concrete import StructureMasks, model_structures

logger = logging.get_logger(__name__)

# Measured with `efficientvlm benchmark` (README, Speed): see `prune_structures`.
PAD_TO_MULTIPLE_OF = 8


def prune_structures(
    model: nn.Module,
    masks: StructureMasks,
    structures_kept: dict[str, list[int]],
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF,
) -> dict[str, Any]:
    """`model.prune(masks, pad_to_multiple_of)`, then the report of the padding: the multiple, the units per layer
    of every masked stack after pruning (`structures_after`: kept + padding), the zero neurons added per layer
    (`padded_units`) and their parameters (`padded_parameters`, included in the model's parameter count).
    `structures_kept` are the units the masks keep (`StructureMasker.kept_structures(masks)`)."""
    include_decoder = any(key.startswith("decoder_") for key in structures_kept)
    model.prune(masks, pad_to_multiple_of=pad_to_multiple_of)
    sizes, unit_parameters = model_structures(model, include_decoder=include_decoder)
    after = {key: list(sizes[key]) for key in structures_kept}
    padded = {key: [a - k for a, k in zip(after[key], structures_kept[key])] for key in structures_kept}
    warn_on_emptied_stacks(after)
    return {
        "pad_to_multiple_of": pad_to_multiple_of,
        "structures_after": after,
        "padded_units": padded,
        "padded_parameters": sum(
            n * unit for key, per_layer in padded.items() for n, unit in zip(per_layer, unit_parameters[key])
        ),
    }


def warn_on_emptied_stacks(sizes: dict[str, list[int]]) -> None:
    """Warns when pruning left a whole stack with no head and no FFN neuron (its layers now pass their input through:
    a target that high, counted on the model given, which may be pruned already, takes a modality out), or no
    cross-attention head in the fusion layers (the fused outputs no longer depend on the image)."""
    for stack, reads in (("vision", "image"), ("text", "text"), ("fusion", "image-text pair"), ("decoder", "answer")):
        keys = [key for key in sizes if key.startswith(f"{stack}_")]
        if keys and not any(any(sizes[key]) for key in keys):
            logger.warning(
                f"Pruning removed every head and FFN neuron of the {stack} layers: they now pass their input through, "
                f"and the model reads the {reads} without them. Prune to a lower target if that was not meant."
            )
    if "fusion_cross_heads" in sizes and sizes["fusion_cross_heads"] and not any(sizes["fusion_cross_heads"]):
        logger.warning(
            "Pruning removed every cross-attention head of the fusion layers: the fused outputs (image-text matching, "
            "VQA answers, NLVR2, captions) no longer depend on the image. Prune to a lower target if that was not "
            "meant."
        )


def ffn_blocks(model: nn.Module, include_decoder: bool = False) -> dict[str, list[nn.Module]]:
    """The FFN blocks (`EfficientVLMMLP`) of every `*_ffn` structure key of `model.structure_sizes()`, layer by layer
    (VQA's answer decoder as `decoder_ffn` with `include_decoder`; a model without one raises, as
    `structure_sizes` does)."""
    model.structure_sizes(include_decoder=include_decoder)
    backbone = getattr(model, "efficientvlm", model)

    def text_stack(text_model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        text, fusion = text_model.config.layout.split(text_model.encoder.layer)
        return [layer.mlp for layer in text], [layer.mlp for layer in fusion]

    blocks = {"vision_ffn": [layer.mlp for layer in backbone.vision_model.layers]}
    blocks["text_ffn"], blocks["fusion_ffn"] = text_stack(backbone.text_model)
    if include_decoder:
        blocks["decoder_ffn"] = text_stack(model.answer_decoder)[1]
    return blocks


def drop_silent_ffn_neurons(model: nn.Module, include_decoder: bool = False) -> int:
    """Physically removes every FFN neuron whose `fc1` row, `fc1` bias and `fc2` column are all zero (the padding
    of an earlier pruning): it adds nothing to the outputs, which stay the same, its gradients are zero, and masks
    over it would count its parameters as prunable (a pruned model pruned again reported its padding removed as
    sparsity). A neuron whose `fc2` column alone is zero is kept: it trains (a residual branch initialised at zero,
    `zero_init_residual`, starts so). Returns the number of neurons removed."""
    import torch

    masks, removed = {}, 0
    for key, blocks in ffn_blocks(model, include_decoder).items():
        per_layer = []
        for block in blocks:
            heard = None
            if block.intermediate_size:
                fc1, fc2 = block.fc1, block.fc2
                heard = fc2.weight.detach().ne(0).any(dim=0) | fc1.weight.detach().ne(0).any(dim=1)
                if fc1.bias is not None:
                    heard |= fc1.bias.detach().ne(0)
            silent = 0 if heard is None else int((~heard).sum())
            per_layer.append(heard.to(torch.float32) if silent else None)
            removed += silent
        masks[key] = per_layer
    if removed:
        model.prune(masks)
    return removed


__all__ = [
    "PAD_TO_MULTIPLE_OF",
    "drop_silent_ffn_neurons",
    "ffn_blocks",
    "prune_structures",
    "warn_on_emptied_stacks",
]
