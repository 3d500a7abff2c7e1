"""Modal-adaptive pruning: hard-concrete masks, the sparsity Lagrangian, `ModalAdaptivePruningTrainer`."""

from .hard_concrete import StructureMasker, random_structure_masks
from .ladder import LadderOutputs, SparsityLadder, parse_sparsity_ladder
from .lagrangian import SparsityLagrangian
from .trainer import ModalAdaptivePruningTrainer, PruningConfig

__all__ = [
    "LadderOutputs",
    "SparsityLadder",
    "parse_sparsity_ladder",
    "ModalAdaptivePruningTrainer",
    "PruningConfig",
    "SparsityLagrangian",
    "StructureMasker",
    "random_structure_masks",
]
