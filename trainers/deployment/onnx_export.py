"""ONNX export of a task model's inference graphs, checked against PyTorch right after export, with optional int8.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. Both exporters give the same numbers here,
but the dynamo exporter took 5-27 s per tiny graph (the TorchScript one 1-3 s) and needs onnxscript; the
TorchScript one exports every graph with dynamic batch and sequence axes, which the parity run below checks at
sizes other than the traced ones (a size the trace baked in as a constant fails there).

Output folder: one `<graph>.onnx` per graph (and `<graph>.int8.onnx` with int8), `onnx_manifest.json` (the graphs,
their inputs and outputs with dtypes and shapes, and how to chain them), the model's `config.json`, and the
processor when one is given.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, logging

from trainers.deployment.graphs import GraphSpec, task_graphs
from trainers.deployment.torch_int8 import INT8_WEIGHTS_NAME, is_torch_int8

logger = logging.get_logger(__name__)

MANIFEST_NAME = "onnx_manifest.json"
MANIFEST_FORMAT = "efficientvlm-onnx"
OPSET = 17
PARITY_ATOL = 1e-4
# (batch, sequence) sizes of the parity check: none is the traced size, so a size baked in as a constant fails.
PARITY_SIZES = ((1, 5), (3, 12), (4, 3))
TRACE_SIZE = (2, 8)

# How each task's graphs chain, for the manifest (the README's "Deploying" section says the same).
CHAINING = {
    "retrieval": [
        "image_features(pixel_values) -> image_states, image_embeds; text_features(input_ids, attention_mask) -> "
        "text_states, text_embeds",
        "ITC similarity = image_embeds @ text_embeds.T (cosine); keep the top-k candidates of each query",
        "itm_scores(image_states[i], text_states[j], attention_mask[j]) for each kept pair (i, j) -> itm_logits; "
        "score = itm_logits[:, 1] (the match logit alone, as X-VLM), or itm_logits[:, 1] - itm_logits[:, 0] + "
        "itc_logit_scale * cosine (the log-odds plus the ITC logit; itc_logit_scale in this manifest); rank by it",
    ],
    "vqa": [
        "vqa_encoder(pixel_values, input_ids, attention_mask) -> question_states (once per question)",
        "vqa_decoder([CLS] of each question, mask 1, question_states, attention_mask) -> logits; the first-token "
        "log-probability of each candidate answer keeps the top k",
        "vqa_decoder(the k candidates '[CLS] answer [SEP]', their mask, question_states repeated k times, its mask) "
        "-> logits; the answer with the highest sum of token log-probabilities wins (EfficientVLMForQuestionAnswering"
        ".rank_answers; config.json holds the candidates as answer_candidates / answer_candidates_ids)",
    ],
    "nlvr2": [
        "nlvr2(pixel_values (batch, 2, ...): left and right image, input_ids, attention_mask) -> logits; "
        "argmax 1 = true"
    ],  # fmt: skip
    "captioning": [
        "caption_image_encoder(pixel_values) -> image_embeds (once per image)",
        "caption_decoder(input_ids = '[CLS] a picture of' without [SEP], image_embeds) -> logits; append the argmax "
        "of the last position; repeat until [SEP] (text_config.eos_token_id) or the length limit",
    ],
}
CHAINING["pretraining"] = CHAINING["retrieval"]


class OnnxParityError(RuntimeError):
    """An exported graph disagrees with PyTorch beyond the tolerance."""


@dataclass
class ExportResult:
    """What `export_onnx` wrote: the output folder, the manifest (as written) and the largest absolute difference
    from PyTorch of each graph (fp32) over the parity sizes."""

    output_dir: Path
    manifest: dict[str, Any]
    max_errors: dict[str, float] = field(default_factory=dict)

    def graph_path(self, name: str, int8: bool = False) -> Path:
        return self.output_dir / self.manifest["graphs"][name]["int8_file" if int8 else "file"]


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:  # the `export` extra
        raise ImportError("ONNX export needs onnx and onnxruntime: pip install 'efficientvlm[export]'.") from error
    return onnxruntime


def ort_session(path: str | os.PathLike, num_threads: int | None = None) -> Any:
    """An onnxruntime CPU session of `path` (`num_threads` intra-op threads, default: torch's)."""
    onnxruntime = _require_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_feed(session: Any, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays a session takes: an input the outputs do not depend on is not in the graph (e.g. the image of a
    VQA model whose fusion layers lost every cross-attention head), so it is left out."""
    return {node.name: arrays[node.name] for node in session.get_inputs()}


def _as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _export_graph(graph: GraphSpec, path: Path, opset: int) -> None:
    example = graph.example_inputs(*TRACE_SIZE, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        # The tracer warns about Python-side shape checks; the parity run is what proves the graph general.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        torch.onnx.export(
            graph.module,
            example,
            str(path),
            input_names=[spec.name for spec in graph.inputs],
            output_names=[spec.name for spec in graph.outputs],
            dynamic_axes=graph.dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    graph.module.eval()


def check_parity(
    graph: GraphSpec,
    path: str | os.PathLike,
    sizes: tuple[tuple[int, int], ...] = PARITY_SIZES,
    atol: float = PARITY_ATOL,
    seed: int = 1,
) -> float:
    """Runs the ONNX file of `graph` with onnxruntime and the PyTorch module on the same random inputs at every
    `(batch, sequence)` of `sizes`; returns the largest absolute difference, or raises [`OnnxParityError`] naming
    the graph, output, size and error when it exceeds `atol`."""
    session = ort_session(path)
    worst = 0.0
    for batch, sequence in sizes:
        inputs = graph.example_inputs(batch, sequence, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = _as_tuple(graph.module(*inputs))
        feed = session_feed(session, {spec.name: tensor.numpy() for spec, tensor in zip(graph.inputs, inputs)})
        try:
            outputs = session.run(None, feed)
        except Exception as error:  # e.g. a size the trace baked in as a constant
            raise OnnxParityError(
                f"ONNX graph {graph.name!r} fails in onnxruntime at batch {batch}, sequence {sequence} (PyTorch runs "
                f"it): {error}"
            ) from error
        for spec, got, want in zip(graph.outputs, outputs, expected):
            if got.shape != tuple(want.shape):
                raise OnnxParityError(
                    f"ONNX graph {graph.name!r}: output {spec.name!r} has shape {got.shape}, PyTorch "
                    f"{tuple(want.shape)} (batch {batch}, sequence {sequence})."
                )
            error = float(np.abs(got - want.numpy()).max()) if got.size else 0.0
            if not error <= atol:  # NaN fails too
                raise OnnxParityError(
                    f"ONNX graph {graph.name!r} differs from PyTorch: max |difference| {error:.3g} > atol {atol:g} "
                    f"on output {spec.name!r} (batch {batch}, sequence {sequence}; file {path})."
                )
            worst = max(worst, error)
    return worst


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """onnxruntime dynamic quantization: int8 weights of the MatMul / Gemm nodes, activations quantized on the fly."""
    _require_onnxruntime()
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process applies to static quantization of CNNs
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


# The weights files that, beside a config.json, make a folder a saved model (`save_pretrained`, `save_torch_int8`).
_MODEL_WEIGHTS_NAMES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, INT8_WEIGHTS_NAME)


def check_export_folder(output_dir: str | os.PathLike, flag: str | None = None) -> None:
    """Raises when `output_dir` holds a saved model (a config.json and its weights) rather than an earlier export
    (`onnx_manifest.json`, which an export may replace): the export writes its own config.json and processor
    there, and the model would no longer load. `flag` names the option that gave the folder in the message."""
    folder = Path(output_dir)
    if (folder / MANIFEST_NAME).is_file() or not (folder / "config.json").is_file():
        return
    held = [name for name in _MODEL_WEIGHTS_NAMES if (folder / name).is_file()]
    if held:
        given = f"{flag} {output_dir}" if flag else str(output_dir)
        raise ValueError(
            f"{given} holds a saved model (config.json, {', '.join(held)}): an export there would write its own "
            "config.json and processor over that model's, and the model would no longer load. Export to a folder "
            f"of its own (or to an earlier export folder, one with {MANIFEST_NAME})."
        )


def export_onnx(
    model: nn.Module,
    output_dir: str | os.PathLike,
    int8: bool = False,
    processor: Any = None,
    opset: int = OPSET,
    parity_sizes: tuple[tuple[int, int], ...] = PARITY_SIZES,
    atol: float = PARITY_ATOL,
) -> ExportResult:
    """
    Exports the inference graphs of a task model (retrieval, VQA, NLVR2, captioning, or pre-training: its retrieval
    graphs) to `output_dir`, each with dynamic batch and sequence axes, and checks each against PyTorch with
    onnxruntime right away (`parity_sizes`, `atol`; [`OnnxParityError`] when one differs).

    Pruned models export as they are (uneven layers, layers with no head or no FFN neuron left). With `int8`, each
    graph is also written as `<graph>.int8.onnx` (onnxruntime dynamic quantization). Writes the model's
    `config.json` (the answer candidates of a VQA model, the special token ids), the processor when given, and
    `onnx_manifest.json`. The model is put in eval mode (dropout off). A folder that holds a saved model is
    refused ([`check_export_folder`]).
    """
    _require_onnxruntime()
    check_export_folder(output_dir)
    if is_torch_int8(model):  # torch's quantized Linear layers have no ONNX export
        raise ValueError(
            "export_onnx takes the float32 model; this one is quantized by quantize_torch_int8, whose int8 Linear "
            "layers do not export to ONNX. Export the float32 model with int8=True (efficientvlm export --int8) "
            "for onnxruntime's int8 graphs."
        )
    model.eval()
    if next(model.parameters()).dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        raise ValueError("Export a float32 model on the CPU (`model.float().cpu()`); the graphs take float32 inputs.")
    task, graphs = task_graphs(model)
    if task == "vqa" and model.config.answer_candidates_ids is None:
        # The graphs rank whatever ids they are given; only the config carries a list to rank by default.
        warnings.warn(
            "This VQA model has no answer candidates (`config.answer_candidates`), so its export has none either: "
            "the ONNX model's `rank_answers` will rank only the `answer_candidates_ids` passed to it. To export "
            "them with it, set them on the PyTorch model (`model.set_answer_candidates(answers, processor)`, then "
            "`save_pretrained`; the training commands' `--answer_list` saves them too) and export again; "
            "`efficientvlm export --answer_list` only scores `--eval_file`.",
            UserWarning,
            stacklevel=2,
        )
    output_dir = Path(output_dir)
    earlier = _graph_files(output_dir)  # an earlier export's graphs: those this one does not write go
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "task": task,
        "model_class": type(model).__name__,
        "opset": opset,
        "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}",
        "parity": {"atol": atol, "sizes": [list(size) for size in parity_sizes], "max_abs_error": {}},
        "graphs": {},
        "chaining": CHAINING[task],
        # The longest text (input_ids, answer_input_ids) the graphs take: BERT positions are a learned table.
        "max_position_embeddings": model.config.text_config.max_position_embeddings,
    }
    if hasattr(model, "itc_logit_scale"):  # the learned ITC temperature, for re-ranking by "log_odds+itc"
        manifest["itc_logit_scale"] = model.itc_logit_scale()
    result = ExportResult(output_dir, manifest)
    for graph in graphs:
        path = output_dir / f"{graph.name}.onnx"
        _export_graph(graph, path, opset)
        result.max_errors[graph.name] = check_parity(graph, path, parity_sizes, atol)
        entry = {
            "file": path.name,
            "description": graph.description,
            "inputs": [spec.as_dict() for spec in graph.inputs],
            "outputs": [spec.as_dict() for spec in graph.outputs],
        }
        taken = {node.name for node in ort_session(path).get_inputs()}
        unused = [spec.name for spec in graph.inputs if spec.name not in taken]
        if unused:  # pruning removed every path from these inputs to the outputs
            entry["unused_inputs"] = unused
        if int8:
            int8_path = output_dir / f"{graph.name}.int8.onnx"
            quantize_int8(path, int8_path)
            entry["int8_file"] = int8_path.name
        manifest["graphs"][graph.name] = entry
        manifest["parity"]["max_abs_error"][graph.name] = result.max_errors[graph.name]
    _save_config_without_model_classes(model.config, output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    (output_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    stale = sorted(earlier - _graph_files(output_dir))
    for name in stale:
        (output_dir / name).unlink(missing_ok=True)
    if stale:
        logger.warning(
            f"Removed from {output_dir} the graphs of the export there before that this one does not have: "
            f"{', '.join(stale)}."
        )
    return result


def _save_config_without_model_classes(config: Any, output_dir: Path) -> None:
    """Saves `config` (its code too, as remote code) with the `AutoModel*` entries of its `auto_map` left out: the
    folder holds graphs, not a PyTorch model, and would not hold the modeling files those entries name."""
    config = copy.deepcopy(config)
    auto_map = {k: v for k, v in (getattr(config, "auto_map", None) or {}).items() if not k.startswith("AutoModel")}
    if auto_map:
        config.auto_map = auto_map
    elif hasattr(config, "auto_map"):
        del config.auto_map
    config.save_pretrained(output_dir)


def _graph_files(folder: Path) -> set[str]:
    """The graph files (fp32 and int8) the manifest of an export folder lists; none without a manifest."""
    if not (folder / MANIFEST_NAME).is_file():
        return set()
    graphs = read_manifest(folder)["graphs"].values()
    return {entry[key] for entry in graphs for key in ("file", "int8_file") if key in entry}


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export folder (a `ValueError` naming the folder when it has none or another format)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{folder} has no {MANIFEST_NAME}: it is not a folder written by `efficientvlm export`.")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an {MANIFEST_FORMAT} manifest (format {manifest.get('format')!r}).")
    return manifest


__all__ = [
    "MANIFEST_NAME",
    "ExportResult",
    "OnnxParityError",
    "check_export_folder",
    "check_parity",
    "export_onnx",
    "ort_session",
    "session_feed",
    "quantize_int8",
    "read_manifest",
]
