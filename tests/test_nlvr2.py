"""NLVR2: X-VLM's twin fusion layers, initialisation from pre-training, masks, physical pruning, loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForPreTraining
from modeling_efficientvlm.modeling_efficientvlm_nlvr2 import (
    EfficientVLMForVisualReasoning,
    init_nlvr2_from_pretraining,
    twin_fusion_config,
)

from .remote_code_utils import load_in_clean_subprocess


def _inputs(config: EfficientVLMConfig, batch_size: int = 3, seq_len: int = 6, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    input_ids = torch.randint(5, config.text_config.vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -2:] = 0
    return {
        "pixel_values": torch.randn(batch_size, 2, 3, size, size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
    }


def _pretraining(config: EfficientVLMConfig, seed: int = 0) -> EfficientVLMForPreTraining:
    torch.manual_seed(seed)
    return EfficientVLMForPreTraining(config).eval()


def _nlvr2(config: EfficientVLMConfig, seed: int = 0) -> EfficientVLMForVisualReasoning:
    return EfficientVLMForVisualReasoning.from_pretraining(_pretraining(config, seed)).eval()


def _stack(model: EfficientVLMForVisualReasoning):
    return model.efficientvlm.text_model.encoder.layer


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared twin K/V counted once


def test_twin_config_and_output_shapes(tiny_config) -> None:
    model = _nlvr2(tiny_config)
    assert tiny_config.text_config.num_fusion_layers == 2  # the given config is left alone
    assert model.config.text_config.num_fusion_layers == 4 and model.config.twin_fusion_layers
    assert model.twin_pairs() == [(2, 3), (4, 5)]
    inputs = _inputs(tiny_config)
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = model(**inputs, labels=labels, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (3, 2)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert out.vision_output.last_hidden_state.shape == (6, 17, 32)  # left images, then right images
    assert out.text_output.last_hidden_state.shape == (3, 6, 32)
    assert len(out.fusion_output.hidden_states) == 5
    assert [a.shape for a in out.fusion_output.cross_attentions] == [(3, 4, 6, 17)] * 4
    with torch.no_grad():
        assert model(**inputs).loss is None

    # Per-layer sizes of a pruned single-image config are doubled with the layers.
    pruned = EfficientVLMConfig.from_preset(
        "tiny",
        text_config=dict(
            num_attention_heads_per_layer=[4, 3, 2, 1],
            num_cross_attention_heads_per_layer=[3, 0],
            intermediate_size_per_layer=[64, 60, 50, 0],
        ),
    )
    twin = twin_fusion_config(pruned).text_config
    assert twin.num_attention_heads_per_layer == [4, 3, 2, 2, 1, 1]
    assert twin.num_cross_attention_heads_per_layer == [3, 3, 0, 0]
    assert twin.intermediate_size_per_layer == [64, 60, 50, 50, 0, 0]
    assert EfficientVLMForVisualReasoning(pruned).structure_sizes()["fusion_cross_heads"] == [3, 0]


def test_twins_start_from_the_pretrained_fusion_layer_and_share_keys_values(tiny_config, tmp_path) -> None:
    pretraining = _pretraining(tiny_config)
    model = EfficientVLMForVisualReasoning.from_pretraining(pretraining)
    source = pretraining.efficientvlm.text_model.encoder.layer
    for index, (left, right) in enumerate(model.twin_pairs()):
        expected = source[2 + index].state_dict()
        for twin in (left, right):
            state = _stack(model)[twin].state_dict()
            assert state.keys() == expected.keys()
            for name in expected:
                torch.testing.assert_close(state[name], expected[name], rtol=0, atol=0)
        # Both cross-attentions start equal; keys and values stay shared for good (X-VLM).
        left_cross, right_cross = _stack(model)[left].crossattention, _stack(model)[right].crossattention
        assert left_cross.k_proj is right_cross.k_proj and left_cross.v_proj is right_cross.v_proj
        assert left_cross.q_proj is not right_cross.q_proj
    for name, value in pretraining.efficientvlm.vision_model.state_dict().items():
        torch.testing.assert_close(model.efficientvlm.vision_model.state_dict()[name], value, rtol=0, atol=0)

    # `from_pretrained` (and the local Auto class) on a pre-training folder initialise the same way.
    pretraining.save_pretrained(tmp_path)
    for loaded in (
        EfficientVLMForVisualReasoning.from_pretrained(tmp_path),
        AutoModelForSequenceClassification.from_pretrained(tmp_path),
    ):
        assert type(loaded) is EfficientVLMForVisualReasoning
        expected_state = model.efficientvlm.state_dict()
        for name, value in loaded.efficientvlm.state_dict().items():
            torch.testing.assert_close(value, expected_state[name], rtol=0, atol=0)

    # The other way round is refused: another task's model started from an NLVR2 folder kept its twin layers.
    from trainers.tasks import task_model_from

    model.save_pretrained(tmp_path / "nlvr2")
    assert type(task_model_from("nlvr2", tmp_path / "nlvr2")) is EfficientVLMForVisualReasoning
    for task in ("captioning", "retrieval", "vqa"):
        with pytest.raises(ValueError, match=f"is an NLVR2 checkpoint, whose fusion layers come in twins .* a {task}"):
            task_model_from(task, tmp_path / "nlvr2")


def test_logits_depend_on_both_images_and_the_text() -> None:
    # A wider initialisation than the default 0.02, so that a random model reacts clearly to its inputs.
    init = dict(initializer_range=0.2)
    config = EfficientVLMConfig.from_preset("tiny", **init, vision_config=init, text_config=init)
    model = _nlvr2(config)
    inputs = _inputs(config)
    left, right = inputs["pixel_values"].unbind(1)
    noise = torch.randn_like(left)
    variants = [
        dict(inputs, pixel_values=torch.stack([left + noise, right], 1)),
        dict(inputs, pixel_values=torch.stack([left, right + noise], 1)),
        dict(inputs, pixel_values=torch.stack([right, left], 1)),
        dict(inputs, input_ids=inputs["input_ids"].roll(1, dims=1)),
    ]
    with torch.no_grad():
        logits = model(**inputs).logits
        for variant in variants:
            assert ((model(**variant).logits - logits).abs().amax(dim=1) > 1e-3).all()
        # Each example only sees its own images: changing example 0's pair leaves the others alone.
        one = dict(inputs, pixel_values=inputs["pixel_values"].clone())
        one["pixel_values"][0] += 1.0
        changed = model(**one).logits
    assert not torch.allclose(changed[0], logits[0])
    torch.testing.assert_close(changed[1:], logits[1:])


def _random_masks(model: EfficientVLMForVisualReasoning, seed: int) -> dict[str, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for key, sizes in model.structure_sizes().items():
        masks[key] = []
        for units in sizes:
            keep = torch.rand(units, generator=generator) < 0.6
            values = 0.5 + torch.rand(units, generator=generator)  # kept units fold their mask value in
            masks[key].append(torch.where(keep, values, torch.zeros(units)))
    masks["fusion_cross_heads"][1] = torch.zeros_like(masks["fusion_cross_heads"][1])  # a pair loses every head
    masks["fusion_heads"][0] = torch.zeros_like(masks["fusion_heads"][0])
    return masks


def test_all_one_masks_change_nothing(tiny_config) -> None:
    model = _nlvr2(tiny_config)
    inputs = _inputs(tiny_config)
    ones = {key: [torch.ones(units) for units in sizes] for key, sizes in model.structure_sizes().items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, structure_masks=ones).logits, model(**inputs).logits)


def test_pruning_matches_the_masked_model_and_round_trips(tiny_config, tmp_path) -> None:
    model = _nlvr2(tiny_config)
    inputs = _inputs(tiny_config)
    masks = _random_masks(model, seed=1)
    units = model.structure_unit_parameters()
    removed = sum(int((mask == 0).sum()) * per_unit for key in masks for mask, per_unit in zip(masks[key], units[key]))
    before = _parameters(model)
    with torch.no_grad():
        masked = model(**inputs, structure_masks=masks).logits
    model.prune(masks)
    with torch.no_grad():
        pruned = model(**inputs).logits
    torch.testing.assert_close(pruned, masked, rtol=0, atol=1e-5)
    assert _parameters(model) == before - removed
    kept = [int((mask != 0).sum()) for mask in masks["fusion_cross_heads"]]
    assert model.structure_sizes()["fusion_cross_heads"] == kept
    assert model.config.text_config.num_cross_attention_heads_per_layer == [kept[0], kept[0], 0, 0]
    left, right = _stack(model)[2].crossattention, _stack(model)[3].crossattention
    assert left.k_proj is right.k_proj and left.v_proj is right.v_proj  # still shared after pruning

    model.save_pretrained(tmp_path)
    reloaded, info = EfficientVLMForVisualReasoning.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.structure_sizes() == model.structure_sizes()
    assert _parameters(reloaded) == _parameters(model)
    left, right = _stack(reloaded)[2].crossattention, _stack(reloaded)[3].crossattention
    assert left.k_proj is right.k_proj
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, pruned, rtol=0, atol=0)

    # trust_remote_code in a process that cannot import this repository gives identical logits.
    assert reloaded.config.auto_map == {
        "AutoConfig": "configuration_efficientvlm.EfficientVLMConfig",
        "AutoModel": "modeling_efficientvlm_nlvr2.EfficientVLMForVisualReasoning",
        "AutoModelForSequenceClassification": "modeling_efficientvlm_nlvr2.EfficientVLMForVisualReasoning",
    }
    assert reloaded.config.id2label == {0: "False", 1: "True"} and reloaded.config.label2id == {"False": 0, "True": 1}
    remote = load_in_clean_subprocess(tmp_path, "AutoModelForSequenceClassification", inputs, ["logits"])
    assert remote["class"] == "EfficientVLMForVisualReasoning" and "transformers_modules" in remote["module"]
    # Another process may split float reductions differently: allow last-bit differences.
    torch.testing.assert_close(remote["logits"], pruned, rtol=1e-5, atol=1e-6)


class _NLVR2Dataset(Dataset):
    def __init__(self, config: EfficientVLMConfig, size: int = 8) -> None:
        self.inputs = _inputs(config, batch_size=size, seed=3)
        self.labels = torch.tensor([0, 1] * (size // 2))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**{key: value[index] for key, value in self.inputs.items()}, "labels": self.labels[index]}


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def test_trainer_reduces_the_nlvr2_loss(tiny_config, tmp_path) -> None:
    model = _nlvr2(tiny_config).train()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=12,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_NLVR2Dataset(tiny_config), data_collator=_collate)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_bad_inputs_raise(tiny_config) -> None:
    model = _nlvr2(tiny_config)
    inputs = _inputs(tiny_config)
    with pytest.raises(ValueError, match="two images per sentence"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"][:, 0]))
    with pytest.raises(ValueError, match="Batch sizes differ"):
        model(**dict(inputs, input_ids=inputs["input_ids"][:2], attention_mask=None))
    with pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=torch.tensor([0, 1]))
    per_layer = {"fusion_cross_heads": [torch.ones(4)] * 4}
    with pytest.raises(ValueError, match="one cross-attention mask per pair"):
        model(**inputs, structure_masks=per_layer)
    with pytest.raises(ValueError, match="one cross-attention mask per pair"):
        model.prune(per_layer)
    with pytest.raises(ValueError, match="already has twin fusion layers"):
        EfficientVLMForVisualReasoning.from_pretraining(model)
    with pytest.raises(ValueError, match="already has twin fusion layers"):
        twin_fusion_config(model.config)
    odd = twin_fusion_config(tiny_config)
    odd.text_config.num_fusion_layers = 3
    with pytest.raises(ValueError, match="even number of fusion layers"):
        EfficientVLMForVisualReasoning(odd)
    pruned = EfficientVLMConfig.from_preset("tiny", text_config=dict(num_cross_attention_heads_per_layer=[4, 2]))
    with pytest.raises(ValueError, match="different per-layer sizes"):
        init_nlvr2_from_pretraining(EfficientVLMForVisualReasoning(tiny_config), _pretraining(pruned))
    student = EfficientVLMConfig.from_preset("tiny-student")
    with pytest.raises(ValueError, match="fusion layers"):
        init_nlvr2_from_pretraining(EfficientVLMForVisualReasoning(student), _pretraining(tiny_config))
