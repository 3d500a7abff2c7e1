"""Trainers, losses, data and metrics for distilling and pruning EfficientVLM models.

The stages of the method, one subpackage each (arrows point one way: commands -> stages -> data/evaluation
-> model):
- `trainers.commands`: the `efficientvlm` command line, one module per subcommand;
- `trainers.distillation`: student built from teacher layers, KD losses, `DistillationTrainer`;
- `trainers.pruning`: hard-concrete masks, the sparsity Lagrangian, `ModalAdaptivePruningTrainer`;
- `trainers.data`: X-VLM JSON / `datasets` datasets and the collators of every task;
- `trainers.evaluation`: metrics (`evaluate` modules), retrieval recall, benchmarking;
- `trainers.demo`: the built-in corpus and the end-to-end demo;
- `trainers.tasks`: the task registry every stage reads.

The names below import lazily, so `import trainers` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DistillationTrainer": "trainers.distillation.trainer",
    "DistillationConfig": "trainers.distillation.objective",
    "build_student": "trainers.distillation.student_init",
    "ModalAdaptivePruningTrainer": "trainers.pruning.trainer",
    "PruningConfig": "trainers.pruning.trainer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'trainers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
