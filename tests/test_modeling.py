"""Model core: presets, encoders, attention backends, structure masks, physical pruning, errors."""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeling_efficientvlm.modeling_efficientvlm as modeling_module
from modeling_efficientvlm import (
    MASK_KEYS,
    EfficientVLMConfig,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
    EfficientVLMModel,
    EfficientVLMTextModel,
    EfficientVLMVisionModel,
)
from modeling_efficientvlm.configuration_efficientvlm import TextStackLayout, has_twin_fusion_layers, stack_depths
from modeling_efficientvlm.grouping_efficientvlm import EncoderGroups
from modeling_efficientvlm.loss_efficientvlm import (
    box_regression_loss,
    identical_texts,
    itm_negative_labels,
    sample_hard_negatives,
)
from modeling_efficientvlm.modeling_efficientvlm import (
    TEXT_MASK_KEYS,
    VISION_MASK_KEYS,
    EfficientVLMMLP,
    image_text_matching_logits,
    sincos_2d_position_embeddings,
)

from .conftest import make_inputs
from .model_utils import prune_unevenly


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fused(model: EfficientVLMModel, inputs: dict, **kwargs) -> dict[str, torch.Tensor]:
    out = model(**inputs, **kwargs)
    return {"fused": out.last_hidden_state, "image": out.image_embeds, "text": out.text_embeds}


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def _random_masks(model, seed: int = 0, zero_layer: bool = True) -> dict[str, list[torch.Tensor]]:
    """Soft masks with some zeros; with `zero_layer`, the first layer of every key is masked entirely."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for key, sizes in model.structure_sizes().items():
        masks[key] = []
        for i, size in enumerate(sizes):
            values = torch.rand(size, generator=generator) + 0.5
            values[torch.rand(size, generator=generator) < 0.4] = 0
            if zero_layer and i == 0:
                values.zero_()
            masks[key].append(values)
    return masks


@pytest.mark.parametrize(
    ("preset", "official_millions"),
    [("xvlm-base", 212.3), ("efficientvlm-small", 120.1)],
)
def test_preset_parameter_counts_match_official_checkpoints(preset: str, official_millions: float) -> None:
    with torch.device("meta"):
        model = EfficientVLMForPreTraining(EfficientVLMConfig.from_preset(preset))
    # The MLM decoder is tied to the word embeddings and counted once, as in the official figures.
    millions = _count(model) / 1e6
    print(f"{preset}: {millions:.2f}M parameters (official {official_millions}M)")
    assert abs(millions - official_millions) / official_millions < 0.01


def test_student_preset_halves_every_stack() -> None:
    teacher = EfficientVLMConfig.from_preset("xvlm-base")
    student = EfficientVLMConfig.from_preset("efficientvlm-small")
    assert (teacher.vision_config.num_hidden_layers, student.vision_config.num_hidden_layers) == (12, 6)
    assert (teacher.text_config.num_hidden_layers, student.text_config.num_hidden_layers) == (6, 3)
    assert (teacher.text_config.num_fusion_layers, student.text_config.num_fusion_layers) == (6, 3)
    assert student.vision_config.hidden_act == "quick_gelu"


def test_preset_overrides_of_unknown_fields_or_of_another_type_are_named_errors() -> None:
    config = EfficientVLMConfig.from_preset("tiny", vision_config={"image_size": 64}, itm_random_negatives=0.5)
    assert config.vision_config.image_size == 64 and config.itm_random_negatives == 0.5
    bad = {
        "Config override 'bogus': the config has no such field.": {"bogus": 1},
        "'vision_config.img_size': the config has no such field; did you mean 'vision_config.image_size'?": {
            "vision_config": {"img_size": 64}
        },
        "'vision_config.image_size': expected a number, got 'big'.": {"vision_config": {"image_size": "big"}},
        "'twin_fusion_layers': expected bool, got 1.": {"twin_fusion_layers": 1},
    }
    for message, overrides in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            EfficientVLMConfig.from_preset("tiny", **overrides)


def test_output_shapes(tiny_config, tiny_inputs) -> None:
    model = EfficientVLMModel(tiny_config).eval()
    out = model(**tiny_inputs, output_hidden_states=True, output_attentions=True)
    batch, seq = tiny_inputs["input_ids"].shape
    patches = (tiny_config.vision_config.image_size // tiny_config.vision_config.patch_size) ** 2
    assert out.image_embeds.shape == (batch, tiny_config.embed_dim)
    assert out.logits_per_image.shape == (batch, batch)
    assert out.last_hidden_state.shape == (batch, seq, tiny_config.text_config.hidden_size)
    assert len(out.vision_output.hidden_states) == tiny_config.vision_config.num_hidden_layers + 1
    assert out.vision_output.attentions[0].shape == (batch, 4, patches + 1, patches + 1)
    assert len(out.text_output.attentions) == tiny_config.text_config.num_hidden_layers
    assert len(out.fusion_output.cross_attentions) == tiny_config.text_config.num_fusion_layers
    assert out.fusion_output.cross_attentions[0].shape == (batch, 4, seq, patches + 1)
    # Attention probabilities: rows sum to one and padded keys get no mass.
    probs = out.text_output.attentions[0]
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert probs[-1, :, :, -2:].abs().max() < 1e-6
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(batch))


def test_a_pruned_model_gives_one_attention_tensor_per_layer_with_its_own_head_count(tiny_config, tiny_inputs) -> None:
    """An emptied layer's weights are (batch, 0, q_len, k_len), not None: per-layer code (stacking a layer's maps,
    reading `.shape`) works on every layer, and the kept heads' maps are the masked model's."""
    model = EfficientVLMModel(tiny_config).eval()
    masks = {key: [(mask != 0).float() for mask in value] for key, value in _random_masks(model).items()}
    with torch.no_grad():
        masked = model(**tiny_inputs, structure_masks=masks, output_attentions=True)
    model.prune(masks)
    with torch.no_grad():
        pruned = model(**tiny_inputs, output_attentions=True)
    batch, seq = tiny_inputs["input_ids"].shape
    tokens = (tiny_config.vision_config.image_size // tiny_config.vision_config.patch_size) ** 2 + 1
    maps = {
        "vision_heads": (pruned.vision_output.attentions, masked.vision_output.attentions, tokens, tokens),
        "text_heads": (pruned.text_output.attentions, masked.text_output.attentions, seq, seq),
        "fusion_heads": (pruned.fusion_output.attentions, masked.fusion_output.attentions, seq, seq),
        "fusion_cross_heads": (
            pruned.fusion_output.cross_attentions,
            masked.fusion_output.cross_attentions,
            seq,
            tokens,
        ),
    }
    for key, (got, reference, q_len, k_len) in maps.items():
        kept = [int(mask.sum()) for mask in masks[key]]
        assert kept[0] == 0 and any(kept), key
        assert [tuple(weights.shape) for weights in got] == [(batch, n, q_len, k_len) for n in kept], key
        for weights, full, mask in zip(got, reference, masks[key]):
            torch.testing.assert_close(weights, full[:, mask.bool()], atol=1e-5, rtol=0)


def test_sdpa_matches_eager(tiny_config, tiny_inputs) -> None:
    torch.manual_seed(0)
    sdpa = EfficientVLMModel._from_config(tiny_config, attn_implementation="sdpa").eval()
    eager = EfficientVLMModel._from_config(copy.deepcopy(tiny_config), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config.vision_config._attn_implementation == "sdpa"
    assert eager.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        _assert_close(_fused(sdpa, tiny_inputs), _fused(eager, tiny_inputs))


def test_texts_without_padding_attend_without_a_mask_and_a_trace_keeps_masking(
    tiny_config, tiny_inputs, monkeypatch
) -> None:
    """An all-ones padding mask is dropped (adding zeros changes no score, and SDPA and the CPU kernel take their
    fast paths without one); a traced graph keeps it, for the padded texts it will meet."""
    torch.manual_seed(0)
    model = EfficientVLMModel(tiny_config).eval()
    unpadded = {**tiny_inputs, "attention_mask": torch.ones_like(tiny_inputs["attention_mask"])}
    masks_seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask=None, **kwargs):
        masks_seen.append(attn_mask is not None)
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        fast = _fused(model, unpadded)
        assert masks_seen and not any(masks_seen)
        padded = _fused(model, tiny_inputs)
        assert any(masks_seen)  # the padded texts' attention is masked
        with monkeypatch.context() as keep:  # the mask of zeros added, as before
            keep.setattr(modeling_module, "_keeps_every_position", lambda attention_mask: False)
            _assert_close(fast, _fused(model, unpadded))

        class Hidden(nn.Module):  # a module, so the tracer takes the weights as parameters
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
                out = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
                return out.last_hidden_state

        names = ("pixel_values", "input_ids", "attention_mask")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it records
            traced = torch.jit.trace(Hidden(), tuple(unpadded[name] for name in names), check_trace=False)
        traced_padded = traced(*(tiny_inputs[name] for name in names))
        torch.testing.assert_close(traced_padded, padded["fused"], atol=1e-5, rtol=0)


def test_masks_of_ones_change_nothing(tiny_config, tiny_inputs) -> None:
    model = EfficientVLMModel(tiny_config).eval()
    ones = {key: [torch.ones(n) for n in sizes] for key, sizes in model.structure_sizes().items()}
    assert set(ones) == set(MASK_KEYS)
    with torch.no_grad():
        _assert_close(_fused(model, tiny_inputs), _fused(model, tiny_inputs, structure_masks=ones), atol=0)


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("vision_heads", "vision_model.layers.1.self_attn"),
        ("text_heads", "text_model.encoder.layer.0.attention"),
        ("fusion_heads", "text_model.encoder.layer.3.attention"),
        ("fusion_cross_heads", "text_model.encoder.layer.2.crossattention"),
    ],
)
def test_masking_a_head_equals_zeroing_its_output_columns(tiny_config, tiny_inputs, key: str, path: str) -> None:
    model = EfficientVLMModel(tiny_config).eval()
    layer_index = {"vision_heads": 1, "text_heads": 0, "fusion_heads": 1, "fusion_cross_heads": 0}[key]
    head, head_dim = 2, tiny_config.text_config.head_dim
    masks = {key: [None] * len(model.structure_sizes()[key])}
    masks[key][layer_index] = torch.tensor([1.0, 1.0, 0.0, 1.0])
    with torch.no_grad():
        masked = _fused(model, tiny_inputs, structure_masks=masks)
        model.get_submodule(path).out_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
        zeroed = _fused(model, tiny_inputs)
    _assert_close(masked, zeroed)


def test_ffn_mask_multiplies_activations(tiny_config, tiny_inputs) -> None:
    model = EfficientVLMModel(tiny_config).eval()
    masks = {"fusion_ffn": [torch.zeros(64), None]}
    masks["fusion_ffn"][0][::2] = 1
    with torch.no_grad():
        masked = _fused(model, tiny_inputs, structure_masks=masks)
        model.text_model.encoder.layer[2].mlp.fc2.weight[:, 1::2] = 0
        zeroed = _fused(model, tiny_inputs)
    _assert_close(masked, zeroed)


def _count_ffn_passes(monkeypatch) -> list[int]:
    """Counts the row blocks every FFN runs (one call of `_activated` or `_plain_forward` each)."""
    passes = []
    for name in ("_activated", "_plain_forward"):
        plain = getattr(EfficientVLMMLP, name)

        def counted(self, hidden_states, *args, _plain=plain, **kwargs):
            passes.append(hidden_states.numel() // hidden_states.shape[-1])
            return _plain(self, hidden_states, *args, **kwargs)

        monkeypatch.setattr(EfficientVLMMLP, name, counted)
    return passes


def test_ffn_without_autograd_runs_in_row_blocks_with_the_same_outputs(tiny_config, tiny_inputs, monkeypatch) -> None:
    model = prune_unevenly(EfficientVLMModel(tiny_config).eval())  # uneven widths and an empty FFN included
    masks = _random_masks(model, zero_layer=False)
    masks = {key: value for key, value in masks.items() if key.endswith("_ffn")}
    with torch.no_grad():
        whole = _fused(model, tiny_inputs, structure_masks=masks)
        passes = _count_ffn_passes(monkeypatch)
        monkeypatch.setattr(EfficientVLMMLP, "inference_chunk_rows", 5)
        blocks = _fused(model, tiny_inputs, structure_masks=masks)
    assert passes and max(passes) <= 5 and len(passes) > len(model.structure_sizes()["vision_ffn"]) * 4
    _assert_close(whole, blocks, atol=1e-6)


def test_ffn_keeps_its_plain_form_under_autograd_and_tracing(tiny_config, tiny_inputs, monkeypatch) -> None:
    model = EfficientVLMModel(tiny_config).eval()
    passes = _count_ffn_passes(monkeypatch)
    monkeypatch.setattr(EfficientVLMMLP, "inference_chunk_rows", 5)
    _fused(model, tiny_inputs)["fused"].sum().backward()  # autograd records the forward: one pass per FFN
    layers = len(model.vision_model.layers) + len(model.text_model.encoder.layer)
    assert len(passes) == layers and all(p.grad is not None for p in model.vision_model.layers[0].mlp.parameters())

    # A trace (without autograd, as the ONNX export's) must not bake the row blocks of its example's size into the
    # graph: it runs at another batch size.
    class LastState(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.encoder(images).last_hidden_state

    vision, pixels = LastState(model.vision_model), tiny_inputs["pixel_values"]
    with torch.no_grad():
        passes.clear()
        traced = torch.jit.trace(vision, pixels[:1], check_trace=False)
        assert len(passes) == len(model.vision_model.layers)
        torch.testing.assert_close(traced(pixels), vision(pixels))


def _quick_gelu_mlp(width: int = 24) -> EfficientVLMMLP:
    config = EfficientVLMConfig.from_preset("tiny").vision_config
    assert config.hidden_act == "quick_gelu"
    torch.manual_seed(0)
    return EfficientVLMMLP(config, width).eval()


def _unfolded(mlp: EfficientVLMMLP, hidden_states: torch.Tensor, ffn_mask: torch.Tensor | None) -> torch.Tensor:
    """The FFN as written: fc1, the activation module, the mask, fc2."""
    return mlp.fc2(mlp.activation_fn(mlp.fc1(hidden_states)) * (1 if ffn_mask is None else ffn_mask))


def test_quick_gelu_ffn_without_autograd_folds_its_scale_into_the_gemms(monkeypatch) -> None:
    mlp = _quick_gelu_mlp()
    hidden_states = torch.randn(3, 7, mlp.config.hidden_size)
    mask = torch.rand(mlp.intermediate_size).round()
    expected = {m is None: _unfolded(mlp, hidden_states, m).detach() for m in (None, mask)}

    class Unused(torch.nn.Module):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the folded form runs no separate activation")

    monkeypatch.setattr(mlp, "activation_fn", Unused())
    with torch.no_grad():
        for ffn_mask in (None, mask):
            folded = mlp(hidden_states, ffn_mask)
            torch.testing.assert_close(folded, expected[ffn_mask is None], atol=1e-6, rtol=1e-5)
        monkeypatch.setattr(EfficientVLMMLP, "inference_chunk_rows", 5)  # the row blocks fold it too
        torch.testing.assert_close(mlp(hidden_states, mask), expected[False], atol=1e-6, rtol=1e-5)
    with pytest.raises(AssertionError, match="no separate activation"):
        mlp(hidden_states)  # under autograd the plain form runs (the in-place SiLU would break the backward)


class _ScaledLinear(torch.nn.Linear):
    """A linear layer that is not a plain `nn.Linear` (as an adapter or a quantized layer would be)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(input)


