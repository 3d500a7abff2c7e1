"""General distillation: student from teacher, KD losses, DistillationTrainer, `run_distill.main`."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from torch.utils.data import Dataset
from transformers import TrainingArguments

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForPreTraining, EfficientVLMModel
from trainers.distillation import DistillationTrainer
from trainers.distillation.layer_mapping import default_layer_mapping
from trainers.distillation.losses import (
    attention_mse,
    hidden_state_mse,
    itc_distillation,
    slotted_mlm_soft_cross_entropy,
    soft_cross_entropy,
)
from trainers.distillation.objective import DistillationConfig, DistillationLoss
from trainers.distillation.student_init import build_student, init_student_from_teacher, make_student_config
from trainers.tasks import LogitKD

from .conftest import make_inputs

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _config(vision: int = 2, text: int = 2, fusion: int = 2, dropout: bool = False, **kwargs) -> EfficientVLMConfig:
    text_config = {"num_hidden_layers": text, "num_fusion_layers": fusion, **({} if dropout else NO_DROPOUT)}
    text_config.update(kwargs.pop("text_config", {}))
    vision_config = {"num_hidden_layers": vision, **kwargs.pop("vision_config", {})}
    return EfficientVLMConfig.from_preset("tiny", vision_config=vision_config, text_config=text_config, **kwargs)


def _teacher(seed: int = 0, **kwargs) -> EfficientVLMForPreTraining:
    torch.manual_seed(seed)
    return EfficientVLMForPreTraining(_config(**kwargs)).eval()


def _mlm_inputs(config: EfficientVLMConfig, batch_size: int = 4, seed: int = 0) -> dict:
    inputs = make_inputs(config, batch_size=batch_size, seed=seed)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 2:4] = inputs["input_ids"][:, 2:4]
    mlm_input_ids = inputs["input_ids"].clone()
    mlm_input_ids[:, 2:4] = 4
    return {**inputs, "mlm_input_ids": mlm_input_ids, "mlm_labels": labels}


class _PairDataset(Dataset):
    """Random image-text pairs with MLM inputs, one dict of tensors per item."""

    def __init__(self, config: EfficientVLMConfig, size: int, seed: int) -> None:
        self.batch = _mlm_inputs(config, batch_size=size, seed=seed)

    def __len__(self) -> int:
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.batch.items()}

    def batch_slice(self, rows: slice) -> dict[str, torch.Tensor]:
        return {key: value[rows] for key, value in self.batch.items()}


def _args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------
# Student from teacher
# --------------------------------------------------------------------------------------------------------------


def test_default_layer_mapping_is_the_official_one() -> None:
    assert default_layer_mapping(6, 12) == [1, 3, 5, 7, 9, 11]
    assert default_layer_mapping(3, 6) == [1, 3, 5]
    assert default_layer_mapping(1, 2) == [1]
    assert default_layer_mapping(4, 4) == [0, 1, 2, 3]
    assert default_layer_mapping(5, 12) == [1, 3, 6, 8, 11]  # evenly spaced, last of each block


def test_student_config_from_the_teacher_preset() -> None:
    teacher = EfficientVLMConfig.from_preset("xvlm-base")
    student = make_student_config(teacher)
    reference = EfficientVLMConfig.from_preset("efficientvlm-small")
    assert (student.vision_config.num_hidden_layers, student.text_config.num_hidden_layers) == (6, 3)
    assert student.text_config.num_fusion_layers == 3
    for name in ("hidden_size", "intermediate_size", "num_attention_heads"):
        assert getattr(student.vision_config, name) == getattr(reference.vision_config, name)
        assert getattr(student.text_config, name) == getattr(reference.text_config, name)
    assert student.embed_dim == reference.embed_dim and student.text_config.vocab_size == 30522
    assert teacher.vision_config.num_hidden_layers == 12  # the teacher's config is left alone


def _expected_source(key: str, vision: list[int], text: list[int], fusion: list[int], teacher_text: int) -> str:
    parts = key.split(".")
    if key.startswith("efficientvlm.vision_model.layers."):
        parts[3] = str(vision[int(parts[3])])
    elif key.startswith("efficientvlm.text_model.encoder.layer."):
        index = int(parts[4])
        parts[4] = str(text[index] if index < len(text) else teacher_text + fusion[index - len(text)])
    return ".".join(parts)


@pytest.mark.parametrize(
    ("layer_mapping", "expected"),
    [
        (None, {"vision": [1, 3], "text": [1], "fusion": [1, 3]}),
        ({"vision": [2, 0], "fusion": [3, 3]}, {"vision": [2, 0], "text": [1], "fusion": [3, 3]}),
    ],
)
def test_student_copies_the_chosen_teacher_layers(layer_mapping, expected) -> None:
    teacher = _teacher(vision=4, text=2, fusion=4)
    student = build_student(teacher, 2, 1, 2, layer_mapping=layer_mapping)
    assert type(student) is EfficientVLMForPreTraining
    assert student.structure_sizes()["vision_heads"] == [4, 4] and len(student.structure_sizes()["fusion_ffn"]) == 2
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        source = _expected_source(key, expected["vision"], expected["text"], expected["fusion"], 2)
        assert torch.equal(value, teacher_state[source]), f"{key} != teacher {source}"
    # Non-layer tensors (embeddings, LayerNorms, projections, temperature, heads) are the teacher's own.
    assert torch.equal(student.efficientvlm.temp, teacher.efficientvlm.temp)
    assert torch.equal(student.itm_head[3].weight, teacher.itm_head[3].weight)


def test_student_of_equal_depth_is_the_teacher() -> None:
    teacher = _teacher()
    student = build_student(teacher, 2, 2, 2)
    inputs = make_inputs(teacher.config)
    with torch.no_grad():
        out_t = teacher.efficientvlm(**inputs)
        out_s = student.eval().efficientvlm(**inputs)
    torch.testing.assert_close(out_s.last_hidden_state, out_t.last_hidden_state, rtol=0, atol=0)


class _WithExtraHead(EfficientVLMForPreTraining):
    """A task model with a head the teacher does not have."""

    def __init__(self, config: EfficientVLMConfig) -> None:
        super().__init__(config)
        self.extra_head = torch.nn.Linear(config.text_config.hidden_size, 3)


def test_init_works_for_the_bare_backbone_and_reports_missing_tensors() -> None:
    torch.manual_seed(0)
    teacher = EfficientVLMModel(_config(vision=4))
    student = EfficientVLMModel(make_student_config(teacher.config, 2, 1, 1))
    assert init_student_from_teacher(teacher, student) == []
    assert torch.equal(student.vision_model.layers[1].mlp.fc2.weight, teacher.vision_model.layers[3].mlp.fc2.weight)
    with pytest.raises(ValueError, match="hold the backbone under different names"):
        init_student_from_teacher(teacher, EfficientVLMForPreTraining(make_student_config(teacher.config, 2, 1, 1)))
    # A head the teacher lacks keeps its own initialisation and is reported.
    pretraining_teacher = _teacher()
    task_student = _WithExtraHead(make_student_config(pretraining_teacher.config, 1, 1, 1))
    extra_before = task_student.extra_head.weight.clone()
    assert init_student_from_teacher(pretraining_teacher, task_student) == ["extra_head.weight", "extra_head.bias"]
    assert torch.equal(task_student.extra_head.weight, extra_before)
    assert torch.equal(task_student.itm_head[0].weight, pretraining_teacher.itm_head[0].weight)


@pytest.mark.parametrize(
    ("layer_mapping", "message"),
    [
        ({"vision": [1]}, r"vision layer mapping has 1 entries but the student has 2 layers"),
        ({"text": [2]}, r"text layer mapping\[0\] is 2, outside the teacher's 2 layers"),
        ({"fusion": [-1]}, r"fusion layer mapping\[0\] is -1"),
        ({"fusion": [0.5]}, r"must be integers"),
        ({"audio": [0]}, r"Unknown layer-mapping keys \['audio'\]"),
    ],
)
def test_bad_layer_mappings_raise(layer_mapping, message) -> None:
    teacher = _teacher()
    with pytest.raises(ValueError, match=message):
        build_student(teacher, 2, 1, 1, layer_mapping=layer_mapping)


def test_other_student_shape_errors() -> None:
    teacher = _teacher()
    with pytest.raises(ValueError, match="no default mapping onto a teacher with 2 layers"):
        build_student(teacher, 3, 1, 1)
    with pytest.raises(ValueError, match="at least one text layer"):
        make_student_config(teacher.config, 1, 0, 1)
    # Deeper than the teacher is fine with an explicit mapping (layers repeat).
    student = build_student(teacher, 3, 1, 1, layer_mapping={"vision": [0, 1, 1]})
    assert torch.equal(
        student.efficientvlm.vision_model.layers[2].mlp.fc1.weight,
        teacher.state_dict()["efficientvlm.vision_model.layers.1.mlp.fc1.weight"],
    )


def test_pruned_teacher_gives_a_student_with_its_layer_sizes() -> None:
    teacher = _teacher(vision=2)
    masks = {"vision_heads": [torch.tensor([1.0, 0, 1, 1]), torch.tensor([1.0, 0, 0, 1])]}
    masks["fusion_ffn"] = [torch.ones(64), torch.cat([torch.ones(10), torch.zeros(54)])]
    teacher.prune(masks)
    student = build_student(teacher, 1, 1, 1)
    assert student.structure_sizes()["vision_heads"] == [2] and student.structure_sizes()["fusion_ffn"] == [10]
    assert torch.equal(
        student.efficientvlm.vision_model.layers[0].self_attn.q_proj.weight,
        teacher.efficientvlm.vision_model.layers[1].self_attn.q_proj.weight,
    )
    # A student config that ignores the teacher's pruned sizes cannot be filled from it.
    plain = EfficientVLMForPreTraining(make_student_config(_config(), 1, 1, 1))
    with pytest.raises(ValueError, match=r"shapes differ"):
        init_student_from_teacher(teacher, plain)


# --------------------------------------------------------------------------------------------------------------
# KD losses
# --------------------------------------------------------------------------------------------------------------


def test_hidden_state_mse_follows_the_mapping_and_ignores_padding() -> None:
    torch.manual_seed(0)
    teacher = tuple(torch.randn(2, 5, 8) for _ in range(5))  # input + 4 layers
    student = (teacher[0], teacher[2], teacher[4])  # 2 layers matching teacher layers 1 and 3 (0-based)
    assert hidden_state_mse(student, teacher).item() == 0.0
    assert hidden_state_mse(student, teacher, mapping=[0, 3]).item() > 0
    perturbed = tuple(s + 0.1 for s in student)
    assert hidden_state_mse(perturbed, teacher).item() == pytest.approx(3 * 0.01, rel=1e-4)
    assert hidden_state_mse(perturbed, teacher, include_input=False, skip_last=True).item() == pytest.approx(0.01)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = tuple(s.clone() for s in student)
    for state in padded:
        state[0, 3:] += 5.0  # only padding changes
    assert hidden_state_mse(padded, teacher, attention_mask=mask).item() == 0.0
    assert hidden_state_mse(padded, teacher).item() > 0
    with pytest.raises(ValueError, match="equal widths"):
        hidden_state_mse((torch.zeros(2, 5, 4),), (torch.zeros(2, 5, 8),))


def _attention(batch: int = 2, heads: int = 4, length: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, length, length, generator=generator).softmax(-1)


def test_attention_mse_matches_the_official_formula_and_masks_padding() -> None:
    teacher = tuple(_attention(seed=i) for i in range(4))
    student = (_attention(seed=10), _attention(seed=11))
    official = sum(torch.nn.MSELoss()(s, teacher[t]) * s.shape[-1] for s, t in zip(student, [1, 3]))
    torch.testing.assert_close(attention_mse(student, teacher), official)
    assert attention_mse((teacher[1], teacher[3]), teacher).item() == 0.0
    assert attention_mse((teacher[1], None), teacher, mapping=[1, 0]).item() == 0.0  # a pruned layer is skipped
    emptied = teacher[0][:, :0]  # a pruned model's layer without heads: (batch, 0, q_len, k_len)
    for mode in ("mean", "error"):
        torch.testing.assert_close(
            attention_mse((teacher[1], emptied), teacher, [1, 0], head_mismatch=mode), torch.tensor(0.0)
        )
    torch.testing.assert_close(attention_mse((emptied,), teacher, [0]), torch.tensor(0.0))

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = teacher[1].clone()
    changed[0, :, 3:, :] = 0.2  # padded queries
    changed[0, :, :, 3:] = 0.0  # padded keys
    assert attention_mse((changed,), (teacher[1],), mapping=[0], attention_mask=mask).item() == 0.0
    assert attention_mse((changed,), (teacher[1],), mapping=[0]).item() > 0
    # Cross-attention: text queries are masked, image keys are not.
    cross = teacher[1].clone()
    cross[1, :, :, 4] += 0.1
    assert attention_mse((cross,), (teacher[1],), [0], attention_mask=mask, is_cross_attention=True).item() > 0


def test_attention_mse_with_fewer_student_heads() -> None:
    teacher = (_attention(heads=4),)
    student = (teacher[0][:, :2],)
    head_mean = attention_mse(student, teacher, mapping=[0])
    expected = ((student[0].mean(1) - teacher[0].mean(1)) ** 2).sum(-1).mean()
    torch.testing.assert_close(head_mean, expected)
    with pytest.raises(ValueError, match="has 2 heads but teacher layer 0 has 4"):
        attention_mse(student, teacher, mapping=[0], head_mismatch="error")


def test_soft_cross_entropy_is_the_official_kl() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5, 11), torch.randn(6, 5, 11)
    for temperature in (1.0, 2.0):
        official = torch.nn.KLDivLoss(reduction="batchmean")(
            torch.log_softmax(student / temperature, -1).view(-1, 11),
            torch.softmax(teacher / temperature, -1).view(-1, 11),
        )
        torch.testing.assert_close(soft_cross_entropy(student, teacher, temperature), official)
    assert soft_cross_entropy(teacher, teacher).abs().item() < 1e-6
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[:, 0] = True
    torch.testing.assert_close(
        soft_cross_entropy(student, teacher, mask=mask), soft_cross_entropy(student[:, 0], teacher[:, 0])
    )
    assert soft_cross_entropy(student, teacher, mask=torch.zeros_like(mask)).item() == 0.0
    assert itc_distillation(teacher[0], teacher[0]).abs().item() < 1e-6
    assert itc_distillation(student[0, :5, :5], teacher[0, :5, :5]).item() > 0
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(student, teacher, 0.0)


def test_slotted_mlm_kd_is_the_official_gathered_kl() -> None:
    """`mlm_logit_slots`: X-VLM gathers each text's logits at its masked positions, padded with position 0 to
    `max_masks` slots, and takes `KLDivLoss(batchmean)` over all batch x slots rows."""
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 9, 13), torch.randn(3, 9, 13)
    labels = torch.full((3, 9), -100)
    labels[0, [2, 5]] = 4
    labels[1, [1, 3, 4, 8]] = 7  # text 2 has no mask: all its slots at [CLS]
    slots = 4
    positions = torch.zeros(3, slots, dtype=torch.long)
    for row in range(3):
        masked = (labels[row] != -100).nonzero().flatten()
        positions[row, : len(masked)] = masked
    gathered = [logits.gather(1, positions[..., None].expand(-1, -1, 13)) for logits in (student, teacher)]
    official = torch.nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(gathered[0], -1).view(-1, 13), torch.softmax(gathered[1], -1).view(-1, 13)
    )
    torch.testing.assert_close(slotted_mlm_soft_cross_entropy(student, teacher, labels, slots), official)
    assert slotted_mlm_soft_cross_entropy(teacher, teacher, labels, slots).abs().item() < 1e-6
    with pytest.raises(ValueError, match="has 4 masked tokens but `mlm_logit_slots` is 3"):
        slotted_mlm_soft_cross_entropy(student, teacher, labels, 3)
    with pytest.raises(ValueError, match="mlm_logit_slots"):
        DistillationConfig(mlm_logit_slots=-1)


def test_distillation_config_validation() -> None:
    with pytest.raises(ValueError, match="`vision_hidden` must be a non-negative number"):
        DistillationConfig(vision_hidden=-1.0)
    with pytest.raises(ValueError, match="head_mismatch"):
        DistillationConfig(head_mismatch="max")
    with pytest.raises(ValueError, match=r"Unknown distillation settings \['visoin_hidden'\]"):
        DistillationConfig.from_dict({"visoin_hidden": 0.1})
    with pytest.raises(ValueError, match=r"`vision_layer_mapping\[1\]` is 'a'"):
        DistillationConfig(vision_layer_mapping=[1, "a"])
    with pytest.raises(ValueError, match=r"text_layer_mapping\[0\] is 5, outside the teacher's 2 layers"):
        DistillationLoss(DistillationConfig(text_layer_mapping=[5]), _config(text=1), _config(text=2))
    config = DistillationConfig()
    assert (config.task_weight, config.kd_weight, config.vision_hidden, config.itc) == (0.6, 0.4, 0.1, 0.0)
    assert config.weight("kd_vision_hidden") == 0.1 and config.needs_attentions and config.needs_hidden_states
    assert not DistillationConfig(kd_weight=0.0).needs_attentions


GENERAL_TERMS = {
    "kd_itm_logit",
    "kd_mlm_logit",
    "kd_text_attn",
    "kd_text_hidden",
    "kd_vision_attn",
    "kd_vision_hidden",
    "kd_fusion_attn",
    "kd_fusion_hidden",
}


def test_kd_terms_are_zero_for_the_teacher_itself_and_positive_for_a_student() -> None:
    teacher = _teacher()
    inputs = _mlm_inputs(teacher.config)
    loss = DistillationLoss(DistillationConfig(itc=1.0, fusion_cross_attn=1.0))
    flags = dict(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        reference = teacher(**inputs, **flags)
        negatives = (reference.negative_text_index, reference.negative_image_index)
        same = teacher(**inputs, itm_negatives=negatives, **flags)
        student = build_student(teacher, 1, 1, 1).eval()
        for parameter in student.parameters():  # away from the teacher everywhere, embeddings included
            parameter.add_(0.05 * torch.randn_like(parameter))
        student_out = student(**inputs, **flags)
        teacher_out = teacher(
            **inputs, itm_negatives=(student_out.negative_text_index, student_out.negative_image_index), **flags
        )
    zero = loss(same, reference, inputs["attention_mask"], inputs["mlm_labels"])
    assert set(zero) == GENERAL_TERMS | {"kd_itc", "kd_fusion_cross_attn"}
    assert all(value.abs().item() < 1e-6 for value in zero.values()), zero
    terms = loss(student_out, teacher_out, inputs["attention_mask"], inputs["mlm_labels"])
    assert all(value.item() > 0 for value in terms.values()), terms
    # Weights: vision hidden counts 0.1, itc and cross-attention their configured 1.0.
    combined = loss.combine(terms)
    manual = sum(value * (0.1 if name == "kd_vision_hidden" else 1.0) for name, value in terms.items())
    torch.testing.assert_close(combined, manual)
    # The official MLM-logit normalisation, when asked: the other terms stay.
    slotted = DistillationLoss(DistillationConfig(itc=1.0, fusion_cross_attn=1.0, mlm_logit_slots=8))
    slotted = slotted(student_out, teacher_out, inputs["attention_mask"], inputs["mlm_labels"])
    expected = slotted_mlm_soft_cross_entropy(student_out.mlm_logits, teacher_out.mlm_logits, inputs["mlm_labels"], 8)
    torch.testing.assert_close(slotted.pop("kd_mlm_logit"), expected)
    assert expected.item() != terms.pop("kd_mlm_logit").item()
    assert slotted.keys() == terms.keys() and all(torch.equal(slotted[k], terms[k]) for k in terms)


def test_an_output_field_the_kd_spec_does_not_declare_raises() -> None:
    from trainers.tasks import KDSpec, task_spec

    teacher = _teacher()
    inputs = _mlm_inputs(teacher.config)
    with torch.no_grad():
        outputs = teacher(**inputs)
    spec = task_spec("pretraining").kd
    # The pre-training spec without its MLM-logit term: the MLM logits would silently go undistilled.
    partial = KDSpec(
        logits=tuple(kd for kd in spec.logits if kd.field != "mlm_logits"),
        similarity=spec.similarity,
        encoders=spec.encoders,
        not_distilled=spec.not_distilled,
    )
    loss = DistillationLoss(DistillationConfig(), spec=partial)
    with pytest.raises(ValueError, match=r"EfficientVLMForPreTrainingOutput has field\(s\) \['mlm_logits'\]"):
        loss(outputs, outputs, inputs["attention_mask"], inputs["mlm_labels"])
    with pytest.raises(ValueError, match="`term` must be one of"):
        LogitKD("logits", "answer_logit")


def test_every_task_spec_resolves_and_a_model_of_no_task_gets_no_kd(tmp_path) -> None:
    from trainers.tasks import TASK_SPECS, task_of_model

    for name, spec in TASK_SPECS.items():
        assert spec.model_class.__name__ == spec.model_class_name and spec.dataset_class and spec.collator_class
        assert (spec.evaluate is None) == (name == "pretraining") == (spec.primary_metric is None)
    assert task_of_model(_teacher()).name == "pretraining"
    bare = EfficientVLMModel(_config())
    with pytest.raises(ValueError, match="EfficientVLMModel is the model of no registered task"):
        DistillationTrainer(model=bare, args=_args(tmp_path), teacher_model=EfficientVLMModel(_config()))


def _task_case(name: str, config: EfficientVLMConfig):
    """(model class, inputs) of a task model, or a skip when that model is not there."""
    import importlib

    module_name, class_name = {
        "retrieval": ("modeling_efficientvlm_retrieval", "EfficientVLMForImageTextRetrieval"),
        "nlvr2": ("modeling_efficientvlm_nlvr2", "EfficientVLMForVisualReasoning"),
        "captioning": ("modeling_efficientvlm_captioning", "EfficientVLMForConditionalGeneration"),
        "vqa": ("modeling_efficientvlm_vqa", "EfficientVLMForQuestionAnswering"),
    }[name]
    try:
        model_class = getattr(importlib.import_module(f"modeling_efficientvlm.{module_name}"), class_name)
    except (ImportError, AttributeError):
        pytest.skip(f"{class_name} is not available")
    inputs = make_inputs(config, batch_size=4)
    if name == "nlvr2":
        inputs.update(pixel_values=torch.randn(4, 2, 3, 32, 32), labels=torch.tensor([0, 1, 1, 0]))
    elif name == "captioning":
        inputs["labels"] = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], -100)
    elif name == "vqa":
        inputs.update(
            answer_input_ids=torch.randint(5, 100, (4, 5)),
            answer_attention_mask=torch.ones(4, 5, dtype=torch.long),
            answer_weights=torch.ones(4),
            answer_counts=torch.ones(4, dtype=torch.long),
        )
    return model_class, inputs


@pytest.mark.parametrize("task", ["retrieval", "nlvr2", "captioning", "vqa"])
def test_kd_terms_of_task_models(task: str, tmp_path) -> None:
    config = _config()
    model_class, inputs = _task_case(task, config)
    torch.manual_seed(0)
    teacher = model_class(config).eval()
    distillation_config = DistillationConfig(fusion_cross_attn=1.0)
    for depth in ((2, 2, 2), (1, 1, 1)):
        student = build_student(teacher, *depth).eval()
        trainer = DistillationTrainer(
            model=student, args=_args(tmp_path), teacher_model=teacher, distillation_config=distillation_config
        )
        with torch.no_grad():
            outputs = student(**inputs, output_attentions=True, output_hidden_states=True)
            terms = trainer.compute_distillation_terms(outputs, trainer.teacher_forward(inputs, outputs), inputs)
        # Captioning runs the whole text stack causally as its `text_output`: its fusion layers' cross-attention
        # maps are the cross term.
        expected = {"kd_vision_attn", "kd_vision_hidden", "kd_text_attn", "kd_text_hidden", "kd_fusion_cross_attn"}
        if task != "captioning":
            expected |= {"kd_fusion_attn", "kd_fusion_hidden"}
        # Retrieval's `logits` are its ITM logits: distilled once, as `kd_itm_logit`.
        expected |= {"kd_itm_logit"} if task == "retrieval" else {"kd_task_logit"}
        assert set(terms) == expected
        if depth == (2, 2, 2):
            assert all(value.abs().item() < 1e-6 for value in terms.values()), terms
        else:
            assert terms["kd_text_hidden"].item() > 0
    if task == "nlvr2":  # twin fusion layers map pair to pair: student layers 0, 1 <- teacher layers 2, 3
        assert trainer.distillation_loss.layer_mappings["fusion"] == [2, 3]
    if task == "captioning":  # the whole-stack pass: text layer 1, then fusion layer 1 (stack index 3)
        assert trainer.distillation_loss.layer_mappings["multimodal"] == [1, 3]


def test_captioning_decoder_kd_matches_the_official_terms(tmp_path) -> None:
    """The official captioning stage matches the decoder's (the whole stack's) cross-attention maps over the fusion
    layer mapping and leaves the student's last layer out of its hidden-state term (`text_skip_last_hidden`)."""
    config = _config()
    model_class, inputs = _task_case("captioning", config)
    torch.manual_seed(0)
    teacher = model_class(config).eval()
    student = build_student(teacher, 1, 1, 1).eval()

    def terms_of(distillation_config, perturb_last=False):
        trainer = DistillationTrainer(
            model=student, args=_args(tmp_path), teacher_model=teacher, distillation_config=distillation_config
        )
        with torch.no_grad():
            outputs = student(**inputs, output_attentions=True, output_hidden_states=True)
            teacher_outputs = trainer.teacher_forward(inputs, outputs)
            if perturb_last:
                states = outputs.text_output.hidden_states
                outputs.text_output.hidden_states = (*states[:-1], states[-1] + 1.0)
            return trainer.compute_distillation_terms(outputs, teacher_outputs, inputs), outputs, teacher_outputs

    terms, outputs, teacher_outputs = terms_of(DistillationConfig(fusion_cross_attn=1.0))
    # One map per fusion layer (the student's 1, the teacher's 2): the fusion mapping, its last layer.
    assert len(outputs.text_output.cross_attentions) == 1 and len(teacher_outputs.text_output.cross_attentions) == 2
    expected = attention_mse(
        outputs.text_output.cross_attentions,
        teacher_outputs.text_output.cross_attentions,
        [1],
        inputs["attention_mask"],
        is_cross_attention=True,
    )
    assert expected.item() > 0
    torch.testing.assert_close(terms["kd_fusion_cross_attn"], expected)

    kept = terms_of(DistillationConfig(), perturb_last=False)[0]["kd_text_hidden"]
    moved = terms_of(DistillationConfig(), perturb_last=True)[0]["kd_text_hidden"]
    skipped = terms_of(DistillationConfig(text_skip_last_hidden=True), perturb_last=False)[0]["kd_text_hidden"]
    skipped_moved = terms_of(DistillationConfig(text_skip_last_hidden=True), perturb_last=True)[0]["kd_text_hidden"]
    assert moved.item() > kept.item() + 0.5
    assert skipped.item() < kept.item()
    torch.testing.assert_close(skipped_moved, skipped)


