"""Metrics: offline `evaluate.load` of each folder, values against hand computations and reference code."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from transformers import EvalPrediction

from trainers.evaluation.metrics import (
    METRIC_NAMES,
    caption_scores,
    make_caption_compute_metrics,
    make_nlvr2_compute_metrics,
    make_retrieval_compute_metrics,
    make_vqa_compute_metrics,
    metric_path,
    nlvr2_accuracy_score,
    normalize_answer,
    retrieval_recall,
    tokenize_caption,
    vqa_accuracy_per_question,
    vqa_accuracy_score,
)

from .data_utils import make_tokenizer


@pytest.fixture(scope="module")
def loaded() -> dict[str, evaluate.EvaluationModule]:
    """Every metric folder through `evaluate.load`, offline (conftest sets HF_*_OFFLINE)."""
    return {name: evaluate.load(metric_path(name)) for name in METRIC_NAMES}


def test_metric_folders_load_offline(loaded) -> None:
    assert {name: type(m).__name__ for name, m in loaded.items()} == {
        "vqa_accuracy": "VQAAccuracy",
        "nlvr2_accuracy": "NLVR2Accuracy",
        "retrieval_recall": "RetrievalRecall",
        "caption_scores": "CaptionScores",
    }
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_path("bleu")


# ------------------------------------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize(
    ("answer", "normalised"),
    [
        ("Two.", "2"),
        ("the dog", "dog"),
        ("An apple\n", "apple"),
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("black/white", "black white"),
        ("yes !", "yes"),
        ("2.5", "2.5"),
        ("1,000", "1000"),
        ("none", "0"),
        ("its", "its"),  # a word, not a contraction
    ],
)
def test_vqa_answer_normalisation(answer: str, normalised: str) -> None:
    assert normalize_answer(answer) == normalised


def test_vqa_accuracy_official_leave_one_out(loaded) -> None:
    ten = ["2", "two"] + ["3"] * 8  # "two" normalises to "2": 2 of 10 annotators
    assert vqa_accuracy_per_question("2", ten) == pytest.approx(0.6)  # (2 * 1/3 + 8 * 2/3) / 10
    assert vqa_accuracy_per_question("3", ten) == pytest.approx(1.0)
    assert vqa_accuracy_per_question("dog", ten) == 0.0
    assert vqa_accuracy_per_question("a", ["a"] * 3 + ["b"] * 7) == pytest.approx(0.9)  # (3 * 2/3 + 7 * 1) / 10
    assert vqa_accuracy_per_question("a", ["a"] * 4 + ["b"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy_per_question("yes", ["yes"]) == 1.0  # a single reference: exact match
    # Fewer than 4 answers (own data): full credit when all the others agree; scores never fall as annotators agree
    # (["red", "red"] scored 1/3, ["red", "red", "red"] 2/3, below ["red"]'s 1.0).
    agreeing = [vqa_accuracy_per_question("red", ["red"] * n) for n in range(1, 11)]
    assert agreeing == [1.0] * 10
    assert vqa_accuracy_per_question("red", ["red", "blue"]) == pytest.approx(0.5)  # (0 + 1) / 2
    assert vqa_accuracy_per_question("red", ["red", "red", "blue"]) == pytest.approx(2 / 3)  # (1/2 + 1/2 + 1) / 3
    assert vqa_accuracy_per_question("red", ["red", "red", "red", "blue"]) == pytest.approx(0.75)  # official from 4
    result = loaded["vqa_accuracy"].compute(predictions=["Two", "3", "cat"], references=[ten, ten, ten])
    assert result == {"vqa_accuracy": pytest.approx((0.6 + 1.0 + 0.0) / 3)}
    with pytest.raises(ValueError, match="no reference answers"):
        vqa_accuracy_score(["a"], [[]])
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        vqa_accuracy_score(["a", "b"], [["a"]])


def test_vqa_compute_metrics() -> None:
    references = [["red"] * 10, ["blue"] * 2 + ["green"] * 8]
    answers = ["red", "blue", "green"]
    compute = make_vqa_compute_metrics(answer_list=answers, references=references)
    logits = np.array([[5.0, 0.0, 1.0], [0.0, 3.0, 1.0]])  # red, blue
    assert compute(EvalPrediction(predictions=logits, label_ids=None)) == {"vqa_accuracy": pytest.approx(0.8)}
    assert compute(EvalPrediction(predictions=np.array([0, 2]), label_ids=None))["vqa_accuracy"] == pytest.approx(1.0)
    by_dict = make_vqa_compute_metrics()({"predictions": ["red", "green"], "references": references})
    assert by_dict["vqa_accuracy"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="answer_list"):
        make_vqa_compute_metrics(references=references)(EvalPrediction(predictions=logits, label_ids=None))


# ---------------------------------------------------------------------------------------------------------- NLVR2


def test_nlvr2_accuracy(loaded) -> None:
    assert loaded["nlvr2_accuracy"].compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1]) == {"accuracy": 0.75}
    assert nlvr2_accuracy_score([True, False], [1, 1]) == 0.5
    with pytest.raises(ValueError, match="prediction 1 is 2"):
        nlvr2_accuracy_score([1, 2], [1, 1])
    compute = make_nlvr2_compute_metrics()
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 1.0], [2.0, 1.0]])  # 1, 0, 1, 0
    assert compute(EvalPrediction(predictions=logits, label_ids=np.array([1, 0, 0, 0]))) == {"accuracy": 0.75}
    # A tuple of model outputs: the first is the task logits; (N,) float logits threshold at 0.
    assert compute(EvalPrediction(predictions=(np.array([1.5, -0.5]), np.zeros(2)), label_ids=np.array([1, 1]))) == {
        "accuracy": 0.5
    }


# ------------------------------------------------------------------------------------------------------ retrieval


def _xvlm_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt) -> dict:
    """X-VLM's `itm_eval` (argsort ranks, percentages) as the reference, divided by 100 at the end."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    result = {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2]}
    result["r_mean"] = (np.mean(tr) + np.mean(ir)) / 2
    return {k: v / 100 for k, v in result.items()}


