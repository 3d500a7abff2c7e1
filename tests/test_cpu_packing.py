"""Packed CPU weights (`pack_cpu_weights`): the attention and FFN blocks run their products from oneDNN-packed
weights where their inference forms run, give the unpacked model's outputs, follow weight changes, and stay out of
autograd, other dtypes, saving and copies."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.modeling_efficientvlm import (
    EfficientVLMAttention,
    EfficientVLMMLP,
    EfficientVLMVisionEmbeddings,
)
from modeling_efficientvlm.packing_efficientvlm import (
    FUSED_ACTIVATIONS,
    NO_ACTIVATION,
    CPUWeightPacks,
    PacksCPUWeights,
)
from tests.model_utils import prune_unevenly, shared_image_scores, tiny_retrieval_model
from trainers.evaluation.benchmarking import count_flops


class _OpRecorder(TorchDispatchMode):
    """Names of the ops a call runs, and (input width, post-op) of each oneDNN linear product without a binary
    post-op."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.post_ops: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        if func is torch.ops.mkldnn._linear_pointwise.default:
            self.post_ops.append((args[0].shape[-1], args[3]))
        return func(*args, **(kwargs or {}))


def _assert_fc1_post_ops(recorder: _OpRecorder, ffn: EfficientVLMMLP, activation_inside: bool) -> None:
    """The recorded products of `ffn`'s fc1 ran its activation inside (`activation_inside`, where oneDNN has it),
    or none; fc2's ran none."""
    hidden_act = ffn.config.hidden_act
    fused = activation_inside and hidden_act in FUSED_ACTIVATIONS
    fc1 = {op for width, op in recorder.post_ops if width == ffn.fc1.in_features}
    fc2 = {op for width, op in recorder.post_ops if width == ffn.fc2.in_features}
    assert fc1 == {FUSED_ACTIVATIONS[hidden_act][0] if fused else NO_ACTIVATION[0]}, recorder.post_ops
    assert fc2 <= {NO_ACTIVATION[0]}, recorder.post_ops


