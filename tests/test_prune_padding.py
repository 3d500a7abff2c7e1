"""Physical pruning pads each pruned FFN with all-zero neurons to a multiple of `pad_to_multiple_of`: the padded
model computes what the masked model computes, reloads with its padded sizes, and the report counts the padding."""

from __future__ import annotations

import copy

import pytest
import torch

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.modeling_efficientvlm import (
    EfficientVLMEmptyMLP,
    EfficientVLMMLP,
    padded_width,
)
from trainers.pruning.hard_concrete import StructureMasker
from trainers.pruning.padding import prune_structures

from .conftest import make_inputs


def _mlp(hidden_act: str = "gelu", width: int = 64) -> EfficientVLMMLP:
    torch.manual_seed(0)
    config = EfficientVLMConfig.from_preset("tiny").text_config
    config.hidden_act = hidden_act
    mlp = EfficientVLMMLP(config, width).eval()
    for p in mlp.parameters():
        torch.nn.init.normal_(p)  # non-zero biases too: a padded neuron must not pick up fc1's bias
    return mlp


def _mask(width: int, kept: list[int], scale: float = 0.7) -> torch.Tensor:
    mask = torch.zeros(width)
    mask[kept] = scale
    return mask


@pytest.mark.parametrize(
    ("kept", "width", "multiple", "expected"),
    [
        (13, 64, 8, 16),
        (16, 64, 8, 16),
        (13, 64, 1, 13),
        (62, 64, 8, 64),
        (61, 63, 8, 63),
        (0, 64, 8, 0),
        (5, 64, 32, 32),
    ],
)
def test_padded_width_rounds_up_within_the_layer_and_keeps_empty_layers_empty(
    kept: int, width: int, multiple: int, expected: int
) -> None:
    assert padded_width(kept, width, multiple) == expected


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_a_bad_multiple_is_refused_by_name(bad) -> None:
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        padded_width(3, 64, bad)
    model = EfficientVLMForImageTextRetrieval(EfficientVLMConfig.from_preset("tiny"))
    sizes = model.structure_sizes()
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        model.prune({"vision_heads": [torch.ones(n) for n in sizes["vision_heads"]]}, pad_to_multiple_of=bad)
    assert model.structure_sizes() == sizes  # nothing changed


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu", "relu"])
def test_a_padded_ffn_equals_the_masked_one_and_its_padding_is_zero(hidden_act: str) -> None:
    mlp = _mlp(hidden_act)
    kept = [1, 4, 5, 9, 20, 21, 33, 40, 41, 42, 50, 60, 63]  # 13 neurons
    mask = _mask(64, kept)
    x = torch.randn(3, 5, mlp.config.hidden_size)
    with torch.no_grad():
        masked = mlp(x, mask)
        padded = mlp.prune(mask, pad_to_multiple_of=8)
        exact = mlp.prune(mask, pad_to_multiple_of=1)
        assert padded.intermediate_size == 16 and exact.intermediate_size == 13
        torch.testing.assert_close(padded(x), masked, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(padded(x), exact(x), rtol=0, atol=1e-6)
    assert not padded.fc1.weight[13:].any() and not padded.fc1.bias[13:].any()
    assert not padded.fc2.weight[:, 13:].any()
    assert torch.equal(padded.fc1.weight[:13], exact.fc1.weight)
    assert isinstance(mlp.prune(torch.zeros(64), pad_to_multiple_of=8), EfficientVLMEmptyMLP)


def test_padding_neurons_get_no_gradient_so_fine_tuning_keeps_them_zero() -> None:
    padded = _mlp().prune(_mask(64, list(range(0, 60, 6))), pad_to_multiple_of=8).train()
    padded(torch.randn(2, 4, padded.config.hidden_size)).pow(2).sum().backward()
    assert not padded.fc1.weight.grad[10:].any() and not padded.fc1.bias.grad[10:].any()
    assert not padded.fc2.weight.grad[:, 10:].any()
    assert padded.fc1.weight.grad[:10].any()


def test_an_activation_nonzero_at_zero_cannot_be_padded() -> None:
    mlp = _mlp("sigmoid")
    mask = _mask(64, [0, 1, 2])
    with pytest.raises(ValueError, match="hidden_act='sigmoid'"):
        mlp.prune(mask, pad_to_multiple_of=8)
    assert mlp.prune(mask, pad_to_multiple_of=1).intermediate_size == 3


def _uneven_masks(model, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Random uneven masks with mask values (CoFi's folded scores), every first FFN emptied."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for key, sizes in model.structure_sizes().items():
        masks[key] = []
        for layer, n in enumerate(sizes):
            keep = (torch.rand(n, generator=generator) > 0.45).float() * (0.5 + torch.rand(n, generator=generator))
            masks[key].append(torch.zeros(n) if key.endswith("_ffn") and layer == 0 else keep)
    return masks


def test_a_padded_pruned_model_equals_the_masked_model_reloads_and_reports_its_padding(tmp_path) -> None:
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(EfficientVLMConfig.from_preset("tiny")).eval()
    masks = _uneven_masks(model)
    inputs = make_inputs(model.config, batch_size=2, seq_len=7, seed=1)
    with torch.no_grad():
        masked = model(**inputs, structure_masks=masks).logits
    masker = StructureMasker.from_model(model)
    kept = masker.kept_structures(masks)
    exact = copy.deepcopy(model)
    exact.prune(masks, pad_to_multiple_of=1)
    report = prune_structures(model, masks, kept, pad_to_multiple_of=8)

    after = model.structure_sizes()
    assert report["structures_after"] == after and report["pad_to_multiple_of"] == 8
    for key in kept:
        for width, units, full, padded in zip(
            after[key], kept[key], masker.structure_sizes[key], report["padded_units"][key]
        ):
            assert padded == width - units >= 0
            if key.endswith("_ffn"):
                assert width == padded_width(units, full, 8)
                assert width == 0 or width % 8 == 0 or width == full
            else:
                assert width == units  # heads are never padded
    assert after["vision_ffn"][0] == after["text_ffn"][0] == after["fusion_ffn"][0] == 0  # empty stays empty
    assert sum(sum(units) for units in report["padded_units"].values()) > 0
    exact_parameters = sum(p.numel() for p in exact.parameters())
    assert sum(p.numel() for p in model.parameters()) - exact_parameters == report["padded_parameters"] > 0
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, masked, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(**inputs).logits, exact(**inputs).logits, rtol=0, atol=1e-6)

    model.save_pretrained(tmp_path)
    reloaded = EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path).eval()
    assert reloaded.structure_sizes() == after
    assert reloaded.config.text_config.intermediate_size_per_layer == after["text_ffn"] + after["fusion_ffn"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=0, atol=1e-5)

    # Pruned again, the padding is not prunable: it is removed first (outputs unchanged), so the masker counts
    # only real neurons (the second report had counted the padding removed as sparsity).
    from transformers import TrainingArguments

    from trainers.pruning import ModalAdaptivePruningTrainer, PruningConfig

    args = TrainingArguments(str(tmp_path / "again"), use_cpu=True, report_to="none", max_steps=1)
    trainer = ModalAdaptivePruningTrainer(
        model=reloaded, args=args, pruning_config=PruningConfig(target_sparsity=0.5), train_dataset=[0]
    )
    assert trainer.silent_neurons_dropped == {
        "neurons": sum(sum(units) for units in report["padded_units"].values()),
        "parameters": report["padded_parameters"],
    }
    assert trainer.masker.structure_sizes == exact.structure_sizes()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, exact(**inputs).logits, rtol=0, atol=1e-6)


