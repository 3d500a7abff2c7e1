"""
Task metrics as `evaluate.Metric` modules and `compute_metrics` builders for `transformers.Trainer`.

Each metric lives in its own folder so it also loads offline with `evaluate.load(metric_path(name))`:
`vqa_accuracy`, `nlvr2_accuracy`, `retrieval_recall`, `caption_scores`. The builders below call the
metrics' plain functions directly (no Arrow round trip), and accept either a Trainer `EvalPrediction`
or a dict, as documented on each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .caption_scores.caption_scores import CaptionScores, caption_scores, tokenize_caption
from .nlvr2_accuracy.nlvr2_accuracy import NLVR2Accuracy, nlvr2_accuracy_score
from .retrieval_recall.retrieval_recall import (
    RetrievalRecall,
    caption_level_golds,
    caption_level_recall,
    normalize_caption,
    retrieval_recall,
)
from .vqa_accuracy.vqa_accuracy import VQAAccuracy, normalize_answer, vqa_accuracy_per_question, vqa_accuracy_score

METRIC_NAMES = ("vqa_accuracy", "nlvr2_accuracy", "retrieval_recall", "caption_scores")
ComputeMetrics = Callable[[Any], dict[str, float]]


def metric_path(name: str) -> str:
    """The folder to give `evaluate.load` for metric `name` (works offline)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; choose one of {METRIC_NAMES}.")
    return str(Path(__file__).parent / name)


def _first(predictions: Any) -> Any:
    # Trainer hands over a tuple when the model returns several tensors; the first is the task output.
    return predictions[0] if isinstance(predictions, tuple) else predictions


def _split(eval_pred: Any) -> tuple[Any, Any]:
    """(predictions, references-or-label_ids) from an `EvalPrediction`, a dict or a pair."""
    if isinstance(eval_pred, dict):
        return eval_pred.get("predictions"), eval_pred.get("references", eval_pred.get("label_ids"))
    if hasattr(eval_pred, "predictions"):
        return eval_pred.predictions, getattr(eval_pred, "label_ids", None)
    predictions, references = eval_pred
    return predictions, references


def _predictions_and_references(
    eval_pred: Any, references: Sequence[Sequence[str]] | None, task: str, what: str
) -> tuple[Any, Sequence[Sequence[str]]]:
    """Predictions and references of a text task: a dict's own references, else the builder's."""
    predictions, refs = _split(eval_pred)
    refs = references if refs is None or not isinstance(eval_pred, dict) else refs
    if refs is None:
        raise ValueError(f"{task} needs the {what}: pass `references` to the builder or in the dict.")
    return _first(predictions), refs


def _are_strings(predictions: Any) -> bool:
    return isinstance(predictions, Sequence) and bool(predictions) and isinstance(predictions[0], str)


def make_vqa_compute_metrics(
    answer_list: Sequence[str] | None = None, references: Sequence[Sequence[str]] | None = None
) -> ComputeMetrics:
    """
    `compute_metrics` for VQA; returns `{"vqa_accuracy": float}`.

    Accepts a dict `{"predictions": list[str], "references": list[list[str]]}` (references may be left
    out if given here), or an `EvalPrediction` whose predictions are answer indices (N,) or answer
    scores (N, A) into `answer_list`; the references are then this builder's `references`
    (e.g. `VQADataset.references`), in evaluation order.
    """

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        predictions, refs = _predictions_and_references(eval_pred, references, "VQA", "reference answers")
        if not _are_strings(predictions):
            array = np.asarray(predictions)
            if array.dtype.kind in "US":
                predictions = array.tolist()
            else:
                if answer_list is None:
                    raise ValueError("Predictions are indices or scores: pass `answer_list` to the builder.")
                indices = array.argmax(-1) if array.ndim == 2 else array.astype(np.int64)
                predictions = [answer_list[int(i)] for i in indices]
        return {"vqa_accuracy": vqa_accuracy_score(predictions, refs)}

    return compute_metrics


