"""Offline test helpers for models: uneven physical pruning of a tiny model."""

from __future__ import annotations

import torch

from trainers.pruning.padding import PAD_TO_MULTIPLE_OF


def prune_unevenly(
    model: torch.nn.Module, seed: int = 0, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF
) -> torch.nn.Module:
    """Prunes `model` in place and returns it: the first layer of every stack loses all its heads and FFN neurons
    (empty blocks), the others lose about half, at random (seeded); FFN widths padded with zero neurons as every
    pruning path of the project pads them (`pad_to_multiple_of`)."""
    generator = torch.Generator().manual_seed(seed)
    model.prune(
        {
            key: [
                torch.zeros(n) if i == 0 else (torch.rand(n, generator=generator) > 0.5).float()
                for i, n in enumerate(sizes)
            ]
            for key, sizes in model.structure_sizes().items()
        },
        pad_to_multiple_of=pad_to_multiple_of,
    )
    return model
