"""Image-text retrieval: ITC + ITM training, pre-training checkpoints, X-VLM re-ranking and recall@K."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from transformers import AutoModelForZeroShotImageClassification, Trainer, TrainingArguments

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForPreTraining
from modeling_efficientvlm.modeling_efficientvlm_retrieval import (
    ITM_SCORES,
    NOT_RERANKED_SCORE,
    EfficientVLMForImageTextRetrieval,
    image_text_matching_logits,
    itm_match_score,
)
from trainers.evaluation.retrieval import ImageBatches, retrieval_evaluate

from .conftest import make_inputs
from .remote_code_utils import load_in_clean_subprocess

NEGATIVES = (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))
RECALL_KEYS = {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"}


def _model(config: EfficientVLMConfig, seed: int = 0) -> EfficientVLMForImageTextRetrieval:
    torch.manual_seed(seed)
    return EfficientVLMForImageTextRetrieval(config).eval()


def test_forward_shapes_and_losses(tiny_config, tiny_inputs) -> None:
    model = _model(tiny_config)
    with torch.no_grad():
        out = model(**tiny_inputs, output_hidden_states=True)
    batch, seq = tiny_inputs["input_ids"].shape
    assert out.logits_per_image.shape == (batch, batch)
    assert out.itm_logits.shape == (3 * batch, 2) and out.logits is out.itm_logits
    assert out.itm_labels.tolist() == [1] * batch + [0] * (2 * batch)
    assert out.image_embeds.shape == out.text_embeds.shape == (batch, tiny_config.embed_dim)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(batch))
    # Without image ids every image matches only its own text, so no pair is its own negative.
    assert (out.negative_text_index != torch.arange(batch)).all()
    assert (out.negative_image_index != torch.arange(batch)).all()
    assert out.vision_output.last_hidden_state.shape == (batch, 17, 32)
    assert out.text_output.last_hidden_state.shape == (batch, seq, 32)
    assert out.fusion_output.last_hidden_state.shape == (3 * batch, seq, 32)
    assert len(out.fusion_output.hidden_states) == tiny_config.text_config.num_fusion_layers + 1
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm)

    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())


def test_itc_embeddings_of_a_bfloat16_model_are_float32_unit_vectors(tiny_config, tiny_inputs) -> None:
    """bfloat16 unit vectors (8 bits of mantissa) would make cosine similarities ties; the embeddings are
    normalised, and ITC scored, in float32 whatever the weights' dtype."""
    model = _model(tiny_config)
    low = _model(tiny_config).to(torch.bfloat16)
    texts = (tiny_inputs["input_ids"], tiny_inputs["attention_mask"])
    with torch.no_grad():
        (_, images), (_, text) = model.embed_images(tiny_inputs["pixel_values"]), model.embed_texts(*texts)
        (low_states, low_images), (_, low_text) = low.embed_images(tiny_inputs["pixel_values"]), low.embed_texts(*texts)
    assert low_states.dtype == torch.bfloat16  # the model itself runs in its dtype
    assert low_images.dtype == low_text.dtype == images.dtype == torch.float32
    torch.testing.assert_close(low_images.norm(dim=-1), torch.ones(len(low_images)))
    scores = low.itc_scores(low_images, low_text)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, model.itc_scores(images, text), atol=0.05, rtol=0)
    # Distinct pairs keep distinct scores (in bfloat16 the 16 cosines would share far fewer values).
    assert scores.unique().numel() == scores.numel()


def test_embed_texts_takes_token_type_ids_as_forward_does(tiny_config, tiny_inputs) -> None:
    model = _model(tiny_config)
    texts = {k: tiny_inputs[k] for k in ("input_ids", "attention_mask")}
    zeros = torch.zeros_like(texts["input_ids"])
    with torch.no_grad():
        _, default = model.embed_texts(**texts)
        _, typed_zero = model.embed_texts(**texts, token_type_ids=zeros)  # the processor's return_token_type_ids
        states, typed_one = model.embed_texts(**texts, token_type_ids=zeros + 1)
        forward = model(pixel_values=tiny_inputs["pixel_values"][:1], **texts, token_type_ids=zeros + 1)
    torch.testing.assert_close(typed_zero, default, atol=0, rtol=0)
    assert not torch.allclose(typed_one, default)  # used, not ignored
    torch.testing.assert_close(typed_one, forward.text_embeds, atol=1e-6, rtol=0)
    assert states.shape == (*texts["input_ids"].shape, tiny_config.text_config.hidden_size)