def test_distillation_switches_must_be_booleans() -> None:
    with pytest.raises(ValueError, match="`text_skip_last_hidden` must be true or false; got 'true'"):
        DistillationConfig.from_dict({"text_skip_last_hidden": "true"})


def _student_trainer(config: EfficientVLMConfig, model_class: type, depth: tuple, tmp_path) -> DistillationTrainer:
    """A `DistillationTrainer` of a seeded teacher and its student of `depth` (vision, text, fusion layers)."""
    torch.manual_seed(0)
    teacher = model_class(config).eval()
    return DistillationTrainer(model=build_student(teacher, *depth).eval(), args=_args(tmp_path), teacher_model=teacher)


@pytest.mark.parametrize("task, matched", [("vqa", False), ("nlvr2", False), ("retrieval", True)])
def test_the_fusion_layers_input_is_matched_only_where_it_is_officially(task: str, matched: bool, tmp_path) -> None:
    """VQA and NLVR2 officially split one multimodal pass's hidden states into text (embedding + text layers) and
    fusion (the fusion layers' outputs): the fusion input, the last text state, is not matched a second time.
    Retrieval's fusion-only pass includes it."""
    config = _config()
    model_class, inputs = _task_case(task, config)
    trainer = _student_trainer(config, model_class, (1, 1, 1), tmp_path)
    with torch.no_grad():
        outputs = trainer.model(**inputs, output_hidden_states=True)
        teacher_outputs = trainer.teacher_forward(inputs, outputs)
        before = trainer.compute_distillation_terms(outputs, teacher_outputs, inputs)["kd_fusion_hidden"]
        states = outputs.fusion_output.hidden_states
        outputs.fusion_output.hidden_states = (states[0] + 1.0, *states[1:])
        after = trainer.compute_distillation_terms(outputs, teacher_outputs, inputs)["kd_fusion_hidden"]
    assert bool(after != before) == matched, (before, after)