def _assert_same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention and FFN blocks and the vision embeddings (their patch embedding)."""
    blocks = [m for m in model.modules() if isinstance(m, PacksCPUWeights)]
    assert {type(b) for b in blocks} == {EfficientVLMAttention, EfficientVLMMLP, EfficientVLMVisionEmbeddings}
    return blocks


def test_packed_model_scores_as_the_unpacked_one_from_packed_products() -> None:
    plain, packed = tiny_retrieval_model(), tiny_retrieval_model()
    assert packed.pack_cpu_weights(min_flops=0) == len(_blocks(packed)) > 0  # the tiny model's products, too
    recorder = _OpRecorder()
    with torch.no_grad():
        expected = shared_image_scores(plain)
        with recorder:
            got = shared_image_scores(packed)
    _assert_same(got, expected)
    # Every block's products ran packed: no MKL GEMM is left but the ITM head's and the projections'.
    linears_outside_blocks = sum(
        1
        for m in packed.modules()
        if isinstance(m, torch.nn.Linear) and not any(m is b for b in _linears_of_blocks(packed))
    )
    assert recorder.ops.count("mkldnn._linear_pointwise") > 0
    assert "aten.convolution" not in recorder.ops  # the patch embedding ran as a packed product too
    gemms = sum(recorder.ops.count(op) for op in ("aten.addmm", "aten.addmm_", "aten.mm"))
    assert gemms <= linears_outside_blocks
    assert all(len(block.cpu_packs) > 0 for block in _blocks(packed))
    assert sum(block.cpu_packs.nbytes() for block in _blocks(packed)) > 0


def _linears_of_blocks(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for block in _blocks(model) for m in block.modules() if isinstance(m, torch.nn.Linear)]


def test_packs_follow_weight_changes_and_moves() -> None:
    plain, packed = tiny_retrieval_model(), tiny_retrieval_model()
    packed.pack_cpu_weights(min_flops=0)
    with torch.no_grad():
        shared_image_scores(packed)  # packs made
        for model in (plain, packed):  # an optimizer-like in-place step, and a whole new state dict
            for linear in _linears_of_blocks(model):
                linear.weight.mul_(1.5)
                linear.bias.add_(0.25)
            (embeddings,) = (m for m in model.modules() if isinstance(m, EfficientVLMVisionEmbeddings))
            embeddings.patch_embed.weight.mul_(1.5)
            embeddings.pos_embed.weight.add_(0.25)
            embeddings.class_embedding.add_(0.25)
        _assert_same(shared_image_scores(packed), shared_image_scores(plain))
        state = {k: v + 0.01 * torch.randn_like(v) for k, v in plain.state_dict().items()}
        plain.load_state_dict(state)
        packed.load_state_dict(state)
        _assert_same(shared_image_scores(packed), shared_image_scores(plain))
        packed.to(torch.bfloat16)  # bfloat16 runs unpacked; back in float32 it packs the new storage again
        plain.to(torch.bfloat16)
        recorder = _OpRecorder()
        with recorder:
            bf16 = shared_image_scores(packed)
        assert "mkldnn._linear_pointwise" not in recorder.ops
        for x, y in zip(bf16, shared_image_scores(plain)):
            torch.testing.assert_close(x, y)
        packed.float()
        plain.float()
        # A move or cast drops the packs: the new storage may take the old one's address (freed memory is reused)
        # with the same version, which the stamp alone would take for the same weights.
        assert all(len(block.cpu_packs) == 0 for block in _blocks(packed))
        _assert_same(shared_image_scores(packed), shared_image_scores(plain))
        # A write through `.data` is one torch does not count (the packs cannot see it): packing again refreshes.
        for model in (plain, packed):
            for linear in _linears_of_blocks(model):
                linear.weight.data.mul_(0.5)
        assert packed.pack_cpu_weights(min_flops=0) > 0
        _assert_same(shared_image_scores(packed), shared_image_scores(plain))


def test_weights_made_under_inference_mode_refuse_to_pack() -> None:
    # Inference tensors keep no version counter: a pack of one could go stale unseen, so packing says so instead.
    with torch.inference_mode():
        model = tiny_retrieval_model()
    with pytest.raises(ValueError, match=r"pack_cpu_weights: efficientvlm\..* is an inference tensor .*outside"):
        model.pack_cpu_weights()
    with torch.inference_mode():  # unpacked, the model still runs
        assert shared_image_scores(model)[0].shape == (5,)
    # A packed model whose weight is swapped for an inference tensor later names the block's product when it
    # would repack, instead of torch's error about version counters.
    model = tiny_retrieval_model()
    model.pack_cpu_weights(min_flops=0)
    with torch.inference_mode():
        shared_image_scores(model)
        q_proj = model.efficientvlm.vision_model.layers[0].self_attn.q_proj
        q_proj.weight.data = torch.randn_like(q_proj.weight)
        with pytest.raises(ValueError, match=r"A weight of 'qkv' \(\(32, 32\)\) is an inference tensor"):
            shared_image_scores(model)


def test_autograd_runs_unpacked_and_gradients_match() -> None:
    plain, packed = tiny_retrieval_model(), tiny_retrieval_model()
    packed.pack_cpu_weights(min_flops=0)
    recorder = _OpRecorder()
    with recorder:
        packed_loss = sum(t.sum() for t in shared_image_scores(packed))
    assert "mkldnn._linear_pointwise" not in recorder.ops
    assert all(len(block.cpu_packs) == 0 for block in _blocks(packed))
    plain_loss = sum(t.sum() for t in shared_image_scores(plain))
    packed_loss.backward()
    plain_loss.backward()
    for (name, a), b in zip(packed.named_parameters(), plain.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_packing_under_cpu_autocast_runs_unpacked() -> None:
    plain, packed = tiny_retrieval_model(), tiny_retrieval_model()
    packed.pack_cpu_weights(min_flops=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        recorder = _OpRecorder()
        with recorder:
            got = shared_image_scores(packed)
        expected = shared_image_scores(plain)
    assert "mkldnn._linear_pointwise" not in recorder.ops
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y)


def test_pruned_blocks_pack_too_and_emptied_layers_run() -> None:
    plain, packed = tiny_retrieval_model(), tiny_retrieval_model()
    packed.pack_cpu_weights(min_flops=0)
    prune_unevenly(plain)
    prune_unevenly(packed)  # the first layer of every stack empty, the others uneven
    assert all(block.cpu_packs is not None for block in _blocks(packed))
    with torch.no_grad():
        _assert_same(shared_image_scores(packed), shared_image_scores(plain))


def test_packs_are_dropped_copied_empty_and_never_saved(tmp_path) -> None:
    packed = tiny_retrieval_model()
    packed.pack_cpu_weights(min_flops=0)
    with torch.no_grad():
        expected = shared_image_scores(packed)
    keys = set(tiny_retrieval_model().state_dict())
    assert set(packed.state_dict()) == keys
    packed.save_pretrained(tmp_path)
    reloaded = EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path).eval()
    assert all(block.cpu_packs is None for block in _blocks(reloaded))
    copied = copy.deepcopy(packed)  # oneDNN tensors do not copy: the copy starts empty and packs its own
    unpickled = pickle.loads(pickle.dumps(packed))
    for model in (reloaded, copied, unpickled):
        with torch.no_grad():
            _assert_same(shared_image_scores(model), expected)
    assert all(isinstance(b.cpu_packs, CPUWeightPacks) and len(b.cpu_packs) > 0 for b in _blocks(copied))
    assert packed.pack_cpu_weights(enabled=False) > 0
    assert all(block.cpu_packs is None for block in _blocks(packed))


def ffn_case(hidden_act: str) -> tuple[EfficientVLMMLP, torch.Tensor, torch.Tensor]:
    """A tiny vision FFN of 24 neurons with `hidden_act` and non-zero biases, its hidden states (2, 7, hidden) and a
    non-contiguous residual."""
    config = EfficientVLMConfig.from_preset("tiny").vision_config
    config.hidden_act = hidden_act
    torch.manual_seed(0)
    ffn = EfficientVLMMLP(config, 24).eval()
    with torch.no_grad():
        ffn.fc1.bias.normal_()
        ffn.fc2.bias.normal_()
    hidden = torch.randn(2, 7, config.hidden_size)
    return ffn, hidden, torch.randn(7, 2, config.hidden_size).transpose(0, 1)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "relu", "silu", "gelu_new", "mish"])
def test_packed_ffn_runs_each_activation_with_masks_blocks_and_residual(
    hidden_act: str, activation_inside: bool, monkeypatch
) -> None:
    """Every activation the product can run itself, inside it or after it (`fuses_activations`), and one it cannot
    (mish: after), with a neuron mask, in row blocks, with a non-contiguous residual."""
    plain, hidden, residual = ffn_case(hidden_act)
    packed = copy.deepcopy(plain)
    packed.cpu_packs = CPUWeightPacks(min_flops=0)
    recorder = _OpRecorder()
    with torch.no_grad():
        for ffn_mask in (None, torch.rand(24).round()):
            for rows in (1024, 5):  # one block; blocks of 5 rows
                monkeypatch.setattr(EfficientVLMMLP, "inference_chunk_rows", rows)
                with recorder:
                    got = packed(hidden, ffn_mask)
                torch.testing.assert_close(got, plain(hidden, ffn_mask), atol=1e-5, rtol=1e-5)
                with recorder:
                    got = packed(hidden, ffn_mask, residual=residual)
                torch.testing.assert_close(got, plain(hidden, ffn_mask, residual=residual), atol=1e-5, rtol=1e-5)
    assert len(packed.cpu_packs) == 2
    _assert_fc1_post_ops(recorder, packed, activation_inside)


def attention_case(cross: bool) -> tuple[EfficientVLMAttention, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A tiny text attention block (4 heads, biases everywhere, dropout set but in eval mode), its hidden states
    (3, 6, hidden), the image states of a cross-attention (else None) and a non-contiguous residual."""
    config = EfficientVLMConfig.from_preset("tiny").text_config
    torch.manual_seed(0)
    kv_size = config.encoder_hidden_size if cross else config.hidden_size
    attention = EfficientVLMAttention(config, 4, kv_size, dropout=0.1).eval()
    with torch.no_grad():
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
            linear.bias.normal_()
    hidden = torch.randn(3, 6, config.hidden_size)
    image = torch.randn(3, 9, config.encoder_hidden_size) if cross else None
    return attention, hidden, image, torch.randn(6, 3, config.hidden_size).transpose(0, 1)


