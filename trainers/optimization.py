"""X-VLM's `lr_mult`: the parameters a task initialises afresh train at a multiple of the learning rate.

The official optimiser puts a model's `init_params` (NLVR2's classifier; pre-training's ITC projections and
temperature, ITM and box heads) in parameter groups of their own at `lr * lr_mult` (2 in the official NLVR2 and
pre-training configs). Here `config.head_learning_rate_multiplier` does the same for the task's
`TaskSpec.fresh_head`, through the `Trainer`'s `optimizer_cls_and_kwargs`: the Trainer's own optimiser class, options
and weight-decay groups, each split in two.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer, TrainingArguments

# Wrappers that prefix parameter names (DDP, FSDP, activation checkpointing).
_WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _unwrapped_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def head_learning_rate_optimizer(
    args: TrainingArguments, model: nn.Module, task: str
) -> tuple[type, dict[str, Any]] | None:
    """`Trainer(optimizer_cls_and_kwargs=...)` whose optimiser trains the task's fresh head at
    `model.config.head_learning_rate_multiplier` times the learning rate (the schedule scales both rates alike);
    None when the multiplier is 1. A task without such a head raises a `ValueError`."""
    from trainers.tasks import task_spec

    multiplier = float(getattr(model.config, "head_learning_rate_multiplier", 1.0))
    if multiplier == 1.0:
        return None
    prefixes = task_spec(task).fresh_head
    if not prefixes:
        raise ValueError(
            f"`head_learning_rate_multiplier` {multiplier:g}: the {task} model has no freshly initialised head "
            "to train faster (X-VLM's `lr_mult` reaches none of its parameters either); leave it at 1."
        )
    base_class, options = Trainer.get_optimizer_cls_and_kwargs(args, model)

    class HeadMultipliedOptimizer(base_class):
        """The Trainer's optimiser, with the fresh head's parameters in groups of their own."""

        def __init__(self, groups: Any, **kwargs: Any) -> None:
            # Read when the Trainer builds the optimiser: after an engine has swapped the parameters in place.
            head = {id(p) for name, p in model.named_parameters() if _unwrapped_name(name).startswith(prefixes)}
            split = []
            for group in groups:
                params = list(group["params"])
                split.append({**group, "params": [p for p in params if id(p) not in head]})
                split.append({**group, "params": [p for p in params if id(p) in head], "lr": kwargs["lr"] * multiplier})
            if not any(group["params"] for group in split[1::2]):
                raise ValueError(
                    f"`head_learning_rate_multiplier`: none of the optimised parameters is in the {task} head "
                    f"({', '.join(prefixes)}); an engine that flattens parameters hides them."
                )
            super().__init__([group for group in split if group["params"]], **kwargs)

    HeadMultipliedOptimizer.__name__ = f"HeadMultiplied{base_class.__name__}"
    return HeadMultipliedOptimizer, options