def _same_depth_kd(config: EfficientVLMConfig, model_class: type, inputs: dict, tmp_path) -> tuple:
    """A student built at the teacher's depth (so the teacher itself): its outputs on `inputs` and its KD terms."""
    trainer = _student_trainer(config, model_class, (2, 2, 2), tmp_path)
    with torch.no_grad():
        outputs = trainer.model(**inputs, output_hidden_states=True)
        terms = trainer.compute_distillation_terms(outputs, trainer.teacher_forward(inputs, outputs), inputs)
    return outputs, terms


def test_retrieval_kd_with_several_negatives_per_pair_scores_the_same_pairs(tmp_path) -> None:
    config = _config()
    config.itm_negatives_per_pair = 2
    model_class, inputs = _task_case("retrieval", config)
    inputs["attention_mask"][0, -2:] = 0  # a padded text: the KD mask of its pairs must follow it
    outputs, terms = _same_depth_kd(config, model_class, inputs, tmp_path)
    batch = inputs["input_ids"].shape[0]
    assert outputs.itm_logits.shape[0] == 5 * batch and outputs.negative_text_index.shape == (2 * batch,)
    # The padding mask of the fused pairs (what the hidden-state terms average over) is each pair's text's.
    from trainers.distillation.objective import _itm_attention_mask

    texts = torch.cat([torch.arange(batch), outputs.negative_text_index, torch.arange(batch).repeat(2)])
    mask = _itm_attention_mask(inputs["attention_mask"], outputs, outputs.fusion_output)
    assert torch.equal(mask, inputs["attention_mask"][texts])
    # The same-depth student is the teacher: scoring the same pairs, every term is zero.
    assert {"kd_itm_logit", "kd_fusion_hidden"} <= set(terms)
    assert all(value.abs().item() < 1e-6 for value in terms.values()), terms


