"""Shared pieces of EfficientVLM's causal text decoders (VQA answer decoder, captioning decoder).

- `answer_decoder_config`: the text config of X-VLM's VQA answer decoder, derived deterministically from the
  main config (so `save_pretrained` / `from_pretrained` rebuild it without storing anything extra).
- `causal_lm_labels`, `causal_lm_loss`, `sequence_log_likelihood`: next-token targets and losses of a BERT
  stack run causally (logits at position t predict the token at t + 1).
- `EfficientVLMDecoderGenerationMixin`: lets `GenerationMixin.generate()` drive a decoder conditioned on
  states computed once from the image (and question): the model encodes in `_encode_for_generation`, the
  encoded states travel in `model_kwargs` and are expanded for beams like any other tensor. No KV cache: the
  decoder recomputes the whole prefix at every step (correct, and cheap for captions/answers of a few tokens).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin

from .configuration_efficientvlm import EfficientVLMConfig, EfficientVLMTextConfig

# Fields of the text config an answer decoder shares with the backbone's text stack. Per-layer sizes are not
# among them: the answer decoder has its own (`answer_decoder_*_per_layer` in the main config).
_SHARED_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "initializer_range",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def answer_decoder_config(config: EfficientVLMConfig) -> EfficientVLMTextConfig:
    """Text config of X-VLM's answer decoder: `num_answer_decoder_layers` (default: the number of fusion layers)
    layers that all carry cross-attention, reading the fused question states (width = text hidden size), each
    with the sizes `answer_decoder_*_per_layer` of the main config (full by default; set by pruning)."""
    text = config.text_config
    num_layers = config.answer_decoder_depth
    if num_layers < 1:
        raise ValueError(f"`num_answer_decoder_layers` must be at least 1, got {num_layers}.")
    # Every decoder layer is a fusion layer, so each per-layer list covers the whole stack.
    decoder_config = EfficientVLMTextConfig(
        **{name: getattr(text, name) for name in _SHARED_TEXT_FIELDS},
        num_hidden_layers=0,
        num_fusion_layers=num_layers,
        encoder_hidden_size=text.hidden_size,
        num_attention_heads_per_layer=config.answer_decoder_num_attention_heads_per_layer,
        num_cross_attention_heads_per_layer=config.answer_decoder_num_cross_attention_heads_per_layer,
        intermediate_size_per_layer=config.answer_decoder_intermediate_size_per_layer,
    )
    # Not a registered sub-config, so `from_pretrained(attn_implementation=...)` would not reach it otherwise.
    decoder_config._attn_implementation = text._attn_implementation
    return decoder_config


def causal_lm_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None
) -> torch.Tensor:
    """Targets for a causal pass over `input_ids` (batch, seq): the ids with -100 on padding (where
    `attention_mask` is 0, or, without a mask, where the id is `pad_token_id`) and on the first position, which
    no logit predicts."""
    labels = input_ids.clone()
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, -100)
    elif pad_token_id is not None:
        labels = labels.masked_fill(input_ids == pad_token_id, -100)
    labels[:, 0] = -100
    return labels


def _next_token_targets(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The target of every logit position: `labels` moved one step left, -100 for the last position (it predicts
    nothing). Targets move, not logits: the (batch, seq, vocab) logits, the largest tensor, are never copied, and
    the log-softmax runs over their contiguous last dimension."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"`labels` has shape {tuple(labels.shape)} but the logits cover {tuple(logits.shape[:2])} positions."
        )
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy: `logits[:, t]` (batch, seq, vocab) predicts `labels[:, t + 1]` (-100 = ignored).

    `reduction="mean"`: mean over the counted tokens (a scalar); `"sum"`: one sum per sequence (batch,), as
    X-VLM's `reduction='none'` answer loss."""
    targets = _next_token_targets(logits, labels)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")
    token_loss = F.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="none",
    ).view(targets.shape)
    if reduction == "sum":
        return token_loss.sum(dim=1)
    counted = (targets != -100).sum()
    return token_loss.sum() / counted.clamp(min=1)


def sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each sequence's targets under the causal logits: (batch, seq, vocab) -> (batch,)."""
    return -causal_lm_loss(logits, labels, reduction="sum")


def position_table_error(prompt: int, total: int, positions: int, max_new_tokens: int | None) -> ValueError:
    """The error of a generation whose sequences of `total` tokens (the `prompt`'s included; `max_new_tokens` when
    the call gave that rather than a `max_length`) do not fit the text position table of `positions`: BERT positions
    are absolute, so it is raised before decoding. Shared by the models' `generate` and the onnxruntime one
    (`trainers.deployment.onnx_models`)."""
    if prompt >= positions:
        return ValueError(
            f"The prompt has {prompt} tokens but the model's position table holds {positions}: it leaves no room to "
            "generate; shorten the prompt."
        )
    if max_new_tokens is not None:
        asked = f"`max_new_tokens`={max_new_tokens} after the {prompt} tokens it starts from"
    else:
        asked = f"`max_length`={total}"
    return ValueError(
        f"{asked} allows sequences of {total} tokens, but the model's position table holds {positions}: pass "
        f"`max_length` <= {positions} or `max_new_tokens` <= {positions - prompt}."
    )


