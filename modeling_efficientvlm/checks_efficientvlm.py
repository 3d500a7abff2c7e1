"""Input checks that hold under `torch.compile`.

A check on tensor values (`if bool(tensor.any()): raise`) makes the compiler stop the graph to read the value
on the host (a graph break). [`check_tensor`] raises the same `ValueError` in eager mode and, while compiling,
becomes an in-graph assertion (`torch._assert_async`, a `RuntimeError` with the same message when it fails), so
inference compiles as one graph (`torch.compile(..., fullgraph=True)`) and bad input still fails loudly.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def check_tensor(condition: torch.Tensor, message: str) -> None:
    """Raises `ValueError(message)` unless the boolean scalar tensor `condition` is true (in-graph assertion with
    the same message while `torch.compile` traces)."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)


def warn_if_dropout_is_on(model: torch.nn.Module, method: str) -> None:
    """Warns (once per method) when an inference helper of `model` runs in training mode with dropout in its layers:
    its answers then vary from call to call (right after `Trainer.train()` the model is still in training mode).
    The mode is not switched here: the caller owns it (and compiled evaluation must not see it change)."""
    if not model.training or torch.compiler.is_compiling():
        return
    # Dropout layers, and attention modules that drop probabilities by a rate of their own (`dropout`, a float).
    rates = (
        module.p if isinstance(module, torch.nn.Dropout) else getattr(module, "dropout", 0.0)
        for module in model.modules()
    )
    if any(isinstance(rate, float) and rate > 0 for rate in rates):
        logger.warning_once(
            f"`{method}` runs in training mode with dropout on: its results vary from call to call. Call "
            "`model.eval()` first."
        )


__all__ = ["check_tensor", "warn_if_dropout_is_on"]
