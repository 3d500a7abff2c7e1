"""Unpacked inference products on oneDNN where MKL is slow: the library chosen (`EFFICIENTVLM_CPU_PRODUCTS`, the CPU
vendor), the same outputs as torch's own products, no copies of the weights, and the written forms elsewhere."""

from __future__ import annotations

import pytest
import torch

from modeling_efficientvlm import packing_efficientvlm as packing
from modeling_efficientvlm.modeling_efficientvlm import EfficientVLMMLP
from tests.model_utils import prune_unevenly, shared_image_scores, tiny_retrieval_model
from tests.test_cpu_packing import (
    _assert_fc1_post_ops,
    _assert_same,
    _blocks,
    _linears_of_blocks,
    _OpRecorder,
    attention_case,
    ffn_case,
)
from trainers.evaluation.benchmarking import count_flops

GEMMS = ("aten.addmm", "aten.addmm_", "aten.mm")  # the linear layers' (attention's own products are bmm)


@pytest.fixture
def products(monkeypatch):
    """Sets the library (`products("onednn")`) for the unpacked inference forms, every product above the floor."""
    monkeypatch.setattr(packing, "MIN_PACKED_FLOPS", 0)

    def use(library: str) -> None:
        monkeypatch.setenv(packing.CPU_PRODUCTS_ENV, library)
        packing.cpu_products_library.cache_clear()

    yield use
    packing.cpu_products_library.cache_clear()  # the variable is restored after this: read it afresh


def _scores(model: torch.nn.Module) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    recorder = _OpRecorder()
    with torch.no_grad(), recorder:
        scores = shared_image_scores(model)
    return scores, recorder.ops


def test_the_library_follows_the_variable_the_cpu_vendor_and_its_vector_width(products, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    for value, library in (("torch", "torch"), (" OneDNN ", "onednn")):
        products(value)
        assert packing.cpu_products_library() == library
    # oneDNN only where MKL would leave the CPU's AVX-512 unused: not Intel's, and AVX-512 there.
    for vendor, capability, library in (
        ("AuthenticAMD", "AVX512", "onednn"),
        ("HygonGenuine", "AVX512", "onednn"),
        ("AuthenticAMD", "AVX2", "torch"),
        ("GenuineIntel", "AVX512", "torch"),
        ("", "AVX512", "torch"),
    ):
        monkeypatch.setattr(packing, "_cpu_vendor", lambda vendor=vendor: vendor)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability)
        for value in ("auto", ""):
            products(value)
            assert packing.cpu_products_library() == library, (vendor, capability, value)
    # MKL's own kernels are not in question where torch's matmul is not MKL's.
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    monkeypatch.setattr(packing, "_cpu_vendor", lambda: "AuthenticAMD")
    products("auto")
    assert packing.cpu_products_library() == "torch"
    products("blas")
    with pytest.raises(ValueError, match=r"^EFFICIENTVLM_CPU_PRODUCTS='blas': choose one of auto, onednn, torch\.$"):
        packing.cpu_products_library()
    # The commands say so before anything runs (here: before the command's own flags are read).
    from trainers.commands import main

    with pytest.raises(ValueError, match=r"^EFFICIENTVLM_CPU_PRODUCTS='blas'"):
        main(["evaluate", "--no_such_flag"])


def test_activations_run_inside_onednn_products_where_the_variable_or_the_cpus_avx512_says(monkeypatch) -> None:
    """`auto`: inside only on CPUs with AVX-512 (with AVX2 alone oneDNN's GELU / SiLU post-ops cost more than torch's
    own pass after the product); the variable chooses either on any CPU."""

    def inside(value: str, capability: str) -> bool:
        monkeypatch.setenv(packing.CPU_ACTIVATIONS_ENV, value)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        packing.fuses_activations.cache_clear()
        return packing.fuses_activations()

    try:
        for capability, expected in (("AVX512", True), ("AVX512_BF16", True), ("AVX2", False), ("DEFAULT", False)):
            for value in ("auto", ""):
                assert inside(value, capability) is expected, (value, capability)
            assert inside(" Inside ", capability) is True and inside("after", capability) is False
        with pytest.raises(
            ValueError, match=r"^EFFICIENTVLM_CPU_ACTIVATIONS='fused': choose one of auto, inside, after\.$"
        ):
            inside("fused", "AVX2")
        # The commands say so before anything runs (here: before the command's own flags are read).
        from trainers.commands import main

        packing.fuses_activations.cache_clear()
        with pytest.raises(ValueError, match=r"^EFFICIENTVLM_CPU_ACTIVATIONS='fused'"):
            main(["evaluate", "--no_such_flag"])
    finally:
        packing.fuses_activations.cache_clear()  # the variable is restored after this: read it afresh