def test_inference_scores_m_images_against_n_texts_without_sampling(tiny_config, tiny_inputs) -> None:
    model = _model(tiny_config)
    images, texts = tiny_inputs["pixel_values"][:3], {k: tiny_inputs[k] for k in ("input_ids", "attention_mask")}
    token_type_ids = torch.zeros_like(texts["input_ids"])
    with torch.no_grad():
        training = model(**tiny_inputs, itm_negatives=NEGATIVES)
        paired = model(**tiny_inputs, return_loss=False)
        first = model(pixel_values=images, **texts, token_type_ids=token_type_ids)  # 3 images, 4 texts: inference
        torch.manual_seed(123)  # no randomness: a different RNG state changes nothing
        second = model(pixel_values=images, **texts, return_loss=False)
        image_features = model.get_image_features(images)
        text_features = model.get_text_features(**texts, token_type_ids=token_type_ids)
    for out in (paired, first, second):
        assert out.loss is None and out.itm_logits is None and out.negative_text_index is None
        assert out.fusion_output is None  # no fusion pass: ITC only
    assert first.logits_per_image.shape == (3, 4) and first.logits_per_text.shape == (4, 3)
    torch.testing.assert_close(first.logits_per_text, first.logits_per_image.t())
    for name in ("logits_per_image", "image_embeds", "text_embeds"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    # The same ITC scores as training computes, scaled by the ITC temperature like CLIP's logits.
    torch.testing.assert_close(paired.logits_per_image, training.logits_per_image)
    torch.testing.assert_close(first.logits_per_image, training.logits_per_image[:3])
    torch.testing.assert_close(image_features, first.image_embeds)
    torch.testing.assert_close(text_features, first.text_embeds)
    scale = 1 / model.efficientvlm.itc_temperature
    torch.testing.assert_close(first.logits_per_image, image_features @ text_features.t() * scale)
    with pytest.raises(ValueError, match="training inputs"):
        model(pixel_values=images, **texts, itm_negatives=NEGATIVES)


def test_same_image_texts_are_positives_never_negatives(tiny_config, tiny_inputs) -> None:
    model = _model(tiny_config)
    image_ids = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        for seed in range(10):
            torch.manual_seed(seed)
            out = model(**tiny_inputs, image_ids=image_ids)
            assert (image_ids[out.negative_text_index] != image_ids).all()
            assert (image_ids[out.negative_image_index] != image_ids).all()
        plain = model(**tiny_inputs, itm_negatives=NEGATIVES)
    # ITC targets: half the mass on each of the two texts of an image.
    logits = out.logits_per_image
    targets = (image_ids[:, None] == image_ids[None]).float() / 2
    expected = -(
        (logits.log_softmax(dim=1) * targets).sum(1).mean() + (logits.t().log_softmax(dim=1) * targets).sum(1).mean()
    )
    torch.testing.assert_close(out.loss_itc, expected / 2)
    assert not torch.isclose(plain.loss_itc, out.loss_itc)


def test_loads_a_pretraining_checkpoint_and_computes_its_itc_and_itm(tiny_config, tiny_inputs, tmp_path) -> None:
    torch.manual_seed(0)
    pretraining = EfficientVLMForPreTraining(tiny_config).eval()
    pretraining.save_pretrained(tmp_path)
    model, info = EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # MLM / box heads are ignored by design
    image_ids = torch.tensor([0, 1, 2, 2])
    negatives = (torch.tensor([2, 0, 1, 0]), torch.tensor([1, 2, 0, 1]))
    with torch.no_grad():
        expected = pretraining(**tiny_inputs, image_ids=image_ids, itm_negatives=negatives)
        out = model.eval()(**tiny_inputs, image_ids=image_ids, itm_negatives=negatives)
    for name in ("logits_per_image", "itm_logits", "loss_itc", "loss_itm", "image_embeds", "text_embeds"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=0, atol=0)


class _PairDataset(Dataset):
    """Image-text pairs; pair i shows image i // texts_per_image."""

    def __init__(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, texts_per_image: int = 1) -> None:
        self.pixel_values, self.input_ids, self.texts_per_image = pixel_values, input_ids, texts_per_image

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = index // self.texts_per_image
        return {"pixel_values": self.pixel_values[image], "input_ids": self.input_ids[index], "image_ids": image}


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack([item["input_ids"] for item in items])
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "image_ids": torch.tensor([item["image_ids"] for item in items]),
    }


def test_trainer_reduces_the_retrieval_loss(tiny_config, tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    dataset = _PairDataset(torch.randn(4, 3, 32, 32, generator=generator), torch.randint(5, 128, (8, 6)), 2)
    model = _model(tiny_config).train()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=15,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=_collate)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 15
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    # An evaluation whose last batch is one pair (9 pairs at 8 a batch) has a loss for it too: with image ids it
    # is a dataset's batch, not the zero-shot pipeline's single-label query (it raised "did not return a loss").
    nine = _PairDataset(torch.randn(9, 3, 32, 32, generator=generator), torch.randint(5, 128, (9, 6)), 1)
    args.per_device_eval_batch_size = 8
    assert torch.isfinite(torch.tensor(trainer.evaluate(nine)["eval_loss"]))
    model.eval()
    query = _collate([nine[0]])
    del query["image_ids"]
    assert model(**query).loss is None and model(**query).logits_per_image.shape == (1, 1)


def _embedded(model: EfficientVLMForImageTextRetrieval, inputs: dict, num_images: int) -> tuple:
    """`(image_states, image_embeds, text_states, text_embeds, itc)` of the first `num_images` images and every
    text, as retrieval evaluation computes them before re-ranking."""
    with torch.no_grad():
        image_states, image_embeds = model.embed_images(inputs["pixel_values"][:num_images])
        text_states, text_embeds = model.embed_texts(inputs["input_ids"], inputs["attention_mask"])
        return image_states, image_embeds, text_states, text_embeds, model.itc_scores(image_embeds, text_embeds)


