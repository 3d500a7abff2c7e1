"""`torch.compile(fullgraph=True)` of every task model's inference call on pruned tiny models (empty and uneven
layers): no graph break, the same outputs as eager; the hard-negative sampling of training compiles too, and its
value check still fails loudly when compiled."""

from __future__ import annotations

import pytest
import torch

from modeling_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMForConditionalGeneration,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForQuestionAnswering,
    EfficientVLMForVisualReasoning,
)
from modeling_efficientvlm.loss_efficientvlm import itm_negative_labels, sample_hard_negatives

from .model_utils import prune_unevenly

CLS, SEP, PAD = 2, 3, 0


def _model(model_class: type) -> torch.nn.Module:
    torch.manual_seed(0)
    text = {"bos_token_id": CLS, "eos_token_id": SEP, "pad_token_id": PAD}
    return prune_unevenly(model_class(EfficientVLMConfig.from_preset("tiny", text_config=text)).eval())


def _inputs(batch: int = 2, seq: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (batch, seq), generator=generator)
    ids[:, 0] = CLS
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    return torch.randn(batch, 3, 32, 32, generator=generator), ids, mask


def _retrieval_scores():
    model = _model(EfficientVLMForImageTextRetrieval)
    pixel_values, ids, mask = _inputs()

    def score(pixel_values, ids, mask):
        itc = model(pixel_values, ids, mask, return_loss=False).logits_per_image
        image_states, _ = model.embed_images(pixel_values)
        text_states, _ = model.embed_texts(ids, mask)
        return itc, model.itm_scores(image_states, text_states, mask)

    return score, (pixel_values, ids, mask)


def _vqa_ranking():
    model = _model(EfficientVLMForQuestionAnswering)
    candidates = torch.tensor([[CLS, 7, SEP, PAD], [CLS, 9, 12, SEP], [CLS, 30, SEP, PAD]])

    def rank(pixel_values, ids, mask):
        ranking = model.rank_answers(pixel_values, ids, mask, candidates, (candidates != PAD).long(), k=2)
        return ranking.topk_indices, ranking.topk_scores

    return rank, _inputs()


def _nlvr2_logits():
    model = _model(EfficientVLMForVisualReasoning)
    pixel_values, ids, mask = _inputs()
    pairs = torch.stack([pixel_values, pixel_values.flip(0)], dim=1)
    return (lambda pairs, ids, mask: model(pairs, ids, mask, return_loss=False).logits), (pairs, ids, mask)


def _caption_step():
    model = _model(EfficientVLMForConditionalGeneration)
    pixel_values, ids, _ = _inputs()

    def step(pixel_values, ids):
        image_embeds = model.efficientvlm.encode_image(pixel_values).last_hidden_state
        return model(input_ids=ids, image_embeds=image_embeds, return_loss=False).logits[:, -1]

    return step, (pixel_values, ids)


@pytest.mark.parametrize("case", [_retrieval_scores, _vqa_ranking, _nlvr2_logits, _caption_step])
def test_inference_compiles_as_one_graph_and_matches_eager(case) -> None:
    torch._dynamo.reset()
    function, inputs = case()
    with torch.no_grad():
        expected = function(*inputs)
        compiled = torch.compile(function, fullgraph=True, backend="eager")(*inputs)  # a graph break raises
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-5)


def test_hard_negative_sampling_compiles_for_a_batch_of_one_image_too() -> None:
    """The sampling in the paired (training) forward was the source of graph breaks; a batch that shows one image
    (no negative to draw) goes through the same graph, its draws labelled out of the ITM loss."""
    torch._dynamo.reset()
    compiled = torch.compile(sample_hard_negatives, fullgraph=True, backend="eager")
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    image_ids = torch.tensor([0, 0, 1, 2])
    negative_texts, negative_images = compiled(logits, image_ids)
    # Never a text or an image of the same image id.
    assert (image_ids[negative_texts] != image_ids).all() and (image_ids[negative_images] != image_ids).all()
    one_image = torch.zeros(4, dtype=torch.long)
    labels = itm_negative_labels(one_image, *compiled(logits, one_image), batch_size=4)
    assert labels.eq(-100).all()


def test_a_failing_check_of_compiled_answer_ranking_raises_and_leaves_gradients_on() -> None:
    torch._dynamo.reset()
    model = _model(EfficientVLMForQuestionAnswering)
    pixel_values, ids, mask = _inputs()
    bad = torch.tensor([[CLS, 7, SEP], [SEP, 9, CLS]])
    with pytest.raises(ValueError, match="same start token"):
        model.rank_answers(pixel_values, ids, mask, bad, k=1)
    compiled = torch.compile(model.rank_answers, fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match="same start token"):
        compiled(pixel_values, ids, mask, bad, k=1)
    assert torch.is_grad_enabled()
