"""The fused inference forms of attention and FFN blocks (no autograd): same outputs as the written forms, and
the written forms wherever the fusion would not compute the same thing."""

from __future__ import annotations

import pytest
import torch

from modeling_efficientvlm import EfficientVLMConfig
from modeling_efficientvlm.modeling_efficientvlm import (
    EfficientVLMAttention,
    EfficientVLMEmptyAttention,
    EfficientVLMEmptyMLP,
    EfficientVLMMLP,
    extended_attention_mask,
)
from tests.model_utils import shared_image_scores, tiny_retrieval_model


def _attention(cross: bool = False) -> EfficientVLMAttention:
    config = EfficientVLMConfig.from_preset("tiny").text_config
    torch.manual_seed(0)
    kv_hidden_size = config.encoder_hidden_size if cross else config.hidden_size
    attention = EfficientVLMAttention(config, 4, kv_hidden_size, dropout=0.1).eval()
    with torch.no_grad():  # biases of the size of the weights: folding them away must matter
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
            linear.bias.normal_()
    return attention


def _record_linear_calls(monkeypatch) -> list[torch.nn.Linear]:
    called, forward = [], torch.nn.Linear.forward

    def recorded(self, input):
        called.append(self)
        return forward(self, input)

    monkeypatch.setattr(torch.nn.Linear, "forward", recorded)
    return called


def _inputs(attention: EfficientVLMAttention, cross: bool) -> dict:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 6, attention.q_proj.in_features, generator=generator)
    padding = torch.ones(3, 9 if cross else 6)
    padding[0, -2:] = 0  # padded keys: their scores get the dtype's minimum, not -inf
    inputs = {"hidden_states": hidden, "attention_mask": extended_attention_mask(padding, hidden.dtype)}
    if cross:
        inputs["encoder_hidden_states"] = torch.randn(3, 9, attention.k_proj.in_features, generator=generator)
    return inputs


@pytest.mark.parametrize("cross", [False, True])
def test_attention_without_autograd_folds_the_key_and_value_biases(cross: bool, monkeypatch) -> None:
    attention = _attention(cross)
    inputs = _inputs(attention, cross)
    residual = torch.randn(6, 3, attention.q_proj.in_features).transpose(0, 1)  # not contiguous
    written = attention(**inputs)[0]  # autograd records it: the written form
    called = _record_linear_calls(monkeypatch)
    with torch.no_grad():
        fused = attention(**inputs)[0]
        assert called == [attention.q_proj]  # keys, values and output from the weights alone
        with_residual = attention(**inputs, residual=residual)[0]
    torch.testing.assert_close(fused, written.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_residual, residual + written.detach(), atol=1e-5, rtol=1e-5)
    called.clear()
    with_residual = attention(**inputs, residual=residual)[0]  # and the written form takes the residual too
    assert len(called) == 4
    torch.testing.assert_close(with_residual, residual + written)


