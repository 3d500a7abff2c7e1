"""Image-text retrieval recall@K (X-VLM's `itm_eval`), as an `evaluate` metric that loads offline from this folder."""

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Recall@K for image-text retrieval, as X-VLM's `itm_eval` reports it, but as fractions in [0, 1]
(X-VLM prints percentages).

- Text retrieval (TR, image -> text; `txt_r1/5/10`): for each image, the rank of its best-scored correct
  caption among all captions.
- Image retrieval (IR, text -> image; `img_r1/5/10`): for each caption, the rank of its image.
- `txt_r_mean`, `img_r_mean`: the means of the three recalls; `r_mean`: the mean of those two.

Ties count against the query: the rank is the number of wrong candidates scoring at least as high as the
correct one, so constant scores give recall@1 = 0, not 1.

Caption-level recall (`caption_level_recall`, keys ending in `_caption`): when several images share an identical
caption, standard recall has one gold image per caption and counts the others as misses; at caption level a
text query is a hit if any image with that caption is retrieved, and an image query if any text identical to
one of its captions is.
"""

_CITATION = """
@inproceedings{zeng2022multi,
  title={Multi-Grained Vision Language Pre-Training: Aligning Texts with Visual Concepts},
  author={Zeng, Yan and Zhang, Xinsong and Li, Hang},
  booktitle={ICML},
  year={2022}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): the image x text score matrix (I, T), one row per image.
    references (`list[list[int]]`): for each image, the indices of its captions (`image_to_texts`).
    scores_t2i (`array`, *optional*): a separate text x image matrix (T, I) for image retrieval (e.g.
        after ITM re-ranking); defaults to the transpose of `predictions`.
    text_to_image (`list[int]`, *optional*): the image of each caption; derived from `references` if absent.
    text_to_images (`list[list[int]]`, *optional*): several gold images per caption (caption-level recall).
Returns:
    txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, img_r5, img_r10, img_r_mean, r_mean (`float`s in [0, 1]).
Examples:
    >>> metric = evaluate.load("trainers/metrics/retrieval_recall")
    >>> metric.compute(predictions=[[1.0, 0.0], [0.0, 1.0]], references=[[0], [1]])["r_mean"]
    1.0
