"""EfficientVLM / X-VLM image captioning: the text stack (text layers + fusion layers) run as one causal
decoder that cross-attends to the image in its fusion layers, with a BERT LM head tied to the word embeddings.

Parameter names are those of the backbone (`efficientvlm.vision_model.*`, `efficientvlm.text_model.*`), so a
pre-training checkpoint loads directly; add `key_mapping={r"^mlm_head\\.": "lm_head."}` to `from_pretrained`
to also start the LM head from the pre-trained MLM head, as X-VLM does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from .configuration_efficientvlm import EfficientVLMConfig
from .modeling_efficientvlm import (
    EfficientVLMLMHead,
    EfficientVLMModel,
    EfficientVLMPreTrainedModel,
    EncoderOutput,
    StructureMasks,
)
from .modeling_efficientvlm_decoder import (
    EfficientVLMDecoderGenerationMixin,
    TextDecoderGenerationConfig,
    causal_lm_loss,
)


def generation_prompt(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch: int, eos_token_id: int | None
) -> torch.Tensor:
    """The prompt (batch, length) that greedy captioning continues, for `batch` images: a trailing [SEP]
    (`eos_token_id`) on every prompt, as the processor writes it, is dropped; one prompt serves every image. A padded
    prompt (zeros in `attention_mask`) raises: BERT positions are absolute, so the caption would follow the padding.
    Shared by the PyTorch model's `generate` and the onnxruntime one (`trainers.deployment.onnx_models`)."""
    if eos_token_id is not None and input_ids.shape[1] > 1 and bool((input_ids[:, -1] == eos_token_id).all()):
        # A prompt straight from the processor ("[CLS] a picture of [SEP]"): continue before its [SEP].
        input_ids = input_ids[:, :-1]
        if attention_mask is not None and attention_mask.shape[1] == input_ids.shape[1] + 1:
            attention_mask = attention_mask[:, :-1]
    if attention_mask is not None and attention_mask.shape == input_ids.shape and (attention_mask == 0).any():
        raise ValueError("Prompts must not be padded: give every image the same prompt (e.g. 'a picture of').")
    if input_ids.shape[0] == 1 and batch > 1:
        input_ids = input_ids.expand(batch, -1)
    if input_ids.shape[0] != batch:
        raise ValueError(f"{input_ids.shape[0]} prompts for {batch} images; pass one prompt or one per image.")
    return input_ids