@pytest.mark.parametrize("task", ["retrieval", "pretraining"])
def test_image_text_kd_with_caption_negatives_scores_the_same_pairs(task: str, tmp_path) -> None:
    config = _config()
    config.itm_caption_negatives = 1.0  # every image's negative text is its caption negative (index batch + i)
    if task == "pretraining":  # general distillation on image-text data that carries caption negatives
        model_class, inputs = EfficientVLMForPreTraining, make_inputs(config, batch_size=4)
    else:
        model_class, inputs = _task_case(task, config)
    negatives = make_inputs(
        config, batch_size=inputs["input_ids"].shape[0], seq_len=inputs["input_ids"].shape[1], seed=3
    )
    negatives["attention_mask"][0, -3:] = 0  # padded differently from the texts: the KD mask must follow it
    inputs = {
        **inputs,
        "itm_negative_input_ids": negatives["input_ids"],
        "itm_negative_attention_mask": negatives["attention_mask"],
    }
    outputs, terms = _same_depth_kd(config, model_class, inputs, tmp_path)
    batch = inputs["input_ids"].shape[0]
    assert torch.equal(outputs.negative_text_index, torch.arange(batch, 2 * batch))
    # The same-depth student is the teacher: scoring the same caption-negative pairs, every term is zero.
    assert {"kd_itm_logit", "kd_fusion_hidden"} <= set(terms)
    assert all(value.abs().item() < 1e-6 for value in terms.values()), terms


