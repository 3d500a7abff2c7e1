"""Training under DeepSpeed ZeRO or FSDP (`--deepspeed ds.json`, `--fsdp`): what the engines need from our models.

- **0-dimensional parameters.** The models' learnable ITC temperature `temp` is a scalar, as in X-VLM's
  checkpoints. FSDP (1 and 2) refuses scalar parameters ("doesn't support scalar parameters") and DeepSpeed's
  start-up broadcast fails on them (`view(torch.uint8)` of a 0-d tensor). [`make_scalar_parameters_shardable`]
  gives each one the shape (1,) in memory, which every use broadcasts alike, and keeps it a scalar in every
  state dict (so saved folders and checkpoints load as usual) and accepts either shape on `load_state_dict`.
- **Sharded weights.** Under FSDP and ZeRO-3 each process holds a shard of every weight. The commands prune,
  evaluate and save the whole model in process 0 after training, which needs the full weights there:
  [`check_whole_model_in_process`] stops such runs before training instead of saving a model of shards.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.tensor import DTensor


def weights_are_sharded(trainer: Any) -> bool:
    """Whether `trainer` (a `transformers.Trainer`) shards the model's weights across processes: FSDP, or
    DeepSpeed ZeRO stage 3."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        return is_deepspeed_zero3_enabled()
    return False


def make_scalar_parameters_shardable(model: nn.Module) -> list[str]:
    """Gives every 0-dimensional parameter of `model` the shape (1,), in place, and returns their names.

    The module that owns one gets two hooks: its `state_dict` holds the value as a scalar again (what
    `save_pretrained` and the checkpoints write, what `from_pretrained` expects), and `load_state_dict` takes a
    scalar or a (1,) tensor. Call it before the optimizer is created and the model is wrapped (the trainers do,
    under DeepSpeed or FSDP). Idempotent: a second call finds nothing to reshape."""
    reshaped = []
    for module_name, module in model.named_modules():
        names = [name for name, parameter in module.named_parameters(recurse=False) if parameter.dim() == 0]
        for name in names:
            parameter = getattr(module, name)
            parameter.data = parameter.data.reshape(1)
            reshaped.append(f"{module_name}.{name}" if module_name else name)
        if names:
            module.register_state_dict_post_hook(_scalars_in_state_dict(names))
            module.register_load_state_dict_pre_hook(_scalars_from_state_dict(names))
    return reshaped


def _scalars_in_state_dict(names: list[str]):
    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for name in names:
            value = state_dict.get(prefix + name)
            # FSDP2's entries are shards (DTensors), which cannot lose their sharded dimension: left as they are.
            if value is not None and not isinstance(value, DTensor) and value.dim() == 1 and value.numel() == 1:
                state_dict[prefix + name] = value.reshape(())

    return hook


def _scalars_from_state_dict(names: list[str]):
    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for name in names:
            value = state_dict.get(prefix + name)
            if value is not None and value.dim() == 0:
                state_dict[prefix + name] = value.reshape(1)

    return hook


def prepare_model_for_engine(trainer: Any) -> None:
    """Under DeepSpeed or FSDP, [`make_scalar_parameters_shardable`] on the trainer's model (before `train`
    wraps it); otherwise nothing."""
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        make_scalar_parameters_shardable(trainer.accelerator.unwrap_model(trainer.model))


def check_whole_model_in_process(trainer: Any) -> None:
    """A ValueError, before training, when `trainer` shards the weights (FSDP, ZeRO-3): the `efficientvlm`
    commands use the whole trained model in process 0 (prune, evaluate and save it) and do not gather it."""
    if weights_are_sharded(trainer):
        raise ValueError(
            "The `efficientvlm` commands prune, evaluate and save the whole model in process 0 after training, but "
            "--fsdp and DeepSpeed ZeRO stage 3 shard the weights across processes. Use DDP (torchrun / accelerate "
            "launch) or DeepSpeed ZeRO stage 1 or 2 (optimizer states and gradients sharded, weights whole)."
        )


__all__ = [
    "check_whole_model_in_process",
    "make_scalar_parameters_shardable",
    "prepare_model_for_engine",
    "weights_are_sharded",
]