def test_quick_gelu_ffn_runs_hooked_or_wrapped_linear_layers_as_themselves() -> None:
    mlp = _quick_gelu_mlp()
    hidden_states = torch.randn(2, 5, mlp.config.hidden_size)
    handle = mlp.fc1.register_forward_hook(lambda module, args, output: output * 3)
    with torch.no_grad():
        torch.testing.assert_close(mlp(hidden_states), _unfolded(mlp, hidden_states, None))
    handle.remove()
    wrapped = _ScaledLinear(mlp.fc2.in_features, mlp.fc2.out_features)
    wrapped.load_state_dict(mlp.fc2.state_dict())
    mlp.fc2 = wrapped
    with torch.no_grad():
        torch.testing.assert_close(mlp(hidden_states), _unfolded(mlp, hidden_states, None))


def test_physical_pruning_matches_masked_model_and_accounting(tiny_config, tiny_inputs, tmp_path) -> None:
    model = EfficientVLMForPreTraining(tiny_config).eval()
    masks = _random_masks(model)
    inputs = {**tiny_inputs, "itm_negatives": (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))}
    with torch.no_grad():
        masked = model(**inputs, structure_masks=masks)
    before, unit_parameters, sizes = _count(model), model.structure_unit_parameters(), model.structure_sizes()
    removed = sum(
        (sizes[key][i] - int((mask != 0).sum())) * unit_parameters[key][i]
        for key, layer_masks in masks.items()
        for i, mask in enumerate(layer_masks)
    )
    model.prune(masks)
    assert _count(model) == before - removed
    # The first layer of every key lost every unit: the model still runs, the sub-block keeps its bias.
    assert model.config.vision_config.num_attention_heads_per_layer[0] == 0
    assert model.config.text_config.intermediate_size_per_layer[0] == 0
    with torch.no_grad():
        pruned = model(**inputs)
    for name in ("itm_logits", "logits_per_image", "image_embeds", "text_embeds"):
        torch.testing.assert_close(getattr(pruned, name), getattr(masked, name), atol=1e-5, rtol=0)

    # The uneven per-layer sizes are in the config: the checkpoint reloads with `from_pretrained`.
    model.save_pretrained(tmp_path)
    reloaded = EfficientVLMForPreTraining.from_pretrained(tmp_path).eval()
    assert reloaded.structure_sizes() == model.structure_sizes()
    with torch.no_grad():
        again = reloaded(**inputs)
    torch.testing.assert_close(again.itm_logits, pruned.itm_logits, atol=1e-6, rtol=0)


