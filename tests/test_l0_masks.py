"""Hard-concrete structure masks, exact parameter accounting and the sparsity Lagrangian (no Trainer)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMModel
from trainers.pruning.hard_concrete import (
    HARD_CONCRETE_TEMPERATURE,
    LIMIT_LEFT,
    LIMIT_RIGHT,
    LOG_ALPHA_RANGE,
    StructureMasker,
    random_structure_masks,
)
from trainers.pruning.lagrangian import SparsityLagrangian

from .conftest import make_inputs


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def backbone(tiny_config) -> EfficientVLMModel:
    torch.manual_seed(0)
    return EfficientVLMModel(tiny_config)


def _spread_log_alphas(masker: StructureMasker, seed: int = 0) -> None:
    """Log-alphas spread over [-4, 4] so deterministic masks zero some units and keep soft values elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, log_alpha in masker.layers():
            log_alpha.copy_(torch.rand(log_alpha.shape, generator=generator) * 8 - 4)


# -- construction ----------------------------------------------------------------------------------------------


def test_initialisation_follows_cofi(backbone) -> None:
    torch.manual_seed(0)
    masker = StructureMasker.from_model(backbone)
    assert masker.structure_sizes == backbone.structure_sizes()
    ffn = torch.cat([p for key, _, p in masker.layers() if key.endswith("ffn")])
    heads = torch.cat([p for key, _, p in masker.layers() if key.endswith("heads")])
    # FFN: log(1 - 0.5) - log(0.5) = 0; heads start high (official EfficientVLM: 10); noise N(0, 0.01).
    assert abs(ffn.mean().item()) < 5e-3 and 0.005 < ffn.std().item() < 0.015
    assert abs(heads.mean().item() - 10) < 5e-3
    assert masker.total_parameters() == sum(
        n * u
        for key in masker.structure_sizes
        for n, u in zip(backbone.structure_sizes()[key], backbone.structure_unit_parameters()[key])
    )
    assert set(masker.modalities) == {"vision", "text", "fusion"}


def test_layers_without_units_get_no_log_alpha() -> None:
    config = EfficientVLMConfig.from_preset(
        "tiny",
        vision_config={"num_attention_heads_per_layer": [0, 4]},
        text_config={"intermediate_size_per_layer": [64, 0, 64, 64]},
    )
    masker = StructureMasker.from_model(EfficientVLMModel(config))
    assert "0" not in masker.log_alpha["vision_heads"] and "1" in masker.log_alpha["vision_heads"]
    assert "1" not in masker.log_alpha["text_ffn"]
    masks = masker.sample()
    assert masks["vision_heads"][0] is None and masks["text_ffn"][1] is None
    assert masks["vision_heads"][1].shape == (4,)


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError, match="keys"):
        StructureMasker({"vision_heads": [4]}, {"vision_ffn": [10]})
    with pytest.raises(ValueError, match="droprate_init"):
        StructureMasker({"vision_heads": [4]}, {"vision_heads": [10]}, droprate_init=1.0)
    with pytest.raises(ValueError, match="structure_sizes"):
        StructureMasker.from_model(torch.nn.Linear(2, 2))


# -- the distribution ------------------------------------------------------------------------------------------


def test_samples_are_stretched_hard_concrete(backbone) -> None:
    torch.manual_seed(0)
    masker = StructureMasker({"vision_ffn": [5]}, {"vision_ffn": [1]})
    log_alpha = masker.log_alpha["vision_ffn"]["0"]
    with torch.no_grad():
        log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    samples = masker.sample_mask(log_alpha.detach().expand(20000, 5))  # 20000 draws of the 5 units
    assert samples.min() == 0 and samples.max() == 1  # exact zeros and ones: the stretch and clamp
    # The empirical P(z = 0) is CoFi's closed form Q(0 | log_alpha) = sigmoid(beta * log(-l / r) - log_alpha).
    empirical = (samples == 0).float().mean(0)
    closed_form = torch.sigmoid(HARD_CONCRETE_TEMPERATURE * math.log(-LIMIT_LEFT / LIMIT_RIGHT) - log_alpha.detach())
    torch.testing.assert_close(empirical, closed_form, atol=0.015, rtol=0)
    torch.testing.assert_close(masker.probability_of_zero(log_alpha.detach()), closed_form)
    # Samples are differentiable with respect to the log-alphas.
    masker.sample()["vision_ffn"][0].sum().backward()
    assert log_alpha.grad is not None and log_alpha.grad.abs().sum() > 0