# --------------------------------------------------------------------------------------------------------------
# DistillationTrainer
# --------------------------------------------------------------------------------------------------------------


def test_trainer_keeps_the_teacher_frozen_and_checkpoints_only_the_student(tmp_path) -> None:
    teacher = _teacher(dropout=True)
    teacher.train()  # the trainer must put it in eval mode
    teacher_before = _state(teacher)
    student = build_student(teacher, 1, 1, 1)
    student_before = _state(student)
    modes = []
    teacher.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    trainer = DistillationTrainer(
        model=student,
        args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=_PairDataset(teacher.config, 8, seed=1),
        teacher_model=teacher,
    )
    trainer.train()

    assert modes == [False, False]
    assert all(torch.equal(value, teacher_before[key]) for key, value in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(value, student_before[key]) for key, value in student.state_dict().items())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters()}

    saved = safetensors.torch.load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert set(saved) <= set(student.state_dict()) and not any("teacher" in key for key in saved)
    assert sum(v.numel() for v in saved.values()) == sum(
        v.numel() for k, v in student.state_dict().items() if k != "mlm_head.decoder.weight"
    )
    reloaded = EfficientVLMForPreTraining.from_pretrained(tmp_path / "checkpoint-2")
    assert reloaded.structure_sizes() == student.structure_sizes()
    assert torch.equal(reloaded.itm_head[0].weight, student.itm_head[0].weight)

    logs = trainer.state.log_history[0]
    assert GENERAL_TERMS | {"loss_itc", "loss_itm", "loss_mlm", "loss_task", "loss_kd"} <= set(logs)
    total = 0.6 * logs["loss_task"] + 0.4 * logs["loss_kd"]
    assert logs["loss"] == pytest.approx(total, rel=1e-5)
    kd = sum(logs[name] * (0.1 if name == "kd_vision_hidden" else 1.0) for name in GENERAL_TERMS)
    assert logs["loss_kd"] == pytest.approx(kd, rel=1e-5)