def _vision_outputs(model: EfficientVLMVisionModel, pixel_values: torch.Tensor, masks=None) -> dict:
    masks = model.layer_masks(masks)
    return {"image": model(pixel_values, **masks).last_hidden_state}


def _text_outputs(model: EfficientVLMTextModel, inputs: dict, image_states: torch.Tensor, masks=None) -> dict:
    masks = model.layer_masks(masks)
    text = model(inputs["input_ids"], inputs["attention_mask"], mode="text", **masks)
    fused = model(
        attention_mask=inputs["attention_mask"],
        text_hidden_states=text.last_hidden_state,
        encoder_hidden_states=image_states,
        mode="fusion",
        **masks,
    )
    return {"text": text.last_hidden_state, "fused": fused.last_hidden_state}


@pytest.mark.parametrize("encoder", ["vision", "text"])
def test_single_encoder_models_prune_like_the_others(tiny_config, tiny_inputs, tmp_path, encoder: str) -> None:
    """The vision-only and text-only models share `prune(structure_masks)` and the structure accounting."""
    torch.manual_seed(0)
    image_states = torch.randn(4, 17, tiny_config.vision_config.hidden_size)
    if encoder == "vision":
        model_class, model = EfficientVLMVisionModel, EfficientVLMVisionModel(tiny_config.vision_config).eval()
        keys, run = VISION_MASK_KEYS, lambda m, masks=None: _vision_outputs(m, tiny_inputs["pixel_values"], masks)
    else:
        model_class, model = EfficientVLMTextModel, EfficientVLMTextModel(tiny_config.text_config).eval()
        keys, run = TEXT_MASK_KEYS, lambda m, masks=None: _text_outputs(m, tiny_inputs, image_states, masks)
    assert set(model.structure_sizes()) == set(model.structure_unit_parameters()) == set(keys)
    masks = _random_masks(model)
    with torch.no_grad():
        masked = run(model, masks)
    before, unit_parameters, sizes = _count(model), model.structure_unit_parameters(), model.structure_sizes()
    removed = sum(
        (sizes[key][i] - int((mask != 0).sum())) * unit_parameters[key][i]
        for key, layer_masks in masks.items()
        for i, mask in enumerate(layer_masks)
    )
    model.prune(masks)
    assert _count(model) == before - removed
    kept = {key: [int((mask != 0).sum()) for mask in layer_masks] for key, layer_masks in masks.items()}
    assert model.structure_sizes() == kept
    assert model.config.num_attention_heads_per_layer[0] == 0  # the first layer of every key lost every unit
    with torch.no_grad():
        _assert_close(run(model), masked)

    # Uneven per-layer sizes are in the config: the checkpoint reloads with `from_pretrained`.
    model.save_pretrained(tmp_path)
    reloaded = model_class.from_pretrained(tmp_path).eval()
    assert reloaded.structure_sizes() == kept
    with torch.no_grad():
        _assert_close(run(reloaded), masked)


def test_prune_rejects_keys_of_other_stacks(tiny_config) -> None:
    vision = EfficientVLMVisionModel(tiny_config.vision_config)
    text = EfficientVLMTextModel(tiny_config.text_config)
    with pytest.raises(
        ValueError, match="EfficientVLMVisionModel has no layers for the structure-mask key 'text_heads'"
    ):
        vision.prune({"text_heads": [None, None]})
    with pytest.raises(ValueError, match="EfficientVLMTextModel has no layers for the structure-mask key 'vision_ffn'"):
        text.prune({"vision_ffn": [None, None]})
    with pytest.raises(ValueError, match="Unknown structure-mask key"):
        text.prune({"fusion_cross_head": [None, None]})
    with pytest.raises(ValueError, match="`text_ffn` has 3 masks but the model has 2 such layers"):
        text.prune({"text_ffn": [None, None, None]})


@pytest.mark.parametrize("task", ["retrieval", "vqa", "nlvr2"])
def test_pruning_one_of_two_models_built_from_one_config_leaves_the_other_as_it_was(task: str, tmp_path) -> None:
    """`prune` records the new sizes in the config, which models built from one config object share: the unpruned
    one then saved pruned sizes and could not be reloaded, and new models from that config came out pruned."""
    from trainers.pruning.hard_concrete import random_structure_masks
    from trainers.tasks import task_model_class

    config = EfficientVLMConfig.from_preset("tiny")
    before = config.to_dict()
    full, small = (task_model_class(task)(config) for _ in range(2))
    small.prune(random_structure_masks(small, 0.5, torch.Generator().manual_seed(0)), pad_to_multiple_of=8)
    assert config.to_dict() == before and full.config.to_dict() == task_model_class(task)(config).config.to_dict()
    assert small.efficientvlm.vision_model.config is small.config.vision_config  # one config tree of its own
    for name, model in (("full", full), ("small", small)):
        model.save_pretrained(tmp_path / name)
        assert task_model_class(task).from_pretrained(tmp_path / name).structure_sizes() == model.structure_sizes()
    assert task_model_class(task)(config).structure_sizes() == full.structure_sizes()