"""


def retrieval_recall(
    scores_i2t: np.ndarray,
    image_to_texts: Sequence[Sequence[int]],
    scores_t2i: np.ndarray | None = None,
    text_to_image: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    text_to_images: Sequence[Sequence[int]] | None = None,
) -> dict:
    """
    Recall@K of text retrieval (`txt_r{k}`) and image retrieval (`img_r{k}`) plus their means.

    Args:
        scores_i2t: (I, T) scores of every image against every text.
        image_to_texts: for each of the I images, the indices of its texts.
        scores_t2i: (T, I) scores for image retrieval; defaults to `scores_i2t.T`.
        text_to_image: (T,) image of each text; derived from `image_to_texts` when None.
        text_to_images: optional gold images of each text when a text has several (its best-scored one counts,
            as for text retrieval); image retrieval then uses these instead of `text_to_image`.
    """
    scores_i2t = np.asarray(scores_i2t, dtype=np.float64)
    if scores_i2t.ndim != 2:
        raise ValueError(f"scores_i2t must be an (images, texts) matrix; got shape {scores_i2t.shape}.")
    num_images, num_texts = scores_i2t.shape
    scores_t2i = scores_i2t.T if scores_t2i is None else np.asarray(scores_t2i, dtype=np.float64)
    if scores_t2i.shape != (num_texts, num_images):
        raise ValueError(f"scores_t2i has shape {scores_t2i.shape}; expected {(num_texts, num_images)}.")
    if len(image_to_texts) != num_images:
        raise ValueError(f"{len(image_to_texts)} image_to_texts entries for {num_images} images.")
    if text_to_image is None:
        owner = np.full(num_texts, -1)
        for image, texts in enumerate(image_to_texts):
            for text in texts:
                if not 0 <= text < num_texts:
                    raise ValueError(f"Image {image} lists text {text}, outside [0, {num_texts}).")
                if owner[text] != -1:
                    raise ValueError(f"Text {text} is listed under images {owner[text]} and {image}.")
                owner[text] = image
        if (owner == -1).any():
            raise ValueError(f"Text {int(np.argmax(owner == -1))} belongs to no image; pass text_to_image.")
        text_to_image = owner
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    if text_to_image.shape != (num_texts,) or not ((0 <= text_to_image) & (text_to_image < num_images)).all():
        raise ValueError(f"text_to_image must hold {num_texts} image indices in [0, {num_images}).")

    # Text retrieval: wrong texts scoring >= the best correct text of the image.
    text_ranks = np.empty(num_images)
    for image, texts in enumerate(image_to_texts):
        if len(texts) == 0:
            raise ValueError(f"Image {image} has no texts.")
        correct = np.zeros(num_texts, dtype=bool)
        correct[list(texts)] = True
        best = scores_i2t[image, correct].max()
        text_ranks[image] = np.count_nonzero((scores_i2t[image] >= best) & ~correct)
    # Image retrieval: other images scoring >= the text's image (its best-scored one, with several).
    if text_to_images is None:
        gold = scores_t2i[np.arange(num_texts), text_to_image]
        image_ranks = np.count_nonzero(scores_t2i >= gold[:, None], axis=1) - 1
    else:
        if len(text_to_images) != num_texts:
            raise ValueError(f"{len(text_to_images)} text_to_images entries for {num_texts} texts.")
        image_ranks = np.empty(num_texts)
        for text, images in enumerate(text_to_images):
            if len(images) == 0 or not all(0 <= image < num_images for image in images):
                raise ValueError(f"Text {text} needs gold images in [0, {num_images}); got {list(images)}.")
            correct = np.zeros(num_images, dtype=bool)
            correct[list(images)] = True
            best = scores_t2i[text, correct].max()
            image_ranks[text] = np.count_nonzero((scores_t2i[text] >= best) & ~correct)

    result = {}
    for prefix, ranks in (("txt", text_ranks), ("img", image_ranks)):
        recalls = [float(np.mean(ranks < k)) for k in ks]
        result.update({f"{prefix}_r{k}": r for k, r in zip(ks, recalls)})
        result[f"{prefix}_r_mean"] = float(np.mean(recalls))
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def normalize_caption(text: str) -> str:
    """The form in which two captions count as identical: lower case, runs of white space as one space."""
    return " ".join(text.lower().split())


def caption_level_golds(
    texts: Sequence[str], text_to_image: Sequence[int], num_images: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(image_to_texts, text_to_images) with identical captions ([`normalize_caption`]) as one: an image's gold
    texts are every text identical to one of its captions; a text's gold images, every image with that caption."""
    images_of: dict[str, set[int]] = {}
    texts_of: dict[str, set[int]] = {}
    for text, (caption, image) in enumerate(zip(texts, text_to_image)):
        key = normalize_caption(caption)
        images_of.setdefault(key, set()).add(int(image))
        texts_of.setdefault(key, set()).add(text)
    image_to_texts: list[set[int]] = [set() for _ in range(num_images)]
    for key, images in images_of.items():
        for image in images:
            image_to_texts[image] |= texts_of[key]
    text_to_images = [sorted(images_of[normalize_caption(caption)]) for caption in texts]
    return [sorted(group) for group in image_to_texts], text_to_images


def caption_level_recall(
    scores_i2t: np.ndarray,
    texts: Sequence[str],
    text_to_image: Sequence[int],
    scores_t2i: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """Recall@K as [`retrieval_recall`] with identical captions counted as one ([`caption_level_golds`]); the
    keys end in `_caption` (`txt_r1_caption`, ..., `r_mean_caption`)."""
    scores_i2t = np.asarray(scores_i2t, dtype=np.float64)
    if len(texts) != scores_i2t.shape[1] or len(text_to_image) != len(texts):
        raise ValueError(
            f"{len(texts)} texts and {len(text_to_image)} text_to_image entries for {scores_i2t.shape[1]} scored texts."
        )
    image_to_texts, text_to_images = caption_level_golds(texts, text_to_image, scores_i2t.shape[0])
    recalls = retrieval_recall(scores_i2t, image_to_texts, scores_t2i, text_to_image, ks, text_to_images)
    return {f"{name}_caption": value for name, value in recalls.items()}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    """Recall@1/5/10 for image-text retrieval; see `retrieval_recall` for large matrices (no Arrow copy)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(
        self,
        predictions: Sequence[Sequence[float]],
        references: Sequence[Sequence[int]],
        scores_t2i: np.ndarray | None = None,
        text_to_image: Sequence[int] | None = None,
    ) -> dict:
        return retrieval_recall(np.asarray(predictions), references, scores_t2i, text_to_image)
