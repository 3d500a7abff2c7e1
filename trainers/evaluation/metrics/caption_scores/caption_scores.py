"""Captioning BLEU and CIDEr (pycocoevalcap scorers), as an `evaluate` metric that loads offline from this folder."""

import re
from collections.abc import Sequence

import datasets
import evaluate
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

_DESCRIPTION = """
Corpus BLEU-1..4 and CIDEr(-D as in the COCO toolkit's `Cider`) of generated captions, computed with
pycocoevalcap's scorers. The COCO toolkit tokenises with the Java PTB tokenizer; this metric needs no Java
and tokenises itself: lowercase, apostrophes dropped ("don't" -> "dont"), every other non-alphanumeric
character replaced by a space, split on whitespace. Scores can therefore differ slightly from the COCO
server's. CIDEr's IDF comes from the references of the scored corpus, so score a whole split at once
(a single image gives CIDEr 0).
"""

_CITATION = """
@inproceedings{vedantam2015cider,
  title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C Lawrence and Parikh, Devi},
  booktitle={CVPR},
  year={2015}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one generated caption per image.
    references (`list[list[str]]`): the reference captions of each image.
Returns:
    bleu_1, bleu_2, bleu_3, bleu_4, cider (`float`s; BLEU in [0, 1], CIDEr unbounded, ~1.2 for good models).
Examples:
    >>> metric = evaluate.load("trainers/metrics/caption_scores")
    >>> metric.compute(predictions=["a big red square"], references=[["A big red square."]])["bleu_4"]
    1.0
"""

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def tokenize_caption(caption: str) -> str:
    """Lowercase, drop apostrophes, other punctuation -> spaces; returns space-joined tokens."""
    return " ".join(_NON_ALPHANUMERIC.sub(" ", caption.lower().replace("'", "")).split())


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """BLEU-1..4 and CIDEr of `predictions` against `references` (one list of captions per prediction). Empty
    references (nothing left after tokenisation) are left out: as a reference, an empty caption lowers CIDEr (its
    n-gram vectors are zero) though it describes nothing; a prediction with no other reference raises."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists.")
    if len(predictions) == 0:
        raise ValueError("No predictions to score.")
    gts, res = {}, {}
    for index, (prediction, refs) in enumerate(zip(predictions, references)):
        refs = [tokenized for tokenized in (tokenize_caption(r) for r in refs) if tokenized]
        if not refs:
            raise ValueError(f"Prediction {index} has no non-empty reference caption.")
        gts[index] = refs
        res[index] = [tokenize_caption(prediction)]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    result = {f"bleu_{n + 1}": float(score) for n, score in enumerate(bleu)}
    result["cider"] = float(cider)
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionScores(evaluate.Metric):
    """BLEU-1..4 and CIDEr; `compute(predictions=list[str], references=list[list[str]])`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
        return caption_scores(predictions, references)
