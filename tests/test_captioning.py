"""Captioning model: shapes and loss, loading a pre-training checkpoint, training with Trainer, generate()
(greedy, beam search), masked == pruned, remote-code reload in a clean interpreter."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForPreTraining
from modeling_efficientvlm.modeling_efficientvlm_captioning import EfficientVLMForConditionalGeneration

from .remote_code_utils import load_in_clean_subprocess
from .test_modeling import _count, _random_masks

# A tiny vocabulary where [PAD]=0, [CLS]=2, [SEP]=3 (as tests/data_utils.py), not BERT's 101/102: generation
# must take its special tokens from the config.
PAD, CLS, SEP = 0, 2, 3
PROMPT = [CLS, 30, 40, 41]  # "[CLS] a picture of"
CAPTIONS = {0: [5, 16], 2: [7, 17]}  # red image -> "red square", blue image -> "blue circle"


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they lose a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides) -> EfficientVLMConfig:
    return EfficientVLMConfig.from_preset(
        "tiny", text_config={"bos_token_id": CLS, "eos_token_id": SEP, "pad_token_id": PAD}, **overrides
    )


def _image(channel: int) -> torch.Tensor:
    image = -torch.ones(3, 32, 32)
    image[channel] = 1.0
    return image


class _CaptionDataset(Dataset):
    """Two solid-colour images, each with its caption after the prompt."""

    def __len__(self) -> int:
        return len(CAPTIONS)

    def __getitem__(self, index: int) -> dict:
        channel = list(CAPTIONS)[index]
        return {"pixel_values": _image(channel), "input_ids": PROMPT + CAPTIONS[channel] + [SEP]}


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pads the texts; labels are the ids with -100 on padding and on the prompt."""
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), PAD)
    attention_mask = torch.zeros_like(input_ids)
    for row, item in enumerate(items):
        input_ids[row, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
        attention_mask[row, : len(item["input_ids"])] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : len(PROMPT)] = -100
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[EfficientVLMForConditionalGeneration, list[float], dict]:
    """The model after 50 steps of the stock Trainer on the two captions, the logged losses and
    `Trainer.evaluate` metrics."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one
    torch.manual_seed(0)
    model = EfficientVLMForConditionalGeneration(_config())
    args = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("trainer")),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        max_steps=50,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_CaptionDataset(), data_collator=_collate)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = trainer.evaluate(_CaptionDataset())
    torch.set_num_threads(threads)
    return model.eval(), losses, metrics


def _batch() -> dict[str, torch.Tensor]:
    return _collate([_CaptionDataset()[0], _CaptionDataset()[1]])


def _prompt_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([_image(0), _image(2)]), torch.tensor([PROMPT])


# ------------------------------------------------------------------------------------------------------------


# Parameters of the official checkpoints (reference key listings, without the LM decoder weight tied to the
# embeddings and the duplicate `cls.predictions.bias`). Our backbone also holds the ITC projections and temperature.
ITC_PARAMETERS = 2 * (768 * 256 + 256) + 1


@pytest.mark.parametrize(("preset", "official"), [("xvlm-base", 209_497_146), ("efficientvlm-small", 117_350_970)])
def test_parameter_count_matches_the_official_checkpoint(preset: str, official: int) -> None:
    with torch.device("meta"):
        model = EfficientVLMForConditionalGeneration(EfficientVLMConfig.from_preset(preset))
    assert _count(model) == official + ITC_PARAMETERS


def test_shapes_loss_and_tied_head() -> None:
    torch.manual_seed(0)
    model = EfficientVLMForConditionalGeneration(_config()).eval()
    batch = _batch()
    out = model(**batch, output_attentions=True, output_hidden_states=True)
    vocab = model.config.text_config.vocab_size
    assert out.logits.shape == (2, batch["input_ids"].shape[1], vocab)
    assert out.vision_output.last_hidden_state.shape == (2, 17, 32)
    assert len(out.text_output.hidden_states) == 1 + 4 and len(out.text_output.cross_attentions) == 2
    # Causal: the first token attends only to itself.
    assert out.text_output.attentions[0][:, :, 0, 1:].abs().max() == 0
    # Shifted next-token cross-entropy over the caption tokens.
    labels = batch["labels"]
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    smoothed = EfficientVLMForConditionalGeneration(_config(label_smoothing=0.1)).eval()
    smoothed.load_state_dict(model.state_dict())
    expected_smoothed = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=0.1
    )
    torch.testing.assert_close(smoothed(**batch).loss, expected_smoothed)
    assert not torch.allclose(expected_smoothed, out.loss)
    assert model.lm_head.decoder.weight is model.efficientvlm.text_model.embeddings.word_embeddings.weight
    # Future tokens do not change earlier logits.
    changed = batch["input_ids"].clone()
    changed[:, -2] = 9
    again = model(batch["pixel_values"], changed, batch["attention_mask"]).logits
    torch.testing.assert_close(again[:, :-2], out.logits[:, :-2])


def test_loads_a_pretraining_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    pretrained = EfficientVLMForPreTraining(_config())
    pretrained.save_pretrained(tmp_path)
    model = EfficientVLMForConditionalGeneration.from_pretrained(tmp_path)
    for name, tensor in pretrained.efficientvlm.state_dict().items():
        torch.testing.assert_close(model.efficientvlm.state_dict()[name], tensor, atol=0, rtol=0)
    # X-VLM also starts the LM head from the MLM head.
    mapped = EfficientVLMForConditionalGeneration.from_pretrained(tmp_path, key_mapping={r"^mlm_head\.": "lm_head."})
    for name, tensor in pretrained.mlm_head.state_dict().items():
        torch.testing.assert_close(mapped.lm_head.state_dict()[name], tensor, atol=0, rtol=0)


def test_trainer_loss_decreases_and_greedy_generation_returns_the_caption(trained) -> None:
    model, losses, metrics = trained
    assert len(losses) == 50
    assert max(losses[-5:]) < 0.5 * min(losses[:5])
    with torch.no_grad():
        assert metrics["eval_loss"] == pytest.approx(model(**_batch()).loss.item(), rel=1e-4)
    pixel_values, prompt = _prompt_batch()
    sequences = model.generate(pixel_values=pixel_values, input_ids=prompt, max_new_tokens=6)
    assert sequences.tolist() == [PROMPT + CAPTIONS[0] + [SEP], PROMPT + CAPTIONS[2] + [SEP]]
    # Without a prompt generation starts from the config's [CLS].
    unprompted = model.generate(pixel_values=pixel_values, max_new_tokens=3)
    assert unprompted[:, 0].tolist() == [CLS, CLS]


def test_beam_search_returns_num_return_sequences(trained) -> None:
    model, _, _ = trained
    pixel_values, prompt = _prompt_batch()
    out = model.generate(
        pixel_values=pixel_values,
        input_ids=prompt,
        max_new_tokens=6,
        num_beams=3,
        num_return_sequences=2,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape[0] == 4
    assert out.sequences_scores.shape == (4,)
    # The best beam of each image is its caption.
    assert out.sequences[0].tolist()[:7] == PROMPT + CAPTIONS[0] + [SEP]
    assert out.sequences[2].tolist()[:7] == PROMPT + CAPTIONS[2] + [SEP]
    assert out.sequences_scores[0] >= out.sequences_scores[1]


def test_greedy_generate_equals_a_hand_written_loop_and_encodes_the_image_once() -> None:
    torch.manual_seed(1)
    model = EfficientVLMForConditionalGeneration(_config()).eval()
    model.generation_config.eos_token_id = None  # run the full length
    pixel_values, prompt = _prompt_batch()
    calls = []
    handle = model.efficientvlm.vision_model.register_forward_hook(lambda *args: calls.append(1))
    sequences = model.generate(pixel_values=pixel_values, input_ids=prompt, max_new_tokens=5, num_beams=2)
    handle.remove()
    assert len(calls) == 1
    greedy = model.generate(pixel_values=pixel_values, input_ids=prompt, max_new_tokens=5)
    expected = prompt.expand(2, -1)
    with torch.no_grad():
        for _ in range(5):
            next_token = model(pixel_values, expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
    assert greedy.tolist() == expected.tolist()
    assert sequences.shape == (2, len(PROMPT) + 5)


def test_generate_honours_max_length_and_max_new_tokens_and_stops_at_the_text_limit(tmp_path) -> None:
    torch.manual_seed(1)
    model = EfficientVLMForConditionalGeneration(_config()).eval()
    model.generation_config.eos_token_id = None  # run the full length
    pixel_values, prompt = _prompt_batch()
    inputs = {"pixel_values": pixel_values, "input_ids": prompt}
    # By default the whole sequence, prompt included, stays within the text limit the model was trained on.
    assert model.generate(**inputs).shape == (2, model.config.max_text_length)
    assert model.generate(**inputs, max_length=10).shape == (2, 10)
    with CaptureLogger(transformers_logging.get_logger("transformers.generation.utils")) as logged:
        assert model.generate(**inputs, max_new_tokens=3).shape == (2, len(PROMPT) + 3)
    assert "Both `max_new_tokens`" not in logged.out  # the default max_length is no user's choice
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["max_length"] == model.config.max_text_length and "max_new_tokens" not in saved
    # A folder saved by an earlier version, whose default was `max_new_tokens`, honours `max_length` too.
    saved.pop("max_length")
    (tmp_path / "generation_config.json").write_text(json.dumps({**saved, "max_new_tokens": 32}))
    reloaded = EfficientVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    reloaded.generation_config.eos_token_id = None
    assert reloaded.generate(**inputs, max_length=10).shape == (2, 10)
    assert reloaded.generate(**inputs).shape == (2, model.config.max_text_length)


def test_a_length_beyond_the_position_table_raises_before_decoding() -> None:
    model = EfficientVLMForConditionalGeneration(_config()).eval()
    pixel_values, prompt = _prompt_batch()
    inputs = {"pixel_values": pixel_values, "input_ids": prompt}
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    expected = (
        r"`max_new_tokens`=100 after the 4 tokens .* allows sequences of 104 tokens, but the model's position table "
        r"holds 64: pass `max_length` <= 64 or `max_new_tokens` <= 60"
    )
    with pytest.raises(ValueError, match=expected):
        model.generate(**inputs, max_new_tokens=100)
    with pytest.raises(ValueError, match=r"`max_length`=65 allows sequences of 65 tokens, .* holds 64"):
        model.generate(**inputs, max_length=65)
    with pytest.raises(ValueError, match="The prompt has 70 tokens but the model's position table holds 64"):
        model.generate(pixel_values=pixel_values, input_ids=torch.tensor([PROMPT + [30] * 66]), max_new_tokens=1)
    handle.remove()
    assert calls == []  # nothing was decoded
    model.generation_config.eos_token_id = None  # run the full length
    assert model.generate(**inputs, max_new_tokens=60).shape == (2, 64)  # the whole table is usable


def test_masked_equals_pruned(tmp_path) -> None:
    torch.manual_seed(0)
    model = EfficientVLMForConditionalGeneration(_config()).eval()
    model.generation_config.eos_token_id = None
    masks = _random_masks(model)
    batch = _batch()
    pixel_values, prompt = _prompt_batch()
    with torch.no_grad():
        masked = model(**batch, structure_masks=masks)
    masked_tokens = model.generate(pixel_values=pixel_values, input_ids=prompt, structure_masks=masks, max_new_tokens=4)
    before = _count(model)
    model.prune(masks)
    assert _count(model) < before
    with torch.no_grad():
        pruned = model(**batch)
    torch.testing.assert_close(pruned.logits, masked.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(pruned.loss, masked.loss, atol=1e-5, rtol=0)
    assert (
        model.generate(pixel_values=pixel_values, input_ids=prompt, max_new_tokens=4).tolist() == masked_tokens.tolist()
    )
    model.save_pretrained(tmp_path)
    reloaded = EfficientVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.structure_sizes() == model.structure_sizes()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, pruned.logits, atol=1e-6, rtol=0)


def test_remote_code_reload_in_a_clean_interpreter_generates_the_same_tokens(trained, tmp_path) -> None:
    model, _, _ = trained
    EfficientVLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    model.save_pretrained(tmp_path / "model")
    pixel_values, prompt = _prompt_batch()
    inputs = {"pixel_values": pixel_values, "input_ids": prompt}
    beam_kwargs = {**inputs, "max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2}
    reloaded = load_in_clean_subprocess(
        tmp_path / "model",
        "AutoModelForImageTextToText",
        {**inputs, "max_new_tokens": 6},
        method="generate",
        calls={"beams": ("generate", beam_kwargs)},
    )
    assert reloaded["module"].startswith("transformers_modules")
    assert reloaded["class"] == "EfficientVLMForConditionalGeneration"
    assert reloaded["output"].tolist() == model.generate(**inputs, max_new_tokens=6).tolist()
    assert reloaded["beams"].tolist() == model.generate(**beam_kwargs).tolist()


def test_bad_generation_inputs_raise() -> None:
    model = EfficientVLMForConditionalGeneration(_config()).eval()
    pixel_values, _ = _prompt_batch()
    padded = torch.tensor([PROMPT, PROMPT[:2] + [PAD, PAD]])
    with pytest.raises(ValueError, match="must not be padded"):
        model.generate(pixel_values=pixel_values, input_ids=padded, attention_mask=(padded != PAD).long())
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        model.generate(pixel_values=pixel_values, input_ids=torch.tensor([PROMPT] * 3))
    with pytest.raises(ValueError, match="needs `pixel_values`"):
        model.generate(input_ids=torch.tensor([PROMPT]))
    with pytest.raises(ValueError, match="labels"):
        model(pixel_values, torch.tensor([PROMPT] * 2), labels=torch.tensor([[1, 2]] * 2))
    # Built from a preset, a model keeps BERT's [CLS] / [SEP] ids (101 / 102) until they are set from its tokenizer:
    # with a smaller vocabulary that was an IndexError deep in the embedding.
    small = _config()
    small.text_config.vocab_size = 100
    unsynced = EfficientVLMForConditionalGeneration(small).eval()
    unsynced.generation_config.bos_token_id = 101
    with pytest.raises(ValueError, match=r"`bos_token_id` 101 is not in the model's vocabulary of 100 tokens"):
        unsynced.generate(pixel_values=pixel_values, max_new_tokens=2)


def test_caption_predictions_name_each_image_by_its_path_and_its_records_image_id(tmp_path) -> None:
    """The items wrote the evaluation's own image index as `image_id` (a record's "image_id": 9 came out as 0):
    now it is `image_index`, beside the path as the records give it and the record's own `image_id`."""
    from trainers.tasks import build_dataset, evaluate_task

    from .data_utils import make_processor, write_image_text_json

    processor = make_processor(tmp_path)
    data, image_root = write_image_text_json(tmp_path, n=3)
    records = json.loads(data.read_text())
    records[1]["image_id"] = 9
    dataset = build_dataset("captioning", records, image_root, processor)
    model = EfficientVLMForConditionalGeneration(_config()).eval()
    items = evaluate_task("captioning", model, dataset, processor, max_new_tokens=2).items
    assert [
        {key: value for key, value in item.items() if key not in ("prediction", "references")} for item in items
    ] == [
        {"image_index": 0, "image": "img0.png"},
        {"image_index": 1, "image": "img1.png", "image_id": 9},
        {"image_index": 2, "image": "img2.png"},
    ]
    assert items[1]["references"] == ["a picture of a green square", "a picture of a green circle"]


