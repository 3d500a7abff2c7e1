"""X-VLM's `lr_mult` (`config.head_learning_rate_multiplier`): a task's fresh head trains at a multiple of the rate."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval, EfficientVLMForVisualReasoning
from trainers.optimization import head_learning_rate_optimizer
from trainers.tasks import build_dataset
from trainers.training import train

from .data_utils import make_processor, write_nlvr2_json


def _args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "out"), learning_rate=1e-3, weight_decay=0.01, report_to=[], use_cpu=True)
    return TrainingArguments(**{**defaults, **kwargs})


def _rates(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """(learning rate before the schedule scales it, weight decay) of every trainable parameter, by name."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: (g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_the_nlvr2_classifier_trains_at_the_multiplied_rate_through_training(tmp_path) -> None:
    config = EfficientVLMConfig.from_preset("tiny", head_learning_rate_multiplier=2.0)
    model = EfficientVLMForVisualReasoning(config)
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    records, image_root = write_nlvr2_json(tmp_path)
    dataset = build_dataset("nlvr2", str(records), str(image_root), processor)
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=2, save_strategy="no", warmup_steps=1)
    trainer = train("nlvr2", model, processor, dataset, args)
    rates = _rates(trainer.optimizer, model)
    assert set(rates) == {name for name, p in model.named_parameters() if p.requires_grad}
    head = {name: rate for name, rate in rates.items() if name.startswith("cls_head.")}
    rest = {name: rate for name, rate in rates.items() if not name.startswith("cls_head.")}
    assert head and rest
    (rest_lr,) = {lr for lr, _ in rest.values()}
    assert rest_lr == 1e-3 and {lr for lr, _ in head.values()} == {2e-3}
    # Weight decay as the Trainer groups it: none on biases and LayerNorms, in the head too.
    assert head["cls_head.0.weight"][1] == 0.01 and head["cls_head.0.bias"][1] == 0.0
    assert rest["efficientvlm.vision_model.post_layernorm.weight"][1] == 0.0


def test_a_multiplier_of_one_changes_nothing_and_a_task_without_a_fresh_head_refuses_another(tmp_path) -> None:
    args = _args(tmp_path)
    model = EfficientVLMForVisualReasoning(EfficientVLMConfig.from_preset("tiny"))
    assert head_learning_rate_optimizer(args, model, "nlvr2") is None
    faster = EfficientVLMConfig.from_preset("tiny", head_learning_rate_multiplier=2)
    retrieval = EfficientVLMForImageTextRetrieval(faster)
    with pytest.raises(ValueError, match="the retrieval model has no freshly initialised head"):
        head_learning_rate_optimizer(args, retrieval, "retrieval")
    for bad in (0, -1.0, "2", True):
        with pytest.raises(ValueError, match="`head_learning_rate_multiplier` must be a positive number"):
            EfficientVLMConfig(head_learning_rate_multiplier=bad)


def test_a_resume_under_another_multiplier_is_refused_naming_both(tmp_path) -> None:
    """The checkpoint's optimizer state holds the head's rate in groups of its own layout: resumed under another
    multiplier it failed on torch's group count (1 -> 2) or silently kept the old rate (2 -> 3)."""
    processor = make_processor(tmp_path, image_size=EfficientVLMConfig.from_preset("tiny").vision_config.image_size)
    records, image_root = write_nlvr2_json(tmp_path)
    dataset = build_dataset("nlvr2", str(records), str(image_root), processor)

    def run(multiplier: float, name: str, resume: str | None = None, steps: int = 1) -> TrainingArguments:
        torch.manual_seed(0)
        model = EfficientVLMForVisualReasoning(
            EfficientVLMConfig.from_preset("tiny", head_learning_rate_multiplier=multiplier)
        )
        args = _args(tmp_path / name, max_steps=steps, per_device_train_batch_size=2, save_steps=1)
        args.resume_from_checkpoint = resume
        return train("nlvr2", model, processor, dataset, args)

    for saved, resumed in ((1.0, 2.0), (2.0, 3.0)):
        run(saved, f"at{saved:g}")
        checkpoint = str(tmp_path / f"at{saved:g}" / "out" / "checkpoint-1")
        with pytest.raises(
            ValueError, match=f"trained with head_learning_rate_multiplier {saved:g}, but this run sets {resumed:g}"
        ):
            run(resumed, f"resumed{resumed:g}", resume=checkpoint, steps=2)
    trainer = run(2.0, "same", resume=checkpoint, steps=2)  # the multiplier it was trained with: resumes
    assert trainer.state.global_step == 2
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {1e-3, 2e-3}


def test_a_pruning_checkpoint_under_another_multiplier_is_only_told_to_resume_alike(tmp_path) -> None:
    """A pruning checkpoint is no model folder (its masks are not applied when loaded): no advice to start from it."""
    from trainers.training import check_resumed_head_rate

    model = EfficientVLMForVisualReasoning(EfficientVLMConfig.from_preset("tiny", head_learning_rate_multiplier=2))
    with pytest.raises(ValueError, match=r"Resume with head_learning_rate_multiplier 1, or start a new run from"):
        check_resumed_head_rate(tmp_path, {}, model)
    (tmp_path / "masker.pt").touch()
    with pytest.raises(ValueError, match=r"Resume with head_learning_rate_multiplier 1\.$"):
        check_resumed_head_rate(tmp_path, {}, model)
    check_resumed_head_rate(tmp_path, {"head_learning_rate_multiplier": 2.0}, model)  # the same rate: resumes
