"""Trainers, losses, data and metrics for distilling and pruning EfficientVLM models.

Submodules (import what you need; nothing heavy runs at import):
- `trainers.data`: X-VLM JSON / `datasets` datasets and the collators of every task;
- `trainers.tasks`: per-task model class, dataset, collator and evaluation routine;
- `trainers.student_init`: a student initialised from a teacher's layers;
- `trainers.distillation_losses`, `trainers.distillation`: KD losses and `DistillationTrainer`;
- `trainers.l0_masks`, `trainers.pruning`: hard-concrete masks, the sparsity Lagrangian and
  `ModalAdaptivePruningTrainer`;
- `trainers.metrics`: VQA accuracy, NLVR2 accuracy, retrieval recall, BLEU/CIDEr as `evaluate` metrics;
- `trainers.benchmarking`: parameters, FLOPs and latency side by side;
- `trainers.cli`, `trainers.demo`: the `efficientvlm` command and its built-in demo.
"""
