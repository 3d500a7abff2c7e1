"""VQA accuracy (the official VQA v2 metric), as an `evaluate` metric that loads offline from this folder."""

import re
from collections.abc import Sequence

import datasets
import evaluate

_DESCRIPTION = """
Official VQA accuracy: with the 10 annotator answers of a question, the score of a prediction is the mean,
over the 10 subsets of 9 annotators, of min(1, #annotators in the subset who gave the prediction / 3).
A prediction given by 2 of 10 annotators scores 0.6 (8 subsets contain both: 2/3; 2 contain one: 1/3);
3 or more matches score 1.0 after the averaging only if at least 4 annotators agree (3 of 10 gives 0.9).
With a single reference answer, leave-one-out is undefined and the score is exact match (0 or 1). With 2 or 3
answers (one's own data) no subset holds 3 other annotators, so full credit needs all the others there (the threshold
is min(3, answers - 1)): the score never falls as annotators agree (["red", "red"] scored 1/3 with the fixed 3, below
["red"]); from 4 answers on the formula is the official one.

Answers and predictions are normalised as the official evaluation script does: newlines/tabs to spaces,
punctuation removed or replaced by a space, periods not followed by a digit removed, lowercase, number
words "none"/"zero"..."ten" to digits, articles (a, an, the) dropped, apostrophe-less contractions restored
("dont" -> "don't"). Unlike the official script, normalisation is always applied (it skips it when all
annotators agree), so "Two." matches "2" in every case.
"""

_CITATION = """
@inproceedings{goyal2017making,
  title={Making the V in VQA Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one predicted answer per question.
    references (`list[list[str]]`): the annotator answers of each question (usually 10, repeats kept).
Returns:
    vqa_accuracy (`float`): mean accuracy in [0, 1].
Examples:
    >>> metric = evaluate.load("trainers/metrics/vqa_accuracy")
    >>> metric.compute(predictions=["two"], references=[["2", "2"] + ["3"] * 8])["vqa_accuracy"]
    0.6
"""

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ","]
_PUNCTUATION += ["?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Canonical contractions. Written without apostrophes, forms that are also common words ("its", "well",
# "were", "ill", "hell", "shell", "wed", "id", "lets", "shed", "whore") are left out, as in the official list.
_CANONICAL_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't shouldn't've somebody'd
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't
we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's
who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've
""".split()


def _contraction_table() -> dict:
    """Maps every spelling with some apostrophes dropped to the canonical contraction."""
    table = {}
    for canonical in _CANONICAL_CONTRACTIONS:
        positions = [i for i, char in enumerate(canonical) if char == "'"]
        for subset in range(1, 2 ** len(positions)):
            dropped = {positions[b] for b in range(len(positions)) if subset >> b & 1}
            table["".join(c for i, c in enumerate(canonical) if i not in dropped)] = canonical
    return table


_CONTRACTIONS = _contraction_table()


def _process_punctuation(text: str) -> str:
    # The official rule: a mark touching a space (or any mark, when a comma sits between digits) is deleted,
    # otherwise it becomes a space ("black/white" -> "black white", "yes !" -> "yes ").
    output = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            output = output.replace(mark, "")
        else:
            output = output.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", output)


def _process_digits_and_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """Normalises an answer with the official VQA rules (see the module description)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(answer))


def vqa_accuracy_per_question(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy of one prediction against its annotator answers (leave-one-out average; with 2 or 3 answers
    full credit needs all the other annotators, see the module description)."""
    if len(answers) == 0:
        raise ValueError("A question has no reference answers.")
    prediction = normalize_answer(prediction)
    matches = [normalize_answer(answer) == prediction for answer in answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    # Leaving annotator j out leaves total - matches[j] matching annotators among the others; full credit takes 3
    # of them, or all of them when there are fewer (see the module description).
    needed = float(min(3, len(matches) - 1))
    return sum(min(1.0, (total - match) / needed) for match in matches) / len(matches)


def vqa_accuracy_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean official VQA accuracy over questions, in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists.")
    if len(predictions) == 0:
        raise ValueError("No predictions to score.")
    return sum(vqa_accuracy_per_question(p, r) for p, r in zip(predictions, references)) / len(predictions)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VQAAccuracy(evaluate.Metric):
    """Official VQA accuracy; `compute(predictions=list[str], references=list[list[str]])`."""

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
        return {"vqa_accuracy": vqa_accuracy_score(predictions, references)}
