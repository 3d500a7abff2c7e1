"""What the app computes, without any UI: load saved models (folders or Hub ids) with their processors, and answer
one input with every model, timing each.

This module (and the rest of `trainers.app`) imports only torch, transformers and PIL, never the rest of this
repository: saved folders carry their own code (`trust_remote_code=True`), so the app runs as a Hugging Face Space
holding only `app.py` and this package (see `space/README.md`).

Input kinds and the model classes that take them (by class name, so remote-code classes match too):

- `question` (an image and a question): VQA models rank their saved answer candidates (free decoding without them);
- `captions` (an image and candidate captions): retrieval models score each caption by ITC (softmax over the
  candidates, as the zero-shot pipeline) and by their ITM head (probability of a match);
- `pair` (two images and a statement): NLVR2 models say whether the statement is true of the pair;
- `caption` (an image, and a prompt or none): captioning models write a caption, greedily, after the prompt (by
  default the one the captioning trainer writes before every caption, "a picture of").

A model that does not take an input kind answers "n/a" for it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

INPUT_KINDS = ("question", "captions", "pair", "caption")
# Model class name -> the input kind it answers.
KIND_OF_CLASS = {
    "EfficientVLMForQuestionAnswering": "question",
    "EfficientVLMForImageTextRetrieval": "captions",
    "EfficientVLMForVisualReasoning": "pair",
    "EfficientVLMForConditionalGeneration": "caption",
}
TASK_OF_CLASS = {
    "EfficientVLMForQuestionAnswering": "vqa",
    "EfficientVLMForImageTextRetrieval": "retrieval",
    "EfficientVLMForVisualReasoning": "nlvr2",
    "EfficientVLMForConditionalGeneration": "captioning",
    "EfficientVLMForPreTraining": "pretraining",
}
NOT_APPLICABLE = "n/a"
# Latency before the answer: a long answer (a caption ranking) must not push it out of view.
RESULT_COLUMNS = ("model", "task", "params (M)", "latency (ms)", "answer")
# Timed runs per answer; the latency shown is their median (the first call of a model pays one-off costs).
LATENCY_REPEATS = 3
# The prompt `efficientvlm finetune --task captioning` trains with (its collator's), and the caption's length cap.
CAPTION_PROMPT = "a picture of"
CAPTION_MAX_NEW_TOKENS = 20
# Environment variable the Space reads its models from (whitespace- or comma-separated folders / Hub ids).
MODELS_ENV = "EFFICIENTVLM_MODELS"


class AppInputError(ValueError):
    """An input the app cannot answer (no image, an empty question, ...); its message is shown in the UI."""


class UnreadableImageError(AppInputError):
    """An uploaded file that is not an image the app can read; its message names the file and the problem."""


@dataclass(frozen=True)
class UnreadableImage:
    """Stands in for an upload PIL cannot read (`name`: the file's name; `problem`: why), so the app answers it
    with a message instead of failing before it is called (see `ui.py`)."""

    name: str
    problem: str

    @classmethod
    def from_error(cls, name: str, error: Exception) -> UnreadableImage:
        import PIL.Image

        if isinstance(error, PIL.UnidentifiedImageError):
            problem = "it is not an image format PIL can read (HEIC photos among them); save it as PNG or JPEG"
        elif isinstance(error, PIL.Image.DecompressionBombError):
            problem = f"it has too many pixels to open safely ({str(error).rstrip('.')})"
        else:
            problem = f"it could not be decoded ({type(error).__name__}: {error})"
        return cls(name, problem)


@dataclass
class AppModel:
    """A loaded model, its processor, and what the app shows about it."""

    name: str
    model: Any
    processor: Any

    @property
    def class_name(self) -> str:
        return type(self.model).__name__

    @property
    def task(self) -> str:
        return TASK_OF_CLASS.get(self.class_name, self.class_name)

    @property
    def kind(self) -> str | None:
        return KIND_OF_CLASS.get(self.class_name)

    @property
    def parameters_m(self) -> float:
        # Tied weights (e.g. NLVR2's shared twin keys / values) count once, as `num_parameters` does.
        return self.model.num_parameters() / 1e6


def models_from_env(default: Sequence[str] = ()) -> list[str]:
    """The model sources in `$EFFICIENTVLM_MODELS` (split on whitespace and commas), else `default`."""
    value = os.environ.get(MODELS_ENV, "")
    sources = [part for part in value.replace(",", " ").split() if part]
    return sources or list(default)


def load_app_model(source: str, name: str | None = None) -> AppModel:
    """Loads a saved folder or Hub id as its own task model (`AutoModel`, which every saved folder maps to its
    task class) with its processor, in eval mode. The folder's code is used (`trust_remote_code=True`) unless this
    repository's `modeling_efficientvlm` is importable, which registers the same classes."""
    from transformers import AutoModel, AutoProcessor

    try:
        import modeling_efficientvlm  # noqa: F401  (registers the classes: no remote code needed)
    except ImportError:
        pass
    if not source or not isinstance(source, str):
        raise ValueError(f"A model source must be a folder or a Hub id; got {source!r}.")
    _check_source(source)
    try:
        model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"Could not load an EfficientVLM model and processor from {source!r}: {error}") from error
    return AppModel(name=name or _short_name(source), model=model, processor=processor)