def test_text_stack_layout_is_the_one_place_for_layer_roles(tiny_config) -> None:
    layout = tiny_config.layout
    assert layout == tiny_config.text_config.layout == TextStackLayout(2, 2)
    assert (layout.text_layers, layout.fusion_layers) == (range(0, 2), range(2, 4))
    assert [layout.is_fusion(i) for i in range(4)] == [False, False, True, True]
    assert (layout.fusion_index(3), layout.stack_index(1)) == (1, 3)
    assert layout.split(["t0", "t1", "f0", "f1"]) == (["t0", "t1"], ["f0", "f1"])
    with pytest.raises(ValueError, match="text layer"):
        layout.fusion_index(1)
    assert stack_depths(tiny_config) == {"vision": 2, "text": 2, "fusion": 2}
    assert stack_depths(tiny_config.text_config) is None

    # NLVR2's twin pairs count as one fusion unit.
    twin = EfficientVLMConfig.from_preset("tiny", text_config={"num_fusion_layers": 4}, twin_fusion_layers=True)
    assert has_twin_fusion_layers(twin) and not has_twin_fusion_layers(tiny_config)
    assert twin.layout.twin_pairs == [(2, 3), (4, 5)] and twin.layout.num_fusion_units == 2
    assert stack_depths(twin) == {"vision": 2, "text": 2, "fusion": 2}
    assert twin.layout.unit_values([7, 7, 5, 5]) == [7, 5] and twin.layout.layer_values([7, 5]) == [7, 7, 5, 5]
    assert twin.layout.fusion_layer_mapping([1]) == [2, 3]
    assert twin.layout.stack_mapping([1], [1]) == [1, 4, 5]  # text layer 1, then fusion pair 1 = stack 4, 5
    with pytest.raises(ValueError, match="even number of fusion layers"):
        EfficientVLMConfig.from_preset("tiny", text_config={"num_fusion_layers": 3}, twin_fusion_layers=True)


def test_itc_temperature_initialises_the_parameter_and_old_configs_load(tmp_path) -> None:
    config = EfficientVLMConfig.from_preset("tiny", itc_temperature=0.2)
    model = EfficientVLMModel(config)
    torch.testing.assert_close(model.itc_temperature, torch.tensor(0.2))
    # Configs saved before the rename call it `temperature`.
    legacy = EfficientVLMConfig.from_dict({**EfficientVLMConfig.from_preset("tiny").to_dict(), "temperature": 0.3})
    assert legacy.itc_temperature == 0.3 and "temperature" not in legacy.to_dict()


def test_non_uniform_config_round_trips(tmp_path, tiny_inputs) -> None:
    config = EfficientVLMConfig.from_preset(
        "tiny",
        vision_config={"num_attention_heads_per_layer": [4, 0], "intermediate_size_per_layer": [17, 64]},
        text_config={
            "num_attention_heads_per_layer": [1, 4, 0, 3],
            "num_cross_attention_heads_per_layer": [2, 0],
            "intermediate_size_per_layer": [0, 5, 64, 9],
        },
    )
    model = EfficientVLMModel(config).eval()
    assert model.structure_sizes()["text_heads"] == [1, 4]
    assert model.structure_sizes()["fusion_cross_heads"] == [2, 0]
    model.save_pretrained(tmp_path)
    reloaded = EfficientVLMModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.text_config.intermediate_size_per_layer == [0, 5, 64, 9]
    with torch.no_grad():
        _assert_close(_fused(model, tiny_inputs), _fused(reloaded, tiny_inputs), atol=0)


def test_other_image_sizes_interpolate_positions(tiny_config) -> None:
    model = EfficientVLMVisionModel(tiny_config.vision_config).eval()
    pixel_values = torch.randn(2, 3, 48, 48)
    out = model(pixel_values, interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (2, 1 + 36, 32)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(pixel_values)


def test_interpolated_positions_are_kept_for_inference_until_the_weights_change(tiny_config) -> None:
    model = EfficientVLMVisionModel(tiny_config.vision_config).eval()
    embeddings = model.embeddings

    def fresh(side: int) -> torch.Tensor:
        return embeddings._interpolated(embeddings.pos_embed.weight.unsqueeze(0), side, side)

    with torch.no_grad():
        first = embeddings.interpolate_pos_encoding(48, 48)
        assert embeddings.interpolate_pos_encoding(48, 48) is first  # kept
        assert first.shape == (1, 1 + 36, 32)
        torch.testing.assert_close(first, fresh(6), atol=0, rtol=0)
        torch.testing.assert_close(embeddings.interpolate_pos_encoding(64, 64), fresh(8), atol=0, rtol=0)
        embeddings.pos_embed.weight.mul_(2)  # in place (an optimizer step, `load_state_dict`)
        torch.testing.assert_close(embeddings.interpolate_pos_encoding(64, 64), fresh(8), atol=0, rtol=0)
        embeddings.pos_embed.weight = nn.Parameter(torch.randn_like(embeddings.pos_embed.weight))  # replaced
        torch.testing.assert_close(embeddings.interpolate_pos_encoding(64, 64), fresh(8), atol=0, rtol=0)
        model.double()
        assert embeddings._interpolation_cache is None  # a move or cast drops it: the storage is new
        assert embeddings.interpolate_pos_encoding(64, 64).dtype == torch.float64
        model.float()
        pixel_values = torch.randn(2, 3, 48, 48)
        expected = model(pixel_values, interpolate_pos_encoding=True).last_hidden_state
        copied = pickle.loads(pickle.dumps(model))  # with a grid kept
        torch.testing.assert_close(copied(pixel_values, interpolate_pos_encoding=True).last_hidden_state, expected)
    # Under autograd every call interpolates, into the graph.
    grid = embeddings.interpolate_pos_encoding(48, 48)
    assert grid.grad_fn is not None and grid is not embeddings.interpolate_pos_encoding(48, 48)


def test_a_model_built_under_inference_mode_interpolates_positions_afresh(tiny_config) -> None:
    # Its weights are inference tensors, whose in-place writes torch does not count: no grid is kept for them, and
    # a write under inference_mode is seen at the next call.
    torch.manual_seed(0)
    expected_model = EfficientVLMVisionModel(tiny_config.vision_config).eval()
    pixel_values = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        torch.manual_seed(0)
        model = EfficientVLMVisionModel(tiny_config.vision_config).eval()
        assert model.embeddings.pos_embed.weight.is_inference()
        for _ in range(2):
            out = model(pixel_values, interpolate_pos_encoding=True).last_hidden_state
            torch.testing.assert_close(
                out, expected_model(pixel_values, interpolate_pos_encoding=True).last_hidden_state
            )
        assert model.embeddings._interpolation_cache is None
        model.embeddings.pos_embed.weight.mul_(2)
        with torch.no_grad():
            expected_model.embeddings.pos_embed.weight.mul_(2)
        out = model(pixel_values, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(out, expected_model(pixel_values, interpolate_pos_encoding=True).last_hidden_state)


def test_sincos_2d_position_embeddings_code_row_and_column() -> None:
    table = sincos_2d_position_embeddings(side=4, dim=32)
    assert table.shape == (16, 32)
    rows, cols = table[:, :16], table[:, 16:]
    # Reading order: patch 6 is row 1, column 2; each half is sines then cosines of 8 frequencies from 1 down.
    frequencies = 10000.0 ** -(torch.arange(8, dtype=torch.float64) / 8)
    torch.testing.assert_close(rows[6], torch.cat([(1 * frequencies).sin(), (1 * frequencies).cos()]).float())
    torch.testing.assert_close(cols[6], torch.cat([(2 * frequencies).sin(), (2 * frequencies).cos()]).float())
    # Patches of one row share the row half and differ in the column half; every patch is distinct.
    torch.testing.assert_close(rows[4], rows[7])
    assert not torch.allclose(cols[4], cols[7])
    assert torch.cdist(table, table).add(torch.eye(16) * 9).min() > 0.1
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_position_embeddings(side=4, dim=30)


def test_sincos_position_init_starts_the_learned_positions_and_a_checkpoint_keeps_its_own(tiny_config, tmp_path):
    vision = tiny_config.vision_config
    default = EfficientVLMVisionModel(vision).embeddings.pos_embed.weight
    assert vision.position_embedding_init == "normal" and default.std() < 3 * vision.initializer_range
    vision.position_embedding_init = "sincos_2d"
    model = EfficientVLMVisionModel(vision)
    positions = model.embeddings.pos_embed.weight
    side = vision.image_size // vision.patch_size
    torch.testing.assert_close(positions[1:].detach(), sincos_2d_position_embeddings(side, vision.hidden_size))
    assert positions[0].abs().sum() == 0 and positions.requires_grad  # still learned
    # Loading a checkpoint keeps its trained positions (the init only runs for weights that are missing).
    with torch.no_grad():
        positions.mul_(3.0).add_(0.5)
    model.save_pretrained(tmp_path)
    reloaded = EfficientVLMVisionModel.from_pretrained(tmp_path)
    assert reloaded.config.position_embedding_init == "sincos_2d"
    torch.testing.assert_close(reloaded.embeddings.pos_embed.weight, positions)
    with pytest.raises(ValueError, match="position_embedding_init"):
        EfficientVLMConfig(vision_config=dict(vision.to_dict(), position_embedding_init="rope"))
    with pytest.raises(ValueError, match="divisible by 4"):
        EfficientVLMConfig(
            vision_config=dict(
                vision.to_dict(), hidden_size=30, num_attention_heads=3, position_embedding_init="sincos_2d"
            )
        )


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config, tiny_inputs) -> None:
    tiny_config.text_config.hidden_dropout_prob = 0.0
    tiny_config.text_config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    model = EfficientVLMForPreTraining(tiny_config)
    inputs = {**tiny_inputs, "itm_negatives": (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))}
    model.train()
    model(**inputs).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.efficientvlm.vision_model.layers)
    model(**inputs).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


