"""Shared fixtures: tiny configs and inputs, built in-process (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from modeling_efficientvlm import EfficientVLMConfig  # noqa: E402

# Tiny models: one thread avoids oversubscribing the 2-core CI machine (a tiny step is ~20x slower under load).
torch.set_num_threads(1)


@pytest.fixture
def tiny_config() -> EfficientVLMConfig:
    return EfficientVLMConfig.from_preset("tiny")


def make_inputs(config: EfficientVLMConfig, batch_size: int = 4, seq_len: int = 7, seed: int = 0) -> dict:
    """Random images and texts for `config`; the last text is padded to exercise attention masks."""
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    input_ids = torch.randint(5, config.text_config.vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, seq_len - 2 :] = 0
    input_ids[-1, seq_len - 2 :] = config.text_config.pad_token_id
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
    }


@pytest.fixture
def tiny_inputs(tiny_config: EfficientVLMConfig) -> dict:
    return make_inputs(tiny_config)


@pytest.fixture(params=[True, False], ids=["activation inside", "activation after"])
def activation_inside(request, monkeypatch) -> bool:
    """Runs a test with an FFN's fc1 activation inside oneDNN's products and again after them
    (`fuses_activations`, which the CPU decides)."""
    from modeling_efficientvlm import modeling_efficientvlm as modeling

    monkeypatch.setattr(modeling, "fuses_activations", lambda: request.param)
    return request.param
