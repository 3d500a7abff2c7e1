"""Saved folders load with `trust_remote_code=True` in a process that cannot import this repository."""

from __future__ import annotations

import torch

from modeling_efficientvlm import EfficientVLMForPreTraining, EfficientVLMModel

from .conftest import make_inputs
from .remote_code_utils import load_in_clean_subprocess


def test_saved_folder_carries_code_and_auto_map(tiny_config, tmp_path) -> None:
    EfficientVLMForPreTraining(tiny_config).save_pretrained(tmp_path)
    names = {path.name for path in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_efficientvlm.py", "modeling_efficientvlm.py"} <= names
    assert "loss_efficientvlm.py" in names  # reached through `from .loss_efficientvlm import ...`
    config = tiny_config.from_pretrained(tmp_path)
    assert config.auto_map["AutoModelForPreTraining"] == "modeling_efficientvlm.EfficientVLMForPreTraining"


def test_trust_remote_code_load_gives_identical_outputs(tiny_config, tmp_path) -> None:
    torch.manual_seed(0)
    inputs = make_inputs(tiny_config)
    negatives = (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))

    pretraining = EfficientVLMForPreTraining(tiny_config).eval()
    pretraining.save_pretrained(tmp_path / "pretraining")
    with torch.no_grad():
        expected = pretraining(**inputs, itm_negatives=negatives)
    remote = load_in_clean_subprocess(
        tmp_path / "pretraining",
        "AutoModelForPreTraining",
        {**inputs, "itm_negatives": negatives},
        outputs=["itm_logits", "logits_per_image", "image_embeds"],
    )
    assert remote["class"] == "EfficientVLMForPreTraining"
    assert "transformers_modules" in remote["module"]  # the copied code, not this repository
    # Another process may use another thread count, hence another summation order: equal up to float rounding.
    for name in ("itm_logits", "logits_per_image", "image_embeds"):
        torch.testing.assert_close(remote[name], getattr(expected, name), atol=1e-6, rtol=0)

    backbone = EfficientVLMModel(tiny_config).eval()
    backbone.save_pretrained(tmp_path / "backbone")
    with torch.no_grad():
        expected = backbone(**inputs)
    remote = load_in_clean_subprocess(tmp_path / "backbone", "AutoModel", inputs, outputs=["last_hidden_state"])
    assert remote["class"] == "EfficientVLMModel"
    torch.testing.assert_close(remote["last_hidden_state"], expected.last_hidden_state, atol=1e-6, rtol=0)