class TextDecoderGenerationConfig(GenerationConfig):
    """Builds a model's default generation config from its text config alone: [CLS] starts, [SEP] ends,
    [PAD] pads, no cache."""

    @classmethod
    def from_model_config(cls, model_config: EfficientVLMConfig) -> GenerationConfig:
        text = model_config.text_config
        return GenerationConfig(
            bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id,
            pad_token_id=text.pad_token_id,
            use_cache=False,
        )


class EfficientVLMDecoderGenerationMixin(GenerationMixin):
    """`generate()` for a causal BERT decoder conditioned on states computed once per input.

    The model's main input is `pixel_values`; `generate` hands it to `_encode_for_generation` (through the
    hook transformers calls before expanding inputs for beams / returned sequences), which stores the encoded
    states in `model_kwargs` and the decoder's start ids as `model_kwargs["input_ids"]`. Subclasses implement
    `_encode_for_generation` and `prepare_inputs_for_generation`, and set `generation_config_class =
    TextDecoderGenerationConfig` (on the model class: `PreTrainedModel` comes first in the MRO).
    """

    # No KV cache: every step recomputes the prefix, so generation never slices `input_ids` (see the module doc).
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _default_max_length(self) -> int:
        """The default `generation_config.max_length`: the longest sequence (start token / prompt included)
        `generate` returns when the call sets neither `max_length` nor `max_new_tokens`: the longest text the model
        was trained on, "[CLS] (prompt) text [SEP]" (VQA's short answers override it)."""
        return self.config.max_text_length

    def _legacy_max_new_tokens(self) -> int:
        """The default `max_new_tokens` that earlier versions set (and saved in generation_config.json) instead of
        `_default_max_length`: as a default it overrode a `max_length` given to `generate`."""
        return self.config.max_text_length

    def adjust_generation_fn(self, *args, **kwargs) -> None:
        """Loads the generation config (`from_pretrained`); one saved by an earlier version, whose default length
        was a `max_new_tokens` that took precedence over a `max_length` given to `generate`, gets the default
        `max_length` instead, and so does one without any length (e.g. from a pre-training folder)."""
        super().adjust_generation_fn(*args, **kwargs)
        generation_config = self.generation_config
        if generation_config.max_length is None and generation_config.max_new_tokens in (
            None,
            self._legacy_max_new_tokens(),
        ):
            generation_config.max_new_tokens = None
            generation_config.max_length = self._default_max_length()

    def _prepare_generated_length(self, generation_config: GenerationConfig, has_default_max_length: bool, **kwargs):
        # The model's default `max_length` is no user's choice: a `max_new_tokens` of the call replaces it without
        # transformers' warning that both were set.
        asked_new_tokens = generation_config.max_new_tokens
        if asked_new_tokens is not None and generation_config.max_length == self._default_max_length():
            has_default_max_length = True
        generation_config = super()._prepare_generated_length(
            generation_config=generation_config, has_default_max_length=has_default_max_length, **kwargs
        )
        # BERT positions are absolute: fail before decoding rather than at the step that runs out of positions.
        positions = self.config.text_config.max_position_embeddings
        if generation_config.max_length > positions:
            raise position_table_error(
                kwargs["input_ids_length"], generation_config.max_length, positions, asked_new_tokens
            )
        return generation_config

    def _start_ids(self, batch_size: int, device: torch.device, generation_config: GenerationConfig) -> torch.Tensor:
        bos = generation_config.bos_token_id
        if bos is None:
            bos = self.config.text_config.bos_token_id
        if bos is None:
            raise ValueError("Generation needs a start token: set `bos_token_id` in the generation or text config.")
        vocab_size = self.config.text_config.vocab_size
        for name, value in (("bos_token_id", bos), ("eos_token_id", generation_config.eos_token_id)):
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(v is not None and not 0 <= int(v) < vocab_size for v in values):
                # A model built from a preset keeps BERT's ids (101 / 102) until they are set from its tokenizer.
                raise ValueError(
                    f"The generation `{name}` {value} is not in the model's vocabulary of {vocab_size} tokens: its "
                    "special-token ids are not its tokenizer's. Set them from the tokenizer (the library's "
                    "`trainers.saving.sync_special_tokens(model, tokenizer)`; saved model folders have them set)."
                )
        return torch.full((batch_size, 1), int(bos), dtype=torch.long, device=device)

    def _encode_for_generation(
        self, pixel_values: torch.Tensor, model_kwargs: dict[str, Any], generation_config: GenerationConfig
    ) -> dict[str, Any]:
        """Encodes the image (and question) once; each model using this mixin defines it."""
        raise TypeError(
            f"{type(self).__name__} uses the decoder generation mixin but defines no `_encode_for_generation`."
        )

    def _maybe_prepare_encoder_kwargs_for_generation(
        self,
        inputs_tensor: torch.Tensor,
        model_kwargs: dict[str, Any],
        model_input_name: str | None,
        generation_config: GenerationConfig,
    ) -> dict[str, Any]:
        if model_input_name != "pixel_values" or inputs_tensor.dim() != 4:
            raise ValueError(f"{type(self).__name__}.generate() needs `pixel_values` (batch, channels, height, width).")
        return self._encode_for_generation(inputs_tensor, model_kwargs, generation_config)


__all__ = [
    "EfficientVLMDecoderGenerationMixin",
    "TextDecoderGenerationConfig",
    "answer_decoder_config",
    "causal_lm_labels",
    "causal_lm_loss",
    "position_table_error",
    "sequence_log_likelihood",
]
