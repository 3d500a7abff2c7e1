"""Converters: official X-VLM / EfficientVLM checkpoints and Hugging Face CLIP + BERT -> our models."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, CLIPVisionConfig, CLIPVisionModel

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForPreTraining
from modeling_efficientvlm.convert_efficientvlm_checkpoints import (
    infer_config,
    load_official_checkpoint,
    teacher_from_clip_and_bert,
)

# Official checkpoint layouts (parameter name -> shape), copied from the official training code's models.
REFERENCE = Path(__file__).resolve().parent / "reference"


@functools.cache
def _synthetic_state_dict(listing: str) -> dict[str, torch.Tensor]:
    """A state dict with the official names and shapes, filled with distinct values per tensor."""
    shapes = json.loads((REFERENCE / listing).read_text())
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[-1]).unsqueeze(0)
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.02
    # The official MLM decoder is tied to the word embeddings.
    for prefix in ("text_encoder.", "text_decoder."):
        decoder = f"{prefix}cls.predictions.decoder.weight"
        if decoder in state:
            state[decoder] = state[f"{prefix}bert.embeddings.word_embeddings.weight"]
            state[f"{prefix}cls.predictions.decoder.bias"] = state[f"{prefix}cls.predictions.bias"]
    return state


def test_teacher_architecture_is_read_from_official_shapes() -> None:
    shapes = json.loads((REFERENCE / "ref_teacher_pretrain_keys.json").read_text())
    config = infer_config({k: torch.empty(v, device="meta") for k, v in shapes.items()}, "pretraining")
    reference = EfficientVLMConfig.from_preset("xvlm-base")
    assert config.vision_config.to_dict() == reference.vision_config.to_dict()
    assert config.text_config.to_dict() == reference.text_config.to_dict()
    assert config.embed_dim == 256


def test_official_student_pretraining_checkpoint_converts_exactly(tmp_path) -> None:
    state = _synthetic_state_dict("ref_student_pretrain_keys.json")
    torch.save({"model": state}, tmp_path / "student.pth")
    model = load_official_checkpoint(tmp_path / "student.pth", "pretraining")
    assert isinstance(model, EfficientVLMForPreTraining)
    assert model.config.vision_config.num_hidden_layers == 6
    assert (model.config.text_config.num_hidden_layers, model.config.text_config.num_fusion_layers) == (3, 3)
    ours = model.state_dict()
    pairs = {
        "vision_encoder.encoder.layers.5.self_attn.q_proj.weight": (
            "efficientvlm.vision_model.layers.5.self_attn.q_proj.weight"
        ),
        "vision_encoder.pos_embed.weight": "efficientvlm.vision_model.embeddings.pos_embed.weight",
        "text_encoder.bert.encoder.layer.4.crossattention.output.dense.weight": (
            "efficientvlm.text_model.encoder.layer.4.crossattention.out_proj.weight"
        ),
        "text_encoder.bert.encoder.layer.4.attention.output.LayerNorm.bias": (
            "efficientvlm.text_model.encoder.layer.4.attention_norm.bias"
        ),
        "text_encoder.bert.encoder.layer.1.output.dense.weight": (
            "efficientvlm.text_model.encoder.layer.1.mlp.fc2.weight"
        ),
        "text_encoder.cls.predictions.transform.dense.weight": "mlm_head.dense.weight",
        "text_encoder.cls.predictions.bias": "mlm_head.decoder.bias",
        "itm_head.3.weight": "itm_head.3.weight",
        "temp": "efficientvlm.temp",
    }
    for official, name in pairs.items():
        torch.testing.assert_close(ours[name], state[official], atol=0, rtol=0)
    # Nothing of the checkpoint is dropped: parameters match one to one (the decoder is tied).
    official_count = sum(t.numel() for k, t in state.items() if not k.endswith(("position_ids", "decoder.weight")))
    official_count -= state["text_encoder.cls.predictions.bias"].numel()  # the decoder's bias, listed twice
    assert sum(p.numel() for p in model.parameters()) == official_count


def test_unknown_official_tensors_raise() -> None:
    state = dict(_synthetic_state_dict("ref_student_pretrain_keys.json"))
    state["text_encoder.bert.pooler.dense.weight"] = torch.zeros(768, 768)
    from modeling_efficientvlm.convert_efficientvlm_checkpoints import model_from_official_state_dict

    with pytest.raises(ValueError, match="pooler"):
        model_from_official_state_dict(state, "pretraining")
    with pytest.raises(ValueError, match="Unknown task"):
        model_from_official_state_dict(state, "grounding")


def test_teacher_from_clip_and_bert_reuses_their_layers() -> None:
    torch.manual_seed(0)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
        )
    ).eval()
    teacher = teacher_from_clip_and_bert(clip, bert, num_text_layers=2, embed_dim=16).eval()
    assert teacher.config.text_config.num_fusion_layers == 2

    pixel_values = torch.randn(2, 3, 32, 32)
    input_ids = torch.randint(5, 100, (2, 6))
    with torch.no_grad():
        ours = teacher.efficientvlm.encode_image(pixel_values).last_hidden_state[:, 0]
        torch.testing.assert_close(ours, clip(pixel_values).pooler_output, atol=1e-5, rtol=0)
        text = teacher.efficientvlm.encode_text(input_ids).last_hidden_state
        reference = bert.bert(input_ids, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(text, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(teacher.mlm_head.dense.weight, bert.cls.predictions.transform.dense.weight)
