"""The inference graphs of each task model: small `nn.Module`s that call the model's own inference pieces with
tensors only (what ONNX export traces), and what each graph takes and returns.

Every task's inference splits into graphs whose inputs have a batch axis and a sequence axis of any size, so one
exported file serves every batch and text length (the image size is fixed by the model):

- retrieval (and pre-training): `image_features`, `text_features`, `itm_scores`. ITC = image_embeds @
  text_embeds.T picks the top-k candidates; `itm_scores` re-ranks those pairs.
- vqa: `vqa_encoder`, `vqa_decoder`. Encode once; the decoder scores the first answer token of every candidate,
  then the k best whole answers (X-VLM's ranking).
- nlvr2: `nlvr2`, one graph: two images and a sentence -> true/false logits.
- captioning: `caption_image_encoder`, `caption_decoder`. Encode the image once; run the decoder on the prefix,
  append the argmax, repeat until [SEP].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modeling_efficientvlm.modeling_efficientvlm import image_text_matching_logits, itc_embedding
from trainers.tasks import task_of_model, task_spec

# Names of the dynamic axes: any size at run time.
BATCH, SEQUENCE = "batch", "sequence"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a graph: its name, dtype and shape (an axis is an int, or the name of a dynamic
    axis)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class GraphSpec:
    """A graph to export: its module (tensors in, tensors out), its inputs and outputs, what it does, and a
    factory of example inputs for `(batch, sequence)` sizes."""

    name: str
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str
    example_inputs: Callable[[int, int, torch.Generator], tuple[torch.Tensor, ...]]

    def __post_init__(self) -> None:
        # Inference graphs: dropout off, and a wrapper fresh out of `nn.Module()` would be in training mode (which
        # `torch.onnx.export` restores after exporting, recursively, switching the model's dropout back on).
        self.module.eval()

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            spec.name: {axis: size for axis, size in enumerate(spec.shape) if isinstance(size, str)}
            for spec in (*self.inputs, *self.outputs)
        }


# -- the graph modules: tensors in, tensors out, the model's own code inside --------------------------------------
class _ModelGraph(nn.Module):
    """A graph over `model`: subclasses define `forward` on tensors only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class ImageFeatures(_ModelGraph):
    """pixel_values -> image tokens (for ITM) and L2-normalised ITC embeddings."""

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        backbone = self.model.efficientvlm
        states = backbone.encode_image(pixel_values).last_hidden_state
        return states, itc_embedding(backbone.vision_proj, states)


