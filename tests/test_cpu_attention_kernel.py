"""The opt-in CPU attention kernel (`attn_implementation="efficientvlm_cpu"`): SDPA's results, on the calls it
covers, and SDPA itself on the others or when it cannot be built."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import modeling_efficientvlm.cpu_attention_efficientvlm as cpu_attention
from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMModel
from trainers.evaluation.benchmarking import count_flops

from .conftest import make_inputs


@pytest.fixture(scope="module")
def kernel():
    built = cpu_attention.load_kernel()
    assert built is not None, cpu_attention._state.get("error")
    return built


@pytest.fixture(scope="module")
def avx2_kernel(kernel):
    """Built without AVX-512: the AVX2 softmax CPUs without AVX-512 run (Zen 1-3, most laptops); on such a CPU the
    native build is that build. Checked against SDPA as every build is."""
    return kernel if kernel.softmax_isa() != "avx512" else cpu_attention._build(extra_flags=("-mno-avx512f",))


@pytest.fixture(scope="module")
def portable_kernel():
    """Built without AVX-512 or AVX2: the plain softmax loop of other x86 CPUs."""
    return cpu_attention._build(extra_flags=("-mno-avx512f", "-mno-avx2"))


def test_each_build_says_which_softmax_it_runs(kernel, avx2_kernel, portable_kernel) -> None:
    flags = set(cpu_attention.cpuinfo_field("flags").split())
    without_avx512 = "avx2" if {"avx2", "fma"} <= flags else "portable"
    assert kernel.softmax_isa() == ("avx512" if "avx512f" in flags else without_avx512)  # -march=native
    assert avx2_kernel.softmax_isa() == without_avx512
    assert portable_kernel.softmax_isa() == "portable"


BUILDS = ["kernel", "avx2_kernel", "portable_kernel"]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize(
    "batch, heads, q_len, k_len, head_dim, value_layout",
    [
        (1, 3, 577, 577, 64, "strided"),
        (2, 4, 37, 45, 32, "strided"),
        (2, 4, 37, 45, 32, "contiguous"),
        (1, 6, 1, 17, 48, "strided"),
        (3, 2, 197, 197, 64, "strided"),
        (1, 5, 40, 577, 64, "strided"),
        (1, 5, 40, 577, 64, "contiguous"),
        (2, 2, 9, 8, 16, "strided"),
    ],
)
def test_kernel_matches_sdpa(
    request, build: str, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, value_layout: str
) -> None:
    kernel = request.getfixturevalue(build)
    generator = torch.Generator().manual_seed(0)
    # Queries as a stacked projection gives them: a strided view of (batch, q_len, 3, heads, head_dim).
    query = torch.randn(batch, q_len, 3, heads, head_dim, generator=generator).permute(2, 0, 3, 1, 4)[0]
    key = torch.randn(batch, heads, k_len, head_dim, generator=generator)
    # Values as a projection's (batch, k_len, heads, head_dim) view (the kernel copies each head's rows together)
    # or with each head's rows already together (read in place).
    value = torch.randn(batch, k_len, heads, head_dim, generator=generator).transpose(1, 2)
    if value_layout == "contiguous":
        value = value.contiguous()
    context = kernel.attention_forward(query, key, value, head_dim**-0.5, cpu_attention.QUERY_BLOCK)
    expected = F.scaled_dot_product_attention(query, key, value).transpose(1, 2)
    assert context.shape == (batch, q_len, heads, head_dim) and context.is_contiguous()
    torch.testing.assert_close(context, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nan_or_inf_input_reaches_the_rows_it_reaches_in_sdpa(request, build: str, where: str, bad: float) -> None:
    """A NaN score, or +inf (through inf - inf), makes its row NaN as in SDPA, not a finite context: the vector
    softmax's clamp of very negative exponents must not swallow it. (Such inputs come from a model that overflowed;
    hiding it would give finite, wrong scores.)"""
    kernel = request.getfixturevalue(build)
    generator = torch.Generator().manual_seed(0)
    # 21 keys: two full AVX2 vectors and a partial one; the bad entry lands in the full ones and in the tail.
    tensors = {
        "query": torch.randn(2, 3, 19, 16, generator=generator),
        "key": torch.randn(2, 3, 21, 16, generator=generator),
        "value": torch.randn(2, 3, 21, 16, generator=generator),
    }
    tensors[where][0, 1, 5, 2] = bad
    tensors[where][1, 2, -1, 7] = bad
    query, key, value = tensors.values()
    context = kernel.attention_forward(query, key, value, 0.25, cpu_attention.QUERY_BLOCK).transpose(1, 2)
    expected = F.scaled_dot_product_attention(query, key, value, scale=0.25)
    assert not expected.isfinite().all()  # each case makes some row NaN (or, through the values, inf) in SDPA
    assert torch.equal(context.isnan(), expected.isnan()) and torch.equal(context.isinf(), expected.isinf())
    torch.testing.assert_close(context, expected, atol=2e-6, rtol=1e-5, equal_nan=True)


class _CountingKernel:
    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, []

    def attention_forward(self, query, *args):
        self.calls.append(tuple(query.shape))
        return self.kernel.attention_forward(query, *args)


def _model_and_inputs():
    config = EfficientVLMConfig.from_preset("tiny")
    torch.manual_seed(0)
    return EfficientVLMModel(config).eval(), make_inputs(config)


def _hidden(model, inputs) -> torch.Tensor:
    return model(**inputs).last_hidden_state


def test_model_on_the_kernel_gives_sdpa_outputs(kernel, monkeypatch) -> None:
    model, inputs = _model_and_inputs()
    with torch.no_grad():
        expected = _hidden(model, inputs)
        counting = _CountingKernel(kernel)
        monkeypatch.setitem(cpu_attention._state, "module", counting)
        model.set_attn_implementation(cpu_attention.ATTN_IMPLEMENTATION)
        assert model.config.vision_config._attn_implementation == cpu_attention.ATTN_IMPLEMENTATION
        got = _hidden(model, inputs)
        # The vision self-attention and the fusion cross-attention (no masks) ran on it; the masked text did not.
        vision_layers = model.config.vision_config.num_hidden_layers
        assert len(counting.calls) >= vision_layers
        assert all(shape[0] == inputs["pixel_values"].shape[0] for shape in counting.calls)
        packed_calls = len(counting.calls)
        model.pack_cpu_weights()
        packed = _hidden(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)
    assert len(counting.calls) == 2 * packed_calls
    # Under a dispatch mode (the benchmark's FLOP counter) attention runs on SDPA, which the counter sees.
    flops = count_flops(model, inputs)
    model.set_attn_implementation("sdpa")
    assert flops == count_flops(model, inputs) and len(counting.calls) == 2 * packed_calls


def test_texts_without_padding_run_their_attention_on_the_kernel_too(kernel, monkeypatch) -> None:
    model, inputs = _model_and_inputs()
    unpadded = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
    text_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        expected = _hidden(model, unpadded)
        counting = _CountingKernel(kernel)
        monkeypatch.setitem(cpu_attention._state, "module", counting)
        model.set_attn_implementation(cpu_attention.ATTN_IMPLEMENTATION)
        got = _hidden(model, unpadded)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Text queries: every text and fusion layer's self-attention now, beside the fusion cross-attention as before.
    text_config = model.config.text_config
    text_calls = [shape for shape in counting.calls if shape[2] == text_length]
    assert len(text_calls) == text_config.num_hidden_layers + 2 * text_config.num_fusion_layers


def test_calls_the_kernel_does_not_cover_run_on_sdpa(kernel, monkeypatch) -> None:
    counting = _CountingKernel(kernel)
    monkeypatch.setitem(cpu_attention._state, "module", counting)
    query, key, value = (torch.randn(2, 3, 9, 16) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = False
    forward = cpu_attention.cpu_kernel_attention_forward
    mask = torch.zeros(2, 1, 9, 9)
    mask[..., -2:] = float("-inf")
    masked, _ = forward(module, query, key, value, mask)
    torch.testing.assert_close(masked, F.scaled_dot_product_attention(query, key, value, mask).transpose(1, 2))
    module.is_causal = True
    causal, _ = forward(module, query, key, value, None)
    expected = F.scaled_dot_product_attention(query, key, value, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(causal, expected)
    module.is_causal = False
    trained = query.clone().requires_grad_()
    context, _ = forward(module, trained, key, value, None)
    context.sum().backward()  # gradients: SDPA's backward
    assert trained.grad is not None
    forward(module, query.double(), key.double(), value.double(), None)
    assert counting.calls == []
    forward(module, query, key, value, None)
    assert counting.calls == [(2, 3, 9, 16)]


def test_a_kernel_that_cannot_be_built_warns_once_and_sdpa_serves(monkeypatch) -> None:
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_attention, "_state", {})
    monkeypatch.setattr(cpu_attention, "_build", no_compiler)
    model, inputs = _model_and_inputs()
    with torch.no_grad():
        expected = _hidden(model, inputs)
        model.set_attn_implementation(cpu_attention.ATTN_IMPLEMENTATION)
        with pytest.warns(UserWarning, match="could not be built .*Ninja is required.*runs on SDPA") as caught:
            got = _hidden(model, inputs)
    assert sum("could not be built" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_the_pip_ninja_is_found_without_an_activated_environment(monkeypatch) -> None:
    import ninja

    monkeypatch.setenv("PATH", "/nowhere")
    monkeypatch.setattr(cpu_attention.shutil, "which", lambda name: None)
    cpu_attention._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
