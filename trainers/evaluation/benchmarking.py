"""Parameters, FLOPs and latency of models, measured side by side on the same inputs.

Timings are only comparable within one run on one machine: every function here measures models one after
the other on identical inputs, and reports ratios against the first (the reference).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def backbone_of(model: nn.Module) -> nn.Module:
    """The `EfficientVLMModel` inside a task model (vision, text and fusion encoders: what pruning shrinks)."""
    return getattr(model, "efficientvlm", model)


def benchmark_inputs(config, batch_size: int = 8, text_length: int = 30, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images of the model's size and texts of `text_length` tokens, for the backbone's forward."""
    if text_length > config.text_config.max_position_embeddings:
        raise ValueError(
            f"`text_length` {text_length} exceeds the model's {config.text_config.max_position_embeddings} positions."
        )
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    return {
        "pixel_values": torch.randn(batch_size, config.vision_config.num_channels, size, size, generator=generator),
        "input_ids": torch.randint(5, config.text_config.vocab_size, (batch_size, text_length), generator=generator),
        "attention_mask": torch.ones(batch_size, text_length, dtype=torch.long),
    }


@torch.no_grad()
def count_flops(model: nn.Module | Callable[[], Any], inputs: dict[str, torch.Tensor] | None = None) -> int:
    """FLOPs of one forward pass of `model(**inputs)`, or of one call of a zero-argument `model` (a workload)
    (`torch.utils.flop_counter`: matmuls, convolutions and SDPA, 2 per multiply-add)."""
    if isinstance(model, nn.Module):
        model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(**inputs) if inputs is not None else model()
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(
    model: nn.Module | Callable[[], Any],
    inputs: dict[str, torch.Tensor] | None = None,
    warmup: int = 3,
    repeats: int = 10,
) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `model(**inputs)` (or of a zero-argument callable) after
    `warmup` untimed ones."""
    if repeats < 1:
        raise ValueError(f"`repeats` must be at least 1, got {repeats}.")
    if isinstance(model, nn.Module):
        model.eval()

    def call() -> Any:
        return model(**inputs) if inputs is not None else model()

    for _ in range(warmup):
        call()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        timings.append(time.perf_counter() - start)
    return timings


def interleaved_timings(
    workloads: dict[str, Callable[[], Any]], warmup: int = 3, repeats: int = 10, rounds: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument workload, measured in interleaved rounds (A, B, C, A, B, C, ...)
    so slow drifts of the machine (other jobs, frequency) affect every workload alike."""
    if rounds < 1:
        raise ValueError(f"`rounds` must be at least 1, got {rounds}.")
    timings: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(rounds):
        for name, workload in workloads.items():
            timings[name] += measure_latency(workload, warmup=warmup, repeats=repeats)
    return timings


@dataclass
class Spread:
    """Median and spread of timings, in milliseconds: interquartile range and extremes."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Spread:
        if not seconds:
            raise ValueError("No timings to summarise.")
        ms = sorted(1e3 * s for s in seconds)
        quartiles = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
        return cls(statistics.median(ms), quartiles[0], quartiles[2], ms[0], ms[-1])


def matmul_peak_gflops(num_threads: int | None = None, size: int = 1024, repeats: int = 10) -> float:
    """The fp32 matmul rate of this machine now: the best of `repeats` timed `torch.mm` of two `size` x `size`
    matrices at `num_threads` (default: the current setting), in GFLOP/s (2 * size^3 per product). Measured in
    the same run as the models, it is the ceiling their achieved GFLOP/s is compared with."""
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator)
        b = torch.randn(size, size, generator=generator)
        torch.mm(a, b)
        best = min(measure_latency(lambda: torch.mm(a, b), warmup=1, repeats=repeats))
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best / 1e9


@dataclass
class BenchmarkRow:
    name: str
    parameters: int
    backbone_parameters: int
    gflops: float
    median_ms: float
    parameter_ratio: float = 1.0
    flops_reduction: float = 1.0
    speedup: float = 1.0

    @property
    def speedup_per_flops_reduction(self) -> float:
        return self.speedup / self.flops_reduction

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup_per_flops_reduction": self.speedup_per_flops_reduction}


def compare_models(
    models: dict[str, nn.Module],
    inputs: dict[str, torch.Tensor],
    warmup: int = 3,
    repeats: int = 10,
    rounds: int = 2,
) -> list[BenchmarkRow]:
    """Benchmarks each model's backbone forward on the same `inputs`; ratios are against the first model.

    Latency rounds are interleaved (model A, B, C, A, B, C, ...) so slow drifts of the machine affect all
    models alike; the median over every timed pass is reported.
    """
    if not models:
        raise ValueError("Give at least one model to benchmark.")
    backbones = {name: backbone_of(model).eval() for name, model in models.items()}
    workloads = {name: (lambda backbone=backbone: backbone(**inputs)) for name, backbone in backbones.items()}
    timings = interleaved_timings(workloads, warmup=warmup, repeats=repeats, rounds=rounds)
    rows = []
    for name, model in models.items():
        rows.append(
            BenchmarkRow(
                name=name,
                parameters=count_parameters(model),
                backbone_parameters=count_parameters(backbones[name]),
                gflops=count_flops(backbones[name], inputs) / 1e9,
                median_ms=statistics.median(timings[name]) * 1e3,
            )
        )
    reference = rows[0]
    for row in rows:
        row.parameter_ratio = row.parameters / reference.parameters
        row.flops_reduction = reference.gflops / row.gflops
        row.speedup = reference.median_ms / row.median_ms
    return rows


def format_table(rows: list[BenchmarkRow]) -> str:
    """A Markdown table of benchmark rows: parameters of the whole model (heads included) and of its encoders
    (vision, text, fusion: what is timed and what pruning shrinks), FLOPs and latency of the encoders."""
    lines = [
        "| model | whole-model params (M) | encoder params (M) | GFLOPs | median latency (ms) | speedup "
        "| FLOPs reduction | speedup / FLOPs reduction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.parameters / 1e6:.2f} | {row.backbone_parameters / 1e6:.2f} | {row.gflops:.2f} "
            f"| {row.median_ms:.1f} | {row.speedup:.2f}x | {row.flops_reduction:.2f}x "
            f"| {row.speedup_per_flops_reduction:.2f} |"
        )
    return "\n".join(lines)