def test_a_pruned_ffn_pruned_again_is_padded_anew_up_to_its_unpruned_width() -> None:
    """Pruning again first drops the padding; the width was then capped by that stripped width, so the second
    pruning left widths off the multiple of 8 (3 of 64, where 8 fit), and only ever narrower."""
    from trainers.pruning.padding import drop_silent_ffn_neurons

    model = EfficientVLMForImageTextRetrieval(EfficientVLMConfig.from_preset("tiny"))
    three = torch.zeros(64)
    three[:3] = 1
    model.prune({"fusion_ffn": [three, torch.ones(64)]}, pad_to_multiple_of=8)
    assert model.structure_sizes()["fusion_ffn"] == [8, 64]
    assert drop_silent_ffn_neurons(model) == 5 and model.structure_sizes()["fusion_ffn"] == [3, 64]
    model.prune({"fusion_ffn": [torch.tensor([1.0, 1.0, 0.0]), torch.ones(64)]}, pad_to_multiple_of=8)
    assert model.structure_sizes()["fusion_ffn"] == [8, 64]


def test_ffn_neurons_of_a_zero_initialised_residual_branch_are_not_taken_for_padding() -> None:
    """`zero_init_residual` starts every `fc2` at zero: the padding test (an all-zero `fc2` column) removed every
    vision and fusion FFN neuron of such a model before its pruning began. Padding is zero in `fc1` too."""
    from trainers.pruning.padding import drop_silent_ffn_neurons

    config = EfficientVLMConfig.from_preset(
        "tiny", vision_config={"zero_init_residual": True}, text_config={"fusion_zero_init_residual": True}
    )
    model = EfficientVLMForImageTextRetrieval(config)
    assert not model.efficientvlm.vision_model.layers[0].mlp.fc2.weight.any()
    sizes = model.structure_sizes()
    assert drop_silent_ffn_neurons(model) == 0 and model.structure_sizes() == sizes


def test_a_stack_or_the_cross_attention_emptied_by_pruning_is_named() -> None:
    """A second pruning to a high target (counted on the pruned model) emptied vision, text and fusion and saved a
    model that reads neither image nor text, without a word."""
    from transformers.testing_utils import CaptureLogger

    from trainers.pruning import padding

    model = EfficientVLMForImageTextRetrieval(EfficientVLMConfig.from_preset("tiny"))
    sizes = model.structure_sizes()
    masks = {key: [torch.ones(n) for n in per_layer] for key, per_layer in sizes.items()}
    masks["fusion_cross_heads"] = [torch.zeros(n) for n in sizes["fusion_cross_heads"]]
    masks["text_heads"] = [torch.zeros(n) for n in sizes["text_heads"]]
    masks["text_ffn"] = [torch.zeros(n) for n in sizes["text_ffn"]]
    kept = StructureMasker.from_model(model).kept_structures(masks)
    with CaptureLogger(padding.logger) as logged:
        prune_structures(model, masks, kept)
    assert "every head and FFN neuron of the text layers" in logged.out
    assert "every cross-attention head of the fusion layers" in logged.out
    assert "vision layers" not in logged.out and "of the fusion layers: they" not in logged.out
