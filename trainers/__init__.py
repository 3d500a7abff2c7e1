"""Trainers, losses, data and metrics for distilling and pruning EfficientVLM models.

Arrows point one way: commands -> stages -> task registry -> data / evaluation -> model.
- `trainers.commands`, `trainers.demo`: the `efficientvlm` command line and the built-in end-to-end demo;
- `trainers.app`: a Gradio page to try saved models side by side (`efficientvlm app`, `space/app.py`);
- `trainers.training`: build, train and save a task model (the loop every stage shares);
- `trainers.distillation`: student built from teacher layers, KD losses, `DistillationTrainer`;
- `trainers.pruning`: hard-concrete masks, the sparsity Lagrangian, `ModalAdaptivePruningTrainer`;
- `trainers.model_card`: model cards and pushing to the Hub;
- `trainers.tasks`: the task registry every stage reads (classes, evaluation, metric, card facts, KD spec);
- `trainers.recipes`: the named settings of `--recipe` (JSON files shipped with the package; the demo's too);
- `trainers.data`: X-VLM JSON / `datasets` datasets and the collators of every task;
- `trainers.evaluation`: one evaluation routine per task, retrieval recall, metrics, benchmarking.

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
