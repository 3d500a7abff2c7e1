"""Image-text retrieval evaluation as X-VLM runs it: ITC over all pairs, ITM re-ranking of the top k.

Every text is encoded once and every image twice by default (batched, without gradients: once for its ITC
embedding, once more, a chunk at a time, when its ITM pairs are scored, so the image states are never all held
at once); the ITC similarity matrix picks the
top-`k` texts of every image and the top-`k` images of every text, the ITM head scores those pairs, and
recall@1/5/10 of text retrieval (TR, `txt_r*`) and image retrieval (IR, `img_r*`) are computed on the
re-ranked scores with the `retrieval_recall` metric. The scoring itself lives on the model
([`EfficientVLMForImageTextRetrieval.itm_rerank_scores`]), so remote-code checkpoints carry it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils.logging import tqdm

from modeling_efficientvlm.modeling_efficientvlm_retrieval import ITM_ITC_SCORE, NOT_RERANKED_SCORE, check_itm_score

from .metrics import retrieval_recall

# How reports name each ITM re-ranking score (`itm_match_score`, `itm_rerank_scores`): the ITM head's ...
ITM_SCORE_WORDS = {
    "log_odds+itc": "match log-odds plus the pair's ITC logit (cosine / temperature)",
    "log_odds": "match log-odds",
    "probability": "match probability",
    "logit": "raw match logit alone (X-VLM's score)",
}
_SCORING_METHODS = ("embed_images", "embed_texts", "itc_scores", "itm_rerank_scores")
# The K of the recalls reported (`txt_r1`, `txt_r5`, `txt_r10`, ...).
RECALL_KS = (1, 5, 10)


@dataclass
class RetrievalEvaluation:
    """
    metrics: `txt_r1/5/10`, `txt_r_mean`, `img_r1/5/10`, `img_r_mean` and `r_mean`, fractions in [0, 1].
    scores_i2t: (num_images, num_texts) re-ranked scores of every text for every image (-100 outside the top k).
    scores_t2i: (num_texts, num_images) re-ranked scores of every image for every text.
    itc_scores: (num_images, num_texts) ITC cosine similarities.
    itc_metrics: the same recalls ranked by the ITC similarities alone (what re-ranking starts from).
    itm_metrics: when the re-ranking score adds the ITC logit to the ITM log-odds (`"log_odds+itc"`), the same
        recalls with the top-k candidates ranked by the ITM log-odds alone; else None.
    """

    metrics: dict[str, float]
    scores_i2t: torch.Tensor
    scores_t2i: torch.Tensor
    itc_scores: torch.Tensor
    itc_metrics: dict[str, float]
    itm_metrics: dict[str, float] | None = None

    def metrics_with_itc(self) -> dict[str, float]:
        """`metrics` and, beside them, `itc_metrics` as `itc_txt_r1`, ..., `itc_r_mean` (what re-ranking adds), and
        `itm_metrics` (if any) as `itm_txt_r1`, ..., `itm_r_mean` (what each head gives on its own)."""
        extra = {f"itc_{name}": value for name, value in self.itc_metrics.items()}
        extra.update({f"itm_{name}": value for name, value in (self.itm_metrics or {}).items()})
        return {**self.metrics, **extra}


class ImageBatches:
    """The images of a dataset as processed `pixel_values` batches, decoded when iterated and again each time
    (so [`retrieval_evaluate`] can stream them twice without holding every image's pixels).

    Args:
        get_image: image `i` (e.g. `dataset.get_image`); num_images: how many.
        image_processor: turns a list of images into `{"pixel_values": (batch, 3, H, W)}`.
        batch_size: images per batch; device: where the batches go.
    """

    def __init__(
        self,
        get_image: Callable[[int], Any],
        num_images: int,
        image_processor: Callable[..., Any],
        batch_size: int = 32,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive; got {batch_size}.")
        self.get_image, self.num_images, self.image_processor = get_image, num_images, image_processor
        self.batch_size, self.device = batch_size, device

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, self.num_images, self.batch_size):
            images = [self.get_image(i) for i in range(start, min(start + self.batch_size, self.num_images))]
            pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
            yield pixel_values if self.device is None else pixel_values.to(self.device)


def _image_batches(pixel_values: torch.Tensor | Iterable, batch_size: int) -> Iterable[torch.Tensor]:
    """A (num_images, channels, height, width) tensor in chunks, or the batches of an iterable (tensors or
    mappings with `pixel_values`, e.g. a DataLoader)."""
    if isinstance(pixel_values, torch.Tensor):
        if pixel_values.dim() != 4:
            raise ValueError(
                "`pixel_values` must have shape (num_images, channels, height, width); "
                f"got {tuple(pixel_values.shape)}."
            )
        yield from pixel_values.split(batch_size)
        return
    for batch in pixel_values:
        if isinstance(batch, Mapping):
            if "pixel_values" not in batch:
                raise ValueError(f"An image batch has no `pixel_values`; it has keys {sorted(batch)}.")
            batch = batch["pixel_values"]
        if not isinstance(batch, torch.Tensor):
            raise ValueError(f"Image batches must be tensors or mappings with `pixel_values`; got {type(batch)}.")
        yield batch


def _image_to_texts(
    text_to_image: Sequence[int] | None, image_to_texts: Sequence[Sequence[int]] | None, num_images: int
) -> list[list[int]]:
    if text_to_image is None:
        if image_to_texts is None:
            raise ValueError("Give the ground truth: `text_to_image` (image of each text) or `image_to_texts`.")
        return [list(texts) for texts in image_to_texts]
    groups: list[list[int]] = [[] for _ in range(num_images)]
    for text, image in enumerate(text_to_image):
        if not 0 <= int(image) < num_images:
            raise ValueError(f"Text {text} belongs to image {int(image)}, outside [0, {num_images}).")
        groups[int(image)].append(text)
    if image_to_texts is not None and [sorted(int(t) for t in texts) for texts in image_to_texts] != groups:
        raise ValueError("`text_to_image` and `image_to_texts` describe different ground truths.")
    return groups


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model` runs: its `device` (a `PreTrainedModel`, or an onnxruntime-backed model with no parameters),
    else its parameters' device."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


@torch.no_grad()
def retrieval_evaluate(
    model: torch.nn.Module,
    pixel_values: torch.Tensor | Iterable,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    text_to_image: Sequence[int] | None = None,
    image_to_texts: Sequence[Sequence[int]] | None = None,
    k: int = 128,
    batch_size: int = 32,
    structure_masks: dict | None = None,
    score: str = "logit",
    interpolate_pos_encoding: bool = False,
    stream_image_states: bool = True,
) -> RetrievalEvaluation:
    """
    Evaluates image-text retrieval with ITC candidates re-ranked by ITM (X-VLM's `evaluation` + `itm_eval`).

    Args:
        model: an `EfficientVLMForImageTextRetrieval` (anything with its scoring methods).
        pixel_values: all images, (num_images, channels, height, width), or an iterable of image batches
            (tensors or mappings with `pixel_values`, such as a DataLoader) in image order.
        input_ids, attention_mask: all texts, (num_texts, seq).
        text_to_image: (num_texts,) image index of each text; image_to_texts: the texts of each image.
            One of the two is needed.
        k: candidates re-ranked by ITM per query (X-VLM: 256 on COCO, 128 on Flickr30K); 0: no re-ranking, the
            ITC similarities rank every candidate (no fusion pass, one vision pass).
        batch_size: images / texts per encoder pass and pairs per fusion pass.
        structure_masks: optional pruning masks applied in every pass.
        score: what ranks the ITM candidates: `"logit"`, the raw ITM match logit alone, as X-VLM ranks (the
            default), the match `"log_odds"` / `"probability"` (see `itm_match_score`), or `"log_odds+itc"`, the
            log-odds plus the pair's ITC logit (see `itm_rerank_scores`; the log-odds alone then also in
            `itm_metrics`).
        stream_image_states: hold the image states (image_len tokens per image) of one `batch_size` chunk at a
            time, encoding each chunk a second time to re-rank its pairs (bounded memory; the default), instead
            of keeping every image's states (one vision pass). A one-shot iterator of images is never re-read.

    Returns:
        A [`RetrievalEvaluation`]: recall metrics and the score matrices.
    """
    needed = [*_SCORING_METHODS, *(["itc_logit_scale"] if score == ITM_ITC_SCORE else [])]
    missing = [name for name in needed if not hasattr(model, name)]
    if missing:
        raise ValueError(f"{type(model).__name__} cannot score retrieval by {score!r}: it lacks {missing}.")
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must have shape (num_texts, seq); got {tuple(input_ids.shape)}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive; got {batch_size}.")
    if k < 0:
        raise ValueError(f"`k` must be 0 (ITC alone) or positive; got {k}.")
    check_itm_score(score, rerank=True)  # even when k = 0 re-ranks nothing
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        text_states, text_embeds = [], []
        for ids, mask in zip(input_ids.split(batch_size), attention_mask.split(batch_size)):
            states, embeds = model.embed_texts(ids.to(device), mask.to(device), structure_masks)
            text_states.append(states)
            text_embeds.append(embeds)
        text_states, text_embeds = torch.cat(text_states), torch.cat(text_embeds)
        # Image states (image_len tokens each) are the big tensors: streamed, each chunk is encoded again when
        # its ITM pairs are scored (the vision pass is cheap next to k fusion passes per image and per text), so
        # only one chunk is held at a time. A one-shot iterator cannot be read twice: its chunks are kept.
        stream = (stream_image_states or k == 0) and not isinstance(pixel_values, Iterator)
        image_embeds, kept_states = [], []
        for batch in _image_batches(pixel_values, batch_size):
            states, embeds = model.embed_images(
                batch.to(device), structure_masks, interpolate_pos_encoding=interpolate_pos_encoding
            )
            image_embeds.append(embeds)
            if not stream:
                kept_states.append(states)
            del states
        if not image_embeds:
            raise ValueError("No images to evaluate.")
        image_embeds = torch.cat(image_embeds)

        def image_state_chunks() -> Iterator[tuple[int, torch.Tensor]]:
            first = 0
            batches = _image_batches(pixel_values, batch_size) if stream else kept_states
            for chunk in batches:
                if stream:
                    chunk, _ = model.embed_images(
                        chunk.to(device), structure_masks, interpolate_pos_encoding=interpolate_pos_encoding
                    )
                yield first, chunk
                first += chunk.shape[0]
                progress.update(chunk.shape[0])

        itc_scores = model.itc_scores(image_embeds, text_embeds)
        if k == 0:
            scores_i2t, scores_t2i = itc_scores, itc_scores.t()
        else:
            # The long part (k fusion passes per image and per text): a progress bar on a terminal, none in logs.
            progress = tqdm(total=image_embeds.shape[0], desc="ITM re-ranking", unit="image", disable=None)
            with progress:
                scores_i2t, scores_t2i = model.itm_rerank_scores(
                    image_state_chunks(),
                    text_states,
                    attention_mask.to(device),
                    itc_scores,
                    k=k,
                    batch_size=batch_size,
                    structure_masks=structure_masks,
                    score=score,
                )
    finally:
        model.train(was_training)
    groups = _image_to_texts(text_to_image, image_to_texts, itc_scores.shape[0])
    gold_images = None if text_to_image is None else [int(image) for image in text_to_image]
    itc = itc_scores.float().cpu().numpy()
    itc_metrics = retrieval_recall(itc, groups, itc.T, gold_images, ks=RECALL_KS)
    metrics = (
        itc_metrics
        if k == 0
        else retrieval_recall(scores_i2t.cpu().numpy(), groups, scores_t2i.cpu().numpy(), gold_images, ks=RECALL_KS)
    )
    _warn_on_capped_recalls(k, *itc_scores.shape)
    itm_metrics = None
    if k > 0 and score == ITM_ITC_SCORE:  # the ITM head's part: the ITC logit taken back off the re-ranked pairs
        itc_logits = itc_scores.float().cpu() * model.itc_logit_scale()
        itm_i2t = _without_itc(scores_i2t.cpu(), itc_logits)
        itm_t2i = _without_itc(scores_t2i.cpu(), itc_logits.t())
        itm_metrics = retrieval_recall(itm_i2t.numpy(), groups, itm_t2i.numpy(), gold_images)
    return RetrievalEvaluation(
        metrics=metrics,
        scores_i2t=scores_i2t.cpu(),
        scores_t2i=scores_t2i.cpu().contiguous(),
        itc_scores=itc_scores.cpu(),
        itc_metrics=itc_metrics,
        itm_metrics=itm_metrics,
    )


def _warn_on_capped_recalls(k: int, num_images: int, num_texts: int) -> None:
    """Warns when the re-ranked recall@K of a K above `k` counts only the top `k` candidates: those beyond them are
    never re-ranked (X-VLM's protocol), so such a recall cannot pass ITC's recall@k, however good the ITM head."""
    capped = [
        f"{prefix}_r{recall_k}"
        for prefix, candidates in (("txt", num_texts), ("img", num_images))
        for recall_k in RECALL_KS
        if 0 < k < recall_k and k < candidates
    ]
    if capped:
        warnings.warn(
            f"Re-ranking only the top k={k} ITC candidates of each query (X-VLM's protocol): {', '.join(capped)} (and "
            f"the means with them) count a hit only among those {k}, so they are capped at ITC's recall@{k}. For "
            f"recall at those K read {', '.join(f'itc_{name}' for name in capped)} (ITC alone; `itc_metrics`), or "
            f"re-rank at least {max(RECALL_KS)} candidates (`k`, `--k`).",
            UserWarning,
            stacklevel=4,  # retrieval_evaluate's caller, past its no_grad wrapper
        )


def _without_itc(scores: torch.Tensor, itc_logits: torch.Tensor) -> torch.Tensor:
    """Re-ranked `"log_odds+itc"` scores with the ITC logits subtracted where a pair was re-ranked."""
    return torch.where(scores == NOT_RERANKED_SCORE, scores, scores - itc_logits)


__all__ = ["ITM_SCORE_WORDS", "RECALL_KS", "ImageBatches", "RetrievalEvaluation", "model_device", "retrieval_evaluate"]
