"""A downloaded checkpoint of every task works the way a Transformers user reaches for it: saved folders (model +
processor) are used in ONE clean process that cannot import this repository, through `pipeline`, the Auto classes
and the documented one-call methods."""

from __future__ import annotations

import torch

from modeling_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMForConditionalGeneration,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForQuestionAnswering,
    EfficientVLMForVisualReasoning,
)
from trainers.saving import save_model_folder

from .data_utils import CLS_ID, make_image, make_processor, save_image
from .remote_code_utils import run_in_clean_subprocess

ANSWERS = ["red", "blue", "green square", "yes"]
IMAGE_FILES = ("photo.jpg", "left.jpg", "right.jpg")
LABELS = ["red", "green", "blue"]

_CODE = """
import transformers
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

folders, image = payload["folders"], payload["image"]

classify = pipeline("zero-shot-image-classification", model=folders["retrieval"], trust_remote_code=True)
result["zero_shot"] = classify(image, candidate_labels=payload["labels"], hypothesis_template="{}")
result["zero_shot_single"] = classify(image, candidate_labels=payload["labels"][:1], hypothesis_template="{}")
# The labels as written, scored by the model itself: what the pipeline gives with hypothesis_template="{}".
own = AutoProcessor.from_pretrained(folders["retrieval"], trust_remote_code=True)
texts = own(text=payload["labels"], padding=True)
logits = classify.model(
    own(images=image)["pixel_values"], texts["input_ids"], texts["attention_mask"], return_loss=False
).logits_per_image
result["zero_shot_own"] = dict(zip(payload["labels"], logits.softmax(-1)[0].tolist()))
result["zero_shot_template"] = classify(image, candidate_labels=payload["labels"])  # "This is a photo of {}."
# On a CPU in float32: the products from oneDNN-packed weights (a tiny model's too: min_flops=0), the same scores.
classify.model.pack_cpu_weights(min_flops=0)
packed = classify(image, candidate_labels=payload["labels"], hypothesis_template="{}")
packs = [len(m.cpu_packs) for m in classify.model.modules() if getattr(m, "cpu_packs", None) is not None]
result["zero_shot_packed"] = (packed, packs)

answer = pipeline("image-text-to-text", model=folders["vqa"], trust_remote_code=True, return_full_text=False)
result["vqa"] = answer(image, text="what color is the square ?")
result["vqa_batch"] = answer([image, image], text=["what color ?", "is there a square ?"])
result["vqa_full"] = answer(image, text="what color ?", return_full_text=True)

# In bfloat16 (fast on CPUs with bfloat16 matmul units): the ITC scores stay float32.
import torch
low = dict(trust_remote_code=True, dtype=torch.bfloat16)
classify = pipeline("zero-shot-image-classification", model=folders["retrieval"], **low)
result["zero_shot_bf16"] = (
    str(classify.model.dtype), classify(image, candidate_labels=payload["labels"], hypothesis_template="{}")
)
answer = pipeline("image-text-to-text", model=folders["vqa"], return_full_text=False, **low)
result["vqa_bf16"] = (str(answer.model.dtype), answer(image, text="what color is the square ?"))

caption = pipeline("image-text-to-text", model=folders["captioning"], trust_remote_code=True)
result["caption"] = caption(image, text="a picture of", return_full_text=False, max_new_tokens=5)
result["caption_full"] = caption(image, text="a picture of", max_new_tokens=5)

nlvr2 = transformers.AutoModelForSequenceClassification.from_pretrained(folders["nlvr2"], trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folders["nlvr2"], trust_remote_code=True)
result["nlvr2"] = nlvr2.eval().predict([image, image], [image, image], ["the left image is red", "two"], processor)
result["nlvr2_id2label"] = dict(nlvr2.config.id2label)

# Every snippet of every folder's model card runs as written (its images stand for photo.jpg / left / right).
import contextlib, io, re
result["card_snippets"] = {}
for task, folder in folders.items():
    card = open(f"{folder}/README.md", encoding="utf-8").read()
    blocks = re.findall(r"```python\\n(.*?)```", card, flags=re.S)
    # The card names the model by its folder name (a Hub id once pushed); run it from the folder's path.
    for name, path in [*payload["image_files"].items(), (f'"{folder.rsplit("/", 1)[-1]}"', f'"{folder}"')]:
        blocks = [block.replace(name, path) for block in blocks]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        for block in blocks:
            exec(block, {})
    result["card_snippets"][task] = (len(blocks), printed.getvalue())

result["auto_model"] = {}
for task, folder in folders.items():
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    features = model.get_image_features(processor(images=image)["pixel_values"])
    result["auto_model"][task] = (type(model).__name__, type(model).__module__, tuple(features.shape))
"""