def _check_source(source: str) -> None:
    """Says up front what from_pretrained would answer confusingly: a file (it tries to unpickle it) and a missing
    folder that cannot be a Hub id (it complains about the form of a repo id)."""
    if os.path.isfile(source):
        raise ValueError(f"{source!r} is a file; give the model folder (the one holding config.json) instead.")
    # A Hub id is "name" or "namespace/name": never absolute, never starting with "." or "~", one "/" at most.
    if not os.path.exists(source) and (
        os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1 or "\\" in source
    ):
        raise ValueError(f"No such folder: {source!r} (relative paths start at {os.getcwd()}).")


def load_app_models(sources: Iterable[str]) -> list[AppModel]:
    """`load_app_model` for each source; names are made unique (a suffix ` (2)`, ...) for the results table."""
    sources = list(sources)
    if not sources:
        raise ValueError("Give at least one model: a saved folder or a Hub id.")
    models, seen = [], {}
    for source in sources:
        name = _short_name(source)
        seen[name] = seen.get(name, 0) + 1
        models.append(load_app_model(source, name if seen[name] == 1 else f"{name} ({seen[name]})"))
    return models


def _short_name(source: str) -> str:
    path = os.path.normpath(source)
    return path if not os.path.isdir(source) else os.path.basename(path) or path


# -- the input kinds ---------------------------------------------------------------------------------------------
def _check_image(image: Any, what: str = "an image") -> None:
    if image is None:
        raise AppInputError(f"Upload {what} first.")
    if isinstance(image, UnreadableImage):
        raise UnreadableImageError(f"Could not read the upload {image.name!r}: {image.problem}.")


def _check_text(text: str | None, what: str) -> str:
    text = (text or "").strip()
    if not text:
        raise AppInputError(f"Type {what} first.")
    return text


@torch.no_grad()
def answer_question(app_model: AppModel, image: Any, question: str) -> str:
    """A VQA model's answer: the best of its saved answer candidates with its share of the top-k's probability
    (X-VLM's k-test), or its freely decoded answer when it has none."""
    model, processor = app_model.model, app_model.processor
    inputs = processor(images=[image], text=[question])
    if model.config.answer_candidates_ids is None:
        ids = model.generate(**inputs, use_answer_candidates=False, max_new_tokens=10)
        # The sequence starts with the start token, whatever its id: the answer is what follows it.
        return processor.tokenizer.decode(ids[0, 1:], skip_special_tokens=True).strip()
    ranking = model.rank_answers(**inputs)
    return f"{ranking.answers[0]} ({ranking.topk_probs[0, 0].item():.2f})"


@torch.no_grad()
def score_captions(app_model: AppModel, image: Any, captions: list[str]) -> str:
    """A retrieval model's ranking of the captions, best first: each with its ITC probability (softmax of the
    similarities over the candidates) and its ITM match probability."""
    model, processor = app_model.model, app_model.processor
    pixel_values = processor(images=[image])["pixel_values"]
    texts = processor(text=captions)
    image_states, image_embeds = model.embed_images(pixel_values)
    text_states, text_embeds = model.embed_texts(texts["input_ids"], texts["attention_mask"])
    temperature = model.efficientvlm.itc_temperature
    itc = (model.itc_scores(image_embeds, text_embeds)[0] / temperature).softmax(dim=-1)
    itm = model.itm_scores(image_states.expand(len(captions), -1, -1), text_states, texts["attention_mask"])
    order = itc.argsort(descending=True).tolist()
    return "\n".join(f"{rank}. {captions[i]} (ITC {itc[i]:.2f}, ITM {itm[i]:.2f})" for rank, i in enumerate(order, 1))


