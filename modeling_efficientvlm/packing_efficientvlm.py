"""oneDNN-packed linear weights for the CPU inference forms of the attention and FFN blocks.

`F.linear` and `torch.mm` run on MKL on a CPU, which copies the weight matrix into its own blocked layout inside
every call. For the 40 rows of a batch-1 text that copy costs as much as the product (those GEMMs ran at 55-64% of
the matmul peak, 577-row ones at 93-98%), and on AMD CPUs MKL's fp32 kernels reach about 90% of oneDNN's. oneDNN
multiplies with a weight reordered once into its blocked layout (`mkldnn._reorder_linear_weight`, the op
`torch.compile`'s freezing packs weights with) and runs the bias, the activation (on CPUs with AVX-512, see
`fuses_activations`) and a residual add inside the product. [`EfficientVLMPreTrainedModel.pack_cpu_weights`] gives
every attention / FFN block and the vision embeddings a [`CPUWeightPacks`]: packed copies of their linear weights
(layers that read the same input stacked into one product: a self-attention's queries, keys and values; the patch
convolution as a linear layer over patches), made at first use and made again whenever a weight changes as torch
counts changes (an optimizer step, `load_state_dict`, a move; not a write through `parameter.data`, which torch
leaves uncounted: pack again after one): one more copy of those weights in memory. The blocks use them on a CPU, in
float32, where their inference forms run (no autograd, tracing, autocast or active dropout) when their largest
product (stacked layers counted as one) has at least `min_flops` FLOPs; everywhere else they run as before.

Unpacked, the same inference forms run their products on oneDNN too, from the layers' own weights (no copy), where
MKL is slow: MKL's fp32 GEMMs take their AVX2 paths on CPUs that are not Intel's, which on an AMD EPYC with AVX-512
(Zen 5, 2 threads) reach 185-237 GFLOP/s against oneDNN's 375-513 on the same weights (see
[`cpu_products_library`]).
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cpu_attention_efficientvlm import cpuinfo_field

# `config.hidden_act` -> (oneDNN post-op, its algorithm): the activation run inside fc1's product where
# `fuses_activations`. Quick-GELU (x * sigmoid(1.702 x)) is SiLU of fc1 scaled by 1.702 (see
# `EfficientVLMMLP._activated`); other activations run after the product.
FUSED_ACTIVATIONS: dict[str, tuple[str, str]] = {
    "gelu": ("gelu", "none"),  # erf
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
    "swish": ("swish", ""),
    "quick_gelu": ("swish", ""),
}
NO_ACTIVATION = ("none", "")


def _cpu_has_avx512() -> bool:
    """Whether torch's CPU kernels run at an AVX-512 level here (`torch.backends.cpu.get_cpu_capability()`)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _environment_choice(variable: str, choices: tuple[str, ...]) -> str:
    """The value of the environment `variable` among `choices`, case and surrounding spaces aside; "auto" when unset
    or empty. Raises a ValueError naming the variable and its choices for any other value."""
    choice = os.environ.get(variable, "auto").strip().lower() or "auto"
    if choice not in choices:
        raise ValueError(f"{variable}={os.environ[variable]!r}: choose one of {', '.join(choices)}.")
    return choice


# Where oneDNN products run fc1's activation: "auto", "inside" (a post-op) or "after" (torch's own pass).
CPU_ACTIVATIONS_ENV = "EFFICIENTVLM_CPU_ACTIVATIONS"
CPU_ACTIVATIONS_CHOICES = ("auto", "inside", "after")


@functools.cache
def fuses_activations() -> bool:
    """Whether oneDNN products run fc1's activation inside themselves (`FUSED_ACTIVATIONS`), or leave it to one
    in-place pass of torch's after the product, from `EFFICIENTVLM_CPU_ACTIVATIONS` ("inside" / "after"; read once
    per process; `auto` when unset): `auto` runs it inside on CPUs with AVX-512, after on the others. With AVX2
    alone oneDNN's GELU and SiLU post-ops cost more than torch's separate pass (an AVX2-only AMD EPYC, Zen 1, packed
    768 -> 1536 / 3072 products, interleaved: 1.03-1.05x the time at 577 rows, 1.09x at 4616 with 2 threads, up
    to 1.2x with 1); the AVX-512 CPUs packing was first measured on ran them inside. Either computes the same
    function; the results differ in float32 rounding."""
    choice = _environment_choice(CPU_ACTIVATIONS_ENV, CPU_ACTIVATIONS_CHOICES)
    if choice != "auto":
        return choice == "inside"
    return _cpu_has_avx512()