def _save(model, processor, folder) -> str:
    """Saved as every stage saves (`save_model_folder`): weights, config, code, processor, model card."""
    save_model_folder(model, processor, folder)
    return str(folder)


def test_every_task_works_from_a_saved_folder_without_the_package(tmp_path) -> None:
    config = EfficientVLMConfig.from_preset("tiny")  # BERT's special-token ids: the save takes the tokenizer's
    processor = make_processor(tmp_path / "vocab", image_size=config.vision_config.image_size)
    torch.manual_seed(0)
    vqa = EfficientVLMForQuestionAnswering(config)
    vqa.set_answer_candidates(ANSWERS, processor.tokenizer)
    models = {
        "retrieval": EfficientVLMForImageTextRetrieval(config),
        "vqa": vqa,
        "captioning": EfficientVLMForConditionalGeneration(config),
        "nlvr2": EfficientVLMForVisualReasoning(config),
    }
    folders = {task: _save(model, processor, tmp_path / task) for task, model in models.items()}
    # The answers travel in config.json: nothing else is needed to rank them.
    assert not any(name.startswith("answer") for name in {p.name for p in (tmp_path / "vqa").iterdir()})

    image_files = {name: str(save_image(tmp_path / "images" / name, "red", 40)) for name in IMAGE_FILES}
    payload = {"folders": folders, "image": make_image("red", 40), "labels": LABELS, "image_files": image_files}
    result = run_in_clean_subprocess(_CODE, tmp_path / "work", payload)

    zero_shot = result["zero_shot"]
    assert sorted(item["label"] for item in zero_shot) == sorted(LABELS)
    assert abs(sum(item["score"] for item in zero_shot) - 1) < 1e-5
    assert [item["score"] for item in zero_shot] == sorted((item["score"] for item in zero_shot), reverse=True)
    assert all(abs(item["score"] - result["zero_shot_own"][item["label"]]) < 1e-5 for item in zero_shot)
    # The pipeline's default template changes the texts scored, so the scores too.
    template = {item["label"]: item["score"] for item in result["zero_shot_template"]}
    assert max(abs(template[label] - result["zero_shot_own"][label]) for label in LABELS) > 1e-3
    # One label is a query too, not a one-pair training batch.
    assert [(item["label"], round(item["score"], 6)) for item in result["zero_shot_single"]] == [(LABELS[0], 1.0)]
    packed, packs = result["zero_shot_packed"]
    assert packs and any(packs)  # the encoders' blocks ran packed (ITC runs no fusion layer)
    assert [item["label"] for item in packed] == [item["label"] for item in zero_shot]
    assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(packed, zero_shot))

    dtype, zero_shot_bf16 = result["zero_shot_bf16"]
    assert dtype == "torch.bfloat16" and abs(sum(item["score"] for item in zero_shot_bf16) - 1) < 1e-5
    scores = {item["label"]: item["score"] for item in zero_shot}
    assert all(abs(item["score"] - scores[item["label"]]) < 0.02 for item in zero_shot_bf16)
    dtype, [vqa_bf16] = result["vqa_bf16"]
    assert dtype == "torch.bfloat16" and vqa_bf16["generated_text"] in ANSWERS

    [vqa_answer] = result["vqa"]
    assert vqa_answer["input_text"] == "what color is the square ?"
    assert vqa_answer["generated_text"] in ANSWERS  # only the answer, from the saved candidates
    assert [answer["input_text"] for answer in result["vqa_batch"]] == ["what color ?", "is there a square ?"]
    assert all(answer["generated_text"] in ANSWERS for answer in result["vqa_batch"])

    # Without `return_full_text=False` the pipeline glues the question and the answer.
    assert result["vqa_full"][0]["generated_text"] == "what color ?" + result["vqa_batch"][0]["generated_text"]

    [caption] = result["caption"]  # the words after the prompt
    [caption_full] = result["caption_full"]  # the whole caption, the prompt's words first
    assert isinstance(caption["generated_text"], str) and caption["generated_text"].strip()
    assert caption_full["generated_text"] == "a picture of" + caption["generated_text"]

    assert result["nlvr2_id2label"] == {0: "False", 1: "True"}
    assert len(result["nlvr2"]) == 2
    for prediction in result["nlvr2"]:
        assert isinstance(prediction["label"], bool) and set(prediction["probabilities"]) == {"False", "True"}
        assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-5
        assert prediction["label"] == (prediction["probabilities"]["True"] > prediction["probabilities"]["False"])

    for task, (blocks, printed) in result["card_snippets"].items():
        assert blocks >= 1 and printed.strip(), task
    assert any(answer in result["card_snippets"]["vqa"][1] for answer in ANSWERS)

    for task, (name, module, shape) in result["auto_model"].items():
        assert name == type(models[task]).__name__ and module.startswith("transformers_modules.")
        assert shape == (1, config.embed_dim)


