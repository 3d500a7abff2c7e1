"""Input checks that hold under `torch.compile`.

A check on tensor values (`if bool(tensor.any()): raise`) makes the compiler stop the graph to read the value
on the host (a graph break). [`check_tensor`] raises the same `ValueError` in eager mode and, while compiling,
becomes an in-graph assertion (`torch._assert_async`, a `RuntimeError` with the same message when it fails), so
inference compiles as one graph (`torch.compile(..., fullgraph=True)`) and bad input still fails loudly.
"""

from __future__ import annotations

import torch


def check_tensor(condition: torch.Tensor, message: str) -> None:
    """Raises `ValueError(message)` unless the boolean scalar tensor `condition` is true (in-graph assertion with
    the same message while `torch.compile` traces)."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)


__all__ = ["check_tensor"]