def test_retrieval_identity_is_perfect(loaded) -> None:
    result = loaded["retrieval_recall"].compute(predictions=np.eye(4).tolist(), references=[[0], [1], [2], [3]])
    assert result["txt_r1"] == result["img_r1"] == result["r_mean"] == 1.0
    assert set(result) == {f"{m}_r{k}" for m in ("txt", "img") for k in (1, 5, 10)} | {
        "txt_r_mean",
        "img_r_mean",
        "r_mean",
    }


def test_retrieval_matches_xvlm_itm_eval() -> None:
    rng = np.random.default_rng(0)
    num_images, per_image = 12, 3
    image_to_texts = [list(range(i * per_image, (i + 1) * per_image)) for i in range(num_images)]
    text_to_image = [i for i in range(num_images) for _ in range(per_image)]
    scores_i2t = rng.normal(size=(num_images, num_images * per_image))
    scores_t2i = rng.normal(size=(num_images * per_image, num_images))  # e.g. after ITM re-ranking
    ours = retrieval_recall(scores_i2t, image_to_texts, scores_t2i)
    reference = _xvlm_itm_eval(scores_i2t, scores_t2i, text_to_image, image_to_texts)
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value), key
    assert 0 < ours["txt_r1"] < ours["txt_r10"] <= 1  # a non-trivial case