def test_rerank_scores_follow_xvlm(tiny_config) -> None:
    model = _model(tiny_config)
    inputs = make_inputs(tiny_config, batch_size=5, seed=1)
    image_states, image_embeds, text_states, text_embeds, itc = _embedded(model, inputs, 3)
    with torch.no_grad():
        scores_i2t, scores_t2i = model.itm_rerank_scores(
            image_states, text_states, inputs["attention_mask"], itc, k=2, batch_size=3, score="probability"
        )
        # The default ranks by the raw match logit alone, as X-VLM's Retrieval.py (no ITC term, no softmax).
        logits_i2t, _ = model.itm_rerank_scores(image_states, text_states, inputs["attention_mask"], itc, k=2)
        summed_i2t, summed_t2i = model.itm_rerank_scores(
            image_states, text_states, inputs["attention_mask"], itc, k=2, score="log_odds+itc"
        )
    temperature = model.efficientvlm.temp.item()
    assert model.itc_logit_scale() == pytest.approx(1 / temperature)
    assert scores_i2t.shape == (3, 5) and scores_t2i.shape == (5, 3)
    torch.testing.assert_close(itc, image_embeds @ text_embeds.t())
    for image in range(3):
        kept = set(itc[image].topk(2).indices.tolist())
        for text in range(5):
            if text not in kept:
                assert scores_i2t[image, text] == NOT_RERANKED_SCORE
                continue
            # The re-ranked score is the ITM head's match probability for this very pair.
            with torch.no_grad():
                logits, _ = image_text_matching_logits(
                    model.efficientvlm,
                    model.itm_head,
                    text_states[text : text + 1],
                    inputs["attention_mask"][text : text + 1],
                    image_states[image : image + 1],
                )
            torch.testing.assert_close(scores_i2t[image, text], logits.softmax(-1)[0, 1])
            torch.testing.assert_close(logits_i2t[image, text], logits[0, 1])
            # BLIP-style: the match log-odds plus the pair's ITC logit (cosine / temperature).
            expected = logits[0, 1] - logits[0, 0] + itc[image, text] / temperature
            torch.testing.assert_close(summed_i2t[image, text], expected)
    for text in range(5):
        kept = set(itc[:, text].topk(2).indices.tolist())
        assert {i for i in range(3) if scores_t2i[text, i] != NOT_RERANKED_SCORE} == kept
        assert {i for i in range(3) if summed_t2i[text, i] != NOT_RERANKED_SCORE} == kept
        assert ((scores_t2i[text] >= 0) & (scores_t2i[text] <= 1) | (scores_t2i[text] == NOT_RERANKED_SCORE)).all()


def test_itm_match_scores_and_why_the_raw_logit_orders_pairs_otherwise(tiny_config, tiny_inputs) -> None:
    logits = torch.tensor([[0.0, 2.0], [3.0, 4.0], [-30.0, 0.0], [-40.0, 0.0]])
    torch.testing.assert_close(itm_match_score(logits, "log_odds"), torch.tensor([2.0, 1.0, 30.0, 40.0]))
    torch.testing.assert_close(itm_match_score(logits, "logit"), torch.tensor([2.0, 4.0, 0.0, 0.0]))
    probability = itm_match_score(logits, "probability")
    torch.testing.assert_close(probability, logits.softmax(-1)[:, 1])
    # The log-odds order is the probability's, and it still separates pairs whose fp32 probability is 1.0.
    assert probability[2] == probability[3] == 1.0 and itm_match_score(logits, "log_odds")[3] > 30
    assert set(ITM_SCORES) == {"probability", "log_odds", "logit"}
    with pytest.raises(ValueError, match="log_odds"):
        itm_match_score(logits, "margin")
    # The ITM cross-entropy moves the head's two output rows by opposite amounts: their sum, half of every raw
    # match logit, stays at its random start, however long the head trains.
    model = _model(tiny_config).train()
    head = model.itm_head[-1]
    start = (head.weight.sum(0).detach().clone(), head.bias.sum().detach().clone())
    start_difference = (head.weight[1] - head.weight[0]).detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(**tiny_inputs).loss_itm.backward()
        optimizer.step()
    assert (head.weight[1] - head.weight[0] - start_difference).abs().max() > 1e-3  # the trained direction moved
    torch.testing.assert_close(head.weight.sum(0), start[0])
    torch.testing.assert_close(head.bias.sum(), start[1])


def test_retrieval_evaluate_returns_recalls_and_scores(tiny_config) -> None:
    model = _model(tiny_config).train()
    inputs = make_inputs(tiny_config, batch_size=6, seed=2)
    pixel_values = inputs["pixel_values"][:3]
    text_to_image = [0, 0, 1, 1, 2, 2]
    result = retrieval_evaluate(
        model, pixel_values, inputs["input_ids"], inputs["attention_mask"], text_to_image=text_to_image, k=4
    )
    assert model.training  # the mode is restored
    assert set(result.metrics) == RECALL_KEYS
    assert all(0.0 <= value <= 1.0 for value in result.metrics.values())
    assert result.metrics["txt_r5"] == result.metrics["img_r5"] == 1.0  # 3 images, 6 texts: all within top 5
    assert result.scores_i2t.shape == result.itc_scores.shape == (3, 6) and result.scores_t2i.shape == (6, 3)
    assert ((result.scores_i2t != NOT_RERANKED_SCORE).sum(dim=1) == 4).all()
    # k = 0: the ITC similarities alone rank everything (what re-ranking starts from, also in `itc_metrics`).
    itc_only = retrieval_evaluate(
        model, pixel_values, inputs["input_ids"], inputs["attention_mask"], text_to_image=text_to_image, k=0
    )
    torch.testing.assert_close(itc_only.scores_i2t, result.itc_scores)
    torch.testing.assert_close(itc_only.scores_t2i, result.itc_scores.t())
    assert itc_only.metrics == itc_only.itc_metrics == result.itc_metrics
    groups = [[0, 1], [2, 3], [4, 5]]
    itc = result.itc_scores.numpy()
    assert result.itc_metrics["txt_r1"] == np.mean([itc[i].argmax() in groups[i] for i in range(3)])
    assert result.itc_metrics["img_r1"] == np.mean([itc[:, t].argmax() == text_to_image[t] for t in range(6)])
    with pytest.raises(ValueError, match="`k` must be 0"):
        retrieval_evaluate(model, pixel_values, inputs["input_ids"], text_to_image=text_to_image, k=-1)

    # Image batches from an iterable (e.g. a DataLoader of dicts) and image_to_texts give the same result.
    batches = [{"pixel_values": pixel_values[:2]}, {"pixel_values": pixel_values[2:]}]
    again = retrieval_evaluate(
        model,
        batches,
        inputs["input_ids"],
        inputs["attention_mask"],
        image_to_texts=[[0, 1], [2, 3], [4, 5]],
        k=4,
        batch_size=4,
    )
    assert again.metrics == result.metrics
    torch.testing.assert_close(again.scores_i2t, result.scores_i2t)
    torch.testing.assert_close(again.scores_t2i, result.scores_t2i)