def test_training_mode_samples_and_eval_mode_is_deterministic(backbone) -> None:
    masker = StructureMasker.from_model(backbone)
    _spread_log_alphas(masker)
    masker.train()
    assert not torch.equal(masker()["vision_ffn"][0], masker()["vision_ffn"][0])
    masker.eval()
    torch.testing.assert_close(masker()["vision_ffn"][0], masker()["vision_ffn"][0])


def test_deterministic_masks_follow_cofi() -> None:
    masker = StructureMasker({"text_ffn": [6]}, {"text_ffn": [3]})
    values = torch.tensor([2.0, -3.0, 0.5, -0.5, 4.0, -2.0])
    with torch.no_grad():
        masker.log_alpha["text_ffn"]["0"].copy_(values)
    expected_zeros = round(6 - (1 - masker.probability_of_zero(values)).sum().item())
    assert expected_zeros == 2
    mask = masker.deterministic_masks()["text_ffn"][0]
    # The expected number of zeros goes to the lowest log-alphas; survivors keep sigmoid(log_alpha / beta * 0.8).
    expected = torch.sigmoid(values / HARD_CONCRETE_TEMPERATURE * 0.8)
    expected[[1, 5]] = 0
    torch.testing.assert_close(mask, expected)
    torch.testing.assert_close(masker.deterministic_masks(binary=True)["text_ffn"][0], (expected > 0).float())


def test_offset_for_sparsity_reaches_a_target_and_keeps_what_was_learned(backbone) -> None:
    masker = StructureMasker.from_model(backbone)
    _spread_log_alphas(masker)
    learned = masker.deterministic_masks()
    offsets = []
    for target in (0.2, 0.5, 0.8):
        offset = masker.offset_for_sparsity(target)
        offsets.append(offset)
        masks = masker.deterministic_masks(offset=offset)
        # The tiny model's units are few and large (one head is ~2% of its prunable parameters).
        assert masker.sparsity_of(masks) == pytest.approx(target, abs=0.03)
        for key, layer, log_alpha in masker.layers():
            mask, before = masks[key][layer], learned[key][layer]
            kept, gone = log_alpha[mask > 0], log_alpha[mask == 0]
            if len(kept) and len(gone):  # the learned ranking decides which units go
                assert kept.min() > gone.max()
            both = (mask > 0) & (before > 0)  # survivors keep their learned score
            torch.testing.assert_close(mask[both], before[both])
    assert offsets[0] > offsets[1] > offsets[2]  # pruning more shifts the log-alphas down
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        masker.offset_for_sparsity(1.0)


def test_constrain_clamps_log_alpha(backbone) -> None:
    masker = StructureMasker.from_model(backbone)  # heads start at 10, above the range
    masker.constrain_()
    values = torch.cat([p.detach() for _, _, p in masker.layers()])
    assert values.max() <= LOG_ALPHA_RANGE[1] + 1e-6 and values.min() >= LOG_ALPHA_RANGE[0] - 1e-6
    assert LOG_ALPHA_RANGE == pytest.approx((math.log(1e-2), math.log(1e2)))


# -- accounting ------------------------------------------------------------------------------------------------


def test_expected_accounting_is_exact_and_differentiable(backbone) -> None:
    masker = StructureMasker.from_model(backbone)
    _spread_log_alphas(masker)
    units = backbone.structure_unit_parameters()
    manual = {"vision": 0.0, "text": 0.0, "fusion": 0.0}
    for key, layer, log_alpha in masker.layers():
        kept = (1 - masker.probability_of_zero(log_alpha.detach())).sum().item()
        manual[key.split("_")[0]] += kept * units[key][layer]
    remaining = masker.expected_remaining_parameters()
    assert remaining.item() == pytest.approx(sum(manual.values()), rel=1e-6)
    for modality, value in manual.items():
        assert masker.expected_remaining_parameters(modality).item() == pytest.approx(value, rel=1e-6)
        expected = 1 - value / masker.total_parameters(modality)
        assert masker.expected_sparsity(modality).item() == pytest.approx(expected, abs=1e-6)
    assert masker.expected_sparsity().item() == pytest.approx(1 - remaining.item() / masker.total_parameters())
    masker.expected_sparsity().backward()
    assert all(p.grad is not None and (p.grad < 0).all() for _, _, p in masker.layers())  # higher alpha, denser
    with pytest.raises(ValueError, match="Unknown modality"):
        masker.expected_sparsity("audio")