def test_retrieval_hand_case_and_errors() -> None:
    # Image 0 owns texts 0, 1; image 1 owns text 2.
    scores = np.array([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    result = retrieval_recall(scores, [[0, 1], [2]], ks=(1, 2))
    # TR: image 0's best text (1) is first; image 1's text 2 is behind text 0 -> rank 1.
    assert (result["txt_r1"], result["txt_r2"]) == (0.5, 1.0)
    # IR (transpose): text 0 prefers image 1 (wrong), text 1 image 0 (right), text 2 image 0 (wrong).
    assert result["img_r1"] == pytest.approx(1 / 3) and result["img_r2"] == 1.0
    # Ties count against the query: constant scores give recall@1 = 0.
    assert retrieval_recall(np.zeros((3, 3)), [[0], [1], [2]])["r_mean"] < 1.0
    assert retrieval_recall(np.zeros((3, 3)), [[0], [1], [2]])["img_r1"] == 0.0
    with pytest.raises(ValueError, match="listed under images 0 and 1"):
        retrieval_recall(np.eye(2), [[0], [0]])
    with pytest.raises(ValueError, match="belongs to no image"):
        retrieval_recall(np.ones((2, 3)), [[0], [1]])
    with pytest.raises(ValueError, match="scores_t2i has shape"):
        retrieval_recall(np.eye(2), [[0], [1]], scores_t2i=np.eye(3))


def test_retrieval_compute_metrics() -> None:
    compute = make_retrieval_compute_metrics(image_to_texts=[[0], [1]])
    assert compute({"scores_i2t": np.eye(2)})["r_mean"] == 1.0
    swapped = compute(EvalPrediction(predictions=(np.eye(2), 1 - np.eye(2)), label_ids=None))
    assert (swapped["txt_r1"], swapped["img_r1"]) == (1.0, 0.0)


# ------------------------------------------------------------------------------------------------------- captions


def test_caption_tokenisation() -> None:
    assert tokenize_caption("A Dog's ball, on the GRASS!") == "a dogs ball on the grass"
    assert tokenize_caption("  black-and-white   photo. ") == "black and white photo"


def test_caption_scores_identical_and_against_pycocoevalcap(loaded) -> None:
    references = [
        ["a red square on a table", "a red box on the table"],
        ["two dogs playing in the grass", "dogs play on grass"],
        ["a man riding a horse on the beach", "a person on a horse"],
    ]
    predictions = [refs[0] for refs in references]
    result = loaded["caption_scores"].compute(predictions=predictions, references=references)
    assert result["bleu_4"] == pytest.approx(1.0) and result["bleu_1"] == pytest.approx(1.0)
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    assert result["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert result["cider"] > 1.0
    # Punctuation and case do not matter after our tokenisation.
    shouted = caption_scores([p.upper() + "." for p in predictions], references)
    assert shouted == pytest.approx(result)
    # A partly wrong corpus matches pycocoevalcap's BLEU-4 on the same tokens.
    wrong = ["a red square on the table", "a cat sleeping", "a man riding a horse"]
    ours = caption_scores(wrong, references)
    bleu = Bleu(4).compute_score(gts, {i: [p] for i, p in enumerate(wrong)}, verbose=0)[0]
    assert ours["bleu_4"] == pytest.approx(bleu[3]) and ours["bleu_4"] < 1.0
    with pytest.raises(ValueError, match="no non-empty reference"):
        caption_scores(["a"], [["!!"]])
    # An empty reference beside real ones lowered CIDEr (6.56 instead of 7.5 for perfect predictions): left out.
    padded = [[*refs, "", "?"] for refs in references]
    assert caption_scores(predictions, padded) == pytest.approx(caption_scores(predictions, references))


def test_caption_compute_metrics_decodes_ids(tmp_path) -> None:
    tokenizer = make_tokenizer(tmp_path)
    references = [["a red square", "a red box"], ["two blue balls", "blue balls"]]
    generated = tokenizer(["a picture of a red square", "a picture of two blue balls"], padding=True)["input_ids"]
    ids = np.array(generated)
    ids[0, -1] = -100  # Trainer pads generated ids with -100
    compute = make_caption_compute_metrics(tokenizer=tokenizer, references=references)
    result = compute(EvalPrediction(predictions=ids, label_ids=None))
    assert result == pytest.approx(caption_scores(["a red square", "two blue balls"], references))
    assert result["bleu_1"] == pytest.approx(1.0)
    # The prompt goes word for word: "a picture offers ..." was scored as "fers ...".
    strings = make_caption_compute_metrics(references=[["a picture offers a red square"]])
    for caption in ("a picture offers a red square", "A Picture of a picture offers a red square"):
        assert strings({"predictions": [caption], "references": None})["bleu_4"] == pytest.approx(1.0), caption
