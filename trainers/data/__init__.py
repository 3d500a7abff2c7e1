"""Data: X-VLM JSON / `datasets` datasets (`datasets.py`) and the collators of every task (`collators.py`)."""

from .collators import CaptioningCollator, ImageTextCollator, NLVR2Collator, PretrainingCollator, VQACollator
from .datasets import DataSource, ImageTextDataset, NLVR2Dataset, PretrainingDataset, VQADataset

__all__ = [
    "CaptioningCollator",
    "DataSource",
    "ImageTextCollator",
    "ImageTextDataset",
    "NLVR2Collator",
    "NLVR2Dataset",
    "PretrainingCollator",
    "PretrainingDataset",
    "VQACollator",
    "VQADataset",
]