class TextFeatures(_ModelGraph):
    """input_ids, attention_mask -> text states (for ITM) and L2-normalised ITC embeddings."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        backbone = self.model.efficientvlm
        states = backbone.encode_text(input_ids, attention_mask).last_hidden_state
        return states, itc_embedding(backbone.text_proj, states)


class MatchingScores(_ModelGraph):
    """(image states, text states, text mask) pairs -> ITM logits (pairs, 2); index 1 = "match"."""

    def forward(
        self, image_states: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        logits, _ = image_text_matching_logits(
            self.model.efficientvlm, self.model.itm_head, text_states, attention_mask, image_states
        )
        return logits


class QuestionEncoder(_ModelGraph):
    """VQA: image and question -> fused question states."""

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.model.encode_question(pixel_values, input_ids, attention_mask)[2].last_hidden_state


class AnswerDecoder(_ModelGraph):
    """VQA: answers (the prefix so far) reading their question's fused states -> next-token logits."""

    def forward(
        self,
        answer_input_ids: torch.Tensor,
        answer_attention_mask: torch.Tensor,
        question_states: torch.Tensor,
        question_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        return self.model.decode(answer_input_ids, answer_attention_mask, question_states, question_attention_mask)[0]


class VisualReasoning(_ModelGraph):
    """NLVR2: two images per sentence -> classifier logits (index 1 = true)."""

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.model(pixel_values, input_ids, attention_mask, return_loss=False).logits


class CaptionImageEncoder(_ModelGraph):
    """Captioning: pixel_values -> image tokens the decoder cross-attends to."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.efficientvlm.encode_image(pixel_values).last_hidden_state


class CaptionDecoder(_ModelGraph):
    """Captioning: the caption so far (no padding) and the image tokens -> next-token logits at every position."""

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, image_embeds=image_embeds, return_loss=False).logits


# -- example inputs ------------------------------------------------------------------------------------------------
def _ids(config, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(5, config.text_config.vocab_size, (batch, length), generator=generator)
    ids[:, 0] = config.text_config.bos_token_id if config.text_config.bos_token_id is not None else 2
    return ids


def _mask(batch: int, length: int) -> torch.Tensor:
    """All ones but the last row, which is padded after half its length (exercises the padding mask)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and length > 2:
        mask[-1, length // 2 + 1 :] = 0
    return mask


def _pixels(config, batch: int, generator: torch.Generator, images_per_example: int = 1) -> torch.Tensor:
    size, channels = config.vision_config.image_size, config.vision_config.num_channels
    shape = (batch, channels, size, size) if images_per_example == 1 else (batch, 2, channels, size, size)
    return torch.randn(*shape, generator=generator)


def image_length(config) -> int:
    """Image tokens of the vision encoder: [CLS] + patches."""
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1


def _states(batch: int, length: int, width: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, length, width, generator=generator)


# -- each task's graphs -----------------------------------------------------------------------------------------
def _pixel_spec(config, images_per_example: int = 1) -> TensorSpec:
    size, channels = config.vision_config.image_size, config.vision_config.num_channels
    shape = (BATCH, channels, size, size) if images_per_example == 1 else (BATCH, 2, channels, size, size)
    return TensorSpec("pixel_values", "float32", shape)


def _retrieval_graphs(model: nn.Module) -> list[GraphSpec]:
    config = model.config
    vision, text, embed = config.vision_config.hidden_size, config.text_config.hidden_size, config.embed_dim
    length = image_length(config)
    ids = TensorSpec("input_ids", "int64", (BATCH, SEQUENCE))
    mask = TensorSpec("attention_mask", "int64", (BATCH, SEQUENCE))
    return [
        GraphSpec(
            "image_features",
            ImageFeatures(model),
            (_pixel_spec(config),),
            (
                TensorSpec("image_states", "float32", (BATCH, length, vision)),
                TensorSpec("image_embeds", "float32", (BATCH, embed)),
            ),
            "Images -> image tokens (input of itm_scores) and L2-normalised ITC embeddings.",
            lambda b, s, g: (_pixels(config, b, g),),
        ),
        GraphSpec(
            "text_features",
            TextFeatures(model),
            (ids, mask),
            (
                TensorSpec("text_states", "float32", (BATCH, SEQUENCE, text)),
                TensorSpec("text_embeds", "float32", (BATCH, embed)),
            ),
            "Texts -> text states (input of itm_scores) and L2-normalised ITC embeddings.",
            lambda b, s, g: (_ids(config, b, s, g), _mask(b, s)),
        ),
        GraphSpec(
            "itm_scores",
            MatchingScores(model),
            (
                TensorSpec("image_states", "float32", (BATCH, length, vision)),
                TensorSpec("text_states", "float32", (BATCH, SEQUENCE, text)),
                mask,
            ),
            (TensorSpec("itm_logits", "float32", (BATCH, 2)),),
            "Row i pairs image_states[i] with text_states[i]: ITM logits, index 1 = match (softmax[:, 1] = score).",
            lambda b, s, g: (_states(b, length, vision, g), _states(b, s, text, g), _mask(b, s)),
        ),
    ]


def _vqa_graphs(model: nn.Module) -> list[GraphSpec]:
    config = model.config
    hidden, vocab = config.text_config.hidden_size, model.answer_decoder.config.vocab_size
    question_length = "question_length"
    return [
        GraphSpec(
            "vqa_encoder",
            QuestionEncoder(model),
            (
                _pixel_spec(config),
                TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
                TensorSpec("attention_mask", "int64", (BATCH, SEQUENCE)),
            ),
            (TensorSpec("question_states", "float32", (BATCH, SEQUENCE, hidden)),),
            "Image and question -> fused question states.",
            lambda b, s, g: (_pixels(config, b, g), _ids(config, b, s, g), _mask(b, s)),
        ),  # fmt: skip
        GraphSpec(
            "vqa_decoder",
            AnswerDecoder(model),
            (
                TensorSpec("answer_input_ids", "int64", (BATCH, SEQUENCE)),
                TensorSpec("answer_attention_mask", "int64", (BATCH, SEQUENCE)),
                TensorSpec("question_states", "float32", (BATCH, question_length, hidden)),
                TensorSpec("question_attention_mask", "int64", (BATCH, question_length)),
            ),
            (TensorSpec("logits", "float32", (BATCH, SEQUENCE, vocab)),),
            "Answers '[CLS] answer [SEP]' (row i reads question_states[i]) -> logits; position t predicts token t + 1.",
            lambda b, s, g: (_ids(config, b, s, g), _mask(b, s), _states(b, s + 3, hidden, g), _mask(b, s + 3)),
        ),
    ]


def _nlvr2_graphs(model: nn.Module) -> list[GraphSpec]:
    config = model.config
    return [
        GraphSpec(
            "nlvr2",
            VisualReasoning(model),
            (
                _pixel_spec(config, 2),
                TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
                TensorSpec("attention_mask", "int64", (BATCH, SEQUENCE)),
            ),
            (TensorSpec("logits", "float32", (BATCH, model.config.num_labels)),),
            "Left and right image and a sentence -> logits, index 1 = the sentence is true.",
            lambda b, s, g: (_pixels(config, b, g, 2), _ids(config, b, s, g), _mask(b, s)),
        )  # fmt: skip
    ]


def _captioning_graphs(model: nn.Module) -> list[GraphSpec]:
    config = model.config
    length, vision, vocab = image_length(config), config.vision_config.hidden_size, config.text_config.vocab_size
    return [
        GraphSpec(
            "caption_image_encoder",
            CaptionImageEncoder(model),
            (_pixel_spec(config),),
            (TensorSpec("image_embeds", "float32", (BATCH, length, vision)),),
            "Images -> image tokens the decoder reads.",
            lambda b, s, g: (_pixels(config, b, g),),
        ),
        GraphSpec(
            "caption_decoder",
            CaptionDecoder(model),
            (
                TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
                TensorSpec("image_embeds", "float32", (BATCH, length, vision)),
            ),
            (TensorSpec("logits", "float32", (BATCH, SEQUENCE, vocab)),),
            "'[CLS] prompt + caption so far' (no padding) -> logits; the last position's argmax is the next token.",
            lambda b, s, g: (_ids(config, b, s, g), _states(b, length, vision, g)),
        ),
    ]


_GRAPHS = {
    "pretraining": _retrieval_graphs,
    "retrieval": _retrieval_graphs,
    "vqa": _vqa_graphs,
    "nlvr2": _nlvr2_graphs,
    "captioning": _captioning_graphs,
}
_GRAPH_CLASSES = [task_spec(task).model_class_name for task in _GRAPHS]


def export_task(model: nn.Module) -> str:
    """The task whose graphs `model` exports; a `ValueError` naming the model classes that export, for another
    model (the bare `EfficientVLMModel`: encoders without a task head)."""
    try:
        task = task_of_model(model).name
    except ValueError:
        task = None
    if task not in _GRAPHS:
        raise ValueError(
            f"{type(model).__name__} has no inference graphs to export: export a task model, one of "
            f"{', '.join(_GRAPH_CLASSES)} (a bare EfficientVLMModel is the encoders without a task head: fine-tune "
            "it for a task first)."
        )
    return task


def task_graphs(model: nn.Module) -> tuple[str, list[GraphSpec]]:
    """The task of `model` (a task model of this package) and its inference graphs."""
    task = export_task(model)
    return task, _GRAPHS[task](model)


__all__ = ["BATCH", "SEQUENCE", "GraphSpec", "TensorSpec", "export_task", "image_length", "task_graphs"]