def test_every_parameter_gets_a_gradient(tiny_config, tiny_inputs) -> None:
    model = EfficientVLMForPreTraining(tiny_config).train()
    out = model(
        **tiny_inputs,
        mlm_input_ids=tiny_inputs["input_ids"],
        mlm_labels=tiny_inputs["input_ids"],
        target_bbox=torch.full((4, 4), 0.3),
    )
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_grounding_loss_covers_only_the_region_texts(tiny_config, tiny_inputs) -> None:
    torch.manual_seed(0)
    model = EfficientVLMForPreTraining(tiny_config).eval()
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.7, 0.4, 0.2], [0.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.1, 0.1]])
    mask = torch.tensor([True, True, False, True])
    itm = (torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1]))  # fixed negatives: the same fusion passes
    masked = model(**tiny_inputs, itm_negatives=itm, target_bbox=boxes, target_bbox_mask=mask)
    # A caption row's box, whatever it holds, changes nothing.
    other_boxes = boxes.index_fill(0, torch.tensor([2]), 7.0)
    other = model(**tiny_inputs, itm_negatives=itm, target_bbox=other_boxes, target_bbox_mask=mask)
    torch.testing.assert_close(other.loss_bbox, masked.loss_bbox)
    torch.testing.assert_close(other.loss_giou, masked.loss_giou)
    # The means over the region rows: the same as the loss of those rows alone.
    fused = masked.itm_fusion_output.last_hidden_state[:4, 0]
    predicted = model.bbox_head(fused).sigmoid()
    l1, giou = box_regression_loss(predicted[mask], boxes[mask])
    torch.testing.assert_close(masked.loss_bbox, l1)
    torch.testing.assert_close(masked.loss_giou, giou)
    assert masked.loss_bbox > 0 and masked.loss_giou > 0
    # A batch of captions only: zero grounding loss, and the box head still in the graph (distributed training).
    none = model.train()(**tiny_inputs, target_bbox=boxes, target_bbox_mask=torch.zeros(4, dtype=torch.bool))
    assert none.loss_bbox.item() == 0 and none.loss_giou.item() == 0
    none.loss.backward()
    assert all(p.grad is not None for p in model.bbox_head.parameters())
    with pytest.raises(ValueError, match=r"`target_bbox` must have shape \(4, 4\)"):
        model(**tiny_inputs, target_bbox=boxes[:3])
    with pytest.raises(ValueError, match=r"`target_bbox_mask` needs `target_bbox` and shape \(4,\)"):
        model(**tiny_inputs, target_bbox_mask=mask)


def test_pretraining_losses_are_finite_and_decrease(tiny_config) -> None:
    torch.manual_seed(0)
    model = EfficientVLMForPreTraining(tiny_config).train()
    inputs = make_inputs(tiny_config, batch_size=8, seq_len=8, seed=1)
    labels = torch.full_like(inputs["input_ids"], -100)
    mlm_input_ids = inputs["input_ids"].clone()
    labels[:, 2] = mlm_input_ids[:, 2]
    mlm_input_ids[:, 2] = 4  # [MASK]
    batch = {**inputs, "mlm_input_ids": mlm_input_ids, "mlm_labels": labels}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(25):
        out = model(**batch)
        history.append([out.loss_itc.item(), out.loss_itm.item(), out.loss_mlm.item()])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    first, last = torch.tensor(history[:3]).mean(0), torch.tensor(history[-3:]).mean(0)
    assert torch.isfinite(torch.tensor(history)).all()
    assert (last < first).all(), f"losses did not all decrease: {first.tolist()} -> {last.tolist()}"


def test_hard_negatives_never_come_from_the_same_image() -> None:
    logits = torch.randn(6, 6) * 5
    image_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    for seed in range(20):
        negative_text, negative_image = sample_hard_negatives(
            logits, image_ids, generator=torch.Generator().manual_seed(seed)
        )
        assert (image_ids[negative_text] != image_ids).all()
        assert (image_ids[negative_image] != image_ids).all()
    # A batch of one image has no negative: every pair may be drawn, and each is labelled out of the ITM loss.
    one_image = torch.tensor([7, 7, 7])
    negative_text, negative_image = sample_hard_negatives(torch.randn(3, 3), one_image)
    assert itm_negative_labels(one_image, negative_text, negative_image, 3).eq(-100).all()
    labels = itm_negative_labels(image_ids, negative_text.new_tensor([1, 2, 0, 0, 5, 3]), torch.arange(6), 6)
    assert labels.tolist() == [-100, 0, 0, 0, -100, 0] + [-100] * 6  # pairs 0-1 and 4-5 share an image
    # Caption negatives (index >= batch) are negatives whatever the image ids.
    assert itm_negative_labels(one_image, torch.tensor([3, 4, 5]), torch.tensor([1, 2, 0]), 3)[:3].eq(0).all()


