"""The measuring primitives of `trainers.benchmark`: parameters, FLOPs, interleaved latencies, a matmul peak.

Timings are only comparable within one run on one machine: `interleaved_timings` measures workloads one after
the other in rounds, so a slow drift of the machine affects all of them alike.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from modeling_efficientvlm.packing_efficientvlm import cpu_packing_available

Key = TypeVar("Key")  # a workload's name in `interleaved_timings`


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _cpu_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(
    grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _in_place_addmm_flops(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    (rows, inner), (_, columns) = a_shape, b_shape
    return 2 * rows * inner * columns


def _packed_linear_flops(x_shape: Any, *args: Any, **kwargs: Any) -> int:
    # (..., in) times a packed (out, in) weight; `binary` has the residual's shape before the weight's.
    weight_shape = args[1] if len(args) == 4 else args[0]
    return 2 * math.prod(x_shape) * weight_shape[0]


# What torch's counter misses: the CPU attention kernels (it counts the CUDA ones; attention is a tenth of a 384 px
# ViT's FLOPs), the in-place `addmm_` of the models' inference forms (the attention output and FFN `fc2` GEMMs
# accumulate into the residual: a third of `efficientvlm-small`'s ITM FLOPs) and the oneDNN products of packed
# weights (`pack_cpu_weights`).
UNCOUNTED_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    torch.ops.aten.addmm_: _in_place_addmm_flops,
}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # both overloads: (X, W, B, attr, ...), binary (X, other, W, ...)
    UNCOUNTED_FLOPS[torch.ops.mkldnn._linear_pointwise] = _packed_linear_flops


@torch.no_grad()
def count_flops(model: nn.Module | Callable[[], Any], inputs: dict[str, torch.Tensor] | None = None) -> int:
    """FLOPs of one forward pass of `model(**inputs)`, or of one call of a zero-argument `model` (a workload)
    (`torch.utils.flop_counter`: matmuls, convolutions and attention, on any device; 2 per multiply-add)."""
    if isinstance(model, nn.Module):
        model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=UNCOUNTED_FLOPS)
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
    workloads: dict[Key, Callable[[], Any]], warmup: int = 3, repeats: int = 10, rounds: int = 2
) -> dict[Key, list[float]]:
    """Seconds per call of each zero-argument workload, measured in interleaved rounds (A, B, C, A, B, C, ...)
    so slow drifts of the machine (other jobs, frequency) affect every workload alike."""
    if rounds < 1:
        raise ValueError(f"`rounds` must be at least 1, got {rounds}.")
    timings: dict[Key, list[float]] = {name: [] for name in workloads}
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


def matmul_peak_size(device: torch.device | str = "cpu") -> int:
    """The side of the square matrices [`matmul_peak_gflops`] multiplies: 1024 on a CPU; 8192 on an accelerator,
    whose 1024-sized product is too short to reach its rate."""
    return 1024 if torch.device(device).type == "cpu" else 8192


def matmul_products(
    size: int | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Callable[[], Any]]:
    """Products of two `size` x `size` matrices (default [`matmul_peak_size`]) of `dtype` on `device`, each
    `2 * size^3` FLOPs, by name: `"torch.mm"` and, on a CPU in float32 with oneDNN, `"onednn"` (the product with a
    pre-packed weight that `pack_cpu_weights` and `torch.compile`'s freezing run; on AMD CPUs about 10% faster than
    MKL's). On an accelerator each returns once the device has finished."""
    size = size or matmul_peak_size(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    products = {"torch.mm": synchronized(lambda: torch.mm(a, b), device)}
    if torch.device(device).type == "cpu" and dtype == torch.float32 and cpu_packing_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous())
        products["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    return products


def matmul_peak_gflops(
    num_threads: int | None = None,
    size: int | None = None,
    repeats: int = 10,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """The matmul rate of this machine now: the best of `repeats` timed products of each of
    [`matmul_products`] (the faster library wins), at `num_threads` (default: the current setting), in GFLOP/s.
    Measured in the same run as the models, it is the ceiling their achieved GFLOP/s is compared with."""
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    size = size or matmul_peak_size(device)
    try:
        best = float("inf")
        for product in matmul_products(size, device, dtype).values():
            product()
            best = min(best, *measure_latency(product, warmup=1, repeats=repeats))
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best / 1e9


def fastest_matmul(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], Any], int, float]:
    """The fastest of [`matmul_products`] at the current thread count (best of 3 each): the product, its FLOPs and
    its best time in seconds."""
    size = matmul_peak_size(device)
    timed = []
    for product in matmul_products(size, device, dtype).values():
        product()
        timed.append((min(measure_latency(product, warmup=0, repeats=3)), product))
    seconds, product = min(timed, key=lambda pair: pair[0])
    return product, 2 * size**3, seconds


def back_to_back(product: Callable[[], Any], count: int) -> Callable[[], None]:
    """A zero-argument workload that calls `product` `count` times."""

    def products() -> None:
        for _ in range(count):
            product()

    return products


def synchronized(call: Callable[[], Any], device: torch.device | str) -> Callable[[], Any]:
    """`call` that returns only once the device has finished its work (CUDA runs kernels asynchronously: a
    wall-clock time of the bare call would measure the launch). On a CPU, `call` itself."""
    device = torch.device(device)
    if device.type != "cuda":
        return call

    def call_and_wait() -> Any:
        result = call()
        torch.cuda.synchronize(device)
        return result

    return call_and_wait
