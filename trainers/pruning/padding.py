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

from .hard_concrete import StructureMasks, model_structures

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
    return {
        "pad_to_multiple_of": pad_to_multiple_of,
        "structures_after": after,
        "padded_units": padded,
        "padded_parameters": sum(
            n * unit for key, per_layer in padded.items() for n, unit in zip(per_layer, unit_parameters[key])
        ),
    }


__all__ = ["PAD_TO_MULTIPLE_OF", "prune_structures"]