def test_unpacked_models_score_alike_on_either_library_and_copy_no_weight(products) -> None:
    """A pruned model with emptied layers: every block's products on oneDNN from the layers' own weights, no packed
    copy made, the same scores; the FLOP count does not change."""
    model = prune_unevenly(tiny_retrieval_model())
    products("torch")
    expected, mkl_ops = _scores(model)
    mkl_flops = count_flops(lambda: shared_image_scores(model))
    assert "mkldnn._linear_pointwise" not in mkl_ops
    products("onednn")
    got, onednn_ops = _scores(model)
    _assert_same(got, expected)
    assert onednn_ops.count("mkldnn._linear_pointwise") > 0
    linears_outside_blocks = sum(
        1
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and not any(m is b for b in _linears_of_blocks(model))
    )
    assert sum(onednn_ops.count(op) for op in GEMMS) <= linears_outside_blocks < sum(mkl_ops.count(op) for op in GEMMS)
    assert all(block.cpu_packs is None for block in _blocks(model))
    assert count_flops(lambda: shared_image_scores(model)) == mkl_flops > 0


def test_products_under_the_floor_and_under_autograd_stay_on_torch(products, monkeypatch) -> None:
    model = tiny_retrieval_model()
    products("onednn")
    monkeypatch.setattr(packing, "MIN_PACKED_FLOPS", 1 << 23)  # the default floor: above all of the tiny model's
    _, ops = _scores(model)
    assert "mkldnn._linear_pointwise" not in ops
    monkeypatch.setattr(packing, "MIN_PACKED_FLOPS", 0)
    model.train()  # dropout off in the tiny preset; gradients: the written form
    recorder = _OpRecorder()
    with recorder:
        logits = shared_image_scores(model)[0]
    assert "mkldnn._linear_pointwise" not in recorder.ops and logits.requires_grad


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "relu", "gelu_new", "mish"])
def test_ffn_on_onednn_with_each_activation_masks_blocks_and_residual(
    products, hidden_act, activation_inside, monkeypatch
) -> None:
    """Quick-GELU without a scaled copy of the weights (its scale on the inputs, then off the output), activations
    inside the product or after it (`fuses_activations`; mish always after), a neuron mask, row blocks and a
    non-contiguous residual."""
    ffn, hidden, residual = ffn_case(hidden_act)
    with torch.no_grad():
        for ffn_mask in (None, torch.rand(24).round()):
            for rows in (1024, 5):  # one block; blocks of 5 rows
                monkeypatch.setattr(EfficientVLMMLP, "inference_chunk_rows", rows)
                for kwargs in ({}, {"residual": residual}):
                    products("torch")
                    expected = ffn(hidden, ffn_mask, **kwargs)
                    products("onednn")
                    recorder = _OpRecorder()
                    with recorder:
                        got = ffn(hidden, ffn_mask, **kwargs)
                    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
                    assert recorder.ops.count("mkldnn._linear_pointwise") == 2 * -(-14 // rows)  # two per block
                    _assert_fc1_post_ops(recorder, ffn, activation_inside)
    assert ffn.cpu_packs is None


@pytest.mark.parametrize("cross", [False, True])
def test_attention_on_onednn_with_biases_and_a_non_contiguous_residual(products, cross: bool) -> None:
    attention, hidden, image, residual = attention_case(cross)
    with torch.no_grad():
        for kwargs in ({}, {"residual": residual}):
            products("torch")
            expected = attention(hidden, encoder_hidden_states=image, **kwargs)[0]
            products("onednn")
            recorder = _OpRecorder()
            with recorder:
                got = attention(hidden, encoder_hidden_states=image, **kwargs)[0]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert recorder.ops.count("mkldnn._linear_pointwise") == 4  # queries, keys, values, output
            assert not any(op in recorder.ops for op in GEMMS)