@torch.no_grad()
def judge_pair(app_model: AppModel, left_image: Any, right_image: Any, statement: str) -> str:
    """An NLVR2 model's verdict on the statement about the (left, right) pair, with its probability."""
    [prediction] = app_model.model.predict(left_image, right_image, statement, app_model.processor)
    label = "True" if prediction["label"] else "False"
    return f"{label} ({prediction['probabilities'][label]:.2f})"


@torch.no_grad()
def write_caption(app_model: AppModel, image: Any, prompt: str) -> str:
    """A captioning model's greedy caption of the image, the prompt included ("a picture of a red square")."""
    model, processor = app_model.model, app_model.processor
    # generate drops the prompt's final [SEP] and continues it (as the image-text-to-text pipeline does).
    ids = model.generate(**processor(images=[image], text=[prompt]), max_new_tokens=CAPTION_MAX_NEW_TOKENS)
    return processor.tokenizer.decode(ids[0], skip_special_tokens=True).strip()


def _parse_captions(captions: str | Sequence[str] | None) -> list[str]:
    lines = captions.splitlines() if isinstance(captions, str) else list(captions or [])
    parsed = [line.strip() for line in lines if line and line.strip()]
    if not parsed:
        raise AppInputError("Type at least one candidate caption (one per line) first.")
    return parsed


def check_inputs(
    kind: str, image: Any, text: str | Sequence[str] | None, second_image: Any = None
) -> tuple[Any, Any, Any]:
    """The inputs of `kind` checked and cleaned: `(image, text, second_image)`, where `text` is the stripped
    question, statement or caption prompt (`CAPTION_PROMPT` when empty), or the list of non-empty captions. An
    `AppInputError` says what is missing."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"Unknown input kind {kind!r}; choose one of {INPUT_KINDS}.")
    if kind == "pair":
        _check_image(image, "the left image")
        _check_image(second_image, "the right image")
        return image, _check_text(text, "a statement about the two images"), second_image
    _check_image(image)
    if kind == "question":
        return image, _check_text(text, "a question"), None
    if kind == "caption":
        return image, (text.strip() if isinstance(text, str) else "") or CAPTION_PROMPT, None
    return image, _parse_captions(text), None


def _row(latency: Any, answer: str, **facts: Any) -> list[Any]:
    values = {**facts, "latency (ms)": latency, "answer": answer}
    return [values[column] for column in RESULT_COLUMNS]


def _answer(app_model: AppModel, kind: str, image: Any, text: Any, second_image: Any) -> str:
    if kind == "question":
        return answer_question(app_model, image, text)
    if kind == "captions":
        return score_captions(app_model, image, text)
    if kind == "caption":
        return write_caption(app_model, image, text)
    return judge_pair(app_model, image, second_image, text)


def predict(
    models: Sequence[AppModel],
    kind: str,
    image: Any,
    text: str | Sequence[str] | None,
    second_image: Any = None,
    repeats: int = LATENCY_REPEATS,
) -> list[list[Any]]:
    """Every model's answer to one input, side by side: one row per model with `RESULT_COLUMNS` (name, task,
    parameters in millions, latency in ms, answer; "n/a" for both where the model does not take `kind`).

    kind: "question" (`text` is the question), "captions" (`text` holds candidate captions, one per line or a
    list), "pair" (`image` left, `second_image` right, `text` the statement) or "caption" (`text` the prompt; empty
    or None: `CAPTION_PROMPT`). Missing inputs raise an
    `AppInputError` naming them; an error inside one model becomes that model's answer ("error: ...").
    Latency: the median wall-clock time of `repeats` runs of the model's whole answer (preprocessing included)."""
    if repeats < 1:
        raise ValueError(f"`repeats` must be at least 1; got {repeats}.")
    image, text, second_image = check_inputs(kind, image, text, second_image)
    rows = []
    for app_model in models:
        facts = {"model": app_model.name, "task": app_model.task, "params (M)": round(app_model.parameters_m, 2)}
        if app_model.kind != kind:
            rows.append(_row(**facts, latency=NOT_APPLICABLE, answer=NOT_APPLICABLE))
            continue
        times = []
        try:
            for _ in range(repeats):
                start = time.perf_counter()
                answer = _answer(app_model, kind, image, text, second_image)
                times.append((time.perf_counter() - start) * 1000)
            latency = round(statistics.median(times), 1)
        except Exception as error:  # one broken model must not hide the others' answers
            answer, latency = f"error: {type(error).__name__}: {error}", NOT_APPLICABLE
        rows.append(_row(**facts, latency=latency, answer=answer))
    return rows