def make_nlvr2_compute_metrics() -> ComputeMetrics:
    """
    `compute_metrics` for NLVR2; returns `{"accuracy": float}`.

    Predictions: logits (N, 2) (argmax), labels/bools (N,), or single logits (N,) float (> 0 means true);
    references: the `label_ids` of an `EvalPrediction` or `"references"` of a dict.
    """

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        predictions, references = _split(eval_pred)
        predictions = np.asarray(_first(predictions))
        if predictions.ndim == 2:
            predictions = predictions.argmax(-1)
        elif predictions.dtype.kind == "f":
            predictions = (predictions > 0).astype(np.int64)
        references = np.asarray(references).astype(np.int64).tolist()
        return {"accuracy": nlvr2_accuracy_score(predictions.astype(np.int64).tolist(), references)}

    return compute_metrics


def make_retrieval_compute_metrics(
    image_to_texts: Sequence[Sequence[int]], text_to_image: Sequence[int] | None = None
) -> ComputeMetrics:
    """
    `compute_metrics` for image-text retrieval; returns `txt_r1/5/10`, `img_r1/5/10`, means and `r_mean`.

    Accepts a dict `{"scores_i2t": (I, T), "scores_t2i": optional (T, I)}` or an `EvalPrediction` whose
    predictions are the (I, T) matrix or a tuple (scores_i2t, scores_t2i). `image_to_texts` /
    `text_to_image` come from `ImageTextDataset`.
    """

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        if isinstance(eval_pred, dict) and "scores_i2t" in eval_pred:
            scores_i2t, scores_t2i = eval_pred["scores_i2t"], eval_pred.get("scores_t2i")
        else:
            predictions, _ = _split(eval_pred)
            if isinstance(predictions, tuple) and len(predictions) == 2 and np.ndim(predictions[0]) == 2:
                scores_i2t, scores_t2i = predictions
            else:
                scores_i2t, scores_t2i = predictions, None
        return retrieval_recall(np.asarray(scores_i2t), image_to_texts, scores_t2i, text_to_image)

    return compute_metrics


def make_caption_compute_metrics(
    tokenizer: Any = None, references: Sequence[Sequence[str]] | None = None, prompt: str = "a picture of "
) -> ComputeMetrics:
    """
    `compute_metrics` for captioning; returns `bleu_1..4` and `cider`.

    Accepts a dict `{"predictions": list[str], "references": list[list[str]]}` (references may come from
    this builder) or an `EvalPrediction` whose predictions are generated token ids (N, L) (-100 treated as
    padding), decoded with `tokenizer` (special tokens skipped); a leading `prompt` is removed from each
    decoded caption, whole words only.
    """

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        predictions, refs = _predictions_and_references(eval_pred, references, "Captioning", "reference captions")
        if not _are_strings(predictions):
            if tokenizer is None:
                raise ValueError("Predictions are token ids: pass `tokenizer` to the builder.")
            ids = np.asarray(predictions)
            ids = np.where(ids < 0, tokenizer.pad_token_id, ids)
            predictions = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        prompt_words = prompt.lower().split()
        captions = []
        for caption in predictions:
            words = caption.split()
            # The prompt is removed word for word: "a picture offers ..." keeps its "offers".
            if prompt_words and [word.lower() for word in words[: len(prompt_words)]] == prompt_words:
                words = words[len(prompt_words) :]
            captions.append(" ".join(words))
        return caption_scores(captions, refs)

    return compute_metrics


__all__ = [
    "METRIC_NAMES",
    "CaptionScores",
    "NLVR2Accuracy",
    "RetrievalRecall",
    "VQAAccuracy",
    "caption_level_golds",
    "caption_level_recall",
    "caption_scores",
    "make_caption_compute_metrics",
    "make_nlvr2_compute_metrics",
    "make_retrieval_compute_metrics",
    "make_vqa_compute_metrics",
    "metric_path",
    "nlvr2_accuracy_score",
    "normalize_answer",
    "normalize_caption",
    "retrieval_recall",
    "tokenize_caption",
    "vqa_accuracy_per_question",
    "vqa_accuracy_score",
]