def test_teacher_sharing_parameters_with_the_student_raises(tmp_path) -> None:
    teacher = _teacher()
    with pytest.raises(ValueError, match="shares parameters with the student"):
        DistillationTrainer(model=teacher, args=_args(tmp_path), teacher_model=teacher)
    # A compiled student hid its task ("OptimizedModule is the model of no registered task"): named, with the way.
    student = torch.compile(build_student(teacher, 1, 1, 1))
    with pytest.raises(ValueError, match=r"torch.compile\(\)d module: pass the model itself and set `torch_compile"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=_teacher())


def test_gradient_accumulation_matches_the_mean_of_micro_batch_losses(tmp_path) -> None:
    teacher = _teacher()
    student = build_student(teacher, 1, 1, 1)
    reference = copy.deepcopy(student)
    dataset = _PairDataset(teacher.config, 4, seed=2)
    learning_rate = 0.5
    args = dict(
        max_steps=1,
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        train_sampling_strategy="sequential",
    )
    trainer = DistillationTrainer(
        model=student, args=_args(tmp_path / "ga", **args), train_dataset=dataset, teacher_model=teacher
    )
    trainer.train()

    # By hand: micro-batches {0, 1} and {2, 3} (two pairs each, so hard negatives are forced).
    helper = DistillationTrainer(model=reference, args=_args(tmp_path / "ref"), teacher_model=teacher)
    reference.train()
    losses = [helper.compute_loss(reference, dataset.batch_slice(rows)) for rows in (slice(0, 2), slice(2, 4))]
    ((losses[0] + losses[1]) / 2).backward()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(((losses[0] + losses[1]) / 2).item(), rel=1e-5)
    with torch.no_grad():
        for (name, trained), expected in zip(student.named_parameters(), reference.parameters()):
            if expected.grad is not None:
                torch.testing.assert_close(trained, expected - learning_rate * expected.grad, msg=name)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path) -> None:
    teacher = _teacher(dropout=True)
    dataset = _PairDataset(teacher.config, 8, seed=3)
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4)

    full = build_student(teacher, 1, 1, 1)
    DistillationTrainer(
        model=full, args=_args(tmp_path / "full", **args), train_dataset=dataset, teacher_model=teacher
    ).train()

    # Start from other weights: only the checkpoint can make the runs agree.
    torch.manual_seed(5)
    resumed = EfficientVLMForPreTraining(full.config)
    trainer = DistillationTrainer(
        model=resumed, args=_args(tmp_path / "resumed", **args), train_dataset=dataset, teacher_model=teacher
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert [log["step"] for log in trainer.state.log_history if "loss" in log] == [1, 2, 3, 4]  # 1, 2 restored
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_distillation_closes_the_gap_to_the_teacher_more_than_the_task_loss(tmp_path) -> None:
    # A teacher with sharper outputs (larger init) and a student that starts far from it (random init).
    init = {"initializer_range": 0.1}
    teacher = _teacher(text_config=init, vision_config=init, **init)
    held_out = _mlm_inputs(teacher.config, batch_size=16, seed=99)
    held_out["attention_mask"][::2, -3:] = 0

    def gap(student) -> float:
        student.eval()
        with torch.no_grad():
            out = student(**held_out)
            ref = teacher(**held_out, itm_negatives=(out.negative_text_index, out.negative_image_index))
        mlm = soft_cross_entropy(out.mlm_logits, ref.mlm_logits, mask=held_out["mlm_labels"] != -100)
        return (soft_cross_entropy(out.itm_logits, ref.itm_logits) + mlm).item()

    gaps = {}
    for name, config in (("kd", DistillationConfig()), ("task", DistillationConfig(task_weight=1.0, kd_weight=0.0))):
        torch.manual_seed(1)
        student = EfficientVLMForPreTraining(make_student_config(teacher.config, 1, 1, 1))
        initial = gap(student)
        trainer = DistillationTrainer(
            model=student,
            args=_args(
                tmp_path / name,
                max_steps=20,
                per_device_train_batch_size=8,
                learning_rate=3e-3,
                lr_scheduler_type="constant",
                logging_steps=20,
            ),
            train_dataset=_PairDataset(teacher.config, 64, seed=1),
            teacher_model=teacher,
            distillation_config=config,
        )
        trainer.train()
        gaps[name] = gap(student)
    print(f"student-teacher gap (ITM + MLM logit KL): initial {initial:.4f}, {gaps}")
    # Measured (teacher seeds 0, 1, 2): kd / initial 0.49-0.56, kd / task 0.51-0.61.
    assert gaps["kd"] < 0.7 * initial
    assert gaps["kd"] < 0.75 * gaps["task"]


# --------------------------------------------------------------------------------------------------------------
# run_distill
# --------------------------------------------------------------------------------------------------------------


def test_run_distill_end_to_end(tmp_path, monkeypatch) -> None:
    import datasets

    from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor
    from trainers.commands.distill import main

    from .data_utils import COLOURS, make_image, make_processor, write_image_text_json

    teacher_dir = tmp_path / "teacher"
    teacher = _teacher(vision=2)
    teacher.save_pretrained(teacher_dir)
    make_processor(tmp_path, image_size=32, max_length=16).save_pretrained(teacher_dir)
    train_file, image_root = write_image_text_json(tmp_path, n=4, captions_per_image=2)
    json_data = ["--train_file", str(train_file), "--image_root", str(image_root)]
    base = ["--teacher_model_name_or_path", str(teacher_dir), "--report_to", "none", "--use_cpu"]
    base += ["--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--logging_steps", "1"]

    output_dir = tmp_path / "student"
    layers = ["--student_layers", "2,1,1", "--num_vision_layers", "1", "--layer_mapping", '{"text": [0]}']
    # How the student trains (paper-distill: X-VLM's ITC gather), set on its config: distill had no way to.
    overrides = ["--config_overrides", '{"itc_local_gradient": true, "itm_negatives_per_pair": 2, ']
    overrides[1] += '"head_learning_rate_multiplier": 2}'
    rates = {}
    create_optimizer = DistillationTrainer.create_optimizer

    def record_rates(self, *args, **kwargs):
        optimizer = create_optimizer(self, *args, **kwargs)
        names = {id(p): name for name, p in self.model.named_parameters()}
        rates.update({names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]})
        return optimizer

    monkeypatch.setattr(DistillationTrainer, "create_optimizer", record_rates)
    main([*base, *json_data, *layers, *overrides, "--max_steps", "2", "--output_dir", str(output_dir)])
    # The pre-training heads (X-VLM's init_params) at twice the rate.
    assert rates["itm_head.0.weight"] == rates["efficientvlm.temp"] == 2 * rates["mlm_head.dense.weight"] > 0

    student = EfficientVLMForPreTraining.from_pretrained(output_dir)
    assert student.config.itc_local_gradient and student.config.itm_negatives_per_pair == 2
    assert not teacher.config.itc_local_gradient
    sizes = student.structure_sizes()
    assert [len(sizes[k]) for k in ("vision_heads", "text_heads", "fusion_heads")] == [1, 1, 1]
    assert EfficientVLMProcessor.from_pretrained(output_dir).tokenizer.mask_token_id == 4
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and "kd_fusion_attn" in state["log_history"][0]
    # Position embeddings beyond the texts' length get no gradient: still the teacher's, as initialised.
    torch.testing.assert_close(
        student.efficientvlm.text_model.embeddings.position_embeddings.weight[-1],
        teacher.efficientvlm.text_model.embeddings.position_embeddings.weight[-1],
    )

    # A `datasets` dataset saved to disk works the same way.
    images = [make_image(colour) for colour in COLOURS[:4]]
    captions = [f"a {colour} square" for colour in COLOURS[:4]]
    datasets.Dataset.from_dict({"image": images, "caption": captions}).save_to_disk(tmp_path / "hf")
    hf_output = tmp_path / "student_hf"
    hf_data = ["--dataset_path", str(tmp_path / "hf"), "--student_layers", "1,1,1"]
    main([*base, *hf_data, "--max_steps", "1", "--output_dir", str(hf_output)])
    assert json.loads((hf_output / "trainer_state.json").read_text())["global_step"] == 1

    bad = [*base, "--output_dir", str(tmp_path / "unused")]
    with pytest.raises(ValueError, match="three positive integers"):
        main([*bad, *json_data, "--student_layers", "6,3"])
    with pytest.raises(ValueError, match=r"at least one layer per stack; got vision, text, fusion = \[1, 0, 1\]"):
        main([*bad, *json_data, "--student_layers", "1,1,1", "--num_text_layers", "0"])
    with pytest.raises(ValueError, match="exactly one of --train_file, --dataset_path"):
        main([*bad, *json_data, "--dataset_path", str(tmp_path / "hf")])
    with pytest.raises(ValueError, match="`kd_temperature` must be positive"):
        main([*bad, *json_data, "--kd_temperature", "0"])
    shape = r"--config_overrides \['embed_dim'\] would change .* The student's shape is the teacher's"
    with pytest.raises(ValueError, match=shape):
        main([*bad, *json_data, "--student_layers", "1,1,1", "--config_overrides", '{"embed_dim": 8}'])
    # The default student (6,3,3) on a shallower teacher: the stack and the flags are named (was "A student with 6
    # layers has no default mapping onto a teacher with 2 layers").
    message = (
        r"^The student's vision stack has 6 layers \(--student_layers 6,3,3; the default is 6,3,3\) but the teacher's"
    )
    with pytest.raises(ValueError, match=message + r".* has 2: give --student_layers with at most 2 vision layers"):
        main([*bad, *json_data])
    with pytest.raises(ValueError, match=r"^The student's fusion stack has 3 layers"):  # vision and text mapped
        main(
            [
                *bad,
                *json_data,
                "--student_layers",
                "3,3,3",
                "--layer_mapping",
                '{"vision": [0, 1, 1], "text": [0, 1, 1]}',
            ]
        )
    # A teacher without the pre-training heads (a retrieval checkpoint has no MLM head) would teach at random.
    from modeling_efficientvlm import EfficientVLMForImageTextRetrieval

    retrieval_dir = tmp_path / "retrieval_teacher"
    EfficientVLMForImageTextRetrieval(teacher.config).save_pretrained(retrieval_dir)
    make_processor(tmp_path, image_size=32, max_length=16).save_pretrained(retrieval_dir)
    not_a_teacher = ["--teacher_model_name_or_path", str(retrieval_dir), *bad[2:]]
    with pytest.raises(ValueError, match=r"retrieval_teacher lacks \d+ parameter\(s\) of a pre-training model"):
        main([*not_a_teacher, *json_data, "--student_layers", "1,1,1"])