def test_a_batch_of_one_image_trains_on_its_positives_alone(tiny_config, tiny_inputs) -> None:
    """An epoch's last batch may hold one pair, or several captions of one image: no ITM negative exists, so the
    ITM loss is the positives' alone and the step still learns (it raised before)."""
    model = EfficientVLMForPreTraining(tiny_config)
    image_ids = torch.zeros(tiny_inputs["input_ids"].shape[0], dtype=torch.long)
    out = model(**tiny_inputs, image_ids=image_ids)
    assert out.itm_labels.tolist() == [1] * 4 + [-100] * 8
    positives = F.cross_entropy(out.itm_logits[:4], out.itm_labels[:4])
    torch.testing.assert_close(out.loss_itm, positives)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad.abs().sum() > 0 for p in model.itm_head.parameters())
    single = {name: value[:1] for name, value in tiny_inputs.items()}  # one pair, no image ids
    assert model(**single).itm_labels.tolist() == [1, -100, -100]


def test_several_hard_negatives_per_pair_are_distinct_and_scored_beside_the_positives(tiny_config) -> None:
    logits = torch.randn(6, 6) * 5
    image_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    for seed in range(10):
        texts, images = sample_hard_negatives(
            logits, image_ids, generator=torch.Generator().manual_seed(seed), num_negatives=3
        )
        assert texts.shape == images.shape == (18,)
        per_image, per_text = texts.view(3, 6).t(), images.view(3, 6).t()  # draw k of pair i at k * batch + i
        assert (image_ids[per_image] != image_ids[:, None]).all() and (image_ids[per_text] != image_ids[:, None]).all()
        assert all(len(set(row.tolist())) == 3 for row in (*per_image, *per_text))  # 4 candidates: distinct
    # Fewer candidates than negatives asked for: drawn with replacement rather than failing.
    texts, _ = sample_hard_negatives(torch.randn(2, 2), num_negatives=3)
    assert texts.tolist() == [1, 0] * 3
    with pytest.raises(ValueError, match="num_negatives"):
        sample_hard_negatives(logits, num_negatives=0)

    inputs = make_inputs(tiny_config, batch_size=4)
    config = copy.deepcopy(tiny_config)
    config.itm_negatives_per_pair = 2
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(config).eval()
    with torch.no_grad():
        out = model(**inputs, image_ids=torch.arange(4))
    assert out.itm_logits.shape == (20, 2) and out.itm_labels.tolist() == [1] * 4 + [0] * 16
    # Row 4 + 4k + i: image i with its k-th negative text; row 12 + 4k + i: text i with its k-th negative image.
    states = model.efficientvlm.encode_text(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
    images = model.efficientvlm.encode_image(inputs["pixel_values"]).last_hidden_state
    texts, negative_images = out.negative_text_index, out.negative_image_index
    pairs_text = torch.cat([torch.arange(4), texts, torch.arange(4).repeat(2)])
    pairs_image = torch.cat([torch.arange(4), torch.arange(4).repeat(2), negative_images])
    with torch.no_grad():
        expected, _ = image_text_matching_logits(
            model.efficientvlm,
            model.itm_head,
            states[pairs_text],
            inputs["attention_mask"][pairs_text],
            images[pairs_image],
        )
    torch.testing.assert_close(out.itm_logits, expected, atol=1e-5, rtol=1e-4)
    # A model with one negative per pair scores given negatives of two per pair (a teacher, a student's pairs).
    with torch.no_grad():
        given = EfficientVLMForImageTextRetrieval(tiny_config).eval()(
            **inputs, image_ids=torch.arange(4), itm_negatives=(texts, negative_images)
        )
    assert given.itm_logits.shape == (20, 2)
    with pytest.raises(ValueError, match="n \\* batch"):
        model(**inputs, image_ids=torch.arange(4), return_loss=True, itm_negatives=(texts[:6], negative_images[:6]))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="itm_negatives_per_pair"):
            EfficientVLMConfig.from_preset("tiny", itm_negatives_per_pair=bad)


def test_identical_texts_are_never_itm_negatives_of_each_others_images() -> None:
    # Four images; texts 0 and 2 are the same caption ("a picture of two shapes"), so each is true of images 0 and 2.
    input_ids = torch.tensor([[2, 7, 8, 3, 0], [2, 9, 3, 0, 0], [2, 7, 8, 3, 0], [2, 10, 11, 12, 3]])
    attention_mask = (input_ids != 0).long()
    same_text = identical_texts(input_ids, attention_mask)
    assert same_text.tolist() == [[i == j or {i, j} == {0, 2} for j in range(4)] for i in range(4)]
    image_ids = torch.arange(4)
    logits = torch.zeros(4, 4)
    logits[0, 2] = logits[2, 0] = 20.0  # ITC singles out the identical caption as the hardest negative
    for exclude, expected in ((False, True), (True, False)):
        generator = torch.Generator().manual_seed(0)
        drawn = [
            sample_hard_negatives(logits, image_ids, generator, same_text=same_text if exclude else None)
            for _ in range(50)
        ]
        texts, images = torch.stack([d[0] for d in drawn]), torch.stack([d[1] for d in drawn])
        # X-VLM's rule draws the identical caption (a true match labelled "no match"); the exclusion never does.
        assert bool((texts[:, 0] == 2).any() and (images[:, 2] == 0).any()) is expected
        assert bool((texts[:, 2] == 0).any() or (images[:, 0] == 2).any()) is expected
        assert (texts != image_ids).all() and (images != image_ids).all()
    # A batch whose captions are all identical keeps the image-id rule rather than having no negative to draw.
    same = torch.ones(3, 3, dtype=torch.bool)
    texts, images = sample_hard_negatives(torch.zeros(3, 3), torch.arange(3), same_text=same)
    assert (texts != torch.arange(3)).all() and (images != torch.arange(3)).all()
    with pytest.raises(ValueError, match="same_text"):
        sample_hard_negatives(logits, image_ids, same_text=same)


def test_retrieval_and_pretraining_skip_identical_caption_negatives_when_configured(tiny_config) -> None:
    inputs = make_inputs(tiny_config, batch_size=4)
    inputs["input_ids"][2] = inputs["input_ids"][0]
    inputs["attention_mask"][2] = inputs["attention_mask"][0]
    for model_class in (EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining):
        seen = {}
        for exclude in (False, True):
            config = copy.deepcopy(tiny_config)
            config.itm_exclude_identical_texts = exclude
            config.itm_random_negatives = 1.0  # uniform: every allowed negative is drawn now and then
            torch.manual_seed(0)
            model = model_class(config).train()
            with torch.no_grad():
                draws = [model(**inputs, image_ids=torch.arange(4)) for _ in range(30)]
            texts = torch.stack([d.negative_text_index for d in draws])
            images = torch.stack([d.negative_image_index for d in draws])
            seen[exclude] = bool((texts[:, 0] == 2).any() or (texts[:, 2] == 0).any() or (images[:, 0] == 2).any())
        assert seen == {False: True, True: False}, model_class.__name__


@pytest.mark.parametrize("model_class", [EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining])
def test_caption_negatives_replace_in_batch_negative_texts_by_their_share(tiny_config, model_class) -> None:
    inputs = make_inputs(tiny_config, batch_size=4)
    negatives = make_inputs(tiny_config, batch_size=4, seed=1)
    extra = dict(itm_negative_input_ids=negatives["input_ids"], itm_negative_attention_mask=negatives["attention_mask"])
    rows = torch.arange(4)
    for share in (0.0, 1.0):
        config = copy.deepcopy(tiny_config)
        config.itm_caption_negatives = share
        torch.manual_seed(0)
        model = model_class(config).eval()
        with torch.no_grad():
            out = model(**inputs, **extra, image_ids=rows)
        # Index batch + i is pair i's caption negative; with share 0 every negative text is an in-batch one.
        if share == 0.0:
            assert (out.negative_text_index < 4).all()
        else:
            assert torch.equal(out.negative_text_index, rows + 4)
        if share == 1.0:  # the (image i, caption negative i) rows are scored on the caption negatives
            states = model.efficientvlm.encode_text(negatives["input_ids"], negatives["attention_mask"])
            images = model.efficientvlm.encode_image(inputs["pixel_values"])
            with torch.no_grad():
                logits, _ = image_text_matching_logits(
                    model.efficientvlm,
                    model.itm_head,
                    states.last_hidden_state,
                    negatives["attention_mask"],
                    images.last_hidden_state,
                )
            torch.testing.assert_close(out.itm_logits[4:8], logits, atol=1e-5, rtol=1e-4)
            # Given back (a teacher scoring a student's pairs), the same negatives give the same logits.
            with torch.no_grad():
                again = model(**inputs, **extra, image_ids=rows, itm_negatives=(out.negative_text_index, rows))
            torch.testing.assert_close(again.itm_logits[:8], out.itm_logits[:8])
            with pytest.raises(ValueError, match="itm_negative_input_ids"):
                model(**inputs, image_ids=rows, itm_negatives=(out.negative_text_index, rows))
    with pytest.raises(ValueError, match="itm_caption_negatives"):
        EfficientVLMConfig.from_preset("tiny", itm_caption_negatives=2.0)