def test_attention_runs_as_written_where_the_fold_would_differ(monkeypatch) -> None:
    attention = _attention()
    inputs = _inputs(attention, cross=False)
    called = _record_linear_calls(monkeypatch)
    head_mask = torch.tensor([1.0, 0.0, 0.5, 1.0])
    with torch.no_grad():
        # A head mask scales each head's context, so its value bias no longer adds b_v to every row.
        attention(**inputs, head_mask=head_mask)
        assert len(called) == 4
        called.clear()
        _, weights = attention(**inputs, output_attentions=True)  # the probabilities it returns use the key bias
        assert len(called) == 4 and weights is not None
        called.clear()
        attention.train()  # dropped probabilities no longer sum to 1
        attention(**inputs)
        assert len(called) == 4
    attention.eval()
    called.clear()
    handle = attention.k_proj.register_forward_hook(lambda module, args, output: 2 * output)
    with torch.no_grad():
        hooked = attention(**inputs)[0]
    assert attention.k_proj in called
    handle.remove()
    with torch.no_grad():
        assert not torch.allclose(hooked, attention(**inputs)[0])  # the hook changed the scores: it ran


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "relu", "gelu_new"])
def test_ffn_without_autograd_accumulates_into_the_residual(hidden_act: str, monkeypatch) -> None:
    config = EfficientVLMConfig.from_preset("tiny").vision_config
    config.hidden_act = hidden_act
    torch.manual_seed(0)
    mlp = EfficientVLMMLP(config, 24).eval()
    hidden = torch.randn(2, 7, config.hidden_size)
    residual = torch.randn(7, 2, config.hidden_size).transpose(0, 1)  # not contiguous
    mask = torch.rand(24).round()
    for ffn_mask in (None, mask):
        written = mlp(hidden, ffn_mask).detach()  # under autograd: the written form
        with torch.no_grad():
            torch.testing.assert_close(mlp(hidden, ffn_mask), written, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(mlp(hidden, ffn_mask, residual=residual), residual + written)
            monkeypatch.setattr(EfficientVLMMLP, "inference_chunk_rows", 5)  # row blocks write into their rows
            torch.testing.assert_close(mlp(hidden, ffn_mask, residual=residual), residual + written)
            monkeypatch.undo()
    # A mask per token (2-D) is not one value per neuron: the written form runs, and still adds the residual.
    token_mask = torch.rand(2, 7, 24).round()
    written = mlp(hidden, token_mask).detach()
    with torch.no_grad():
        torch.testing.assert_close(mlp(hidden, token_mask, residual=residual), residual + written)


def test_empty_blocks_add_their_bias_to_the_residual() -> None:
    hidden, residual, bias = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(8)
    torch.testing.assert_close(EfficientVLMEmptyAttention(bias)(hidden, residual=residual)[0], residual + bias)
    torch.testing.assert_close(EfficientVLMEmptyMLP(bias)(hidden, residual=residual), residual + bias)
    torch.testing.assert_close(EfficientVLMEmptyMLP(bias)(hidden), bias.expand(2, 3, 8))


def test_model_scores_the_same_with_and_without_autograd() -> None:
    """Every fused block of a whole model at once: ITM scores of texts sharing images (grouped cross-attention,
    padded texts) and the retrieval embeddings, inference form against the written one."""
    model = tiny_retrieval_model()
    written = [tensor.detach() for tensor in shared_image_scores(model)]  # autograd records it: the written forms
    with torch.no_grad():
        fused = shared_image_scores(model)
    for a, b in zip(fused, written):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layers_add_each_block_to_its_residual_once() -> None:
    """Pre-LN vision block and post-LN fusion layer against their formulas, written out from their parts."""
    from modeling_efficientvlm.modeling_efficientvlm import EfficientVLMTextLayer, EfficientVLMVisionLayer

    config = EfficientVLMConfig.from_preset("tiny")
    torch.manual_seed(0)
    vision = EfficientVLMVisionLayer(config.vision_config, 0).eval()
    fusion = EfficientVLMTextLayer(config.text_config, 0, has_cross_attention=True).eval()
    for layer in (vision, fusion):
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.normal_(std=0.2)
    x = torch.randn(2, 5, config.vision_config.hidden_size)
    t = torch.randn(2, 4, config.text_config.hidden_size)
    image = torch.randn(2, 5, config.text_config.encoder_hidden_size)
    with torch.no_grad():
        for fused in (True, False):
            with torch.set_grad_enabled(not fused):  # the inference form, then the written one
                h = x + vision.self_attn(vision.layer_norm1(x))[0]
                expected = h + vision.mlp(vision.layer_norm2(h))
                torch.testing.assert_close(vision(x)[0], expected, atol=1e-5, rtol=1e-5)

                h = fusion.attention_norm(t + fusion.attention(t)[0])
                h = fusion.crossattention_norm(h + fusion.crossattention(h, encoder_hidden_states=image)[0])
                expected = fusion.mlp_norm(h + fusion.mlp(h))
                torch.testing.assert_close(fusion(t, encoder_hidden_states=image)[0], expected, atol=1e-5, rtol=1e-5)


def test_a_residual_that_requires_grad_keeps_the_written_forms() -> None:
    """Frozen blocks on a trainable residual stream: the gradient reaches the residual (the fused forms write into
    new tensors with `out=`, which autograd cannot record)."""
    attention = _attention().requires_grad_(False)
    config = EfficientVLMConfig.from_preset("tiny").text_config
    mlp = EfficientVLMMLP(config, 24).eval().requires_grad_(False)
    hidden = torch.randn(2, 6, config.hidden_size)
    for block in (lambda residual: attention(hidden, residual=residual)[0], lambda r: mlp(hidden, residual=r)):
        residual = torch.randn(2, 6, config.hidden_size, requires_grad=True)
        block(residual).sum().backward()
        torch.testing.assert_close(residual.grad, torch.ones_like(residual))
