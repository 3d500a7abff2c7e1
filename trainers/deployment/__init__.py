"""Deploying a (pruned) task model: ONNX graphs of every task's inference path with a parity check against PyTorch
(`onnx_export`), optional int8 (onnxruntime dynamic quantization), onnxruntime-backed task models that the task
evaluation routines score (`onnx_models`), PyTorch vs ONNX fp32 vs int8 side by side (`comparison`), and int8 in
PyTorch (`torch_int8`)."""

from trainers.deployment.onnx_export import ExportResult, OnnxParityError, export_onnx, read_manifest
from trainers.deployment.onnx_models import load_onnx_model
from trainers.deployment.torch_int8 import load_torch_int8, quantize_torch_int8, save_torch_int8

__all__ = [
    "ExportResult",
    "OnnxParityError",
    "export_onnx",
    "load_onnx_model",
    "load_torch_int8",
    "quantize_torch_int8",
    "read_manifest",
    "save_torch_int8",
]