def test_a_k_below_the_largest_recall_k_warns_that_those_recalls_count_only_the_top_k(tiny_config) -> None:
    """Candidates beyond the top k are never re-ranked (X-VLM's protocol), so the re-ranked recall@5 / @10 with k = 3
    cannot pass ITC's recall@3 (txt_r10 0.333 against itc_txt_r10 0.75 in an audit) and nothing said so."""
    import warnings

    model = _model(tiny_config)
    inputs = make_inputs(tiny_config, batch_size=12, seed=1)
    args = (model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    message = (
        r"^Re-ranking only the top k=3 ITC candidates of each query \(X-VLM's protocol\): txt_r5, txt_r10, img_r5, "
        r"img_r10 \(and the means with them\) count a hit only among those 3, so they are capped at ITC's recall@3\. "
        r"For recall at those K read itc_txt_r5, itc_txt_r10, itc_img_r5, itc_img_r10 \(ITC alone; `itc_metrics`\), "
        r"or re-rank at least 10 candidates \(`k`, `--k`\)\.$"
    )
    with pytest.warns(UserWarning, match=message):
        capped = retrieval_evaluate(*args, text_to_image=list(range(12)), k=3)
    assert capped.metrics["txt_r5"] == capped.metrics["txt_r10"] < capped.itc_metrics["txt_r10"]
    # Only the direction with more candidates than k: 3 images, 6 texts, k = 4.
    with pytest.warns(UserWarning, match=r"\): txt_r5, txt_r10 \(and .* read itc_txt_r5, itc_txt_r10 \(ITC"):
        retrieval_evaluate(model, *(x[:n] for x, n in zip(args[1:], (3, 6, 6))), text_to_image=[0, 0, 1, 1, 2, 2], k=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in (0, 10):  # ITC alone, or every reported K re-ranked
            retrieval_evaluate(*args, text_to_image=list(range(12)), k=k)


def test_retrieval_evaluate_streams_image_states_one_chunk_at_a_time(tiny_config) -> None:
    model = _model(tiny_config)
    inputs = make_inputs(tiny_config, batch_size=10, seed=3)
    pixel_values, text_to_image = inputs["pixel_values"][:5], [i // 2 for i in range(10)]
    seen: list[list[int]] = []
    rerank = model.itm_rerank_scores

    def recording(image_states, *args, **kwargs):
        chunks = [(0, image_states)] if isinstance(image_states, torch.Tensor) else image_states

        def recorded():
            for first, states in chunks:
                seen[-1].append(states.shape[0])
                yield first, states

        seen.append([])
        return rerank(recorded(), *args, **kwargs)

    model.itm_rerank_scores = recording
    args = (model, pixel_values, inputs["input_ids"], inputs["attention_mask"])
    streamed = retrieval_evaluate(*args, text_to_image=text_to_image, k=3, batch_size=2)
    kept = retrieval_evaluate(*args, text_to_image=text_to_image, k=3, batch_size=2, stream_image_states=False)
    one_shot = retrieval_evaluate(
        model, iter(pixel_values.split(2)), *args[2:], text_to_image=text_to_image, k=3, batch_size=2
    )
    # Every way holds at most one batch of image states at a time and re-ranks the same pairs to the same scores.
    assert seen == [[2, 2, 1]] * 3
    for other in (kept, one_shot):
        assert other.metrics == streamed.metrics
        torch.testing.assert_close(other.scores_i2t, streamed.scores_i2t)
        torch.testing.assert_close(other.scores_t2i, streamed.scores_t2i)
    assert ((streamed.scores_t2i != NOT_RERANKED_SCORE).sum(dim=1) == 3).all()
    with pytest.raises(ValueError, match="cover 4 images"):
        with torch.no_grad():
            states, embeds = model.embed_images(pixel_values)
            texts, text_embeds = model.embed_texts(inputs["input_ids"], inputs["attention_mask"])
            rerank(iter([(0, states[:4])]), texts, None, model.itc_scores(embeds, text_embeds), k=2)


def test_retrieval_evaluate_is_perfect_on_separable_toy() -> None:
    # Four solid colours, each with its own one-word caption: separable after a few steps (a wider
    # initialisation and no dropout make the tiny model learn fast).
    init = dict(initializer_range=0.1)
    config = EfficientVLMConfig.from_preset(
        "tiny",
        **init,
        vision_config=init,
        text_config={**init, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    )
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]])
    pixel_values = colours[:, :, None, None].expand(4, 3, 32, 32).contiguous()
    input_ids = torch.tensor([[2, 10 + i, 3] for i in range(4)])
    model = _model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    before = retrieval_evaluate(model, pixel_values, input_ids, text_to_image=[0, 1, 2, 3], k=1).metrics
    for _ in range(20):
        loss = model(pixel_values=pixel_values, input_ids=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # k=1: each query's ITC favourite is the only ITM-scored candidate, the rest score -100.
    result = retrieval_evaluate(model, pixel_values, input_ids, text_to_image=[0, 1, 2, 3], k=1, batch_size=3)
    assert before["r_mean"] < 1.0
    assert result.metrics["txt_r1"] == result.metrics["img_r1"] == result.metrics["r_mean"] == 1.0


def test_bad_inputs_raise(tiny_config, tiny_inputs) -> None:
    model = _model(tiny_config)
    with pytest.raises(ValueError, match="image_ids"):
        model(**tiny_inputs, image_ids=torch.tensor([0, 1]))
    states = torch.zeros(2, 17, 32)
    with pytest.raises(ValueError, match="itc_scores"):
        model.itm_rerank_scores(states, torch.zeros(3, 5, 32), None, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="score"):
        model.itm_scores(states, torch.zeros(2, 5, 32), None, score="rank")
    with pytest.raises(ValueError, match="ground truth"):
        retrieval_evaluate(model, tiny_inputs["pixel_values"], tiny_inputs["input_ids"])
    with pytest.raises(ValueError, match="different ground truths"):
        retrieval_evaluate(
            model,
            tiny_inputs["pixel_values"][:2],
            tiny_inputs["input_ids"],
            text_to_image=[0, 0, 1, 1],
            image_to_texts=[[0, 1, 2], [3]],
        )


def test_auto_classes_and_trust_remote_code(tiny_config, tiny_inputs, tmp_path) -> None:
    model = _model(tiny_config)
    model.save_pretrained(tmp_path)
    assert model.config.auto_map["AutoModelForZeroShotImageClassification"] == (
        "modeling_efficientvlm_retrieval.EfficientVLMForImageTextRetrieval"
    )
    assert (tmp_path / "modeling_efficientvlm_retrieval.py").exists()
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(tmp_path)) is EfficientVLMForImageTextRetrieval

    assert model.config.auto_map["AutoModel"] == model.config.auto_map["AutoModelForZeroShotImageClassification"]
    with torch.no_grad():
        expected = model(**tiny_inputs, itm_negatives=NEGATIVES)
    names = ["loss", "logits_per_image", "itm_logits", "image_embeds"]
    remote = load_in_clean_subprocess(
        tmp_path, "AutoModelForZeroShotImageClassification", {**tiny_inputs, "itm_negatives": NEGATIVES}, names
    )
    assert remote["class"] == "EfficientVLMForImageTextRetrieval"
    assert "transformers_modules" in remote["module"]
    for name in names:  # another process may split float reductions differently: allow last-bit differences
        torch.testing.assert_close(remote[name], getattr(expected, name), rtol=1e-5, atol=1e-6)


def _share_a_caption(records: list[dict]) -> None:
    """Two images, the same captions."""
    records[1]["caption"] = records[0]["caption"]


def _evaluation_setup(config: EfficientVLMConfig, tmp_path, n: int = 4, edit=None) -> tuple:
    """`(processor, dataset, model)`: a retrieval split of `n` written images (records changed by `edit` first)
    and a seeded random model, as the task evaluation gets them."""
    import json

    from trainers.tasks import build_dataset

    from .data_utils import make_processor, write_image_text_json

    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    data, image_root = write_image_text_json(tmp_path, n=n)
    records = json.loads(data.read_text())
    if edit is not None:
        edit(records)
    torch.manual_seed(0)
    return processor, build_dataset("retrieval", records, image_root, processor), _model(config)


def test_a_tied_gold_is_not_ranked_first_in_the_items_as_in_the_recalls() -> None:
    from types import SimpleNamespace

    from trainers.data import ImageTextDataset
    from trainers.evaluation.metrics import retrieval_recall
    from trainers.evaluation.tasks import _retrieval_items

    # Text 0's gold image 0 ties with image 1; image 1's best gold text (1) ties with text 2 and trails text 0.
    scores_i2t = torch.tensor([[0.9, 0.1, 0.2, 0.0], [0.9, 0.5, 0.5, 0.3]])
    records = [{"image": image, "caption": text} for image, text in zip("abab", "abcd")]
    dataset = ImageTextDataset(records, check_files=False)
    assert dataset.text_to_image == [0, 1, 0, 1] and dataset.image_to_texts == [[0, 2], [1, 3]]
    items = _retrieval_items(dataset, SimpleNamespace(scores_t2i=scores_i2t.T, scores_i2t=scores_i2t))
    ranks = {(item["query"], item.get("text_index", item.get("image_index"))): item["rank"] for item in items}
    assert ranks == {("text", 0): 2, ("text", 1): 1, ("text", 2): 2, ("text", 3): 1, ("image", 0): 1, ("image", 1): 3}
    recalls = retrieval_recall(scores_i2t.numpy(), dataset.image_to_texts, text_to_image=dataset.text_to_image)
    assert recalls["img_r1"] == 2 / 4 == sum(ranks[("text", t)] == 1 for t in range(4)) / 4
    assert recalls["txt_r1"] == 1 / 2 == sum(ranks[("image", i)] == 1 for i in range(2)) / 2


def test_evaluation_items_give_each_query_its_gold_rank_and_warn_on_shared_captions(tiny_config, tmp_path) -> None:
    from trainers.tasks import evaluate_task

    processor, dataset, model = _evaluation_setup(tiny_config, tmp_path)
    result = evaluate_task("retrieval", model, dataset, processor, k=4)
    texts = [item for item in result.items if item["query"] == "text"]
    images = [item for item in result.items if item["query"] == "image"]
    assert len(texts) == len(dataset.texts) and len(images) == dataset.num_images
    # Text-retrieval recall@1 is the share of images whose best gold text is ranked first.
    assert sum(item["rank"] == 1 for item in images) / len(images) == pytest.approx(result.metrics["txt_r1"])
    assert sum(item["rank"] == 1 for item in texts) / len(texts) == pytest.approx(result.metrics["img_r1"])
    assert all(item["gold_image"] == dataset.text_to_image[item["text_index"]] for item in texts)
    # The task decodes images a batch at a time (ImageBatches): the same metrics as all pixels in one tensor.
    pixels = processor.image_processor([dataset.get_image(i) for i in range(dataset.num_images)], return_tensors="pt")
    tokens = processor.tokenizer(dataset.texts, padding="longest", return_tensors="pt")
    whole = retrieval_evaluate(
        model, pixels["pixel_values"], tokens["input_ids"], tokens["attention_mask"], dataset.text_to_image, k=4
    )
    assert whole.metrics == pytest.approx({k: v for k, v in result.metrics.items() if k in whole.metrics})
    batches = ImageBatches(dataset.get_image, dataset.num_images, processor.image_processor, batch_size=3)
    assert len(batches) == 2 and [b.shape[0] for b in batches] == [3, 1] == [b.shape[0] for b in batches]

    _, shared, _ = _evaluation_setup(tiny_config, tmp_path / "captions_shared", edit=_share_a_caption)
    with pytest.warns(UserWarning, match="describe several images"):
        evaluate_task("retrieval", model, shared, processor, k=4)


def test_predictions_name_images_by_their_path_and_their_records_image_id(tiny_config, tmp_path) -> None:
    """The items wrote the evaluation's own image index as `image_id` (a record's "image_id": 9 came out as 0) and
    no path: now the index is `image_index`, beside the path as the records give it and the record's own id."""
    from trainers.tasks import evaluate_task

    def give_ids(records: list[dict]) -> None:
        records[0]["image_id"], records[1]["image_id"] = 9, "COCO_1"  # images 2 and 3 have none

    processor, dataset, model = _evaluation_setup(tiny_config, tmp_path, edit=give_ids)
    items = evaluate_task("retrieval", model, dataset, processor, k=4).items
    ids = {0: 9, 1: "COCO_1"}
    names = [{key: item[key] for key in ("image_index", "image", "image_id") if key in item} for item in items[8:]]
    assert names == [
        {"image_index": 0, "image": "img0.png", "image_id": 9},
        {"image_index": 1, "image": "img1.png", "image_id": "COCO_1"},
        {"image_index": 2, "image": "img2.png"},
        {"image_index": 3, "image": "img3.png"},
    ]
    texts = items[:8]
    assert [item["gold_image"] for item in texts] == [0, 0, 1, 1, 2, 2, 3, 3]
    for item in texts:  # indices kept, each with its path and its record's image_id (None without one) beside it
        assert item["gold_image_path"] == f"img{item['gold_image']}.png"
        assert item["gold_image_id"] == ids.get(item["gold_image"])
        assert item["top_image_paths"] == [f"img{i}.png" for i in item["top_images"]]
        assert item["top_image_ids"] == [ids.get(i) for i in item["top_images"]]
    # Without any image_id in the records, no id fields: the paths name the images.
    _, plain, _ = _evaluation_setup(tiny_config, tmp_path / "plain")
    items = evaluate_task("retrieval", model, plain, processor, k=4).items
    assert "gold_image_id" not in items[0] and items[0]["gold_image_path"] == "img0.png"
    assert items[-1]["image_index"] == 3 and items[-1]["image"] == "img3.png" and "image_id" not in items[-1]


def test_caption_level_recall_counts_any_image_with_an_identical_caption() -> None:
    from trainers.evaluation.metrics import caption_level_golds, caption_level_recall, retrieval_recall

    # Images 0 and 1 share the caption "a red square" (texts 0 and 1); image 2 has "a blue circle".
    texts = ["a red square", "A red  square", "a blue circle"]
    text_to_image = [0, 1, 2]
    # Text 0 retrieves image 1 first; image 0 retrieves text 1 first: misses for standard recall@1, hits at
    # caption level. Everything else is ranked first.
    scores_t2i = np.array([[0.5, 0.9, 0.1], [0.2, 0.9, 0.1], [0.1, 0.2, 0.9]])
    scores_i2t = np.array([[0.5, 0.9, 0.1], [0.2, 0.9, 0.1], [0.1, 0.2, 0.9]])
    image_to_texts, text_to_images = caption_level_golds(texts, text_to_image, 3)
    assert image_to_texts == [[0, 1], [0, 1], [2]] and text_to_images == [[0, 1], [0, 1], [2]]

    standard = retrieval_recall(scores_i2t, [[0], [1], [2]], scores_t2i, text_to_image)
    caption = caption_level_recall(scores_i2t, texts, text_to_image, scores_t2i)
    assert standard["img_r1"] == pytest.approx(2 / 3) and caption["img_r1_caption"] == 1.0
    assert standard["txt_r1"] == pytest.approx(2 / 3) and caption["txt_r1_caption"] == 1.0
    assert standard["img_r5"] == caption["img_r5_caption"] == 1.0
    # Only R@1 moves, by 1/3 in each direction: each mean over R@1/5/10 moves by 1/9, and so does r_mean.
    assert caption["r_mean_caption"] - standard["r_mean"] == pytest.approx(1 / 9)
    # Without shared captions the two agree.
    distinct = ["a red square", "a green square", "a blue circle"]
    assert caption_level_recall(scores_i2t, distinct, text_to_image, scores_t2i) == {
        f"{name}_caption": value for name, value in standard.items()
    }


def test_evaluate_reports_caption_level_recall_on_request(tiny_config, tmp_path) -> None:
    from trainers.tasks import evaluate_task

    processor, dataset, model = _evaluation_setup(tiny_config, tmp_path, edit=_share_a_caption)
    with pytest.warns(UserWarning, match="--caption_level_recall"):
        plain = evaluate_task("retrieval", model, dataset, processor, k=4).metrics
    with pytest.warns(UserWarning):
        both = evaluate_task("retrieval", model, dataset, processor, k=4, caption_level_recall=True).metrics
    assert {name: both[name] for name in plain} == plain
    reranked = [name for name in plain if not name.startswith("itc_")]  # plus the ITC-only recalls, as they are
    assert set(plain) == set(reranked) | {f"itc_{name}" for name in reranked}
    assert set(both) - set(plain) == {f"{name}_caption" for name in reranked}
    for name in reranked:  # a caption-level hit includes every standard hit
        assert both[f"{name}_caption"] >= plain[name]
    with pytest.raises(ValueError, match="--caption_level_recall"):
        evaluate_task("nlvr2", model, dataset, processor, caption_level_recall=True)


def test_evaluate_ranks_by_the_itm_score_asked_for(tiny_config, tmp_path) -> None:
    from trainers.tasks import evaluate_task

    processor, dataset, model = _evaluation_setup(tiny_config, tmp_path, n=6)
    with torch.no_grad():  # a head whose two rows differ from their sum: the raw logit orders pairs otherwise
        model.itm_head[-1].weight.normal_(std=2.0)
    items = {
        score: evaluate_task("retrieval", model, dataset, processor, k=3, itm_score=score).items
        for score in ("logit", "log_odds", "probability")
    }
    orders = {
        score: [item.get("top_images", item.get("top_texts")) for item in found] for score, found in items.items()
    }
    assert orders["log_odds"] == orders["probability"] != orders["logit"]
    with pytest.raises(ValueError, match="--itm_score"):
        evaluate_task("retrieval", model, dataset, processor, k=3, itm_score="margin")

    # "log_odds+itc" adds the ITC logit to the log-odds of each re-ranked pair, and reports the log-odds alone
    # beside the sum (`itm_*`), as a "log_odds" run gives them.
    log_odds = evaluate_task("retrieval", model, dataset, processor, k=3, itm_score="log_odds").metrics
    summed = evaluate_task("retrieval", model, dataset, processor, k=3, itm_score="log_odds+itc").metrics
    reranked = [name for name in log_odds if not name.startswith("itc_")]
    assert {name: summed[f"itm_{name}"] for name in reranked} == {name: log_odds[name] for name in reranked}
    assert not any(name.startswith("itm_") for name in log_odds)
    images = processor.image_processor([dataset.get_image(i) for i in range(dataset.num_images)], return_tensors="pt")
    texts = processor.tokenizer(dataset.texts, padding="longest", return_tensors="pt")
    args = (model, images["pixel_values"], texts["input_ids"], texts["attention_mask"], dataset.text_to_image)
    alone, both = (retrieval_evaluate(*args, k=3, score=score) for score in ("log_odds", "log_odds+itc"))
    kept = alone.scores_i2t != NOT_RERANKED_SCORE
    assert torch.equal(kept, both.scores_i2t != NOT_RERANKED_SCORE) and 0 < kept.sum() < kept.numel()
    itc_logits = alone.itc_scores / model.efficientvlm.temp.item()
    torch.testing.assert_close(both.scores_i2t[kept], alone.scores_i2t[kept] + itc_logits[kept])
    assert alone.itm_metrics is None and both.itm_metrics == alone.metrics
    scorer = type("Scorer", (), {name: getattr(model, name) for name in ("embed_images", "embed_texts", "itc_scores")})
    scorer.itm_rerank_scores = model.itm_rerank_scores  # a duck-typed model without the ITC temperature
    lacks = r"Scorer cannot score retrieval by 'log_odds\+itc': it lacks \['itc_logit_scale'\]"
    with pytest.raises(ValueError, match=lacks):
        retrieval_evaluate(scorer(), *args[1:], k=3, score="log_odds+itc")
    pixels = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="`score` must be one of"):  # even with nothing to re-rank
        retrieval_evaluate(model, pixels, torch.ones(1, 4, dtype=torch.long), text_to_image=[0], k=0, score="margin")