def test_caption_evaluation_decodes_with_the_beams_and_lengths_asked(tmp_path) -> None:
    """`evaluate --num_beams 3 --min_new_tokens 1 --max_new_tokens 16` is the official evaluation (greedy, at most 20
    new tokens, was the only one); each option reaches `generate`, and bad values or another task are refused."""
    from trainers.commands import evaluate as evaluate_command
    from trainers.tasks import build_dataset, evaluate_task

    from .data_utils import make_processor, write_image_text_json

    processor = make_processor(tmp_path)
    data, image_root = write_image_text_json(tmp_path, n=3)
    dataset = build_dataset("captioning", data, image_root, processor)
    torch.manual_seed(0)
    model = EfficientVLMForConditionalGeneration(_config()).eval()
    prompt = processor.tokenizer(["a picture of "] * 3, return_tensors="pt")["input_ids"][:, :-1]
    pixel_values = processor.image_processor([dataset.get_image(i) for i in range(3)], return_tensors="pt")
    beams = {"num_beams": 3, "min_new_tokens": 3, "max_new_tokens": 4}
    for options, decoding in (({}, {"max_new_tokens": 20}), (beams, beams)):  # the default: greedy, 20 tokens
        with torch.no_grad():
            ids = model.generate(pixel_values=pixel_values["pixel_values"], input_ids=prompt, **decoding)
        expected = processor.tokenizer.batch_decode(ids[:, prompt.shape[1] :], skip_special_tokens=True)
        got = evaluate_task("captioning", model, dataset, processor, **options).predictions
        assert got == [text.strip() for text in expected]
    new_tokens = ids[:, prompt.shape[1] :]
    assert new_tokens.shape[1] >= 3 and not (new_tokens[:, :3] == processor.tokenizer.sep_token_id).any()
    for bad in ({"num_beams": 0}, {"min_new_tokens": 5, "max_new_tokens": 4}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError, match="Captions need num_beams >= 1 and 0 <= min_new_tokens <= max_new_tokens"):
            evaluate_task("captioning", model, dataset, processor, **bad)
    model.config.save_pretrained(tmp_path)  # a model folder as far as the flags' checks go
    with pytest.raises(ValueError, match="--min_new_tokens and --num_beams decode captions; the vqa task generates"):
        evaluate_command.main(
            ["--task", "vqa", "--model_name_or_path", str(tmp_path), "--eval_file", str(data), "--num_beams", "3"]
            + ["--min_new_tokens", "1"]
        )


