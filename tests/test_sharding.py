"""`trainers.sharding`: the models' scalar ITC temperature made wrappable by DeepSpeed / FSDP, saved as a scalar;
models loaded whole under a ZeRO-3 config; what a sharded run cannot gather refused before training. (2-process
ZeRO-2, ZeRO-3 and FSDP runs are in `tests/test_distributed.py`.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from trainers.sharding import check_engine, make_scalar_parameters_shardable, whole_model, whole_weights_on_load

from .conftest import make_inputs
from .distributed_reference import tiny_config
from .model_utils import prune_unevenly


def test_scalar_parameters_train_as_vectors_and_save_as_scalars(tmp_path) -> None:
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    with torch.no_grad():
        model.efficientvlm.temp.fill_(0.05)
    inputs = make_inputs(model.config, batch_size=4, seed=1)
    with torch.no_grad():
        torch.manual_seed(2)  # the same ITM hard negatives in both forwards
        before = model(**inputs)
    assert make_scalar_parameters_shardable(model) == ["efficientvlm.temp"]
    assert model.efficientvlm.temp.shape == (1,) and make_scalar_parameters_shardable(model) == []
    with torch.no_grad():
        torch.manual_seed(2)
        after = model(**inputs)
    for name in ("loss", "logits_per_image", "itm_logits"):
        if getattr(before, name, None) is not None:
            assert torch.equal(getattr(before, name), getattr(after, name)), name
    # Saved as a scalar: the folder loads into an ordinary model.
    assert model.state_dict()["efficientvlm.temp"].shape == ()
    model.save_pretrained(tmp_path)
    loaded = EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path)
    assert loaded.efficientvlm.temp.shape == () and loaded.efficientvlm.temp.item() == pytest.approx(0.05)
    # Loads from either shape (DeepSpeed's own checkpoints go through load_state_dict).
    for value in (torch.tensor(0.2), torch.tensor([0.3])):
        model.load_state_dict({**model.state_dict(), "efficientvlm.temp": value})
        assert model.efficientvlm.temp.shape == (1,) and model.efficientvlm.temp.item() == pytest.approx(value.item())


def _trainer(
    fsdp: bool = False, zero: dict | None = None, save_on_each_node: bool = False, fsdp_flag: list | None = None
) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": zero or {}})
    return SimpleNamespace(
        is_fsdp_enabled=fsdp,
        is_deepspeed_enabled=zero is not None,
        args=SimpleNamespace(save_on_each_node=save_on_each_node, fsdp=["full_shard"] if fsdp else (fsdp_flag or [])),
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
    )


def test_sharded_runs_that_cannot_be_gathered_are_refused_before_training() -> None:
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    check_engine(_trainer(save_on_each_node=True))  # DDP: every process holds the whole model
    check_engine(_trainer(fsdp=True))
    with pytest.raises(ValueError, match="--save_on_each_node with --fsdp or DeepSpeed ZeRO-3"):
        check_engine(_trainer(fsdp=True, save_on_each_node=True))
    # --fsdp on a CPU: accelerate leaves FSDP off and the run would quietly be DDP.
    with pytest.raises(ValueError, match="--fsdp full_shard was given, but accelerate did not enable FSDP"):
        check_engine(_trainer(fsdp_flag=["full_shard"]))
    zero3 = {"stage": 3}
    config = HfDeepSpeedConfig({"zero_optimization": zero3, "train_micro_batch_size_per_gpu": 1})
    try:
        with pytest.raises(ValueError, match='"stage3_gather_16bit_weights_on_model_save": true'):
            check_engine(_trainer(zero=zero3))
        check_engine(_trainer(zero={**zero3, "stage3_gather_16bit_weights_on_model_save": True}))
    finally:
        unset_hf_deepspeed_config()
    del config


def test_models_load_whole_under_a_zero3_config(tmp_path) -> None:
    """Under a ZeRO-3 config `from_pretrained` would partition a model as it loads (`zero.Init`); inside
    `whole_weights_on_load` it does not, and the config is in force again afterwards."""
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    torch.manual_seed(0)
    EfficientVLMForImageTextRetrieval(tiny_config()).save_pretrained(tmp_path)
    args = SimpleNamespace(hf_deepspeed_config=HfDeepSpeedConfig({"zero_optimization": {"stage": 3}}))
    try:
        with whole_weights_on_load(args):
            assert not is_deepspeed_zero3_enabled()
            model = EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path)
        assert is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()
    assert not any(hasattr(p, "ds_id") for p in model.parameters())
    assert model.efficientvlm.temp.shape == ()
    with whole_weights_on_load(SimpleNamespace()):  # no DeepSpeed: nothing to lift
        assert not is_deepspeed_zero3_enabled()


def test_whole_model_without_sharding_is_the_trained_model() -> None:
    model = EfficientVLMForImageTextRetrieval(tiny_config())
    trainer = SimpleNamespace(
        model=model,
        is_fsdp_enabled=False,
        is_deepspeed_enabled=False,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
    )
    assert whole_model(trainer) is model
    copied = whole_model(trainer, copy_weights=True)
    assert copied is not model and copied.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in copied.state_dict().items())


def test_whole_model_under_sharding_is_a_new_model_with_the_gathered_weights() -> None:
    """The sharded branch with a stand-in for the gather (`Accelerator.get_state_dict`): process 0 gets a new model
    with the gathered weights (the temperature back to a scalar) and a config of its own, so pruning it leaves the
    trained model's config alone (a sparsity ladder prunes several copies); the other processes get None."""
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config())
    make_scalar_parameters_shardable(model)
    gathered = {key: value.clone() for key, value in model.state_dict(keep_vars=False).items()}
    gathered["efficientvlm.temp"] = gathered["efficientvlm.temp"].reshape(1)  # as ZeRO-3 consolidates it

    def trainer(rank: int) -> SimpleNamespace:
        accelerator = SimpleNamespace(unwrap_model=lambda m: m, get_state_dict=lambda m: gathered if rank == 0 else {})
        return SimpleNamespace(
            model=model,
            model_wrapped=model,
            is_fsdp_enabled=True,
            is_deepspeed_enabled=False,
            accelerator=accelerator,
            args=SimpleNamespace(process_index=rank),
        )

    assert whole_model(trainer(1)) is None
    whole = whole_model(trainer(0))
    assert whole is not model and whole.config is not model.config
    assert whole.efficientvlm.temp.shape == ()
    for key, value in whole.state_dict().items():
        assert torch.equal(value, gathered[key].reshape(value.shape)), key
    sizes = model.config.to_dict()
    prune_unevenly(whole)
    assert whole.config.to_dict() != sizes and model.config.to_dict() == sizes