def test_rerank_fuses_each_candidate_pair_once_and_projects_each_image_once_per_pass(tiny_config) -> None:
    """A pair among both directions' candidates is fused once; pairs go through the fusion grouped by image, so
    the cross-attention keys / values of an image are computed once per pass, not once per text."""
    model = _model(tiny_config)
    inputs = make_inputs(tiny_config, batch_size=6, seed=5)
    image_states, _, text_states, _, itc = _embedded(model, inputs, 4)
    i2t = {(i, t) for i in range(4) for t in itc[i].topk(3).indices.tolist()}
    t2i = {(i, t) for t in range(6) for i in itc[:, t].topk(3).indices.tolist()}
    fused, projected = [], []
    cross = model.efficientvlm.text_model.encoder.layer[tiny_config.text_config.num_hidden_layers].crossattention
    hooks = [
        model.itm_head.register_forward_hook(lambda module, args, output: fused.append(args[0].shape[0])),
        cross.k_proj.register_forward_hook(lambda module, args, output: projected.append(args[0].shape[0])),
    ]
    scores_i2t, scores_t2i = model.itm_rerank_scores(
        image_states, text_states, inputs["attention_mask"], itc, k=3, batch_size=100
    )
    for hook in hooks:
        hook.remove()
    assert sum(fused) == len(i2t | t2i) < len(i2t) + len(t2i)
    assert projected == [4]  # one pass: each of the 4 images projected once
    assert {(i, t) for i, t in zip(*(scores_i2t != NOT_RERANKED_SCORE).nonzero().t().tolist())} == i2t
    assert {(i, t) for t, i in zip(*(scores_t2i != NOT_RERANKED_SCORE).nonzero().t().tolist())} == t2i
    for image, text in i2t & t2i:  # the one score of a shared pair lands in both matrices
        assert scores_i2t[image, text] == scores_t2i[text, image]


