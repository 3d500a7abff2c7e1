"""int8 in PyTorch: dynamic quantization of a task model's Linear layers, and a format that saves and reloads it.

safetensors stores plain tensors; a dynamically quantized Linear holds packed int8 weights with their scale, which
`save_pretrained` cannot write (so it raises, naming these functions). The format here:

    folder/config.json                    the model's config (as save_pretrained writes it)
    folder/torch_int8.json                {"format": "efficientvlm-torch-int8", "dtype": "qint8", "modules": ["Linear"]}
    folder/torch_int8_state_dict.pt       torch.save of the quantized model's state dict (loaded with weights_only=True)

`load_torch_int8` builds the model from the config, quantizes it the same way and loads the state dict: the reloaded
model computes exactly what the saved one did. For a deployment artefact that needs no PyTorch, export ONNX int8
(`efficientvlm export --int8`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

INT8_FORMAT = "efficientvlm-torch-int8"
INT8_INFO_NAME = "torch_int8.json"
INT8_WEIGHTS_NAME = "torch_int8_state_dict.pt"


def quantize_torch_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode, CPU) whose `nn.Linear` layers run int8 weights with dynamically quantized
    activations (`torch.ao.quantization.quantize_dynamic`, qint8); `model` is unchanged (its training flags
    included). `model` must be float32: the int8 layers take float32 activations."""
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if dtypes:
        raise ValueError(
            f"quantize_torch_int8 quantizes a float32 model; this one holds {', '.join(dtypes)} weights, which the "
            "int8 layers would run into at inference ('expected scalar type Float'). Quantize `model.float()`."
        )
    training = [module.training for module in model.modules()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notice that eager-mode quantization is moving to torchao
            quantized = torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear}, torch.qint8, inplace=False)
    finally:  # the caller's model keeps each module's own flag
        for module, flag in zip(model.modules(), training):
            module.training = flag
    return quantized.eval()  # the int8 Linear layers it made are in training mode


def is_torch_int8(model: nn.Module) -> bool:
    """Whether `model` holds dynamically quantized modules."""
    return any(type(module).__module__.startswith("torch.ao.nn.quantized") for module in model.modules())


def save_torch_int8(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Saves a model from [`quantize_torch_int8`] to `folder` (see the module docstring); returns the folder."""
    if not is_torch_int8(model):
        raise ValueError("This model is not quantized: call `quantize_torch_int8(model)` first (or save_pretrained).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # raised inside torch.save
        torch.save(model.state_dict(), folder / INT8_WEIGHTS_NAME)
    info = {"format": INT8_FORMAT, "dtype": "qint8", "modules": ["Linear"], "model_class": type(model).__name__}
    (folder / INT8_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return folder


def load_torch_int8(folder: str | os.PathLike) -> nn.Module:
    """The model [`save_torch_int8`] saved in `folder`, quantized, in eval mode."""
    import modeling_efficientvlm
    from modeling_efficientvlm import EfficientVLMConfig

    folder = Path(folder)
    info_path = folder / INT8_INFO_NAME
    if not info_path.is_file():
        raise ValueError(f"{folder} has no {INT8_INFO_NAME}: it was not written by `save_torch_int8`.")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("format") != INT8_FORMAT:
        raise ValueError(f"{info_path} is not an {INT8_FORMAT} file (format {info.get('format')!r}).")
    model_class = getattr(modeling_efficientvlm, info["model_class"], None)
    if model_class is None:
        raise ValueError(f"{info_path} names an unknown model class {info['model_class']!r}.")
    model = quantize_torch_int8(model_class(EfficientVLMConfig.from_pretrained(folder)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # raised inside torch.load
        state = torch.load(folder / INT8_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


__all__ = ["is_torch_int8", "load_torch_int8", "quantize_torch_int8", "save_torch_int8"]