def test_masks_drawn_in_one_go_match_each_layer_on_its_own(backbone) -> None:
    masker = StructureMasker.from_model(backbone)
    _spread_log_alphas(masker)
    # Deterministic: each layer alone (its own count of zeros) gives the same masks as all layers in one pass.
    masks = masker.deterministic_masks()
    for key, layer, log_alpha in masker.layers():
        torch.testing.assert_close(masks[key][layer], masker.deterministic_mask(log_alpha.detach()))
    # Sampled: the noise is drawn for all units at once, in `layers()` order.
    noise = torch.rand(sum(p.numel() for p in masker.parameters()), generator=torch.Generator().manual_seed(3))
    original_rand_like = torch.rand_like
    try:
        torch.rand_like = lambda tensor: noise.clone()
        sampled = masker.sample()
    finally:
        torch.rand_like = original_rand_like
    for (key, layer, log_alpha), layer_noise in zip(
        masker.layers(), noise.split([p.numel() for p in masker.parameters()])
    ):
        u = layer_noise.clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha.detach()) / HARD_CONCRETE_TEMPERATURE)
        torch.testing.assert_close(sampled[key][layer].detach(), (s * 1.2 - 0.1).clamp(0, 1))
    # One pass of accounting: every modality's expected sparsity, with gradients.
    sparsities = masker.expected_sparsities()
    assert set(sparsities) == {"overall", *masker.modalities}
    for name, value in sparsities.items():
        expected = masker.expected_sparsity(None if name == "overall" else name)
        assert value.item() == pytest.approx(expected.item(), abs=1e-6)
    sparsities["text"].backward()
    assert all(bool(p.grad.abs().sum() > 0) == key.startswith("text") for key, _, p in masker.layers())


def _graph_nodes(tensors: list[torch.Tensor]) -> int:
    """Autograd nodes behind `tensors`, views and leaves left out: the kernels a backward runs."""
    seen, stack = set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    skipped = ("AccumulateGrad", "View", "Split", "Reshape", "Unsafe")
    return sum(not type(node).__name__.startswith(skipped) for node in seen)


def test_a_mask_learning_step_costs_the_same_kernels_for_any_number_of_layers() -> None:
    # A sampled draw and the Lagrangian run over all layers at once: on a GPU one small kernel per layer and
    # function made a mask-learning step 1.2-1.4x a distillation step however large the batch.
    def nodes(layers: int) -> int:
        sizes = {"vision_heads": [4] * layers, "vision_ffn": [32] * layers, "text_ffn": [32] * layers}
        masker = StructureMasker(sizes, {key: [8] * layers for key in sizes})
        lagrangian = SparsityLagrangian(0.5, 0, {"vision": 0.4})
        masks = masker.sample()
        loss, _ = lagrangian(masker, step=1)
        return _graph_nodes([loss, *(mask for per_layer in masks.values() for mask in per_layer)])

    assert nodes(12) == nodes(2) < 40


def _vqa_inputs(config, model):
    inputs = make_inputs(config)
    answers = torch.randint(5, config.text_config.vocab_size, (6, 4))
    answers[:, 0] = 2
    return {
        **inputs,
        "answer_input_ids": answers,
        "answer_attention_mask": torch.ones_like(answers),
        "answer_counts": torch.tensor([2, 1, 2, 1]),
    }


def _nlvr2_inputs(config, model):
    inputs = make_inputs(config)
    pixel_values = torch.stack([inputs["pixel_values"], inputs["pixel_values"].flip(0)], dim=1)
    return {**inputs, "pixel_values": pixel_values, "labels": torch.tensor([0, 1, 1, 0])}


def _negatives_inputs(config, model):
    return {**make_inputs(config), "itm_negatives": (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))}


def _pretraining_inputs(config, model):
    inputs = _negatives_inputs(config, model)
    mlm_labels = torch.full_like(inputs["input_ids"], -100)
    mlm_labels[:, 2] = inputs["input_ids"][:, 2]
    mlm_input_ids = inputs["input_ids"].clone()
    mlm_input_ids[:, 2] = 4
    return {**inputs, "mlm_input_ids": mlm_input_ids, "mlm_labels": mlm_labels}


