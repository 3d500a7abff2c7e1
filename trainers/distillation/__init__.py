"""General and task distillation: a student built from teacher layers, KD losses, `DistillationTrainer`."""

from .losses import DistillationConfig, DistillationLoss
from .student_init import build_student
from .trainer import DistillationTrainer

__all__ = ["DistillationConfig", "DistillationLoss", "DistillationTrainer", "build_student"]
