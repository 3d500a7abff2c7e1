"""Training under DeepSpeed ZeRO or FSDP (`--deepspeed ds.json`, `--fsdp`): what the engines need from our models.

- **0-dimensional parameters.** The models' learnable ITC temperature `temp` is a scalar, as in X-VLM's
  checkpoints. FSDP (1 and 2) refuses scalar parameters ("doesn't support scalar parameters") and DeepSpeed's
  start-up broadcast fails on them (`view(torch.uint8)` of a 0-d tensor). [`make_scalar_parameters_shardable`]
  gives each one the shape (1,) in memory, which every use broadcasts alike, and keeps it a scalar in every
  state dict (so saved folders and checkpoints load as usual) and accepts either shape on `load_state_dict`.
- **Whole models on load.** Under ZeRO-3, `from_pretrained` partitions a model as it loads (`zero.Init`); the
  teacher is never given to the engine, so it would stay a model of shards. [`whole_weights_on_load`] loads
  every model whole; the engine partitions the student when training starts.
- **Sharded weights after training.** Under FSDP and ZeRO-3 each process holds a shard of every weight; the
  commands prune, evaluate and save the whole model. [`whole_model`] gathers the full state dict into process 0
  (`Accelerator.get_state_dict`: ZeRO-3's 16-bit consolidation, FSDP's full state dict) and loads it into a
  new, unwrapped copy of the model there; without sharding it is the trained model itself. Every engine then
  takes the same path: prune / evaluate / save that model in process 0.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
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


def check_engine(trainer: Any) -> None:
    """A ValueError, before training, for sharded runs (FSDP, ZeRO-3) that [`whole_model`] cannot gather: ZeRO-3
    without `stage3_gather_16bit_weights_on_model_save` (accelerate then refuses to consolidate the weights), or
    `--save_on_each_node` (the whole model is gathered into the world's first process only); and `--fsdp` that
    accelerate did not turn on (it enables FSDP on accelerators only: on CPU the run would quietly be DDP)."""
    if getattr(trainer.args, "fsdp", None) and not getattr(trainer, "is_fsdp_enabled", False):
        given = " ".join(str(getattr(option, "value", option)) for option in trainer.args.fsdp)
        raise ValueError(
            f"--fsdp {given} was given, but accelerate did not enable FSDP "
            "(it does so on GPUs and other accelerators only, not with --use_cpu or on a machine without one): "
            "the run would train with plain DDP. Run on accelerators, or leave --fsdp out."
        )
    if not weights_are_sharded(trainer):
        return
    if trainer.args.save_on_each_node:
        raise ValueError(
            "--save_on_each_node with --fsdp or DeepSpeed ZeRO-3: the trained model's weights are gathered into the "
            "world's first process only, which saves it; leave --save_on_each_node out."
        )
    if getattr(trainer, "is_deepspeed_enabled", False):
        zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
            raise ValueError(
                'DeepSpeed ZeRO-3 needs "stage3_gather_16bit_weights_on_model_save": true in the "zero_optimization" '
                "section of the --deepspeed config: the commands gather the trained model's weights into process 0 "
                "to prune, evaluate and save it (and the Trainer's checkpoints then hold the weights too)."
            )


@contextmanager
def whole_weights_on_load(training_args: Any) -> Iterator[None]:
    """Models loaded (`from_pretrained`) inside are whole, even when `training_args` configure DeepSpeed ZeRO-3,
    under which transformers would partition them as they load (`zero.Init`). The teacher must be whole (the
    engine never wraps it) and the student's weights are copied around before training (student init, masker);
    the engine partitions the student when training starts."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    config = getattr(training_args, "hf_deepspeed_config", None)
    if config is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)


def whole_model(trainer: Any, copy_weights: bool = False) -> nn.Module | None:
    """The trained model (a `transformers.Trainer`'s) with all its weights, for pruning, evaluating and saving.

    Without sharded weights (one process, DDP, ZeRO-1/2): the trainer's own unwrapped model (a deep copy of it with
    `copy_weights=True`), in every process. Under FSDP or ZeRO-3: the full state dict is gathered into the world's
    first process (`Accelerator.get_state_dict`) and loaded into a new model of the same class and a copy of its
    config on the CPU, in the dtype of the gathered weights; the other processes get None. There it is a
    collective: every process must call it at the same point."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not weights_are_sharded(trainer):
        return copy.deepcopy(model) if copy_weights else model
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.args.process_index != 0:
        return None
    whole = type(model)(copy.deepcopy(model.config))  # its own config: pruning the copy rewrites it
    own = whole.state_dict()
    missing = sorted(set(own) - set(state_dict))
    if missing:
        raise ValueError(f"The gathered state dict of the trained model lacks {missing[:5]} ({len(missing)} keys).")
    # A 0-d parameter comes back as the (1,) tensor it trained as (see `make_scalar_parameters_shardable`).
    state_dict = {
        key: value.reshape(own[key].shape) if key in own and value.numel() == own[key].numel() else value
        for key, value in state_dict.items()
    }
    whole.load_state_dict(state_dict, strict=True, assign=True)
    if hasattr(whole, "tie_weights"):
        whole.tie_weights()
    return whole.train(model.training)


def broadcast_from_first_process(value: Any) -> Any:
    """`value` of the world's first process, in every process (a picklable object; itself without
    `torch.distributed`). A collective: every process must call it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    if torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


__all__ = [
    "broadcast_from_first_process",
    "check_engine",
    "make_scalar_parameters_shardable",
    "prepare_model_for_engine",
    "weights_are_sharded",
    "whole_model",
    "whole_weights_on_load",
]
