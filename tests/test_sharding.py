"""`trainers.sharding`: the models' scalar ITC temperature made wrappable by DeepSpeed / FSDP, saved as a scalar;
sharded weights refused by the commands. (A 2-process DeepSpeed run is in `tests/test_distributed.py`.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from trainers.sharding import check_whole_model_in_process, make_scalar_parameters_shardable

from .conftest import make_inputs
from .distributed_reference import tiny_config


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


def test_commands_refuse_sharded_weights() -> None:
    check_whole_model_in_process(SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False))
    with pytest.raises(ValueError, match="--fsdp and DeepSpeed ZeRO stage 3 shard the weights"):
        check_whole_model_in_process(SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=False))