def test_the_pipeline_text_after_the_prompt_starts_with_a_space_only_when_a_new_word_does(tmp_path) -> None:
    """The README said `return_full_text=False` output starts with a space; the pipeline cuts the decoded caption at
    the prompt's length, so a first token that continues the prompt's last word ("##s") comes with none."""
    import re
    from pathlib import Path

    from transformers import pipeline

    from trainers.saving import save_model_folder

    from .data_utils import VOCAB, make_image, make_processor

    torch.manual_seed(0)
    model = EfficientVLMForConditionalGeneration(_config())
    with torch.no_grad():  # every new token "##s"
        model.get_output_embeddings().bias[VOCAB.index("##s")] = 100.0
    save_model_folder(model, make_processor(tmp_path), tmp_path / "captioning")
    caption = pipeline("image-text-to-text", model=str(tmp_path / "captioning"))
    [after] = caption(make_image(), text="a picture of", return_full_text=False, max_new_tokens=2)
    [full] = caption(make_image(), text="a picture of", max_new_tokens=2)
    assert (full["generated_text"], after["generated_text"]) == ("a picture ofss", "ss")

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [said] = re.findall(r"return_full_text=False the text after the prompt(.*?)\n\n", readme, re.S)
    said = " ".join(line.lstrip("# ") for line in said.splitlines())
    assert "not when the first new token is a WordPiece continuation" in said, said