def test_random_negative_share_mixes_uniform_draws_into_the_hard_ones() -> None:
    # ITC logits that single out one negative per row: hard sampling always picks it, a random share spreads out.
    batch = 8
    logits = torch.zeros(batch, batch)
    hardest = (torch.arange(batch) + 1) % batch
    logits[torch.arange(batch), hardest] = 20.0
    draws = {}
    for fraction in (0.0, 0.5, 1.0):
        generator = torch.Generator().manual_seed(0)
        texts = torch.cat(
            [sample_hard_negatives(logits, generator=generator, random_fraction=fraction)[0] for _ in range(400)]
        )
        rows = torch.arange(batch).repeat(400)
        assert (texts != rows).all()
        draws[fraction] = (texts == hardest[rows]).float().mean().item()
    assert draws[0.0] == 1.0
    # Uniform over the 7 other texts: the hardest one 1/7 of the time; the mixture (1 - f) + f / 7.
    assert abs(draws[1.0] - 1 / 7) < 0.03
    assert abs(draws[0.5] - (0.5 + 0.5 / 7)) < 0.03
    with pytest.raises(ValueError, match="random_fraction"):
        sample_hard_negatives(logits, random_fraction=1.5)
    with pytest.raises(ValueError, match="itm_random_negatives"):
        EfficientVLMConfig.from_preset("tiny", itm_random_negatives=-0.1)


# ------------------------------------------------------------------------------------------------------------
# Errors that name the problem
# ------------------------------------------------------------------------------------------------------------


def test_wrong_pixel_values_raise(tiny_config, tiny_inputs) -> None:
    model = EfficientVLMModel(tiny_config).eval()
    with pytest.raises(ValueError, match="channels"):
        model(**{**tiny_inputs, "pixel_values": torch.randn(4, 1, 32, 32)})
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        model(**{**tiny_inputs, "pixel_values": torch.randn(3, 32, 32)})
    with pytest.raises(ValueError, match="does not match the model"):
        model(**{**tiny_inputs, "pixel_values": torch.randn(4, 3, 40, 40)})


def test_text_longer_than_position_table_raises(tiny_config, tiny_inputs) -> None:
    model = EfficientVLMModel(tiny_config).eval()
    long_ids = torch.ones(4, tiny_config.text_config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="position table"):
        model(pixel_values=tiny_inputs["pixel_values"], input_ids=long_ids)


