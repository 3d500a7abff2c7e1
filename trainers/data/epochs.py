"""Per-epoch randomness of collators: a collator with a `set_epoch(epoch)` method (`PretrainingCollator`, whose
MLM masks are seeded per sample and epoch) is told each epoch by a Trainer callback."""

from __future__ import annotations

import math
from typing import Any

from transformers import Trainer, TrainerCallback


class CollatorEpochCallback(TrainerCallback):
    """Tells a collator with a `set_epoch(epoch)` method the epoch about to start, before the Trainer iterates its
    data loader (so data workers see it too: `PretrainingCollator` keeps its epoch in shared memory, which the
    copies held by `--dataloader_persistent_workers` share). On resume mid-epoch, `state.epoch` is that epoch plus
    a fraction: its floor is the epoch."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(math.floor((state.epoch or 0) + 1e-9))


def follow_collator_epochs(trainer: Trainer) -> None:
    """Adds a [`CollatorEpochCallback`] for `trainer`'s collator when it has per-epoch randomness and none is there
    yet (without it every epoch would draw the first epoch's masks again)."""
    collator = trainer.data_collator
    if not hasattr(collator, "set_epoch"):
        return
    callbacks = trainer.callback_handler.callbacks
    if not any(isinstance(callback, CollatorEpochCallback) and callback.collator is collator for callback in callbacks):
        trainer.add_callback(CollatorEpochCallback(collator))
