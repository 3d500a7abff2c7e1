"""Model cards (`trainers.model_card`): the Hub metadata, a runnable snippet per task, no placeholders."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from modeling_efficientvlm import EfficientVLMConfig
from trainers.model_card import ModelCardInfo
from trainers.saving import save_model_folder
from trainers.tasks import TASKS, task_model_class, task_spec

from .data_utils import make_processor

REPORT = {
    "target_sparsity": 0.35,
    "sparsity": 0.3512,
    "sparsity_per_modality": {"vision": 0.41, "text": 0.22, "fusion": 0.37},
    "parameters_before": 1000,
    "parameters_after": 700,
}
SNIPPETS = {
    "retrieval": 'pipeline("zero-shot-image-classification"',
    "vqa": 'pipeline("image-text-to-text"',
    "captioning": 'pipeline("image-text-to-text"',
    "nlvr2": "AutoModelForSequenceClassification.from_pretrained(",
    "pretraining": "AutoModel.from_pretrained(",
}


def _save(tmp_path, task: str, info: ModelCardInfo, **kwargs):
    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    return save_model_folder(task_model_class(task)(config), processor, tmp_path / f"my_{task}", info, **kwargs)


def assert_complete_card(card: ModelCard, pipeline_tag: bool = True) -> None:
    """Every metadata field the Hub reads, and a body without placeholders. (NLVR2 has no pipeline tag: no
    pipeline takes two images; nor has pre-training: no pipeline gives its forward image-text pairs.)"""
    data = card.data
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    assert bool(data.pipeline_tag) == pipeline_tag
    assert "efficientvlm" in data.tags
    assert data.base_model
    assert data.datasets
    assert data.eval_results and all(result.metric_value is not None for result in data.eval_results)
    assert "model-index" in card.content
    assert "<" not in card.text
    assert "2210.07795" in card.text and "@inproceedings" in card.text
    for section in ("## How to use", "## Training data", "## Size and speed", "## Limitations", "## Citation"):
        assert section in card.text


@pytest.mark.parametrize("task", TASKS)
def test_every_tasks_card_has_the_hub_metadata_and_its_snippet(tmp_path, task: str) -> None:
    metric = task_spec(task).primary_metric or "loss"
    info = ModelCardInfo(
        task=task,
        stage="finetune",
        base_model="someone/efficientvlm-teacher",
        datasets=["my_train.json"],
        metrics={metric: 0.5, "note": "not a number"},
        eval_dataset="my_test.json",
    )
    folder = _save(tmp_path, task, info)
    card = ModelCard.load(folder / "README.md")
    # `image-feature-extraction` (the pre-training cards' tag before) raised a TypeError: forward needs texts.
    assert_complete_card(card, pipeline_tag=task not in ("nlvr2", "pretraining"))
    assert card.data.pipeline_tag == task_spec(task).pipeline_tag
    # Cards whose snippets use a pipeline say how to give it what the processor reads (transparent, 16-bit images).
    assert ("to_rgb_image(image)" in card.text) == (task_spec(task).pipeline_tag is not None)
    assert card.data.base_model == "someone/efficientvlm-teacher" and card.data.datasets == ["my_train.json"]
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_name) == (metric, 0.5, "my_test.json")
    assert SNIPPETS[task] in card.text
    # Not pushed: the snippet names the folder.
    assert f'"my_{task}", trust_remote_code=True' in card.text


def test_card_of_a_pruned_demo_model_says_what_it_is(tmp_path) -> None:
    info = ModelCardInfo(
        task="vqa",
        stage="demo",
        role="pruned",
        base_model="someone/evlm-student_vqa",
        teacher_model="someone/evlm-teacher_vqa",
        synthetic_data=True,
        metrics={"vqa_accuracy": 0.58},
        benchmark={"parameters": 700, "gflops": 0.38, "median_ms": 14.2, "speedup": 3.12},
        hardware="a test CPU",
    )
    folder = _save(tmp_path, "vqa", info, pruning_report=REPORT)
    card = ModelCard.load(folder / "README.md")
    assert_complete_card(card)
    assert "pruning" in card.data.tags and "demo" in card.data.tags
    assert card.data.datasets == ["efficientvlm-demo-synthetic-shapes"]
    text = card.text
    assert "synthetic" in text and "not for real use" in text
    assert "3.12x" in text and "a test CPU" in text
    assert "vision: 0.410" in text and "text: 0.220" in text and "fusion: 0.370" in text
    assert "someone/evlm-teacher_vqa" in text
    assert info.commit_message(REPORT) == "efficientvlm demo: pruned vqa model, sparsity 0.35"


def test_unknown_task_raises() -> None:
    with pytest.raises(ValueError, match="Unknown task"):
        ModelCardInfo(task="audio", stage="finetune")
