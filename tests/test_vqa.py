"""VQA model: the answer decoder, X-VLM's weighted loss, training with Trainer, answer ranking (k-test) against
a brute-force likelihood, generate(), masked == pruned, remote-code reload in a clean interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForPreTraining
from modeling_efficientvlm.modeling_efficientvlm_vqa import EfficientVLMForQuestionAnswering

from .remote_code_utils import load_in_clean_subprocess
from .test_modeling import _count, _random_masks

PAD, CLS, SEP = 0, 2, 3  # as tests/data_utils.py: generation must read them from the config
QUESTION = [CLS, 15, 17, 12, 40, 3]  # "[CLS] what color is it [SEP]"-like
# channel of a solid image -> its answers (token ids) and their weights
ANSWERS = {0: ([[5], [5, 16]], [0.8, 0.2]), 1: ([[6]], [1.0]), 2: ([[7]], [1.0])}
CANDIDATES = [[5], [6], [7], [5, 16], [8, 9], [10]]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they lose a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides) -> EfficientVLMConfig:
    text = {"bos_token_id": CLS, "eos_token_id": SEP, "pad_token_id": PAD, **overrides.pop("text_config", {})}
    return EfficientVLMConfig.from_preset("tiny", text_config=text, **overrides)


def _image(channel: int) -> torch.Tensor:
    image = -torch.ones(3, 32, 32)
    image[channel] = 1.0
    return image


def _pad(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(sequence) for sequence in sequences)
    ids = torch.tensor([sequence + [PAD] * (length - len(sequence)) for sequence in sequences])
    return ids, (ids != PAD).long()


def _candidates() -> tuple[torch.Tensor, torch.Tensor]:
    return _pad([[CLS] + answer + [SEP] for answer in CANDIDATES])


class _VQADataset(Dataset):
    def __len__(self) -> int:
        return len(ANSWERS)

    def __getitem__(self, index: int) -> dict:
        channel = list(ANSWERS)[index]
        answers, weights = ANSWERS[channel]
        return {"pixel_values": _image(channel), "question": QUESTION, "answers": answers, "weights": weights}


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """The VQA batch layout: questions (B, Lq); all answers of all questions (N, La), "[CLS] answer [SEP]"."""
    input_ids, attention_mask = _pad([item["question"] for item in items])
    answer_ids, answer_mask = _pad([[CLS] + answer + [SEP] for item in items for answer in item["answers"]])
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "answer_input_ids": answer_ids,
        "answer_attention_mask": answer_mask,
        "answer_weights": torch.tensor([weight for item in items for weight in item["weights"]]),
        "answer_counts": torch.tensor([len(item["answers"]) for item in items]),
    }


def _batch() -> dict[str, torch.Tensor]:
    dataset = _VQADataset()
    return _collate([dataset[i] for i in range(len(dataset))])


def _questions() -> dict[str, torch.Tensor]:
    batch = _batch()
    return {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[EfficientVLMForQuestionAnswering, list[float], dict]:
    """The model after 40 steps of the stock Trainer on one colour question per image, the logged losses and
    `Trainer.evaluate` metrics."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one
    torch.manual_seed(0)
    model = EfficientVLMForQuestionAnswering(_config())
    model.init_answer_decoder_from_fusion()
    args = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("trainer")),
        per_device_train_batch_size=3,
        per_device_eval_batch_size=3,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        max_steps=40,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        remove_unused_columns=False,  # the collator reads raw item fields
    )
    trainer = Trainer(model=model, args=args, train_dataset=_VQADataset(), data_collator=_collate)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = trainer.evaluate(_VQADataset())
    torch.set_num_threads(threads)
    return model.eval(), losses, metrics