def _captioning_inputs(config, model):
    inputs = make_inputs(config)
    return {**inputs, "labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)}


# (module, class name, inputs builder, output fields compared)
TASK_MODELS = [
    ("modeling_efficientvlm.modeling_efficientvlm", "EfficientVLMForPreTraining", _pretraining_inputs,
     ("loss", "itm_logits", "mlm_logits", "logits_per_image")),
    ("modeling_efficientvlm.modeling_efficientvlm_retrieval", "EfficientVLMForImageTextRetrieval", _negatives_inputs,
     ("loss", "itm_logits", "logits_per_image")),
    ("modeling_efficientvlm.modeling_efficientvlm_vqa", "EfficientVLMForQuestionAnswering", _vqa_inputs,
     ("loss", "logits")),
    ("modeling_efficientvlm.modeling_efficientvlm_nlvr2", "EfficientVLMForVisualReasoning", _nlvr2_inputs,
     ("loss", "logits")),
    ("modeling_efficientvlm.modeling_efficientvlm_captioning", "EfficientVLMForConditionalGeneration",
     _captioning_inputs, ("loss", "logits")),
]  # fmt: skip


def _task_model_class(module: str, name: str) -> type:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        pytest.skip(f"{module}.{name} is not available yet: {error}")


@pytest.mark.parametrize("module, name, build_inputs, fields", TASK_MODELS, ids=[t[1] for t in TASK_MODELS])
def test_deterministic_masks_prune_exactly(tiny_config, module, name, build_inputs, fields) -> None:
    """For every task model: the pruned model computes what the masked model computed, and the parameters
    it lost are exactly what the masker's accounting says (integers)."""
    torch.manual_seed(0)
    model = _task_model_class(module, name)(tiny_config).eval()
    masker = StructureMasker.from_model(model)
    _spread_log_alphas(masker, seed=1)
    masks = masker.deterministic_masks()
    assert 0 < masker.sparsity_of(masks) < 1
    inputs = build_inputs(model.config, model)
    with torch.no_grad():
        masked = model(**inputs, structure_masks=masks)
    before = _count(model)
    model.prune(masks)
    after = _count(model)
    # Exact integer accounting: removed parameters == prunable total - remaining(masks).
    assert before - after == masker.total_parameters() - masker.remaining_parameters(masks)
    assert masker.sparsity_of(masks) == (before - after) / masker.total_parameters()
    assert model.structure_sizes() == masker.kept_structures(masks)
    with torch.no_grad():
        pruned = model(**inputs)
    for field in fields:
        torch.testing.assert_close(getattr(pruned, field), getattr(masked, field), atol=1e-5, rtol=0)


def test_per_modality_sparsity_of_masks(backbone) -> None:
    masker = StructureMasker.from_model(backbone)
    masks = masker.deterministic_masks(binary=True)
    for key in masks:
        if key.startswith("vision"):
            masks[key] = [torch.zeros_like(mask) for mask in masks[key]]
        else:
            masks[key] = [torch.ones_like(mask) for mask in masks[key]]
    assert masker.sparsity_of(masks, "vision") == 1.0
    assert masker.sparsity_of(masks, "text") == masker.sparsity_of(masks, "fusion") == 0.0
    expected = masker.total_parameters("vision") / masker.total_parameters()
    assert masker.sparsity_of(masks) == pytest.approx(expected)
    # A key or layer left out keeps its structures whole.
    assert masker.remaining_parameters({}) == masker.total_parameters()


def test_masks_that_do_not_fit_raise(backbone) -> None:
    masker = StructureMasker.from_model(backbone)
    with pytest.raises(ValueError, match="Unknown structure-mask keys"):
        masker.sparsity_of({"audio_heads": [torch.ones(4)]})
    with pytest.raises(ValueError, match="layers"):
        masker.sparsity_of({"vision_heads": [torch.ones(4)]})
    with pytest.raises(ValueError, match="shape"):
        masker.sparsity_of({"vision_heads": [torch.ones(3), None]})
    other = EfficientVLMModel(EfficientVLMConfig.from_preset("tiny-student"))
    with pytest.raises(ValueError, match="do not fit"):
        masker.check_fits(other)


def test_mask_state_that_does_not_fit_raises(backbone) -> None:
    masker = StructureMasker.from_model(backbone)
    other = StructureMasker.from_model(EfficientVLMModel(EfficientVLMConfig.from_preset("tiny-student")))
    with pytest.raises(ValueError, match="does not fit"):
        masker.load_state_dict(other.state_dict())
    state = masker.state_dict()
    state["log_alpha.vision_ffn.0"] = torch.zeros(7)
    with pytest.raises(ValueError, match="log_alpha.vision_ffn.0"):
        masker.load_state_dict(state)
    # A state that fits loads exactly.
    copy_ = StructureMasker.from_model(backbone)
    _spread_log_alphas(copy_)
    masker.load_state_dict(copy_.state_dict())
    torch.testing.assert_close(masker.log_alpha["text_ffn"]["1"], copy_.log_alpha["text_ffn"]["1"])


def test_random_structure_masks_reach_the_target(backbone) -> None:
    masker = StructureMasker.from_model(backbone)
    largest_unit = max(max(units) for units in backbone.structure_unit_parameters().values())
    for target in (0.0, 0.35, 0.5):
        masks = random_structure_masks(backbone, target, torch.Generator().manual_seed(0))
        sparsity = masker.sparsity_of(masks)
        assert target <= sparsity < target + largest_unit / masker.total_parameters()
    with pytest.raises(ValueError, match="target_sparsity"):
        random_structure_masks(backbone, 1.0)


# -- the Lagrangian --------------------------------------------------------------------------------------------


def test_target_is_warmed_up_linearly() -> None:
    lagrangian = SparsityLagrangian(0.5, warmup_steps=10, target_sparsity_per_modality={"vision": 0.2})
    assert [lagrangian.target(step) for step in (0, 5, 10, 20)] == [0.0, 0.25, 0.5, 0.5]
    assert lagrangian.target(5, "vision") == pytest.approx(0.1)
    assert SparsityLagrangian(0.3).target(0) == 0.3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_sparsity": 1.0}, r"\[0, 1\)"),
        ({"target_sparsity": -0.1}, r"\[0, 1\)"),
        ({"target_sparsity": "0.5"}, r"\[0, 1\)"),
        ({"target_sparsity": True}, r"\[0, 1\)"),
        ({"target_sparsity_per_modality": {"vision": 1.5}}, "vision"),
        ({"target_sparsity_per_modality": {"audio": 0.5}}, "Unknown modality"),
        ({}, "target_sparsity"),
        ({"target_sparsity": 0.5, "warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_bad_targets_raise(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SparsityLagrangian(**kwargs)


def test_multipliers_ascend_and_masks_descend(backbone) -> None:
    """A plain descent step on everything raises the term through the multipliers (ascent) and, once they
    are set, moves the expected sparsity towards the target."""
    torch.manual_seed(0)
    masker = StructureMasker.from_model(backbone)
    lagrangian = SparsityLagrangian(0.5)
    optimizer = torch.optim.SGD(lagrangian.parameters(), lr=1.0)
    term, logs = lagrangian(masker, step=0)
    assert term.item() == 0 and float(logs["expected_sparsity"]) < 0.5
    term.backward()
    optimizer.step()
    gap = float(logs["expected_sparsity"]) - 0.5
    assert lagrangian.lambda_1["overall"].item() == pytest.approx(gap, rel=1e-5)  # ascent: lambda_1 += gap
    assert lagrangian.lambda_2["overall"].item() == pytest.approx(gap**2, rel=1e-5)
    assert lagrangian(masker, step=1)[0].item() > 0  # the term went up
    # With these multipliers the masks' gradient increases the sparsity (s < t).
    masker.zero_grad()
    lagrangian(masker, step=1)[0].backward()
    before = masker.expected_sparsity().item()
    with torch.no_grad():
        for _, _, log_alpha in masker.layers():
            log_alpha -= 10.0 * log_alpha.grad / log_alpha.grad.abs().max()
    assert masker.expected_sparsity().item() > before


def _optimise(masker: StructureMasker, lagrangian: SparsityLagrangian, steps: int, lr: float = 0.3) -> list[dict]:
    """The pruning trainer's optimisation of masks and multipliers alone (AdamW, no weight decay, clamping)."""
    optimizer = torch.optim.AdamW(
        [{"params": masker.parameters(), "lr": lr}, {"params": lagrangian.parameters(), "lr": lr}], weight_decay=0.0
    )
    history = []
    for step in range(steps):
        term, logs = lagrangian(masker, step)
        term.backward()
        optimizer.step()
        optimizer.zero_grad()
        masker.constrain_()
        history.append({name: float(value) for name, value in logs.items()})
    return history


def test_lagrangian_drives_expected_sparsity_to_the_target(backbone) -> None:
    torch.manual_seed(0)
    masker = StructureMasker.from_model(backbone)
    history = _optimise(masker, SparsityLagrangian(0.5, warmup_steps=100), steps=300)
    assert [h["target_sparsity"] for h in history[:101:50]] == [0.0, 0.25, 0.5]
    assert all(abs(h["expected_sparsity"] - 0.5) < 0.02 for h in history[-50:])


def test_per_modality_targets_are_enforced(backbone) -> None:
    torch.manual_seed(0)
    masker = StructureMasker.from_model(backbone)
    lagrangian = SparsityLagrangian(0.5, warmup_steps=100, target_sparsity_per_modality={"vision": 0.8})
    assert set(lagrangian.lambda_1) == {"overall", "vision"}
    history = _optimise(masker, lagrangian, steps=300)
    assert abs(history[-1]["expected_sparsity"] - 0.5) < 0.02
    assert abs(history[-1]["expected_sparsity_vision"] - 0.8) < 0.02
    assert {"lambda_1_vision", "lambda_2_vision", "target_sparsity_vision"} <= set(history[-1])


# -- the hard-concrete arithmetic, pinned to hand-computed values --------------------------------------------------
# With stretch limits (l, r) = (-0.1, 1.1) and beta = 2/3 (Louizos et al. 2018; CoFi; official EfficientVLM):
#   P(z = 0)       = sigmoid(beta * log(-l / r) - log_alpha),  beta * log(0.1 / 1.1) = -1.5985968
#   E[kept units]  = sum of (1 - P(z = 0))
#   score          = sigmoid(log_alpha / beta * 0.8) = sigmoid(1.2 * log_alpha)
#   sample         = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) * (r - l) + l, 0, 1)
# Values below were computed from these formulas by hand (to 6 digits), not with the code under test, so a
# change of the limits or of beta (e.g. (-0.2, 1.1) or 1/2) fails here.
HAND_LOG_ALPHA = torch.tensor([-3.0, -1.0, 0.0, 2.0])
HAND_P_ZERO = [0.802406, 0.354665, 0.168178, 0.026633]  # sum 1.351882: E[kept] = 2.648118, round(zeros) = 1
HAND_SCORE = [0.026597, 0.231475, 0.5, 0.916827]


def _single_layer_masker() -> StructureMasker:
    return StructureMasker({"text_ffn": [4]}, {"text_ffn": [1]})


def test_probability_of_zero_and_expected_kept_units_match_the_formulas() -> None:
    masker = _single_layer_masker()
    p_zero = masker.probability_of_zero(HAND_LOG_ALPHA)
    assert p_zero.tolist() == pytest.approx(HAND_P_ZERO, abs=1e-6)
    with torch.no_grad():
        masker.log_alpha["text_ffn"]["0"].copy_(HAND_LOG_ALPHA)
    assert masker.expected_remaining_parameters().item() == pytest.approx(2.648118, abs=1e-5)
    assert masker.expected_sparsity().item() == pytest.approx(1.351882 / 4, abs=1e-5)


def test_deterministic_mask_matches_the_formulas() -> None:
    masker = _single_layer_masker()
    # round(1.351882) = 1 unit is zeroed: the lowest log-alpha; the others keep their score (CoFi) or 1.
    assert masker.deterministic_mask(HAND_LOG_ALPHA).tolist() == pytest.approx([0.0, *HAND_SCORE[1:]], abs=1e-6)
    assert masker.deterministic_mask(HAND_LOG_ALPHA, binary=True).tolist() == [0.0, 1.0, 1.0, 1.0]


def test_stretched_sample_for_fixed_noise_matches_the_formulas(monkeypatch) -> None:
    masker = _single_layer_masker()
    noise = torch.tensor([0.25, 0.9, 0.1, 0.5])
    log_alpha = torch.tensor([1.0, 2.0, -2.0, 0.0])
    monkeypatch.setattr(torch, "rand_like", lambda tensor: noise.clone())
    # u=0.25, la=1: sigmoid(-0.147918) = 0.463088 -> 0.455705; u=0.9, la=2: 1.097791 -> clamped to 1;
    # u=0.1, la=-2: -0.097791 -> clamped to 0; u=0.5, la=0: 0.5 -> 0.5.
    assert masker.sample_mask(log_alpha).tolist() == pytest.approx([0.455705, 1.0, 0.0, 0.5], abs=1e-6)