@pytest.mark.parametrize("cross", [False, True])
def test_packed_attention_stacks_its_projections_and_takes_a_non_contiguous_residual(cross: bool) -> None:
    """Self-attention runs its queries, keys and values as one product (value bias inside), cross-attention its
    keys and values (from the other modality's states); with biases everywhere, with and without a residual."""
    plain, hidden, image, residual = attention_case(cross)
    packed = copy.deepcopy(plain)
    packed.cpu_packs = CPUWeightPacks(min_flops=0)
    recorder = _OpRecorder()
    with torch.no_grad():
        for kwargs in ({}, {"residual": residual}):
            expected = plain(hidden, encoder_hidden_states=image, **kwargs)[0]
            with recorder:
                got = packed(hidden, encoder_hidden_states=image, **kwargs)[0]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    products = recorder.ops.count("mkldnn._linear_pointwise")
    assert products == 2 * (3 if cross else 2)  # (q, kv, out) or (qkv, out), twice
    assert len(packed.cpu_packs) == (3 if cross else 2)


def test_stacked_pack_is_its_layers_side_by_side_and_follows_each_of_them() -> None:
    torch.manual_seed(0)
    layers = (torch.nn.Linear(16, 8), torch.nn.Linear(16, 4), torch.nn.Linear(16, 8))
    packs = CPUWeightPacks(min_flops=0)
    inputs = torch.randn(5, 16)

    def expected() -> torch.Tensor:  # biases times (1, none, 2)
        first, second, third = (inputs @ layer.weight.T for layer in layers)
        return torch.cat([first + layers[0].bias, second, third + 2 * layers[2].bias], dim=-1)

    def stacked() -> torch.Tensor:
        pack = packs.get_stacked("stack", layers, bias_scales=(1.0, None, 2.0))
        return torch.ops.mkldnn._linear_pointwise(inputs, pack.weight, pack.bias, "none", [], "")

    with torch.no_grad():
        first = packs.get_stacked("stack", layers, bias_scales=(1.0, None, 2.0))
        torch.testing.assert_close(stacked(), expected())
        assert packs.get_stacked("stack", layers, bias_scales=(1.0, None, 2.0)) is first  # kept
        layers[2].bias.add_(1.0)  # a bias of the third layer changes in place: repacked
        torch.testing.assert_close(stacked(), expected())
        layers[1].bias.add_(1.0)  # the second layer's bias is not used: kept
        pack = packs.get_stacked("stack", layers, bias_scales=(1.0, None, 2.0))
        layers[1].weight = torch.nn.Parameter(torch.randn(4, 16))  # a replaced parameter: repacked
        assert packs.get_stacked("stack", layers, bias_scales=(1.0, None, 2.0)) is not pack
        torch.testing.assert_close(stacked(), expected())
        assert len(packs) == 1
        # `.data` replaced by a cast (no module `_apply` to drop the packs): not the stale float32 pack, none at all
        kept = layers[0].weight.data
        layers[0].weight.data = kept.to(torch.bfloat16)
        assert packs.get_stacked("stack", layers, bias_scales=(1.0, None, 2.0)) is None and len(packs) == 0
        layers[0].weight.data = kept
        torch.testing.assert_close(stacked(), expected())
        no_bias = packs.get_stacked("keys", layers[:2], bias_scales=(None, None))
        assert no_bias.bias is None
        got = torch.ops.mkldnn._linear_pointwise(inputs, no_bias.weight, None, "none", [], "")
        torch.testing.assert_close(got, torch.cat([inputs @ layers[0].weight.T, inputs @ layers[1].weight.T], -1))
    with pytest.raises(ValueError, match="3 layers to stack under 'stack' but 2 bias scales"):
        packs.get_stacked("stack", layers, bias_scales=(1.0, None))