def _brute_force_log_likelihood(model, questions: dict, candidates: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(answer | image, question) of every candidate for every question, token by token: (B, A)."""
    batch, num = questions["input_ids"].shape[0], candidates.shape[0]
    with torch.no_grad():
        logits = model(
            **questions,
            answer_input_ids=candidates.repeat(batch, 1),
            answer_attention_mask=mask.repeat(batch, 1),
            answer_counts=torch.full((batch,), num),
        ).logits
    log_probs = logits.float().log_softmax(-1)
    targets = candidates.repeat(batch, 1)
    scores = torch.zeros(batch * num)
    for row in range(batch * num):
        for t in range(1, int(mask.repeat(batch, 1)[row].sum())):
            scores[row] += log_probs[row, t - 1, targets[row, t]]
    return scores.view(batch, num)


# ------------------------------------------------------------------------------------------------------------


# Parameters of the official checkpoints (reference key listings, without the LM decoder weight tied to the
# embeddings and the duplicate `cls.predictions.bias`). Our backbone also holds the ITC projections and temperature.
ITC_PARAMETERS = 2 * (768 * 256 + 256) + 1


@pytest.mark.parametrize(("preset", "official"), [("xvlm-base", 290_044_986), ("efficientvlm-small", 169_543_482)])
def test_parameter_count_matches_the_official_checkpoint(preset: str, official: int) -> None:
    with torch.device("meta"):
        model = EfficientVLMForQuestionAnswering(EfficientVLMConfig.from_preset(preset))
    assert _count(model) == official + ITC_PARAMETERS


def test_answer_decoder_layout() -> None:
    model = EfficientVLMForQuestionAnswering(_config(vision_config={"hidden_size": 48, "intermediate_size": 96}))
    decoder = model.answer_decoder
    assert decoder.config.num_hidden_layers == 0 and decoder.config.num_fusion_layers == 2
    # Every decoder layer cross-attends to the fused question states: text width, not the vision width.
    for layer in decoder.encoder.layer:
        assert layer.crossattention.k_proj.in_features == 32
    assert model.efficientvlm.text_model.encoder.layer[2].crossattention.k_proj.in_features == 48
    assert model.answer_head.decoder.weight is decoder.embeddings.word_embeddings.weight
    assert len(EfficientVLMForQuestionAnswering(_config(num_answer_decoder_layers=3)).answer_decoder.encoder.layer) == 3


def test_init_answer_decoder_from_fusion_copies_what_fits() -> None:
    torch.manual_seed(0)
    pretrained = EfficientVLMForPreTraining(_config())
    model = EfficientVLMForQuestionAnswering(_config())
    model.efficientvlm.load_state_dict(pretrained.efficientvlm.state_dict())
    assert model.init_answer_decoder_from_fusion(mlm_head=pretrained.mlm_head) == []
    fusion = model.efficientvlm.text_model.encoder.layer[2:]
    for layer, source in zip(model.answer_decoder.encoder.layer, fusion):
        for name, tensor in source.state_dict().items():
            torch.testing.assert_close(layer.state_dict()[name], tensor, atol=0, rtol=0)
    torch.testing.assert_close(model.answer_head.dense.weight, pretrained.mlm_head.dense.weight, atol=0, rtol=0)
    torch.testing.assert_close(
        model.answer_decoder.embeddings.word_embeddings.weight,
        model.efficientvlm.text_model.embeddings.word_embeddings.weight,
        atol=0,
        rtol=0,
    )
    # Vision width 48 != text width 32: fusion cross-attention keys/values cannot seed the decoder's.
    wide = EfficientVLMForQuestionAnswering(
        _config(vision_config={"hidden_size": 48, "intermediate_size": 96}, num_answer_decoder_layers=3)
    )
    skipped = wide.init_answer_decoder_from_fusion()
    for i in range(2):
        for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            assert f"answer_decoder.encoder.layer.{i}.crossattention.{name}" in skipped
    assert "answer_decoder.encoder.layer.0.crossattention.q_proj.weight" not in skipped
    assert "answer_decoder.encoder.layer.2.mlp.fc1.weight" in skipped  # no third fusion layer


def test_shapes_and_weighted_answer_loss() -> None:
    torch.manual_seed(0)
    model = EfficientVLMForQuestionAnswering(_config()).eval()
    batch = _batch()
    out = model(**batch, output_attentions=True, output_hidden_states=True)
    num_answers, answer_length = batch["answer_input_ids"].shape
    assert out.logits.shape == (num_answers, answer_length, 128)
    assert out.fusion_output.last_hidden_state.shape == (3, len(QUESTION), 32)
    assert len(out.decoder_output.cross_attentions) == 2
    assert out.decoder_output.cross_attentions[0].shape == (num_answers, 4, answer_length, len(QUESTION))
    # X-VLM: per answer the summed token cross-entropy (not [CLS], not padding), times its weight, / questions.
    per_answer = []
    for row in range(num_answers):
        length = int(batch["answer_attention_mask"][row].sum())
        targets = batch["answer_input_ids"][row, 1:length]
        per_answer.append(F.cross_entropy(out.logits[row, : length - 1], targets, reduction="sum"))
    expected = (torch.stack(per_answer) * batch["answer_weights"]).sum() / 3
    torch.testing.assert_close(out.loss, expected)
    # The answers of question 0 read question 0's states: the same answer scores the same as a lone answer.
    rows = [0, 2, 3]
    alone = model(
        **_questions(),
        answer_input_ids=batch["answer_input_ids"][rows],
        answer_attention_mask=batch["answer_attention_mask"][rows],
    ).logits
    torch.testing.assert_close(alone, out.logits[rows], atol=1e-5, rtol=0)


def test_eager_matches_sdpa_and_reaches_the_decoder(tmp_path) -> None:
    torch.manual_seed(0)
    model = EfficientVLMForQuestionAnswering(_config()).eval()
    model.save_pretrained(tmp_path)
    eager = EfficientVLMForQuestionAnswering.from_pretrained(tmp_path, attn_implementation="eager").eval()
    # The answer decoder's config is derived, not a registered sub-config: it must follow the request too.
    assert eager.answer_decoder.config._attn_implementation == "eager"
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(eager(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_trainer_loss_decreases_and_the_trained_answers_are_ranked_and_generated(trained) -> None:
    model, losses, metrics = trained
    assert len(losses) == 40
    assert max(losses[-5:]) < 0.3 * min(losses[:5])
    # Trainer evaluates the loss too (the model says so through `return_loss`; VQA has no "labels").
    with torch.no_grad():
        assert metrics["eval_loss"] == pytest.approx(model(**_batch()).loss.item(), rel=1e-4)
    candidates, mask = _candidates()
    ranking = model.rank_answers(**_questions(), answer_candidates_ids=candidates, answer_candidates_mask=mask, k=3)
    assert ranking.answer_index.tolist() == [0, 1, 2]  # red, green, blue
    assert ranking.topk_indices.shape == ranking.topk_scores.shape == (3, 3)
    torch.testing.assert_close(ranking.topk_probs.sum(1), torch.ones(3))
    sequences = model.generate(**_questions(), max_new_tokens=4)
    assert [row[:3] for row in sequences.tolist()] == [[CLS, 5, SEP], [CLS, 6, SEP], [CLS, 7, SEP]]


def test_answer_ranking_in_training_mode_with_dropout_says_so() -> None:
    """Right after `Trainer.train()` a model is in training mode: `rank_answers` then ran with dropout on, and its
    answers varied from call to call without a word."""
    from transformers.testing_utils import CaptureLogger

    from modeling_efficientvlm import checks_efficientvlm

    candidates, mask = _candidates()
    quiet = EfficientVLMForQuestionAnswering(
        _config(text_config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    )
    noisy = EfficientVLMForQuestionAnswering(_config(text_config={"attention_probs_dropout_prob": 0.1}))
    for model, training, warned in ((quiet, True, False), (noisy, False, False), (noisy, True, True)):
        model.train(training)
        with CaptureLogger(checks_efficientvlm.logger) as logged:
            model.rank_answers(**_questions(), answer_candidates_ids=candidates, answer_candidates_mask=mask, k=2)
        assert ("`rank_answers` runs in training mode with dropout on" in logged.out) == warned


def test_ranking_matches_a_brute_force_likelihood() -> None:
    torch.manual_seed(3)
    model = EfficientVLMForQuestionAnswering(_config()).eval()
    questions = _questions()
    candidates, mask = _candidates()
    brute = _brute_force_log_likelihood(model, questions, candidates, mask)
    cross = next(layer.crossattention for layer in model.answer_decoder.encoder.layer if layer.has_cross_attention)
    projected: list[int] = []
    hook = cross.k_proj.register_forward_hook(lambda module, args, output: projected.append(args[0].shape[0]))
    ranking = model.rank_answers(**questions, answer_candidates_ids=candidates, answer_candidates_mask=mask, k=100)
    hook.remove()
    # Each question's keys / values are computed once for all its candidate answers (3 questions, 2 passes).
    assert projected == [3, 3]
    expected_scores, expected_order = brute.sort(dim=1, descending=True)
    assert ranking.topk_indices.tolist() == expected_order.tolist()
    torch.testing.assert_close(ranking.topk_scores, expected_scores, atol=1e-4, rtol=0)
    # The official score adds the first answer token's log-probability once more.
    official = model.rank_answers(**questions, answer_candidates_ids=candidates, k=len(CANDIDATES), xvlm_scoring=True)
    with torch.no_grad():
        start = model(**questions, answer_input_ids=candidates[:1, :1].expand(3, 1)).logits[:, 0].log_softmax(-1)
    official_brute = brute + start[:, candidates[:, 1]]
    torch.testing.assert_close(
        official.topk_scores, official_brute.sort(dim=1, descending=True).values, atol=1e-4, rtol=0
    )
    # k < candidates: only the k best first tokens survive.
    top2 = model.rank_answers(**questions, answer_candidates_ids=candidates, k=2)
    first_top2 = start[:, candidates[:, 1]].topk(2, dim=1).indices
    assert all(set(a) == set(b) for a, b in zip(top2.topk_indices.tolist(), first_top2.tolist()))


def test_greedy_generate_equals_a_hand_written_loop() -> None:
    torch.manual_seed(1)
    model = EfficientVLMForQuestionAnswering(_config()).eval()
    model.generation_config.eos_token_id = None  # run the full length
    questions = _questions()
    calls = []
    handle = model.efficientvlm.vision_model.register_forward_hook(lambda *args: calls.append(1))
    beams = model.generate(**questions, max_new_tokens=4, num_beams=3, num_return_sequences=2)
    handle.remove()
    assert len(calls) == 1 and beams.shape == (6, 5)
    greedy = model.generate(**questions, max_new_tokens=4)
    expected = torch.full((3, 1), CLS)
    with torch.no_grad():
        for _ in range(4):
            next_token = model(**questions, answer_input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
    assert greedy.tolist() == expected.tolist()


def test_free_generation_honours_max_length_and_max_new_tokens() -> None:
    torch.manual_seed(1)
    model = EfficientVLMForQuestionAnswering(_config()).eval()
    model.generation_config.eos_token_id = None  # run the full length
    questions = _questions()
    assert model.generate(**questions).shape == (3, 1 + 10)  # [CLS] and at most 10 answer tokens by default
    assert model.generate(**questions, max_length=4).shape == (3, 4)
    assert model.generate(**questions, max_new_tokens=2).shape == (3, 1 + 2)
    with pytest.raises(ValueError, match="position table holds 64: pass `max_length` <= 64 or `max_new_tokens` <= 63"):
        model.generate(**questions, max_new_tokens=100)  # before decoding, not at the step past the table


def test_masked_equals_pruned_and_the_decoder_is_untouched(tmp_path) -> None:
    torch.manual_seed(0)
    model = EfficientVLMForQuestionAnswering(_config()).eval()
    model.generation_config.eos_token_id = None
    masks = _random_masks(model)
    batch = _batch()
    candidates, mask = _candidates()
    questions = _questions()
    with torch.no_grad():
        masked = model(**batch, structure_masks=masks)
    masked_ranking = model.rank_answers(**questions, answer_candidates_ids=candidates, k=4, structure_masks=masks)
    masked_tokens = model.generate(**questions, structure_masks=masks, max_new_tokens=3)
    decoder_state = {name: tensor.clone() for name, tensor in model.answer_decoder.state_dict().items()}
    before = _count(model)
    model.prune(masks)
    assert _count(model) < before
    for name, tensor in model.answer_decoder.state_dict().items():
        torch.testing.assert_close(tensor, decoder_state[name], atol=0, rtol=0)
    with torch.no_grad():
        pruned = model(**batch)
    torch.testing.assert_close(pruned.logits, masked.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(pruned.loss, masked.loss, atol=1e-5, rtol=0)
    ranking = model.rank_answers(**questions, answer_candidates_ids=candidates, k=4)
    assert ranking.topk_indices.tolist() == masked_ranking.topk_indices.tolist()
    torch.testing.assert_close(ranking.topk_scores, masked_ranking.topk_scores, atol=1e-5, rtol=0)
    assert model.generate(**questions, max_new_tokens=3).tolist() == masked_tokens.tolist()
    model.save_pretrained(tmp_path)
    reloaded = EfficientVLMForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert reloaded.structure_sizes() == model.structure_sizes()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, pruned.logits, atol=1e-6, rtol=0)


def test_remote_code_reload_in_a_clean_interpreter(trained, tmp_path) -> None:
    model, _, _ = trained
    EfficientVLMForQuestionAnswering.register_for_auto_class("AutoModelForVisualQuestionAnswering")
    model.save_pretrained(tmp_path / "model")
    questions = _questions()
    candidates, _ = _candidates()
    rank_kwargs = {**questions, "answer_candidates_ids": candidates, "k": 3}
    reloaded = load_in_clean_subprocess(
        tmp_path / "model",
        "AutoModelForVisualQuestionAnswering",
        {**questions, "max_new_tokens": 4},
        method="generate",
        calls={"ranking": ("rank_answers", rank_kwargs)},
    )
    assert reloaded["module"].startswith("transformers_modules")
    assert reloaded["class"] == "EfficientVLMForQuestionAnswering"
    assert reloaded["output"].tolist() == model.generate(**questions, max_new_tokens=4).tolist()
    expected = model.rank_answers(**rank_kwargs).topk_indices
    assert reloaded["ranking"]["topk_indices"].tolist() == expected.tolist()


def test_bad_inputs_raise() -> None:
    model = EfficientVLMForQuestionAnswering(_config()).eval()
    batch = _batch()
    with pytest.raises(ValueError, match="answer_counts"):
        model(**{**batch, "answer_counts": torch.tensor([1, 1, 1])})
    with pytest.raises(ValueError, match="pass `answer_counts`"):
        model(**{key: value for key, value in batch.items() if key != "answer_counts"})
    with pytest.raises(ValueError, match="answer_weights"):
        model(**{**batch, "answer_weights": torch.ones(2)})
    candidates, _ = _candidates()
    mixed = candidates.clone()
    mixed[1, 0] = SEP
    with pytest.raises(ValueError, match="same start token"):
        model.rank_answers(**_questions(), answer_candidates_ids=mixed)
    with pytest.raises(ValueError, match="question as `input_ids`"):
        model.generate(pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="num_answer_decoder_layers"):
        EfficientVLMForQuestionAnswering(_config(num_answer_decoder_layers=0))


def test_saved_answer_candidates_are_ranked_and_generated_by_default(tmp_path) -> None:
    from .data_utils import make_tokenizer

    tokenizer = make_tokenizer(tmp_path)
    answers = ["red", "blue square", "two", "yes", "green"]
    torch.manual_seed(2)
    model = EfficientVLMForQuestionAnswering(_config()).eval()
    model.set_answer_candidates(answers, tokenizer)
    assert model.config.answer_candidates == answers
    assert model.config.answer_candidates_ids == tokenizer(answers)["input_ids"]
    model.save_pretrained(tmp_path / "saved")
    reloaded = EfficientVLMForQuestionAnswering.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.config.answer_candidates == answers

    questions = _questions()
    ids, mask = _pad(tokenizer(answers)["input_ids"])
    explicit = model.rank_answers(**questions, answer_candidates_ids=ids, answer_candidates_mask=mask)
    saved = reloaded.rank_answers(**questions)  # k=128 capped at the 5 candidates
    assert saved.topk_indices.shape == (3, len(answers)) and explicit.answers is None
    assert saved.topk_indices.tolist() == explicit.topk_indices.tolist()
    assert saved.answers == [answers[i] for i in explicit.answer_index.tolist()]

    # generate answers from the saved list (the image-text-to-text pipeline's path), free decoding on request.
    generated = reloaded.generate(**questions)
    assert generated.tolist() == ids[explicit.answer_index].tolist()
    assert tokenizer.batch_decode(generated, skip_special_tokens=True) == saved.answers
    top2 = reloaded.generate(**questions, num_return_sequences=2)
    assert top2.tolist() == ids[explicit.topk_indices[:, :2].flatten()].tolist()
    free = reloaded.generate(**questions, use_answer_candidates=False, max_new_tokens=3)
    assert free.shape[0] == 3 and free[:, 0].tolist() == [CLS] * 3

    with pytest.raises(ValueError, match="no saved answer candidates"):
        EfficientVLMForQuestionAnswering(_config()).rank_answers(**questions)
    with pytest.raises(ValueError, match="non-empty"):
        model.set_answer_candidates([], tokenizer)
    # Words the vocabulary lacks become [UNK]: such answers tokenize alike and all but the first could never win.
    with pytest.raises(ValueError, match=r"1 candidate answer\(s\) tokenize like an earlier one, e.g. 'perhaps' like "
                       r"'maybe' \(\[CLS\] \[UNK\] \[SEP\]\)"):  # fmt: skip
        model.set_answer_candidates(["red", "maybe", "perhaps"], tokenizer)
    assert model.config.answer_candidates == answers  # unchanged
    with pytest.raises(ValueError, match="go together"):
        _config(answer_candidates=["red"])


def test_evaluation_ranks_the_saved_answer_candidates_by_default(tmp_path) -> None:
    from trainers.tasks import build_dataset, evaluate_task

    from .data_utils import make_processor, write_vqa_json

    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    data, image_root = write_vqa_json(tmp_path, n=4)
    dataset = build_dataset("vqa", data, image_root, processor)
    torch.manual_seed(0)
    model = EfficientVLMForQuestionAnswering(config).eval()
    with pytest.raises(ValueError, match="answer_list"):
        evaluate_task("vqa", model, dataset, processor)
    model.set_answer_candidates(["red", "blue"], processor.tokenizer)
    saved = evaluate_task("vqa", model, dataset, processor)
    given = evaluate_task("vqa", model, dataset, processor, answer_list=["red", "blue"])
    assert set(saved.predictions) <= {"red", "blue"} and saved.predictions == given.predictions
    assert saved.metrics == given.metrics


def test_evaluation_scores_answers_the_official_way_when_asked(tmp_path, monkeypatch) -> None:
    """`--xvlm_scoring` (evaluate) reaches `rank_answers`: the paper's numbers count the first answer token twice."""
    from trainers.tasks import build_dataset, evaluate_task

    from .data_utils import make_processor, write_vqa_json

    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    data, image_root = write_vqa_json(tmp_path, n=4)
    dataset = build_dataset("vqa", data, image_root, processor)
    model = EfficientVLMForQuestionAnswering(config).eval()
    model.set_answer_candidates(["red", "blue", "green"], processor.tokenizer)
    seen, rank = [], model.rank_answers

    def spy(*args, **kwargs):
        seen.append(kwargs["xvlm_scoring"])
        return rank(*args, **kwargs)

    monkeypatch.setattr(model, "rank_answers", spy)
    official = evaluate_task("vqa", model, dataset, processor, xvlm_scoring=True)
    plain = evaluate_task("vqa", model, dataset, processor)
    assert seen == [True, False] and len(official.predictions) == len(plain.predictions) == 4
    with pytest.raises(ValueError, match="--xvlm_scoring scores VQA answers; the nlvr2 task ranks none"):
        evaluate_task("nlvr2", model, dataset, processor, xvlm_scoring=True)


def test_candidates_without_the_eval_answers_are_named_with_the_accuracy_they_can_reach(tmp_path) -> None:
    """An --answer_list made for another split (["purple", "orange"]) scored VQA accuracy 0.0 without a word; now
    the evaluation of finetune / prune / export (`checked_eval_dataset`) and of evaluate warns first."""
    import json

    from transformers.testing_utils import CaptureLogger

    from trainers import training
    from trainers.commands import evaluate
    from trainers.tasks import build_dataset
    from trainers.training import checked_eval_dataset, warn_on_answer_coverage

    from .data_utils import make_processor, write_vqa_json

    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    data, image_root = write_vqa_json(tmp_path, n=3)  # gold answers: red, green, blue (7 of 10), red, blue
    dataset = build_dataset("vqa", data, image_root, processor)

    def warned(answers: list[str], source: str = "--answer_list a.json") -> str:
        with CaptureLogger(training.logger) as logged:
            warn_on_answer_coverage(dataset, answers, source, data)
        return logged.out

    # Only question 1 has "green" among its answers, 7 annotators of 10 (accuracy 1.0): 1 / 3 at best.
    assert warned(["green", "purple"]).strip() == (
        f"1 of 3 eval questions ({data}) have a gold answer among the 2 candidate answers (--answer_list a.json): "
        "VQA accuracy cannot exceed 0.3333."
    )
    assert warned(["purple", "orange"]).startswith(
        f"None of the 3 eval questions ({data}) has a gold answer among the 2 candidate answers (--answer_list "
        "a.json): VQA accuracy will be 0.0 whatever the model does."
    )
    assert warned(["Red.", "GREEN", "purple"]) == ""  # matched as VQA accuracy matches: normalised; every question
    unanswered = build_dataset("vqa", [{**r, "answer": []} for r in json.loads(data.read_text())], image_root)
    with CaptureLogger(training.logger) as logged:  # a test split is answered unscored: nothing to reach
        warn_on_answer_coverage(unanswered, ["purple"], "--answer_list a.json")
    assert logged.out == ""

    # finetune / prune / export check their eval split with `checked_eval_dataset`: given or saved candidates.
    model = EfficientVLMForQuestionAnswering(config).eval()
    with CaptureLogger(training.logger) as logged:
        checked_eval_dataset("vqa", data, image_root, processor, model, ["purple", "orange"], answers_source="--x")
    assert "None of the 3 eval questions" in logged.out and "candidate answers (--x)" in logged.out
    model.set_answer_candidates(["green", "purple"], processor.tokenizer)
    with CaptureLogger(training.logger) as logged:
        checked_eval_dataset("vqa", data, image_root, processor, model, model_name="my_model")
    assert "1 of 3 eval questions" in logged.out and "(saved with my_model): VQA accuracy cannot exceed 0.3333" in (
        logged.out
    )

    # `efficientvlm evaluate`: the warning, then the accuracy it announced.
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["purple", "orange"]))
    argv = ["--task", "vqa", "--model_name_or_path", str(folder), "--eval_file", str(data)]
    argv += ["--image_root", str(image_root), "--device", "cpu"]
    with CaptureLogger(training.logger) as logged:
        assert evaluate.main([*argv, "--answer_list", str(answers)]) == {"vqa_accuracy": 0.0}
    assert f"candidate answers (--answer_list {answers}): VQA accuracy will be 0.0" in logged.out
    with CaptureLogger(training.logger) as logged:
        evaluate.main(argv)
    assert f"(saved with {folder}): VQA accuracy cannot exceed 0.3333" in logged.out
