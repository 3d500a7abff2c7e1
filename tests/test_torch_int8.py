"""int8 in PyTorch: a dynamically quantized pruned model saves and reloads to the same outputs through
`save_torch_int8` / `load_torch_int8`; `save_pretrained` of it is a clear error naming that route and ONNX int8."""

from __future__ import annotations

import pytest
import torch

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForVisualReasoning
from trainers.deployment import load_torch_int8, quantize_torch_int8, save_torch_int8
from trainers.deployment.torch_int8 import is_torch_int8

from .model_utils import prune_unevenly


def _pruned_nlvr2() -> EfficientVLMForVisualReasoning:
    torch.manual_seed(0)
    return prune_unevenly(EfficientVLMForVisualReasoning(EfficientVLMConfig.from_preset("tiny")).eval())


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (3, 6), generator=generator)
    return torch.randn(3, 2, 3, 32, 32, generator=generator), ids, torch.ones_like(ids)


def test_quantized_pruned_model_round_trips_to_identical_outputs(tmp_path) -> None:
    model = _pruned_nlvr2()
    quantized = quantize_torch_int8(model)
    assert is_torch_int8(quantized) and not is_torch_int8(model)  # the float model is left alone
    with torch.no_grad():
        float_logits, int8_logits = model(*_inputs()).logits, quantized(*_inputs()).logits
    assert 0 < (float_logits - int8_logits).abs().max() < 0.1  # int8 changes the numbers, a little

    save_torch_int8(quantized, tmp_path)
    reloaded = load_torch_int8(tmp_path)
    assert is_torch_int8(reloaded)
    assert (
        reloaded.config.text_config.num_attention_heads_per_layer
        == model.config.text_config.num_attention_heads_per_layer
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*_inputs()).logits, int8_logits, rtol=0, atol=0)


def test_save_pretrained_of_a_quantized_model_names_the_routes(tmp_path) -> None:
    quantized = quantize_torch_int8(_pruned_nlvr2())
    with pytest.raises(ValueError, match=r"dynamically quantized model.*save_torch_int8.*efficientvlm export --int8"):
        quantized.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with pytest.raises(ValueError, match="not quantized"):
        save_torch_int8(_pruned_nlvr2(), tmp_path / "float")
    with pytest.raises(ValueError, match="torch_int8.json"):
        load_torch_int8(tmp_path)


def test_quantizing_leaves_the_models_training_flags_and_refuses_a_bfloat16_model() -> None:
    """quantize_torch_int8 switched the caller's model to eval mode; a bfloat16 model quantized, then failed at
    inference with 'expected scalar type Float but found BFloat16'."""
    model = _pruned_nlvr2().train()
    model.efficientvlm.vision_model.eval()  # mixed flags come back as they were, module by module
    flags = [module.training for module in model.modules()]
    quantized = quantize_torch_int8(model)
    assert [module.training for module in model.modules()] == flags and model.training
    assert not any(module.training for module in quantized.modules())
    with pytest.raises(ValueError, match=r"^quantize_torch_int8 quantizes a float32 model; this one holds "
                       r"torch\.bfloat16 weights.*Quantize `model\.float\(\)`\.$"):  # fmt: skip
        quantize_torch_int8(_pruned_nlvr2().to(torch.bfloat16))


def test_onnx_export_of_a_torch_int8_model_points_to_int8_export(tmp_path) -> None:
    """It dumped ~400 lines of TorchScript IR, then UnsupportedOperatorError."""
    from trainers.deployment import export_onnx

    with pytest.raises(ValueError, match=r"quantized by quantize_torch_int8.*Export the float32 model with int8=True "
                       r"\(efficientvlm export --int8\)"):  # fmt: skip
        export_onnx(quantize_torch_int8(_pruned_nlvr2()), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