@dataclass
class EfficientVLMCaptioningOutput(ModelOutput):
    """
    loss (`torch.FloatTensor` of shape `()`):
        Next-token cross-entropy averaged over the caption tokens whose label is not -100 (with label
        smoothing when configured). Given when `labels` are.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        Predictions; position t predicts token t + 1.
    vision_output ([`EncoderOutput`]):
        The vision transformer on the images (`None` when `image_embeds` were passed in).
    text_output ([`EncoderOutput`]):
        The causal multimodal pass of the text stack (text layers then fusion layers); its `cross_attentions`
        come from the fusion layers.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    vision_output: EncoderOutput | None = None
    text_output: EncoderOutput | None = None


class EfficientVLMForConditionalGeneration(EfficientVLMPreTrainedModel, EfficientVLMDecoderGenerationMixin):
    """X-VLM captioning: the whole text stack decodes causally, conditioned on the image through the fusion
    layers' cross-attention. Works with `generate()` (greedy, beam search, sampling): the image is encoded
    once and expanded for beams; without a KV cache the text is recomputed at every step. A prompt may come
    straight from the processor (`generate(**processor(images=image, text="a picture of"))`): its final [SEP]
    is dropped and the caption continues the prompt (as in `pipeline("image-text-to-text", ...)`).

    Length: `generate` stops at [SEP], at `max_length` tokens (prompt included; default `config.max_text_length`,
    the longest text the model was trained on) or after `max_new_tokens` tokens. A length beyond the text
    position table (`text_config.max_position_embeddings`) raises a `ValueError` before decoding starts.

    Label smoothing comes from `config.label_smoothing` (default 0; X-VLM fine-tunes with 0.1). It is not a
    `forward` argument: Trainer treats every argument whose name contains "label" as a label column.
    """

    auto_classes = ("AutoModelForImageTextToText",)

    generation_config_class = TextDecoderGenerationConfig
    _tied_weights_keys = {"lm_head.decoder.weight": "efficientvlm.text_model.embeddings.word_embeddings.weight"}
    lm_head_name = "lm_head"

    def __init__(self, config: EfficientVLMConfig) -> None:
        super().__init__(config)
        self.efficientvlm = EfficientVLMModel(config)
        self.lm_head = EfficientVLMLMHead(config.text_config)
        self.post_init()
        # A total length (prompt included), so that a `max_length` or a `max_new_tokens` given to `generate` wins.
        self.generation_config.max_length = self._default_max_length()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        token_type_ids: torch.Tensor | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> EfficientVLMCaptioningOutput:
        """
        pixel_values: (batch, channels, height, width), or `image_embeds` (batch, image_length, vision_hidden)
        already encoded; input_ids / attention_mask / token_type_ids: (batch, seq) "[CLS] (prompt) caption
        [SEP]" + padding; labels: (batch, seq) the ids with -100 on padding and on the prompt (position t + 1 is
        predicted from position t, so labels[:, 0] is never used); the loss is computed only when they are given
        and `return_loss` is True.
        """
        if input_ids is None:
            raise ValueError("Captioning needs `input_ids` (at least the start token).")
        vision = None
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("Pass `pixel_values` (or pre-computed `image_embeds`).")
            vision = self.efficientvlm.encode_image(
                pixel_values,
                structure_masks,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                interpolate_pos_encoding=interpolate_pos_encoding,
            )
            image_embeds = vision.last_hidden_state
        text_model = self.efficientvlm.text_model
        text = text_model(
            input_ids,
            attention_mask,
            token_type_ids=token_type_ids,
            encoder_hidden_states=image_embeds,
            mode="multimodal",
            is_causal=True,
            **text_model.layer_masks(structure_masks),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.lm_head(text.last_hidden_state)

        loss = None
        if labels is not None and return_loss:
            loss = causal_lm_loss(logits, labels, label_smoothing=getattr(self.config, "label_smoothing", 0.0))
        return EfficientVLMCaptioningOutput(loss=loss, logits=logits, vision_output=vision, text_output=text)

    # -- generation ---------------------------------------------------------------------------------------
    def _encode_for_generation(
        self, pixel_values: torch.Tensor, model_kwargs: dict[str, Any], generation_config: GenerationConfig
    ) -> dict[str, Any]:
        batch = pixel_values.shape[0]
        vision = self.efficientvlm.encode_image(
            pixel_values,
            model_kwargs.get("structure_masks"),
            interpolate_pos_encoding=model_kwargs.pop("interpolate_pos_encoding", False),
        )
        model_kwargs["image_embeds"] = vision.last_hidden_state
        input_ids, attention_mask = model_kwargs.get("input_ids"), model_kwargs.get("attention_mask")
        model_kwargs.pop("token_type_ids", None)  # a prompt is one sentence: type 0, as the default
        if input_ids is None:
            input_ids = self._start_ids(batch, pixel_values.device, generation_config)
        else:
            eos = generation_config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            input_ids = generation_prompt(input_ids, attention_mask, batch, eos)
        model_kwargs["input_ids"] = input_ids
        # Causal attention over an unpadded sequence needs no padding mask.
        model_kwargs["attention_mask"] = None
        return model_kwargs

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        # The whole sequence so far (no cache); the image was encoded once before decoding.
        return {"input_ids": input_ids, "image_embeds": image_embeds, "structure_masks": structure_masks}


__all__ = ["EfficientVLMCaptioningOutput", "EfficientVLMForConditionalGeneration", "generation_prompt"]