def test_rerank_passes_hold_texts_of_one_length_cut_to_it(tiny_config) -> None:
    """Texts are padded together to the longest of all. Within an image the candidate pairs go shortest text
    first, and each fusion pass is cut to the longest text in it; the scores are those of uncut passes (the cut
    columns are masked keys and query rows nothing reads)."""
    model = _model(tiny_config)
    inputs = make_inputs(tiny_config, batch_size=6, seed=5)
    image_states, _, text_states, _, itc = _embedded(model, inputs, 4)
    mask = inputs["attention_mask"].clone()
    mask[:3, 4:] = 0  # texts 0-2: 4 tokens; 3 and 4: all 7; 5: 5 (make_inputs pads the last text)
    seen = []
    fusion = model.efficientvlm.text_model.encoder.layer[tiny_config.text_config.num_hidden_layers]
    hook = fusion.attention.q_proj.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[-2]))
    with torch.no_grad():
        cut = model.itm_rerank_scores(image_states, text_states, mask, itc, k=6, batch_size=2, score="log_odds")
    hook.remove()
    # Each image's 6 texts in passes of 2: (0, 1) 4 tokens, (2, 5) 5, (3, 4) 7; in index order (2, 3) and (4, 5)
    # would both take 7.
    assert seen == [4, 5, 7] * 4
    for image, text in [(0, 0), (2, 5), (3, 4)]:  # against one uncut pass of that pair
        with torch.no_grad():
            logits, _ = image_text_matching_logits(
                model.efficientvlm, model.itm_head, text_states[text : text + 1], mask[text : text + 1],
                image_states[image : image + 1],
            )  # fmt: skip
        expected = logits[0, 1] - logits[0, 0]
        torch.testing.assert_close(cut[0][image, text], expected)
        torch.testing.assert_close(cut[1][text, image], expected)


