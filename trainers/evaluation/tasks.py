"""The evaluation routine of each task, one function per task; the task registry (`trainers.tasks`) names which
one a task runs, and `trainers.tasks.evaluate_task` runs it.

- vqa: answers ranked from `answer_list` (X-VLM's k-test), VQA accuracy.
- nlvr2: accuracy of the true/false prediction.
- retrieval: ITC candidates re-ranked by ITM, TR/IR recall@1/5/10.
- captioning: greedy captions, BLEU-4 and CIDEr.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader


@dataclass
class EvaluationResult:
    """`metrics`: the task's scores; `predictions`: the raw prediction of each item (VQA / captioning strings,
    NLVR2 labels); `items`: one JSON-ready record per item with its prediction and its gold answer(s) or ranks (what
    `efficientvlm evaluate --predictions_file` writes)."""

    metrics: dict[str, float]
    predictions: list[Any]
    items: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EvaluationOptions:
    """Settings of an evaluation run; each routine reads the ones it needs.

    Args:
        batch_size: examples (or images) per forward.
        answer_list: VQA's candidate answers.
        k: VQA answers re-ranked per question; retrieval candidates re-ranked by ITM per query.
        structure_masks: optional structure masks passed to every forward (a model being pruned).
        max_new_tokens: captioning: longest generated caption, in tokens after the prompt.
        num_beams: captioning: beam search with this many beams (1: greedy).
        min_new_tokens: captioning: shortest generated caption, in tokens after the prompt ([SEP] held back until
            then).
        caption_level_recall: retrieval: also report recall with identical captions counted as one
            (`txt_r1_caption`, ..., `r_mean_caption`; see `caption_level_recall`).
        itm_score: retrieval: what ranks the re-ranked candidates, `"logit"` (X-VLM's raw match logit),
            `"log_odds"`, `"probability"` (see `itm_match_score`) or `"log_odds+itc"` (see `itm_rerank_scores`).
        xvlm_scoring: VQA: score the k answers as the official code does (the first token's log-probability
            counted twice; see `rank_answers`) instead of by their plain likelihood.
    """

    batch_size: int = 32
    answer_list: list[str] | None = None
    k: int = 128
    structure_masks: dict | None = None
    max_new_tokens: int = 20
    caption_level_recall: bool = False
    itm_score: str = "logit"
    xvlm_scoring: bool = False
    num_beams: int = 1
    min_new_tokens: int = 0

    @property
    def mask_kwargs(self) -> dict[str, Any]:
        return {"structure_masks": self.structure_masks} if self.structure_masks is not None else {}


def _device_of(model: torch.nn.Module) -> torch.device:
    from trainers.evaluation.retrieval import model_device

    return model_device(model)


def evaluate_vqa(model: Any, dataset: Any, processor: Any, options: EvaluationOptions) -> EvaluationResult:
    """Ranks `options.answer_list` (default: the candidates saved with the model) for each question (X-VLM's
    k-test); VQA accuracy. A split without any answers (a test split) is answered unscored: no metric, the
    predictions only; one where only some questions have answers raises, naming the first without."""
    from trainers.evaluation import metrics

    answer_list = options.answer_list or getattr(model.config, "answer_candidates", None)
    batch_size, device = options.batch_size, _device_of(model)
    if not answer_list:
        raise ValueError(
            "VQA evaluation ranks candidate answers: the model has none saved (`config.answer_candidates`); "
            "give `answer_list` (--answer_list)."
        )
    unanswered = dataset.unanswered
    scored = len(unanswered) < len(dataset)
    if scored and unanswered:
        raise ValueError(
            f"{dataset._where(unanswered[0])} has no answers, but other questions of the split have some "
            f"({len(unanswered)} of {len(dataset)} have none): VQA accuracy scores every question against its "
            "answers. A split without any answers is answered unscored."
        )
    if options.answer_list:  # the saved candidates were checked when they were saved
        from modeling_efficientvlm.modeling_efficientvlm_vqa import answer_candidate_ids

        answer_candidate_ids(list(answer_list), processor)
    candidates = processor.tokenizer(answer_list, padding="longest", return_tensors="pt")
    predictions = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        inputs = processor(images=[item["image"] for item in items], text=[item["question"] for item in items])
        ranked = model.rank_answers(
            inputs["pixel_values"].to(device),
            inputs["input_ids"].to(device),
            inputs["attention_mask"].to(device),
            candidates["input_ids"].to(device),
            candidates["attention_mask"].to(device),
            k=min(options.k, len(answer_list)),
            xvlm_scoring=options.xvlm_scoring,
            **options.mask_kwargs,
        )
        predictions += [answer_list[i] for i in ranked.answer_index.tolist()]
    references = [dataset.references[i] for i in range(len(dataset))]
    items = [
        {
            "question_id": dataset.records[i].get("question_id", i),
            "question": dataset.questions[i],
            "prediction": prediction,
            "answers": references[i],
            "vqa_accuracy": metrics.vqa_accuracy_per_question(prediction, references[i]) if references[i] else None,
        }
        for i, prediction in enumerate(predictions)
    ]
    scores = {"vqa_accuracy": float(metrics.vqa_accuracy_score(predictions, references))} if scored else {}
    return EvaluationResult(scores, predictions, items)


def evaluate_nlvr2(model: Any, dataset: Any, processor: Any, options: EvaluationOptions) -> EvaluationResult:
    """Accuracy of the true/false prediction for each pair of images."""
    from trainers.data import NLVR2Collator
    from trainers.evaluation import metrics

    device = _device_of(model)
    predictions, labels = [], []
    batches = DataLoader(dataset, batch_size=options.batch_size, shuffle=False, collate_fn=NLVR2Collator(processor))
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(
            pixel_values=batch["pixel_values"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **options.mask_kwargs,
        ).logits
        predictions += logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    items = [
        {"index": i, "sentence": dataset.sentences[i], "prediction": bool(prediction), "label": bool(label)}
        for i, (prediction, label) in enumerate(zip(predictions, labels))
    ]
    accuracy = float(metrics.nlvr2_accuracy_score(predictions, labels))
    return EvaluationResult({"nlvr2_accuracy": accuracy}, predictions, items)


def evaluate_retrieval(model: Any, dataset: Any, processor: Any, options: EvaluationOptions) -> EvaluationResult:
    """ITC candidates re-ranked by ITM, both directions; TR/IR recall@1/5/10 and their mean."""
    from trainers.evaluation.retrieval import ImageBatches, retrieval_evaluate

    _warn_on_shared_captions(dataset)
    device = _device_of(model)
    # Decoded a batch at a time (twice: ITC embeddings, then ITM re-ranking), never all pixels at once.
    images = ImageBatches(dataset.get_image, dataset.num_images, processor.image_processor, options.batch_size, device)
    texts = processor.tokenizer(dataset.texts, padding="longest", truncation=True, return_tensors="pt")
    result = retrieval_evaluate(
        model,
        images,
        texts["input_ids"].to(device),
        texts["attention_mask"].to(device),
        text_to_image=dataset.text_to_image,
        image_to_texts=dataset.image_to_texts,
        k=options.k,
        batch_size=options.batch_size,
        structure_masks=options.structure_masks,
        score=options.itm_score,
    )
    # Re-ranked: the ITC-only recalls beside them (with k = 0 the metrics are those already).
    metrics = result.metrics_with_itc() if options.k > 0 else dict(result.metrics)
    if options.caption_level_recall:
        from trainers.evaluation.metrics import caption_level_recall

        metrics.update(
            caption_level_recall(
                result.scores_i2t.numpy(), dataset.texts, dataset.text_to_image, result.scores_t2i.numpy()
            )
        )
    return EvaluationResult(metrics, [], _retrieval_items(dataset, result))


def _warn_on_shared_captions(dataset: Any) -> None:
    """Standard recall has one gold image per caption: a caption written for several images counts as a miss
    for all but one of them, whatever the model does."""
    from trainers.evaluation.metrics import normalize_caption

    images_of: dict[str, set[int]] = {}
    for text, image in zip(dataset.texts, dataset.text_to_image):
        images_of.setdefault(normalize_caption(text), set()).add(image)
    shared = {text: images for text, images in images_of.items() if len(images) > 1}
    if shared:
        example, images = next(iter(shared.items()))
        warnings.warn(
            f"{len(shared)} caption(s) describe several images (e.g. {example!r} for images {sorted(images)[:5]}); "
            "standard recall counts each as a miss for all but its own image, so recall is a lower bound here "
            "(`efficientvlm evaluate --caption_level_recall` also reports recall with identical captions as one).",
            UserWarning,
            stacklevel=3,
        )


def _gold_rank(scores: torch.Tensor, golds: list[int]) -> int:
    """1 + the wrong candidates scoring at least the best gold: a tie counts against the query, as in the recalls
    (`retrieval_recall`), so rank 1 is exactly a recall@1 hit."""
    correct = torch.zeros(scores.shape[0], dtype=torch.bool)
    correct[golds] = True
    return int(((scores >= scores[correct].max()) & ~correct).sum()) + 1


def _image_names(dataset: Any) -> list[dict[str, Any]]:
    """How a predictions file names each image of an image-text split, by the evaluation's own index (images in the
    order they first appear in the records, a record's `image_id` shared): `image`, its path as the records give it
    (None for an image stored in a `datasets` column), and `image_id`, the record's own, when it gives one."""
    names = []
    for index in range(dataset.num_images):
        record = dataset.image_record(index)
        value = None if dataset.lazy_image_column else record.get(dataset.image_column)
        if isinstance(value, dict):  # a `datasets` Image value read undecoded: {"path": ..., "bytes": ...}
            value = value.get("path")
        name = {"image_index": index, "image": str(value) if isinstance(value, (str, os.PathLike)) else None}
        if record.get("image_id") is not None:
            name["image_id"] = record["image_id"]
        names.append(name)
    return names


def _retrieval_items(dataset: Any, result: Any, top: int = 5) -> list[dict[str, Any]]:
    """Per query: the gold, its rank (1 = first; see `_gold_rank`) among the re-ranked scores, and the top `top`
    retrieved. Images are named by index (`gold_image`, `top_images`; an image query's `image_index`) with their
    paths beside (`gold_image_path`, `top_image_paths`; an image query's `image`), and the records' own `image_id`s
    (`gold_image_id`, `top_image_ids`, None for an image without one) when they give any; texts by index
    (`text_index`, `gold_texts`, `top_texts`) into the split's captions, each with its text query's record."""
    images = _image_names(dataset)
    with_ids = any("image_id" in name for name in images)
    items = []
    for t, scores in enumerate(result.scores_t2i):
        order = scores.argsort(descending=True).tolist()[:top]
        gold = dataset.text_to_image[t]
        item = {
            "query": "text",
            "text_index": t,
            "text": dataset.texts[t],
            "gold_image": gold,
            "gold_image_path": images[gold]["image"],
            "rank": _gold_rank(scores, [gold]),
            "top_images": order,
            "top_image_paths": [images[i]["image"] for i in order],
        }
        if with_ids:
            item["gold_image_id"] = images[gold].get("image_id")
            item["top_image_ids"] = [images[i].get("image_id") for i in order]
        items.append(item)
    for i, scores in enumerate(result.scores_i2t):
        order = scores.argsort(descending=True).tolist()
        golds = dataset.image_to_texts[i]
        items.append(
            {"query": "image", **images[i], "gold_texts": golds,
             "rank": _gold_rank(scores, list(golds)), "top_texts": order[:top]}
        )  # fmt: skip
    return items


def evaluate_captioning(model: Any, dataset: Any, processor: Any, options: EvaluationOptions) -> EvaluationResult:
    """Captions after the processor's caption prompt (greedy, or beam search with `options.num_beams`); BLEU-4 and
    CIDEr."""
    from trainers.evaluation import metrics

    batch_size, device = options.batch_size, _device_of(model)
    predictions, references = [], []
    for image_index in range(dataset.num_images):
        references.append([dataset.texts[t] for t in dataset.image_to_texts[image_index]])
    prompt = getattr(processor, "caption_prompt", "a picture of ")
    for start in range(0, dataset.num_images, batch_size):
        ids = range(start, min(start + batch_size, dataset.num_images))
        pixel_values = processor.image_processor([dataset.get_image(i) for i in ids], return_tensors="pt")
        prompt_ids = processor.tokenizer([prompt] * len(ids), return_tensors="pt")["input_ids"][:, :-1]
        generated = model.generate(
            pixel_values=pixel_values["pixel_values"].to(device),
            input_ids=prompt_ids.to(device),
            max_new_tokens=options.max_new_tokens,
            min_new_tokens=options.min_new_tokens,
            num_beams=options.num_beams,
            **options.mask_kwargs,
        )
        texts = processor.tokenizer.batch_decode(generated[:, prompt_ids.shape[1] :], skip_special_tokens=True)
        predictions += [text.strip() for text in texts]
    scores = metrics.caption_scores(predictions, references)
    # By index and path as the records give them, and the records' own image_id (see `_image_names`).
    images = _image_names(dataset)
    items = [
        {**images[i], "prediction": prediction, "references": references[i]} for i, prediction in enumerate(predictions)
    ]
    return EvaluationResult({key: float(value) for key, value in scores.items()}, predictions, items)


__all__ = [
    "EvaluationOptions",
    "EvaluationResult",
    "evaluate_captioning",
    "evaluate_nlvr2",
    "evaluate_retrieval",
    "evaluate_vqa",
]