def _task_inputs(config: EfficientVLMConfig, task: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    images = (3, 2, 3, size, size) if task == "nlvr2" else (3, 3, size, size)
    input_ids = torch.randint(5, 100, (3, 6), generator=generator)
    input_ids[:, 0] = CLS_ID
    return {
        "pixel_values": torch.randn(*images, generator=generator),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
    }


def test_inference_forwards_are_deterministic_and_take_token_type_ids(tiny_config) -> None:
    """Without labels (and with `return_loss=False`) every task forward only infers: no loss, no sampling, the
    same result twice; `token_type_ids` (BERT tokenizers emit them) are accepted, zeros change nothing."""
    classes = {
        "retrieval": (EfficientVLMForImageTextRetrieval, "logits_per_image"),
        "vqa": (EfficientVLMForQuestionAnswering, "fusion_output"),
        "captioning": (EfficientVLMForConditionalGeneration, "logits"),
        "nlvr2": (EfficientVLMForVisualReasoning, "logits"),
    }
    for task, (model_class, field) in classes.items():
        torch.manual_seed(0)
        model = model_class(tiny_config).eval()
        inputs = _task_inputs(tiny_config, task)
        with torch.no_grad():
            first = model(**inputs, return_loss=False) if task in ("retrieval", "vqa") else model(**inputs)
            torch.manual_seed(1)
            second = model(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"]), return_loss=False)
        assert first.loss is None and second.loss is None, task
        value, again = getattr(first, field), getattr(second, field)
        if field == "fusion_output":
            value, again = value.last_hidden_state, again.last_hidden_state
        assert torch.equal(value, again), task


def test_auto_classes_pick_each_task_model_in_process(tiny_config, tmp_path) -> None:
    """With the package installed one config class serves every task: `config.architectures` picks the class for
    the auto classes that load several tasks (`AutoModel`, `AutoModelForImageTextToText`)."""
    from transformers import AutoModel, AutoModelForImageTextToText

    for model_class in (EfficientVLMForQuestionAnswering, EfficientVLMForConditionalGeneration):
        model_class(tiny_config).save_pretrained(tmp_path / model_class.__name__)
        assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / model_class.__name__)) is model_class
        assert type(AutoModel.from_pretrained(tmp_path / model_class.__name__)) is model_class
    saved = EfficientVLMConfig.from_pretrained(tmp_path / "EfficientVLMForQuestionAnswering")
    assert set(saved.auto_map) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForVisualQuestionAnswering",
        "AutoModelForImageTextToText",
    }
    # A config copied from another task's folder does not keep that task's auto_map entries on save.
    EfficientVLMForImageTextRetrieval(saved).save_pretrained(tmp_path / "retrieval")
    assert set(EfficientVLMConfig.from_pretrained(tmp_path / "retrieval").auto_map) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForZeroShotImageClassification",
    }