def test_task_models_built_from_a_pretrained_model_have_a_config_of_their_own(tiny_config) -> None:
    from trainers.tasks import task_model_from

    source = EfficientVLMForPreTraining(tiny_config)
    before = source.config.to_dict()
    for task in ("retrieval", "vqa", "nlvr2", "captioning"):
        model = task_model_from(task, source)
        assert model.config is not source.config and model.efficientvlm.config is model.config
        model.config.itm_caption_negatives = 0.7  # e.g. the demo's retrieval setting: the source never sees it
    assert source.config.to_dict() == before and source.efficientvlm.config.itm_caption_negatives == 0.0


def test_reranking_progress_counts_every_image_once(tiny_config, monkeypatch) -> None:
    """The long part shows a progress bar (on a terminal): its total is the image count and it ends there."""
    import trainers.evaluation.retrieval as retrieval_module

    bars = []

    class Recorder:
        def __init__(self, total: int, **kwargs) -> None:
            self.total, self.n, self.kwargs = total, 0, kwargs
            bars.append(self)

        def update(self, count: int) -> None:
            self.n += count

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.closed_at = self.n

    monkeypatch.setattr(retrieval_module, "tqdm", Recorder)
    model = _model(tiny_config)
    inputs = make_inputs(tiny_config, batch_size=10, seed=3)
    args = (model, inputs["pixel_values"][:5], inputs["input_ids"], inputs["attention_mask"])
    retrieval_evaluate(*args, text_to_image=[i // 2 for i in range(10)], k=3, batch_size=2)
    assert [(bar.total, bar.closed_at) for bar in bars] == [(5, 5)]
    assert bars[0].kwargs["disable"] is None  # tqdm's own rule: no bar when stderr is not a terminal
    retrieval_evaluate(*args, text_to_image=[i // 2 for i in range(10)], k=0)
    assert len(bars) == 1  # ITC alone: no re-ranking, no bar


def test_caption_negatives_asked_of_records_without_them_are_named(tmp_path) -> None:
    """`--config_overrides '{"itm_caption_negatives": 1.0}'` on records without `negative_caption` trained as with 0,
    exit 0, without a word."""
    from types import SimpleNamespace

    from transformers.testing_utils import CaptureLogger

    from trainers import training
    from trainers.data.datasets import ImageTextDataset

    from .data_utils import save_image

    save_image(tmp_path / "a.png")
    plain = ImageTextDataset([{"image": "a.png", "caption": "a red square"}], image_root=tmp_path)
    negatives = ImageTextDataset(
        [{"image": "a.png", "caption": "a red square", "negative_caption": "a blue square"}], image_root=tmp_path
    )
    for rate, dataset, warns in ((1.0, plain, True), (1.0, negatives, False), (0.0, plain, False)):
        trainer = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(itm_caption_negatives=rate)))
        trainer.train_dataset = dataset
        with CaptureLogger(training.logger) as logged:
            training.warn_on_unused_caption_negatives(trainer)
        assert ("give no `negative_caption`" in logged.out) == warns, (rate, dataset.negative_texts)
