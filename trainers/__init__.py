"""Trainers, losses, data and metrics for distilling and pruning EfficientVLM models."""
