"""One place that knows, for each task, its model class, dataset, collator and evaluation routine.

The command-line stages (`finetune`, `prune`, `evaluate`, `demo`) all go through this table, so a task
behaves the same whichever stage runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

TASKS = ("pretraining", "retrieval", "vqa", "nlvr2", "captioning")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")


def task_model_class(task: str) -> type:
    """The `PreTrainedModel` class of `task`."""
    _check_task(task)
    import modeling_efficientvlm as mv

    return {
        "pretraining": mv.EfficientVLMForPreTraining,
        "retrieval": mv.EfficientVLMForImageTextRetrieval,
        "vqa": mv.EfficientVLMForQuestionAnswering,
        "nlvr2": mv.EfficientVLMForVisualReasoning,
        "captioning": mv.EfficientVLMForConditionalGeneration,
    }[task]


def task_model_from(task: str, source: Any) -> Any:
    """A `task` model initialised from `source`: a model or a saved folder, of the same task or of another
    (typically a pre-training checkpoint), as X-VLM initialises its fine-tuning.

    Backbone weights always carry over; the pre-training MLM head initialises the captioning LM head and the
    VQA answer decoder's head; the VQA answer decoder starts from the fusion layers; both NLVR2
    cross-attentions start from the single one; the ITM head carries over to retrieval and NLVR2's classifier.
    """
    model_class = task_model_class(task)
    if isinstance(source, (str, os.PathLike)):
        from modeling_efficientvlm import EfficientVLMConfig

        saved = EfficientVLMConfig.from_pretrained(source)
        if model_class.__name__ in (saved.architectures or []):
            return model_class.from_pretrained(source)
        from transformers import AutoModelForPreTraining

        source = (
            AutoModelForPreTraining.from_pretrained(source)
            if "EfficientVLMForPreTraining" in (saved.architectures or [])
            else task_model_class("retrieval").from_pretrained(source)
        )
    if isinstance(source, model_class):
        return source
    if task == "nlvr2":
        return model_class.from_pretraining(source)
    model = model_class(source.config)
    model.load_state_dict(source.state_dict(), strict=False)  # shared names: backbone, ITM head
    mlm_head = getattr(source, "mlm_head", None)
    if task == "captioning" and mlm_head is not None:
        model.lm_head.load_state_dict(mlm_head.state_dict())
    if task == "vqa":
        model.init_answer_decoder_from_fusion(mlm_head)
    model.tie_weights()
    return model


def build_dataset(task: str, data: Any, image_root: str | os.PathLike | None, processor: Any = None):
    """The dataset of `task` over an X-VLM JSON file, a list of records or a `datasets.Dataset`."""
    _check_task(task)
    from trainers.data import ImageTextDataset, NLVR2Dataset, VQADataset

    dataset_class = {"vqa": VQADataset, "nlvr2": NLVR2Dataset}.get(task, ImageTextDataset)
    return dataset_class(data, image_root=image_root, processor=processor)


def build_collator(task: str, processor: Any, **kwargs: Any):
    """The collator turning dataset items of `task` into model inputs."""
    _check_task(task)
    from trainers import data

    collator_class = {
        "pretraining": data.PretrainingCollator,
        "retrieval": data.ImageTextCollator,
        "vqa": data.VQACollator,
        "nlvr2": data.NLVR2Collator,
        "captioning": data.CaptioningCollator,
    }[task]
    return collator_class(processor, **kwargs)


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    predictions: list[Any]


def _batches(dataset: Any, collate: Any, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_task(
    task: str,
    model: Any,
    dataset: Any,
    processor: Any,
    batch_size: int = 32,
    answer_list: list[str] | None = None,
    k: int = 128,
    structure_masks: dict | None = None,
    max_new_tokens: int = 20,
) -> EvaluationResult:
    """Runs `task`'s evaluation routine and returns its metrics (and per-example predictions).

    - vqa: answers ranked from `answer_list` (X-VLM's k-test), VQA accuracy.
    - nlvr2: accuracy of the true/false prediction.
    - retrieval: ITC candidates re-ranked by ITM, TR/IR recall@1/5/10.
    - captioning: greedy captions, BLEU-4 and CIDEr.
    """
    _check_task(task)
    from trainers.evaluation import metrics

    model.eval()
    device = _device_of(model)
    masks = {"structure_masks": structure_masks} if structure_masks is not None else {}

    if task == "vqa":
        if not answer_list:
            raise ValueError("VQA evaluation ranks a list of candidate answers: give `answer_list`.")
        candidates = processor.tokenizer(answer_list, padding="longest", return_tensors="pt")
        predictions, references = [], []
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            inputs = processor(images=[item["image"] for item in items], text=[item["question"] for item in items])
            ranked = model.rank_answers(
                inputs["pixel_values"].to(device),
                inputs["input_ids"].to(device),
                inputs["attention_mask"].to(device),
                candidates["input_ids"].to(device),
                candidates["attention_mask"].to(device),
                k=min(k, len(answer_list)),
                **masks,
            )
            predictions += [answer_list[i] for i in ranked.answer_index.tolist()]
        references = [dataset.references[i] for i in range(len(dataset))]
        accuracy = metrics.vqa_accuracy_score(predictions, references)
        return EvaluationResult({"vqa_accuracy": float(accuracy)}, predictions)

    if task == "nlvr2":
        predictions, labels = [], []
        for batch in _batches(dataset, build_collator("nlvr2", processor), batch_size):
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(
                pixel_values=batch["pixel_values"],
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                **masks,
            ).logits
            predictions += logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
        return EvaluationResult(
            {"nlvr2_accuracy": float(metrics.nlvr2_accuracy_score(predictions, labels))}, predictions
        )

    if task == "retrieval":
        from trainers.evaluation.retrieval import retrieval_evaluate

        images = processor.image_processor(
            [dataset.get_image(i) for i in range(dataset.num_images)], return_tensors="pt"
        )["pixel_values"]
        texts = processor.tokenizer(dataset.texts, padding="longest", truncation=True, return_tensors="pt")
        result = retrieval_evaluate(
            model,
            images.to(device),
            texts["input_ids"].to(device),
            texts["attention_mask"].to(device),
            text_to_image=dataset.text_to_image,
            image_to_texts=dataset.image_to_texts,
            k=k,
            batch_size=batch_size,
            structure_masks=structure_masks,
        )
        return EvaluationResult(dict(result.metrics), [])

    if task == "captioning":
        predictions, references = [], []
        for image_id in range(dataset.num_images):
            references.append([dataset.texts[t] for t in dataset.image_to_texts[image_id]])
        prompt = getattr(processor, "caption_prompt", "a picture of ")
        for start in range(0, dataset.num_images, batch_size):
            ids = range(start, min(start + batch_size, dataset.num_images))
            pixel_values = processor.image_processor([dataset.get_image(i) for i in ids], return_tensors="pt")
            prompt_ids = processor.tokenizer([prompt] * len(ids), return_tensors="pt")["input_ids"][:, :-1]
            generated = model.generate(
                pixel_values=pixel_values["pixel_values"].to(device),
                input_ids=prompt_ids.to(device),
                max_new_tokens=max_new_tokens,
                **masks,
            )
            texts = processor.tokenizer.batch_decode(generated[:, prompt_ids.shape[1] :], skip_special_tokens=True)
            predictions += [text.strip() for text in texts]
        scores = metrics.caption_scores(predictions, references)
        return EvaluationResult({key: float(value) for key, value in scores.items()}, predictions)

    raise ValueError("Pre-training has no evaluation routine here; evaluate a downstream task instead.")


def save_with_processor(model: Any, processor: Any, output_dir: str | os.PathLike) -> Path:
    """Saves a model and its processor side by side, so the folder is complete for `from_pretrained`."""
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    return output_dir