# A block whose largest product has fewer FLOPs (2 x rows x in x out; stacked layers count as one product) runs
# unpacked: below this oneDNN's fixed cost per call (about 17 us against MKL's 5 on a 2-core AMD EPYC) outweighs
# what packing saves (measured with 2 threads, packed / MKL time: a 64 -> 256 layer on 128 rows 1.11, on 577 rows
# 0.96; 768 -> 3072 on 8 rows 0.38).
MIN_PACKED_FLOPS = 1 << 23


def cpu_packing_available() -> bool:
    """Whether this PyTorch build has oneDNN (`torch.backends.mkldnn`) and its packed linear ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# Which library runs the unpacked inference forms' products on a CPU: "auto", "onednn" or "torch" (torch's own
# matmul: MKL in x86 builds).
CPU_PRODUCTS_ENV = "EFFICIENTVLM_CPU_PRODUCTS"
CPU_PRODUCTS_CHOICES = ("auto", "onednn", "torch")


@functools.cache
def _cpu_vendor() -> str:
    return cpuinfo_field("vendor_id") or ""


@functools.cache
def cpu_products_library() -> str:
    """The library of the float32 products the inference forms of unpacked attention and FFN blocks run on a CPU,
    "onednn" or "torch" (torch's own matmul), from `EFFICIENTVLM_CPU_PRODUCTS` (read once per process; `auto` when
    unset). `auto` takes oneDNN on x86 CPUs with AVX-512 not made by Intel, where torch's matmul is MKL's and MKL
    keeps its AVX-512 kernels for Intel's CPUs and runs its AVX2 ones: on an AMD EPYC (Zen 5, 2 threads) 40 to 4616
    rows x 768 -> 768 / 3072 products ran at 185-237 GFLOP/s on MKL and at 375-513 on oneDNN from the same
    (unpacked) weights (1.7x at 577 rows, 2.0-2.3x elsewhere; on a Zen 4 1.1-1.5x, but for 0.9x at exactly 577
    rows). Where both run AVX2 (an AVX2-only EPYC, Zen 1) they were level (0.95-1.1x), but for oneDNN's 0.8x at 577
    rows, so torch's own stays there, as on Intel CPUs, other architectures and builds without MKL or oneDNN.
    Either runs the same function; the results differ in float32 rounding. Training (autograd) always runs torch's
    own products."""
    choice = _environment_choice(CPU_PRODUCTS_ENV, CPU_PRODUCTS_CHOICES)
    if choice == "onednn" and not cpu_packing_available():
        raise ValueError(f"{CPU_PRODUCTS_ENV}=onednn: this PyTorch build has no oneDNN (torch.backends.mkldnn).")
    if choice != "auto":
        return choice
    slow_mkl = torch.backends.mkl.is_available() and _cpu_vendor() not in ("", "GenuineIntel") and _cpu_has_avx512()
    return "onednn" if slow_mkl and cpu_packing_available() else "torch"


def onednn_products(module: nn.Module, name: str, inputs: torch.Tensor, stacked: int = 1) -> bool:
    """Whether an unpacked inference form runs its products on oneDNN from the layers' own weights (see
    `cpu_products_library`), decided as `runs_packed` decides, by its largest product: `module.<name>` on `inputs`
    (..., in), `stacked` such products counted as one; float32 on the CPU and at least `MIN_PACKED_FLOPS` FLOPs
    (below, oneDNN's fixed cost per call outweighs the gain)."""
    return (
        inputs.dtype == torch.float32
        and inputs.device.type == "cpu"
        and 2 * inputs.numel() * getattr(module, name).out_features * stacked >= MIN_PACKED_FLOPS
        and cpu_products_library() == "onednn"
    )


def inference_tensor_error(what: str) -> ValueError:
    """The error for packing weights that are inference tensors; `what` names them."""
    return ValueError(
        f"{what} is an inference tensor (made under torch.inference_mode()): torch does not count in-place writes "
        "to it, so a packed copy could go stale unseen. Construct the model outside inference_mode (torch.no_grad() "
        "is fine; from_pretrained loads ordinary tensors; calls under inference_mode pack as usual), or leave it "
        "unpacked."
    )


@dataclass(frozen=True)
class TensorStamp:
    """What a tensor derived from `tensor` (a packed copy, interpolated positions) was made from: the tensor itself,
    weakly (a replaced parameter is another object), its storage, its version (in-place updates: optimizer steps,
    `load_state_dict`'s copy_), its dtype and whether it is on the CPU (`.data` replaced). A move or cast can give
    new storage the old address with the same version: the owners of derived tensors drop them in `_apply`
    (`PacksCPUWeights`, the vision embeddings)."""

    tensor: weakref.ref
    state: tuple[int, int, torch.dtype, bool]

    @staticmethod
    def _state(tensor: torch.Tensor) -> tuple[int, int, torch.dtype, bool]:
        return tensor.data_ptr(), tensor._version, tensor.dtype, tensor.is_cpu

    @classmethod
    def of(cls, tensor: torch.Tensor, what: str = "A tensor") -> TensorStamp:
        """The stamp of `tensor`; ValueError naming it as `what` for an inference tensor (made under
        `torch.inference_mode()`), whose in-place writes torch does not count: what is derived from it could go
        stale unseen. (A stamped tensor whose `.data` later becomes one has new storage: it matches no more.)"""
        if tensor.is_inference():
            raise inference_tensor_error(f"{what} ({tuple(tensor.shape)})")
        return cls(weakref.ref(tensor), cls._state(tensor))

    def matches(self, tensor: torch.Tensor) -> bool:
        return self.tensor() is tensor and self.state == self._state(tensor)


@dataclass(frozen=True)
class PackedLinear:
    """The weights (out, in) of one linear layer, or of several that read the same input stacked along `out`, in
    oneDNN's blocked layout, times `weight_scale`, and their bias (each layer's times its bias scale, zeros for a
    scale of None; None when no layer adds one); `made_from` stamps each layer's weight and bias (None: not used),
    `scales` the weight scale and the bias scales."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    made_from: tuple[TensorStamp | None, ...]
    scales: tuple[float, tuple[float | None, ...]]

    def is_of(self, sources: tuple[torch.Tensor | None, ...], scales: tuple[float, tuple[float | None, ...]]) -> bool:
        """Whether this pack was made from exactly `sources` (as `made_from`) with `scales`."""
        if self.scales != scales or len(sources) != len(self.made_from):
            return False
        # A plain loop: this runs before every packed product, where each Python frame counts at batch 1.
        for stamp, source in zip(self.made_from, sources):
            if source is None or stamp is None:
                if source is not stamp:
                    return False
            elif not stamp.matches(source):
                return False
        return True


class CPUWeightPacks:
    """The packed linear weights of one block, by layer name, made at first use (see the module docstring), for
    products of at least `min_flops` FLOPs."""

    def __init__(self, min_flops: int = MIN_PACKED_FLOPS) -> None:
        self.min_flops = min_flops
        self._packs: dict[str, PackedLinear] = {}

    def get(
        self, name: str, linear: nn.Linear, weight_scale: float = 1.0, bias_scale: float | None = 1.0
    ) -> PackedLinear | None:
        """The packed `linear` (weight times `weight_scale`, bias times `bias_scale`; no bias for None), repacked
        if its weight or bias changed since; None off the CPU or for weights other than float32."""
        return self.get_stacked(name, (linear,), weight_scale, (bias_scale,))

    def get_stacked(
        self,
        name: str,
        linears: tuple[nn.Module, ...],
        weight_scale: float = 1.0,
        bias_scales: tuple[float | None, ...] | None = None,
    ) -> PackedLinear | None:
        """`linears` (linear layers of the same input size, or one patch convolution) as one packed layer whose
        output is their outputs side by side: one product where there were several, each layer's bias times its
        entry of `bias_scales` (default 1; None: no bias, zeros in its place). Repacked if any weight or bias
        changed since; None unless all run on the CPU in float32."""
        bias_scales = (1.0,) * len(linears) if bias_scales is None else tuple(bias_scales)
        if len(bias_scales) != len(linears):
            raise ValueError(f"{len(linears)} layers to stack under {name!r} but {len(bias_scales)} bias scales.")
        sources = []
        for linear, scale in zip(linears, bias_scales):
            sources += (linear.weight, linear.bias if scale is not None else None)
        scales = (weight_scale, bias_scales)
        pack = self._packs.get(name)
        # A current pack was made from these very tensors, unchanged, so they still run on the CPU in float32.
        if pack is not None and pack.is_of(sources, scales):
            return pack
        self._packs.pop(name, None)  # the stale copy goes before the new one is made
        if not all(self.applies_to(linear) for linear in linears):
            return None
        pack = self._pack(name, tuple(sources), scales)
        self._packs[name] = pack
        return pack

    @staticmethod
    def _pack(
        name: str, sources: tuple[torch.Tensor | None, ...], scales: tuple[float, tuple[float | None, ...]]
    ) -> PackedLinear:
        weight_scale, bias_scales = scales
        made_from = tuple(None if t is None else TensorStamp.of(t, f"A weight of {name!r}") for t in sources)
        with torch.no_grad():
            # sources: (weight, bias or None) per layer. A patch convolution (kernel = stride) is a linear layer over
            # flattened patches: (out, in, kh, kw).
            weights = [w.detach().flatten(1) for w in sources[0::2]]
            weight = torch.cat(weights) if len(weights) > 1 else weights[0]
            if weight_scale != 1:
                weight = weight * weight_scale
            biases = sources[1::2]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat(
                    [
                        b.detach() * scale if b is not None else weight.new_zeros(w.shape[0])
                        for w, b, scale in zip(weights, biases, bias_scales)
                    ]
                )
            return PackedLinear(torch.ops.mkldnn._reorder_linear_weight(weight), bias, made_from, scales)

    @staticmethod
    def applies_to(linear: nn.Linear) -> bool:
        """Whether `linear` runs packed: float32 weights on the CPU."""
        return linear.weight.device.type == "cpu" and linear.weight.dtype == torch.float32

    def clear(self) -> None:
        """Drops every packed copy (they are made again at the next use)."""
        self._packs.clear()

    def __len__(self) -> int:
        return len(self._packs)

    def nbytes(self) -> int:
        """Bytes held by the packed weights and their biases."""
        tensors = [t for p in self._packs.values() for t in (p.weight, p.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    # oneDNN tensors neither deep-copy nor pickle: a copy of a model starts with empty packs and makes its own.
    def __deepcopy__(self, memo: dict) -> CPUWeightPacks:
        return CPUWeightPacks(self.min_flops)

    def __getstate__(self) -> dict[str, Any]:
        return {"min_flops": self.min_flops, "_packs": {}}


class PacksCPUWeights(nn.Module):
    """A block whose linear layers may run from packed weights: `cpu_packs`, set by
    `EfficientVLMPreTrainedModel.pack_cpu_weights` (None: unpacked). A move or cast of the block drops its packs:
    they are made again from the new storage at the next use."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_packs: CPUWeightPacks | None = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        result = super()._apply(fn, recurse)
        if self.cpu_packs is not None:
            self.cpu_packs.clear()
        return result


def runs_packed(module: nn.Module, name: str, inputs: torch.Tensor, stacked: int = 1) -> bool:
    """Whether `module.<name>` (a linear layer, or a patch convolution on `inputs` that it tiles), alone or stacked
    with `stacked - 1` more layers of its size, runs on `inputs` (..., in) from a packed weight: `module` packs
    (`module.cpu_packs` set), the layer's weight and the inputs are float32 on the CPU, and the product has at
    least the packs' `min_flops` FLOPs."""
    packs, linear = getattr(module, "cpu_packs", None), getattr(module, name)
    if packs is None or not packs.applies_to(linear) or inputs.dtype != torch.float32:
        return False
    return 2 * inputs.numel() * linear.weight.shape[0] * stacked >= packs.min_flops


def packed_weight(
    module: nn.Module, name: str, weight_scale: float = 1.0, bias_scale: float | None = 1.0
) -> PackedLinear | None:
    """The packed form of `module.<name>` when `module` packs its weights (`module.cpu_packs` set) and the layer
    runs on the CPU in float32; else None."""
    packs = getattr(module, "cpu_packs", None)
    return None if packs is None else packs.get(name, getattr(module, name), weight_scale, bias_scale)


def packed_stack(
    module: nn.Module, name: str, layers: tuple[str, ...], bias_scales: tuple[float | None, ...]
) -> PackedLinear | None:
    """The packed stack of `module`'s `layers` (see `CPUWeightPacks.get_stacked`) under `name`, when `module`
    packs its weights and the layers run on the CPU in float32; else None."""
    packs = getattr(module, "cpu_packs", None)
    linears = tuple(getattr(module, layer) for layer in layers)
    return None if packs is None else packs.get_stacked(name, linears, bias_scales=bias_scales)


def packed_linear(
    inputs: torch.Tensor,
    pack: PackedLinear,
    activation: tuple[str, str] = NO_ACTIVATION,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """`activation(inputs @ weight.T + bias)`, or `inputs @ weight.T + bias + residual` (no activation then):
    (..., in) -> (..., out), one oneDNN call."""
    return onednn_linear(inputs, pack.weight, pack.bias, activation, residual)


def onednn_linear(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: tuple[str, str] = NO_ACTIVATION,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """`activation(inputs @ weight.T + bias)`, or `inputs @ weight.T + bias + residual` (no activation then), in one
    oneDNN call: (..., in) -> (..., out). `weight` (out, in) packed (`mkldnn._reorder_linear_weight`) or plain."""
    if residual is not None:
        residual = residual.reshape(*inputs.shape[:-1], weight.shape[0]).contiguous()
        return torch.ops.mkldnn._linear_pointwise.binary(inputs, residual, weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, activation[0], [], activation[1])
