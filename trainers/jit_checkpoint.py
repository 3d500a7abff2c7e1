"""`--enable_jit_checkpoint` (a checkpoint on SIGTERM) saved on an optimizer-step boundary, so that a resume
continues exactly, as from any other checkpoint.

transformers' `JITCheckpointCallback` saves from inside the step that is under way when the signal is seen: in
`on_pre_optimizer_step`, after the step's forward and backward but before its optimizer step, the checkpoint is
labelled with the previous step while its RNG state has already drawn this step's randomness (dropout,
hard-concrete mask noise, ITM negatives); a resume then redoes the step with other draws. From `on_step_end` it
saves before the callbacks after it (the pruning masks' and the sparsity ladder's) have run, so their per-step
state is missing. [`StepBoundaryJITCheckpoint`] replaces it: on SIGTERM it only asks the Trainer, at the end of the
optimizer step, to save and stop; the Trainer saves after every callback's `on_step_end` has run, with the
checkpoint code of a scheduled save (`--save_steps`).
"""

from __future__ import annotations

import signal
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)


class StepBoundaryJITCheckpoint(TrainerCallback):
    """On SIGTERM, makes the Trainer save a checkpoint and stop at the end of the optimizer step under way (or of the
    epoch, when the signal comes after its last step).

    Under several processes every one must save at the same step (the save and the next step are collective): the
    request is reduced across processes at every step end (one scalar), so all save at the first step end after
    any of them was signalled.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous_handler: Any = None
        self._installed = False

    def install_signal_handler(self) -> None:
        """Handles SIGTERM from now on (in the main thread only, as Python allows); `on_train_end` puts back the
        handler that was there."""
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def restore_signal_handler(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Only a flag: the handler runs between two bytecodes of the training step, which must finish first.
        self.requested = True

    def _requested_anywhere(self, args: Any) -> bool:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.requested
        if torch.distributed.get_world_size() == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _save_and_stop(self, args, state, control) -> None:
        if self._requested_anywhere(args):
            # Answered: left set, the epoch's end after this step end would save the same checkpoint folder again (in
            # place, doubling the time in the grace period, and a kill then would damage the only new checkpoint).
            self.requested = False
            logger.warning(f"SIGTERM received: saving a checkpoint at step {state.global_step} and stopping training.")
            control.should_save = True
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        # Flags only: the Trainer saves once every callback's `on_step_end` has run, whatever their order.
        self._save_and_stop(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        # No step is under way at an epoch's end: the state is that of its last step's end.
        self._save_and_stop(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_signal_handler()


def use_step_boundary_jit_checkpoint(trainer: Trainer) -> None:
    """Under `--enable_jit_checkpoint`, replaces transformers' `JITCheckpointCallback` of `trainer` (and its SIGTERM
    handler) with a [`StepBoundaryJITCheckpoint`]; does nothing otherwise. Call it right after building the
    Trainer, in the main thread."""
    if not trainer.args.enable_jit_checkpoint:
        return
    callbacks = trainer.callback_handler.callbacks
    if any(isinstance(callback, StepBoundaryJITCheckpoint) for callback in callbacks):
        return
    from transformers.trainer_jit_checkpoint import JITCheckpointCallback

    for callback in [callback for callback in callbacks if isinstance(callback, JITCheckpointCallback)]:
        trainer.callback_handler.remove_callback(callback)
        manager = callback.jit_manager
        if manager is not None and manager._original_sigterm_handler is not None:
            signal.signal(signal.SIGTERM, manager._original_sigterm_handler)
    jit_checkpoint = StepBoundaryJITCheckpoint()
    jit_checkpoint.install_signal_handler()
    trainer.add_callback(jit_checkpoint)


__all__ = ["StepBoundaryJITCheckpoint", "use_step_boundary_jit_checkpoint"]
