"""PyTorch (fp32, int8), ONNX fp32 and ONNX int8 side by side in one run: the latency of every exported graph on the
same inputs (interleaved rounds, ratios against PyTorch), the largest output difference from PyTorch, and a task
metric on an evaluation file through the task's own evaluation routine."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from trainers.deployment.graphs import task_graphs
from trainers.deployment.onnx_export import ort_session, read_manifest, session_feed
from trainers.deployment.torch_int8 import quantize_torch_int8
from trainers.tasks import evaluate_task, task_spec


@dataclass
class LatencyRow:
    """One backend: median milliseconds of each graph and of all of them, its speedup over PyTorch (total), and
    the largest absolute difference of its outputs from PyTorch's."""

    backend: str
    graph_ms: dict[str, float]
    total_ms: float
    speedup: float = 1.0
    max_abs_difference: float = 0.0
    graph_speedups: dict[str, float] = field(default_factory=dict)


def _numpy(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return [t.numpy() for t in (outputs if isinstance(outputs, tuple) else (outputs,))]


def _timed(run: Any, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        run()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return timings


@torch.no_grad()
def compare_latency(
    model: nn.Module,
    folder: str | os.PathLike,
    int8: bool,
    batch_size: int = 8,
    sequence_length: int = 30,
    warmup: int = 2,
    repeats: int = 10,
    rounds: int = 2,
    seed: int = 0,
) -> list[LatencyRow]:
    """Times each graph of the export `folder` in PyTorch, in onnxruntime fp32 and, with `int8`, in PyTorch int8
    ([`quantize_torch_int8`]) and onnxruntime int8, on the same `(batch_size, sequence_length)` inputs, in
    interleaved rounds (one machine, one run: only the ratios travel). Differences are against PyTorch fp32."""
    manifest = read_manifest(folder)
    torch_graphs = {"PyTorch": task_graphs(model.eval())[1]}
    if int8:
        torch_graphs["PyTorch int8"] = task_graphs(quantize_torch_int8(model))[1]
    graphs = torch_graphs["PyTorch"]
    backends = [*torch_graphs, "ONNX fp32", *(["ONNX int8"] if int8 else [])]
    timings = {backend: {graph.name: [] for graph in graphs} for backend in backends}
    difference = dict.fromkeys(backends, 0.0)
    for index, graph in enumerate(graphs):
        inputs = graph.example_inputs(batch_size, sequence_length, torch.Generator().manual_seed(seed))
        feed = {spec.name: tensor.numpy() for spec, tensor in zip(graph.inputs, inputs)}
        entry = manifest["graphs"][graph.name]
        expected = _numpy(graph.module(*inputs))
        runs = {}
        for backend, backend_graphs in torch_graphs.items():
            module = backend_graphs[index].module
            runs[backend] = lambda module=module, inputs=inputs: _numpy(module(*inputs))
        sessions = {"ONNX fp32": ort_session(os.path.join(folder, entry["file"]))}
        if int8:
            sessions["ONNX int8"] = ort_session(os.path.join(folder, entry["int8_file"]))
        for backend, session in sessions.items():
            runs[backend] = lambda session=session, feed=feed: session.run(None, session_feed(session, feed))
        for backend, run in runs.items():
            error = max(float(np.abs(got - want).max()) for got, want in zip(run(), expected))
            difference[backend] = max(difference[backend], error)
        for _ in range(rounds):
            for backend in backends:
                timings[backend][graph.name] += _timed(runs[backend], warmup, repeats)
    rows = []
    for backend in backends:
        graph_ms = {name: statistics.median(values) * 1e3 for name, values in timings[backend].items()}
        rows.append(LatencyRow(backend, graph_ms, sum(graph_ms.values()), max_abs_difference=difference[backend]))
    reference = rows[0]
    for row in rows:
        row.speedup = reference.total_ms / row.total_ms
        row.graph_speedups = {name: reference.graph_ms[name] / ms for name, ms in row.graph_ms.items()}
    return rows


def format_latency(rows: list[LatencyRow]) -> str:
    """A Markdown table: one row per backend, median ms per graph, the total and its speedup over PyTorch."""
    names = list(rows[0].graph_ms)
    lines = [
        "| backend | " + " | ".join(f"{name} (ms)" for name in names) + " | total (ms) | speedup | max abs diff |",
        "|---|" + "---|" * (len(names) + 3),
    ]
    for row in rows:
        cells = " | ".join(f"{row.graph_ms[name]:.2f}" for name in names)
        lines.append(
            f"| {row.backend} | {cells} | {row.total_ms:.2f} | {row.speedup:.2f}x | {row.max_abs_difference:.2g} |"
        )
    return "\n".join(lines)


def compare_accuracy(
    task: str,
    backends: dict[str, nn.Module],
    dataset: Any,
    processor: Any,
    batch_size: int = 32,
    k: int = 128,
    answer_list: list[str] | None = None,
    itm_score: str = "logit",
) -> dict[str, dict[str, float]]:
    """The task's metrics (its evaluation routine in `trainers.evaluation.tasks`) of each backend (a PyTorch model
    or an onnxruntime-backed one) on the same dataset; `answer_list` (VQA: default, the saved candidates) and
    `itm_score` (retrieval: what ranks the re-ranked candidates) as in [`evaluate_task`]."""
    if task_spec(task).evaluate is None:
        raise ValueError(f"The {task} task has no evaluation routine: --eval_file needs a downstream task model.")
    options = {"batch_size": batch_size, "k": k, "answer_list": answer_list, "itm_score": itm_score}
    return {name: evaluate_task(task, model, dataset, processor, **options).metrics for name, model in backends.items()}


def format_accuracy(task: str, metrics: dict[str, dict[str, float]]) -> str:
    """The primary metric (and every other) of each backend, with its change from the first backend."""
    reference = next(iter(metrics.values()))
    named = task_spec(task).primary_metric
    primary = named if named in reference else next(iter(reference))
    lines = []
    for name, values in metrics.items():
        change = values[primary] - reference[primary]
        others = ", ".join(f"{key} {value:.4f}" for key, value in values.items() if key != primary)
        lines.append(
            f"{name}: {primary} {values[primary]:.4f} (change {change:+.4f})" + (f"; {others}" if others else "")
        )
    return "\n".join(lines)


__all__ = ["LatencyRow", "compare_accuracy", "compare_latency", "format_accuracy", "format_latency"]
