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
) -> dict:
    """
    Recall@K of text retrieval (`txt_r{k}`) and image retrieval (`img_r{k}`) plus their means.

    Args:
        scores_i2t: (I, T) scores of every image against every text.
        image_to_texts: for each of the I images, the indices of its texts.
        scores_t2i: (T, I) scores for image retrieval; defaults to `scores_i2t.T`.
        text_to_image: (T,) image of each text; derived from `image_to_texts` when None.
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
    # Image retrieval: other images scoring >= the text's image.
    gold = scores_t2i[np.arange(num_texts), text_to_image]
    image_ranks = np.count_nonzero(scores_t2i >= gold[:, None], axis=1) - 1

    result = {}
    for prefix, ranks in (("txt", text_ranks), ("img", image_ranks)):
        recalls = [float(np.mean(ranks < k)) for k in ks]
        result.update({f"{prefix}_r{k}": r for k, r in zip(ks, recalls)})
        result[f"{prefix}_r_mean"] = float(np.mean(recalls))
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


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