def test_mismatched_batch_sizes_raise(tiny_config, tiny_inputs) -> None:
    with pytest.raises(ValueError, match="Batch sizes differ"):
        EfficientVLMModel(tiny_config)(**{**tiny_inputs, "pixel_values": tiny_inputs["pixel_values"][:3]})
    with pytest.raises(ValueError, match="Batch sizes differ"):
        EfficientVLMForPreTraining(tiny_config)(**{**tiny_inputs, "pixel_values": tiny_inputs["pixel_values"][:3]})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vision_config": {"num_attention_heads_per_layer": [4]}}, "1 entries but the encoder has 2 layers"),
        ({"text_config": {"intermediate_size_per_layer": [1, 2, 3]}}, "3 entries but the encoder has 4 layers"),
        ({"text_config": {"num_cross_attention_heads_per_layer": [4, 4, 4]}}, "3 entries but the encoder has 2"),
        ({"text_config": {"num_attention_heads_per_layer": [4, 4, 9, 4]}}, "between 0 and 4"),
    ],
)
def test_per_layer_sizes_of_the_wrong_length_raise(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EfficientVLMConfig.from_preset("tiny", **overrides)


def test_bad_masks_raise(tiny_config, tiny_inputs) -> None:
    model = EfficientVLMModel(tiny_config).eval()
    with pytest.raises(ValueError, match="Unknown structure-mask key"):
        model(**tiny_inputs, structure_masks={"vision_head": [None, None]})
    with pytest.raises(ValueError, match="3 entries but there are 2 layers"):
        model(**tiny_inputs, structure_masks={"vision_heads": [None, None, None]})
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        model.prune({"vision_heads": [torch.ones(5), None]})
    with pytest.raises(ValueError, match="Unknown preset"):
        EfficientVLMConfig.from_preset("huge")


def test_fusion_zero_init_residual_starts_fusion_layers_as_identity(tmp_path, tiny_inputs) -> None:
    config = EfficientVLMConfig.from_preset(
        "tiny", text_config={"fusion_zero_init_residual": True, "num_cross_attention_heads_per_layer": [0, 4]}
    )
    model = EfficientVLMModel(config).eval()
    layers = model.text_model.encoder.layer
    text_layers = config.text_config.num_hidden_layers
    for index, layer in enumerate(layers):
        outputs = [layer.attention.out_proj.weight, layer.mlp.fc2.weight]
        if index >= text_layers and hasattr(layer.crossattention, "out_proj"):
            outputs.append(layer.crossattention.out_proj.weight)
        zeroed = [bool((weight == 0).all()) for weight in outputs]
        assert zeroed == [index >= text_layers] * len(outputs), f"layer {index}: {zeroed}"
        # The inputs of every branch keep their normal init.
        std = layer.attention.q_proj.weight.std().item()
        assert std == pytest.approx(config.text_config.initializer_range, rel=0.3)
    # The fusion layers start as the identity (up to LayerNorm): the image does not move the fused states yet.
    with torch.no_grad():
        fused = model(**tiny_inputs).last_hidden_state
        other_image = model(**{**tiny_inputs, "pixel_values": tiny_inputs["pixel_values"].flip(0)}).last_hidden_state
    torch.testing.assert_close(fused, other_image, atol=0, rtol=0)
    default = EfficientVLMModel(EfficientVLMConfig.from_preset("tiny"))
    assert not (default.text_model.encoder.layer[-1].mlp.fc2.weight == 0).all()
    # Only fresh weights: trained (loaded) weights are not zeroed again.
    with torch.no_grad():
        layers[-1].mlp.fc2.weight.fill_(0.5)
    model.save_pretrained(tmp_path)
    reloaded = EfficientVLMModel.from_pretrained(tmp_path)
    assert (reloaded.text_model.encoder.layer[-1].mlp.fc2.weight == 0.5).all()


def test_vision_zero_init_residual_starts_vision_layers_as_identity(tmp_path) -> None:
    config = EfficientVLMConfig.from_preset("tiny", vision_config={"zero_init_residual": True})
    model = EfficientVLMModel(config).eval()
    states = torch.randn(2, 5, config.vision_config.hidden_size)
    for layer in model.vision_model.layers:
        assert (layer.self_attn.out_proj.weight == 0).all() and (layer.mlp.fc2.weight == 0).all()
        assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(
            config.vision_config.initializer_range, rel=0.3
        )
        with torch.no_grad():
            torch.testing.assert_close(layer(states)[0], states, atol=0, rtol=0)  # the positions pass intact
    assert not (
        EfficientVLMModel(EfficientVLMConfig.from_preset("tiny")).vision_model.layers[0].mlp.fc2.weight == 0
    ).all()
    with torch.no_grad():
        model.vision_model.layers[0].mlp.fc2.weight.fill_(0.5)
    model.save_pretrained(tmp_path)
    reloaded = EfficientVLMModel.from_pretrained(tmp_path)
    assert reloaded.config.vision_config.zero_init_residual
    assert (reloaded.vision_model.layers[0].mlp.fc2.weight == 0.5).all()  # trained weights are not zeroed again


def test_output_position_embeddings_add_the_positions_to_the_tokens_the_fusion_reads(tmp_path) -> None:
    config = EfficientVLMConfig.from_preset("tiny")
    assert not config.vision_config.output_position_embeddings  # X-VLM's layout by default
    torch.manual_seed(0)
    plain = EfficientVLMVisionModel(copy.deepcopy(config.vision_config)).eval()
    config.vision_config.output_position_embeddings = True
    with_positions = EfficientVLMVisionModel(config.vision_config).eval()
    with_positions.load_state_dict(plain.state_dict())  # the same parameters: nothing new to load or convert
    embeddings = plain.embeddings
    size = config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = plain(pixels).last_hidden_state + embeddings.pos_embed.weight
        torch.testing.assert_close(with_positions(pixels).last_hidden_state, expected)
        # Another image size adds the interpolated positions, as the input embeddings do.
        larger = torch.randn(1, 3, 2 * size, 2 * size)
        torch.testing.assert_close(
            with_positions(larger, interpolate_pos_encoding=True).last_hidden_state,
            plain(larger, interpolate_pos_encoding=True).last_hidden_state
            + embeddings.interpolate_pos_encoding(2 * size, 2 * size),
        )
    with_positions.save_pretrained(tmp_path)
    assert EfficientVLMVisionModel.from_pretrained(tmp_path).config.output_position_embeddings


@pytest.mark.parametrize("index", [[2, 2, 2, 2, 2, 0], [1, 0, 1, 1, 0, 1], [0, 1, 2, 3, 0, 1]])
def test_shared_image_fusion_trains_and_reports_attention_as_with_copies(tiny_config, index) -> None:
    """The shared-image fusion trains (keys and values indexed per text under autograd) with the same gradients as
    fusing copies of the images, and `output_attentions` gives each text's own cross-attention weights."""
    model = EfficientVLMModel(tiny_config).train()
    for module in model.modules():  # dropout off (hidden states and attention weights), autograd on
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    inputs = make_inputs(tiny_config, batch_size=6, seed=5)
    index = torch.tensor(index)
    images = model.vision_model(inputs["pixel_values"][:4]).last_hidden_state
    texts = model.text_model(inputs["input_ids"], inputs["attention_mask"], mode="text").last_hidden_state

    def fused_and_grads(**kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model.fuse(texts, inputs["attention_mask"], **kwargs).last_hidden_state
        out.pow(2).sum().backward(retain_graph=True)
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    shared, shared_grads = fused_and_grads(image_states=images, image_index=index)
    repeated, repeated_grads = fused_and_grads(image_states=images[index])
    torch.testing.assert_close(shared, repeated)
    assert len(shared_grads) == len(repeated_grads) > 0
    for a, b in zip(shared_grads, repeated_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        weights = model.fuse(texts, inputs["attention_mask"], images, image_index=index, output_attentions=True)
        own = model.fuse(texts, inputs["attention_mask"], images[index], output_attentions=True)
    for a, b in zip(weights.cross_attentions, own.cross_attentions):
        assert a.shape[0] == len(index)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("seed", range(5))
def test_encoder_groups_round_trip_with_bounded_padding(seed) -> None:
    """Blocks hold each text once, with its own image; padding stays under 2 x (texts + images used)."""
    generator = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 8, (1,), generator=generator))
    batch = int(torch.randint(1, 40, (1,), generator=generator))
    # Skewed: most texts on row 0, as with the hub images of retrieval re-ranking.
    index = torch.where(torch.rand(batch, generator=generator) < 0.6, 0, torch.randint(0, rows, (batch,)))
    assert not EncoderGroups(index, rows).blocked  # under autograd (training) keys and values go per text
    with torch.no_grad():
        groups = EncoderGroups(index, rows)
    assert groups.blocked
    states = torch.randn(batch, 3, 4, generator=generator)
    blocks = groups.to_blocks(states)
    assert blocks.shape == (groups.num_blocks, groups.block_size * 3, 4)
    torch.testing.assert_close(groups.from_blocks(blocks, 3), states)
    block_rows = groups.rows_of_blocks(torch.arange(rows))
    assert torch.equal(block_rows[groups.block], index)  # every text's block is one of its own image
    used = len(index.unique())
    assert groups.num_blocks * groups.block_size <= 2 * (batch + used)
    assert blocks.abs().sum() == pytest.approx(states.abs().sum().item(), rel=1e-5)  # the rest is zero padding


def test_texts_sharing_an_image_fuse_as_with_the_image_repeated_and_project_it_once(tiny_config) -> None:
    """`image_index` (retrieval re-ranking, VQA answers): each distinct image is given once and its cross-attention
    keys / values are computed once, yet every text fuses exactly as with its own copy of the image."""
    model = EfficientVLMModel(tiny_config).eval()
    inputs = make_inputs(tiny_config, batch_size=5, seed=4)
    index = torch.tensor([1, 0, 1, 1, 0])
    with torch.no_grad():
        images = model.vision_model(inputs["pixel_values"][:2]).last_hidden_state
        texts = model.text_model(inputs["input_ids"], inputs["attention_mask"], mode="text").last_hidden_state
    image_mask = torch.ones(images.shape[:2], dtype=torch.long)
    image_mask[1, -2:] = 0  # padded image tokens: the mask follows the index too
    projected: list[int] = []
    cross = model.text_model.encoder.layer[tiny_config.text_config.num_hidden_layers].crossattention
    hook = cross.k_proj.register_forward_hook(lambda module, args, output: projected.append(args[0].shape[0]))
    with torch.no_grad():
        shared = model.fuse(texts, inputs["attention_mask"], images, image_mask, image_index=index)
        repeated = model.fuse(texts, inputs["attention_mask"], images[index], image_mask[index])
    hook.remove()
    assert projected == [2, 5]
    torch.testing.assert_close(shared.last_hidden_state, repeated.last_hidden_state)
    # One image shared by most texts, one unused: its block is split in two and the unused image gets none.
    many = model.fuse(texts, inputs["attention_mask"], images, image_mask, image_index=torch.tensor([0, 0, 0, 0, 1]))
    copies = model.fuse(texts, inputs["attention_mask"], images[[0, 0, 0, 0, 1]], image_mask[[0, 0, 0, 0, 1]])
    torch.testing.assert_close(many.last_hidden_state, copies.last_hidden_state)
    with pytest.raises(ValueError, match=r"one entry per text \(5\)"):
        model.fuse(texts, inputs["attention_mask"], images, image_index=index[:4])
    with pytest.raises(ValueError, match="integer"):
        model.fuse(texts, inputs["attention_mask"], images, image_index=index.float())
    with pytest.raises(ValueError, match=r"rows of `encoder_hidden_states` \(0 to 1\)"):
        model.fuse(texts, inputs["attention_mask"], images, image_index=torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="without `encoder_hidden_states`"):
        model.text_model(text_hidden_states=texts, mode="fusion", encoder_index=index)