def test_packed_patch_embedding_equals_the_convolution() -> None:
    """The patch convolution as one packed product with the positions inside it and the class token after: any
    batch, interpolated and non-square sizes; a hooked convolution and autograd run the convolution itself."""
    config = EfficientVLMConfig.from_preset("tiny").vision_config
    torch.manual_seed(0)
    plain = EfficientVLMVisionEmbeddings(config).eval()
    with torch.no_grad():
        plain.class_embedding.normal_()
        plain.pos_embed.weight.normal_()
    packed = copy.deepcopy(plain)
    packed.cpu_packs = CPUWeightPacks(min_flops=0)
    size, patch = config.image_size, config.patch_size
    recorder = _OpRecorder()
    with torch.no_grad():
        for batch, height, width in ((1, size, size), (3, size, size), (2, size + 2 * patch, size - patch)):
            pixels = torch.randn(batch, 3, height, width)
            interpolate = (height, width) != (size, size)
            expected = plain(pixels, interpolate_pos_encoding=interpolate)
            with recorder:
                got = packed(pixels, interpolate_pos_encoding=interpolate)
            assert got.shape == expected.shape == (batch, 1 + (height // patch) * (width // patch), config.hidden_size)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "aten.convolution" not in recorder.ops and recorder.ops.count("mkldnn._linear_pointwise") == 3
    assert len(packed.cpu_packs) == 1
    pixels = torch.randn(2, 3, size, size)
    handle = packed.patch_embed.register_forward_hook(lambda module, args, output: output * 2)
    with torch.no_grad(), recorder:
        hooked = packed(pixels)
    handle.remove()
    assert "aten.convolution" in recorder.ops
    with torch.no_grad():
        doubled = plain.patch_embed(pixels).flatten(2).transpose(1, 2) * 2
        torch.testing.assert_close(hooked[:, 1:], doubled + plain.pos_embed.weight[1:])
    recorder = _OpRecorder()
    with recorder:
        trained = packed(pixels)  # autograd: the written form
    assert "mkldnn._linear_pointwise" not in recorder.ops and trained.requires_grad
    torch.testing.assert_close(trained, plain(pixels))


def test_flop_count_of_the_packed_model_equals_the_unpacked_one() -> None:
    plain, packed = tiny_retrieval_model(), tiny_retrieval_model()
    packed.pack_cpu_weights(min_flops=0)
    assert count_flops(lambda: shared_image_scores(packed)) == count_flops(lambda: shared_image_scores(plain)) > 0


def test_a_folder_loaded_as_remote_code_packs_too(tmp_path) -> None:
    """`packing_efficientvlm.py` ships with a saved folder: its remote-code model packs and scores the same."""
    from tests.remote_code_utils import load_in_clean_subprocess

    model = tiny_retrieval_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "packing_efficientvlm.py").exists()
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model.get_image_features(pixels)
    inputs = {"pixel_values": pixels}
    calls = {"blocks": ("pack_cpu_weights", {"min_flops": 0}), "features": ("get_image_features", inputs)}
    result = load_in_clean_subprocess(tmp_path, "AutoModel", inputs, method="get_image_features", calls=calls)
    assert result["blocks"] == len(_blocks(model))
    torch.testing.assert_close(result["output"], expected)  # unpacked, then packed
    torch.testing.assert_close(result["features"], expected, atol=1e-5, rtol=1e-5)


def test_products_below_the_flops_floor_run_unpacked() -> None:
    """oneDNN's cost per call outweighs packing on small products: by default the tiny model runs unpacked. A block
    packs when its largest product reaches the floor, a self-attention's three products counted as the one they
    are stacked into: a floor above every FFN and cross-attention product packs the self-attention blocks only."""
    plain, packed = tiny_retrieval_model(), tiny_retrieval_model()
    packed.pack_cpu_weights()
    recorder = _OpRecorder()
    with torch.no_grad(), recorder:
        got = shared_image_scores(packed)
    assert "mkldnn._linear_pointwise" not in recorder.ops
    assert all(len(block.cpu_packs) == 0 for block in _blocks(packed))
    with torch.no_grad():
        _assert_same(got, shared_image_scores(plain))
    # At most 40 rows (5 texts x 8 tokens; 2 images x 17 tokens) run any product; the FFNs' are 32 -> 64, the
    # cross-attention's 32 -> 32 (queries) and 32 -> 64 (keys and values stacked): all below the floor. Every
    # self-attention runs 34 rows or more through 32 -> 96 (queries, keys and values stacked), the patch embedding
    # 32 patches (2 images x 16) through 192 -> 32: above it.
    config = packed.config
    assert config.vision_config.intermediate_size == config.text_config.intermediate_size == 2 * 32
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (32, 8)
    floor = 2 * 40 * 32 * 64 + 1
    assert min(2 * 34 * 32 * 96, 2 * 32 * 192 * 32) >= floor
    packed.pack_cpu_weights(min_flops=floor)
    recorder = _OpRecorder()
    with torch.no_grad(), recorder:
        got = shared_image_scores(packed)
    with torch.no_grad():
        _assert_same(got, shared_image_scores(plain))
    cross = {id(layer.crossattention) for layer in packed.modules() if getattr(layer, "has_cross_attention", False)}
    attention = [block for block in _blocks(packed) if isinstance(block, EfficientVLMAttention)]
    assert len(cross) == config.text_config.num_fusion_layers and len(attention) > len(cross)
    assert all(sorted(block.cpu_packs._packs) == ["out_proj", "qkv"] for block in attention if id(block) not in cross)
    assert all(len(block.cpu_packs) == 0 for block in attention if id(block) in cross)
    assert all(len(block.cpu_packs) == 0 for block in _blocks(packed) if isinstance(block, EfficientVLMMLP))
    assert [len(b.cpu_packs) for b in _blocks(packed) if isinstance(b, EfficientVLMVisionEmbeddings)] == [1]
    assert recorder.ops.count("mkldnn._linear_pointwise") == 2 * (len(attention) - len(cross)) + 1
    # Just above a cross-attention's queries (40 rows x 32 -> 32), below its keys and values over the image (34 rows
    # x 32 -> 64): the cross-attention packs all three of its products.
    packed.pack_cpu_weights(min_flops=2 * 40 * 32 * 32 + 1)
    with torch.no_grad():
        _assert_same(shared_image_scores(packed), shared_image_scores(plain))
    assert all(
        sorted(block.cpu_packs._packs) == ["kv", "out_proj", "q_proj"] for block in attention if id(block) in cross
    )
