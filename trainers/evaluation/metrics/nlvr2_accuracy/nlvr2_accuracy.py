"""NLVR2 accuracy, as an `evaluate` metric that loads offline from this folder."""

from collections.abc import Sequence

import datasets
import evaluate

_DESCRIPTION = """
Accuracy of true/false predictions for NLVR2: the fraction of sentences whose predicted label (1 = true,
0 = false) equals the reference label.
"""

_CITATION = """
@inproceedings{suhr2019corpus,
  title={A Corpus for Reasoning about Natural Language Grounded in Photographs},
  author={Suhr, Alane and Zhou, Stephanie and Zhang, Ally and Zhang, Iris and Bai, Huajun and Artzi, Yoav},
  booktitle={ACL},
  year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]` or `list[bool]`): predicted labels, 1/True = the sentence is true.
    references (`list[int]` or `list[bool]`): gold labels.
Returns:
    accuracy (`float`): in [0, 1].
Examples:
    >>> metric = evaluate.load("trainers/metrics/nlvr2_accuracy")
    >>> metric.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])["accuracy"]
    0.75
"""


def nlvr2_accuracy_score(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of equal labels; every label must be 0/1 or a bool."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if len(predictions) == 0:
        raise ValueError("No predictions to score.")
    for name, values in (("prediction", predictions), ("reference", references)):
        for index, value in enumerate(values):
            if int(value) not in (0, 1) or int(value) != value:
                raise ValueError(f"{name} {index} is {value!r}; NLVR2 labels must be 0/1 or booleans.")
    return sum(int(p) == int(r) for p, r in zip(predictions, references)) / len(predictions)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NLVR2Accuracy(evaluate.Metric):
    """NLVR2 accuracy; `compute(predictions=list[int], references=list[int])`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: Sequence[int], references: Sequence[int]) -> dict:
        return {"accuracy": nlvr2_accuracy_score(predictions, references)}
