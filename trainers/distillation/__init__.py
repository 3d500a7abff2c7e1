"""General and task distillation: a student built from teacher layers, KD losses, `DistillationTrainer`.

- `layer_mapping`: which teacher layer each student layer learns from;
- `losses`: the KD loss functions and modules (hidden MSE, attention MSE, soft cross-entropy, ITC);
- `objective`: `DistillationConfig` and `DistillationLoss`, which combines the terms a task's KD spec declares;
- `trainer`: `DistillationTrainer`; `student_init`: `build_student`.
"""

from .objective import DistillationConfig, DistillationLoss
from .student_init import build_student
from .trainer import DistillationTrainer

__all__ = ["DistillationConfig", "DistillationLoss", "DistillationTrainer", "build_student"]
