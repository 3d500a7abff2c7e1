"""NLVR2 (is a sentence true of a pair of images?) built as the official X-VLM / EfficientVLM code builds it.

X-VLM's NLVR model (`models/model_nlvr.py`, reused by EfficientVLM's `efficient_models/model_nlvr.py`)
doubles the fusion layers: pre-trained fusion layer i becomes two consecutive layers of the same shape,
"twins", both initialised from it; the first cross-attends to the left image, the second to the right one,
and the pair shares its cross-attention key and value projections for good (`share_cross_attention`),
while queries, output projections, self-attention and FFN of the two layers train apart. A classifier
reads the fused [CLS]. Following that code keeps official NLVR2 checkpoints convertible and the paper's
setup reproducible.

In this package the twin stack is an ordinary `EfficientVLMModel` whose config has `2 * F` fusion layers
and `twin_fusion_layers = True` (its `config.layout` knows the pairs); [`twin_fusion_config`] derives it from a
single-image config, so `EfficientVLMForVisualReasoning(pretraining_config)` and
`from_pretrained(pretraining_folder)` both work.

Structured pruning: the self-attention heads and FFN neurons of every fusion layer are masked one layer at
a time (`fusion_heads` / `fusion_ffn`: one mask per layer, 2 * F). A cross-attention head owns key/value rows
shared by the twins, so `fusion_cross_heads` has one mask per twin pair (F) that keeps or removes the head
in both layers; one such unit carries both layers' query rows and output columns and the shared key/value
rows once.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .checks_efficientvlm import warn_if_dropout_is_on
from .configuration_efficientvlm import EfficientVLMConfig, TextStackLayout, has_twin_fusion_layers
from .modeling_efficientvlm import (
    EfficientVLMAttention,
    EfficientVLMITMHead,
    EfficientVLMModel,
    EfficientVLMPreTrainedModel,
    EfficientVLMTaskOutput,
    EncoderOutput,
    StructureMasks,
    check_prunable_masks,
    extended_attention_mask,
)

# NLVR2's classes: index 1 = the sentence is true of the image pair.
NLVR2_LABELS = ("False", "True")
_TWIN_SHARED_PARAMETERS = ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")
# `from_pretrained` keyword arguments that locate a checkpoint's config.
_CONFIG_LOCATION_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def twin_fusion_config(config: EfficientVLMConfig) -> EfficientVLMConfig:
    """The NLVR2 config of a single-image `config`: every fusion layer i becomes twin layers 2i and 2i + 1
    with its sizes, and `twin_fusion_layers` is set. Returns a new config; `config` is unchanged."""
    if has_twin_fusion_layers(config):
        raise ValueError("This config already has twin fusion layers (`twin_fusion_layers=True`).")
    config = copy.deepcopy(config)
    text = config.text_config
    single = text.layout
    twin = TextStackLayout(single.num_text_layers, 2 * single.num_fusion_layers, twin_fusion_layers=True)
    for name in ("num_attention_heads_per_layer", "intermediate_size_per_layer"):
        if getattr(text, name) is not None:
            text_values, fusion_values = single.split(getattr(text, name))
            setattr(text, name, text_values + twin.layer_values(fusion_values))
    if text.num_cross_attention_heads_per_layer is not None:
        text.num_cross_attention_heads_per_layer = twin.layer_values(text.num_cross_attention_heads_per_layer)
    text.num_fusion_layers = twin.num_fusion_layers
    config.twin_fusion_layers = True
    # The source checkpoint's auto classes and architecture name another task's model.
    config.auto_map, config.architectures = None, None
    return config


def _check_twin_config(config: EfficientVLMConfig) -> None:
    layout = config.layout  # raises for an odd number of fusion layers
    cross = [config.text_config.layer_cross_heads(i) for i in layout.fusion_layers]
    if layout.layer_values(layout.unit_values(cross)) != cross:  # both twins of a pair alike
        raise ValueError(f"Twin fusion layers must keep the same cross-attention heads; got per-layer counts {cross}.")


def _backbone_of(source: EfficientVLMPreTrainedModel) -> EfficientVLMModel:
    backbone = source if isinstance(source, EfficientVLMModel) else getattr(source, "efficientvlm", None)
    if not isinstance(backbone, EfficientVLMModel):
        raise ValueError(
            f"Expected an `EfficientVLMModel` or a model holding one as `.efficientvlm`; got {type(source).__name__}."
        )
    if has_twin_fusion_layers(backbone.config):
        raise ValueError("The source model already has twin fusion layers; load it with `from_pretrained` instead.")
    return backbone


def init_nlvr2_from_pretraining(
    model: EfficientVLMForVisualReasoning, source: EfficientVLMPreTrainedModel
) -> EfficientVLMForVisualReasoning:
    """Copies a single-image backbone (an `EfficientVLMModel`, or a pre-training / retrieval model holding
    one) into `model`: fusion layer i fills both twin layers 2i and 2i + 1, everything else is copied as is
    (X-VLM's `load_pretrained` for NLVR). The classifier keeps its fresh initialisation. Returns `model`."""
    backbone = _backbone_of(source)
    layout, source_layout = model.config.layout, backbone.config.layout
    if (layout.num_text_layers, layout.num_fusion_units) != (
        source_layout.num_text_layers,
        source_layout.num_fusion_layers,
    ):
        raise ValueError(
            f"The source has {source_layout.num_text_layers} text and {source_layout.num_fusion_layers} fusion "
            f"layers; the NLVR2 model needs {layout.num_text_layers} text layers and half of its "
            f"{layout.num_fusion_layers} fusion layers."
        )
    prefix = "text_model.encoder.layer."
    state = {}
    for name, tensor in backbone.state_dict().items():
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            if source_layout.is_fusion(int(index)):
                left, right = layout.twin_pairs[source_layout.fusion_index(int(index))]
                state[f"{prefix}{left}.{rest}"] = state[f"{prefix}{right}.{rest}"] = tensor
                continue
        state[name] = tensor
    target = model.efficientvlm.state_dict()
    mismatched = [name for name, tensor in state.items() if name in target and target[name].shape != tensor.shape]
    if mismatched:
        raise ValueError(
            f"The source and the NLVR2 model have different per-layer sizes (e.g. {mismatched[:3]}); build the "
            "model with `EfficientVLMForVisualReasoning.from_pretraining(source)`."
        )
    # Strict: every parameter of the twin stack (the shared key/value ones under both names) gets a value.
    model.efficientvlm.load_state_dict(state)
    return model


@dataclass
class EfficientVLMVisualReasoningOutput(EfficientVLMTaskOutput):
    """
    The fields of [`EfficientVLMTaskOutput`]:

    loss (`torch.FloatTensor` of shape `()`):
        Cross-entropy of `logits` against `labels`, when `labels` are given.
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Classifier scores (NLVR2: index 1 = the sentence is true of the image pair).
    vision_output ([`EncoderOutput`]):
        The vision encoder on `2 * batch_size` images: every example's left image, then every right image.
    text_output ([`EncoderOutput`]): the text layers on the sentences.
    fusion_output ([`EncoderOutput`]):
        The `2 * F` twin fusion layers (even layers cross-attend to the left image, odd ones to the right).
    """


class EfficientVLMForVisualReasoning(EfficientVLMPreTrainedModel):
    """NLVR2: one sentence, two images, a true/false classifier on the fused [CLS] (X-VLM's twin fusion layers).

    A config without `twin_fusion_layers` describes a single-image backbone and is converted with
    [`twin_fusion_config`]. `from_pretrained` on a single-image checkpoint (pre-training, retrieval, backbone)
    initialises both twins of every fusion layer from it (see [`from_pretraining`]).
    """

    auto_classes = ("AutoModelForSequenceClassification",)

    def __init__(self, config: EfficientVLMConfig) -> None:
        if not has_twin_fusion_layers(config):
            config = twin_fusion_config(config)
        _check_twin_config(config)
        if config.id2label == {0: "LABEL_0", 1: "LABEL_1"}:  # the default names: say what the classes mean
            config.id2label = dict(enumerate(NLVR2_LABELS))
            config.label2id = {label: index for index, label in config.id2label.items()}
        super().__init__(config)
        self.efficientvlm = EfficientVLMModel(config)
        self.cls_head = EfficientVLMITMHead(config.text_config.hidden_size, config.num_labels)
        self._share_twin_key_values()
        self.post_init()

    # -- twin bookkeeping ------------------------------------------------------------------------------------
    def twin_pairs(self) -> list[tuple[int, int]]:
        """Indices in the text stack (`efficientvlm.text_model.encoder.layer`) of each (left, right) twin pair."""
        return self.config.layout.twin_pairs

    def _share_twin_key_values(self) -> None:
        """Makes the right twin use the left twin's key/value projection modules (X-VLM's shared K/V)."""
        stack = self.efficientvlm.text_model.encoder.layer
        for left, right in self.twin_pairs():
            if isinstance(stack[left].crossattention, EfficientVLMAttention):  # a fully pruned pair has none
                stack[right].crossattention.k_proj = stack[left].crossattention.k_proj
                stack[right].crossattention.v_proj = stack[left].crossattention.v_proj
        # Declared so that `save_pretrained` stores each shared tensor once and `from_pretrained` re-ties it.
        self._tied_weights_keys = self._twin_tied_keys()

    def _twin_tied_keys(self) -> dict[str, str]:
        stack = self.efficientvlm.text_model.encoder.layer
        prefix = f"{self.base_model_prefix}.text_model.encoder.layer"
        keys = {}
        for left, right in self.twin_pairs():
            if isinstance(stack[left].crossattention, EfficientVLMAttention):
                for name in _TWIN_SHARED_PARAMETERS:
                    keys[f"{prefix}.{right}.crossattention.{name}"] = f"{prefix}.{left}.crossattention.{name}"
        return keys

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # The twins share K/V whatever `tie_word_embeddings` (a flag about word embeddings) says.
        return {**super().get_expanded_tied_weights_keys(all_submodels), **self._twin_tied_keys()}

    def _per_layer_cross_masks(self, masks: list[torch.Tensor | None] | None) -> list[torch.Tensor | None] | None:
        """One `fusion_cross_heads` mask per twin pair -> one per fusion layer (both twins get the pair's)."""
        if masks is None:
            return None
        if len(masks) != len(self.twin_pairs()):
            raise ValueError(
                f"`fusion_cross_heads` has {len(masks)} masks but the model has {len(self.twin_pairs())} twin pairs "
                "of fusion layers; NLVR2 takes one cross-attention mask per pair."
            )
        return self.config.layout.layer_values(masks)

    # -- loading from a single-image checkpoint ----------------------------------------------------------------
    @classmethod
    def from_pretraining(
        cls, source: str | os.PathLike | EfficientVLMPreTrainedModel, *model_args, **kwargs
    ) -> EfficientVLMForVisualReasoning:
        """Builds the NLVR2 model from a single-image checkpoint: a folder / Hub id (loaded as an
        `EfficientVLMModel`, `model_args` / `kwargs` go to its `from_pretrained`) or a model holding the
        backbone. Both twins of every fusion layer start from its weights; the classifier is new."""
        if isinstance(source, (str, os.PathLike)):
            source = EfficientVLMModel.from_pretrained(source, *model_args, **kwargs)
        backbone = _backbone_of(source)
        model = cls(copy.deepcopy(backbone.config))  # its own: a change to it must not reach the source
        parameter = next(backbone.parameters())
        model.to(device=parameter.device, dtype=parameter.dtype)
        return init_nlvr2_from_pretraining(model, backbone).train(backbone.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a single-image checkpoint (no `twin_fusion_layers` in its
        config) goes through [`from_pretraining`] so each fusion layer fills its twin pair, and the classifier it
        lacks (freshly initialised) is listed in the loading info's `missing_keys`."""
        config = kwargs.get("config")
        if config is None or isinstance(config, (str, os.PathLike)):
            location = {key: kwargs[key] for key in _CONFIG_LOCATION_KWARGS if key in kwargs}
            config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path, **location)
        if has_twin_fusion_layers(config):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        output_loading_info = kwargs.pop("output_loading_info", False)
        backbone, info = EfficientVLMModel.from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        model = cls.from_pretraining(backbone)
        info["missing_keys"] = {
            *info["missing_keys"],
            *(f"cls_head.{name}" for name, _ in model.cls_head.named_parameters()),
        }
        return (model, info) if output_loading_info else model

    # -- forward -----------------------------------------------------------------------------------------------
    def fuse_image_pair(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        left_image_states: torch.Tensor,
        right_image_states: torch.Tensor,
        structure_masks: StructureMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        """Runs the twin fusion layers on text_states (batch, seq, hidden): layer 2i cross-attends to the left
        image tokens, layer 2i + 1 to the right ones (each (batch, image_len, vision_hidden))."""
        text_model = self.efficientvlm.text_model
        masks = text_model.layer_masks(structure_masks)
        masks["cross_head_mask"] = self._per_layer_cross_masks(masks["cross_head_mask"])
        additive_mask = extended_attention_mask(attention_mask, text_states.dtype)
        hidden_states = text_states
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        all_cross = () if output_attentions else None
        twin_layers = [
            (index, image_states)
            for pair in self.twin_pairs()
            for index, image_states in zip(pair, (left_image_states, right_image_states))
        ]
        for index, image_states in twin_layers:
            # One layer at a time through the shared encoder, which indexes and checks the masks.
            layer_output = text_model.encoder(
                hidden_states,
                additive_mask,
                encoder_hidden_states=image_states,
                layers=range(index, index + 1),
                **masks,
                output_attentions=output_attentions,
            )
            hidden_states = layer_output.last_hidden_state
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attn += layer_output.attentions
                all_cross += layer_output.cross_attentions
        return EncoderOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden, attentions=all_attn, cross_attentions=all_cross
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        token_type_ids: torch.Tensor | None = None,
        return_loss: bool = True,
    ) -> EfficientVLMVisualReasoningOutput:
        """
        pixel_values: (batch, 2, channels, height, width), the left and right image of each example;
        input_ids / attention_mask / token_type_ids: (batch, seq) sentences; labels: (batch,) class indices
        (NLVR2: 1 = true), the loss is computed only when given and `return_loss` (otherwise: inference,
        deterministic).
        structure_masks: as [`MASK_KEYS`], with `fusion_cross_heads` holding one mask per twin pair.
        """
        if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            raise ValueError(
                "`pixel_values` must have shape (batch, 2, channels, height, width), two images per sentence; "
                f"got {tuple(pixel_values.shape)}."
            )
        batch = input_ids.shape[0]
        if labels is not None and labels.shape != (batch,):
            raise ValueError(f"`labels` must have shape ({batch},); got {tuple(labels.shape)}.")
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        # One vision pass over all 2 * batch images, left images first (X-VLM's layout).
        vision, text, attention_mask = self.efficientvlm.encode_image_text(
            pixel_values.transpose(0, 1).flatten(0, 1),
            input_ids,
            attention_mask,
            structure_masks,
            interpolate_pos_encoding=interpolate_pos_encoding,
            images_per_text=2,
            token_type_ids=token_type_ids,
            **flags,
        )
        # Slices ending at the traced `batch`: with `.split(batch)` or `.unflatten(0, (2, -1)).unbind(0)` an exported
        # graph keeps the batch size it was traced at as a constant (and fails at any other).
        image_states = vision.last_hidden_state
        left_image_states, right_image_states = image_states[:batch], image_states[batch:]
        fusion = self.fuse_image_pair(
            text.last_hidden_state, attention_mask, left_image_states, right_image_states, structure_masks, **flags
        )
        logits = self.cls_head(fusion.last_hidden_state[:, 0])
        loss = F.cross_entropy(logits, labels) if labels is not None and return_loss else None
        return EfficientVLMVisualReasoningOutput(
            loss=loss, logits=logits, vision_output=vision, text_output=text, fusion_output=fusion
        )

    @torch.no_grad()
    def predict(self, left_images: Any, right_images: Any, sentences: str | list[str], processor: Any) -> list[dict]:
        """One call from images and sentences to answers: is each sentence true of its (left, right) image pair?

        left_images / right_images: one image each or two equal-length lists (PIL, numpy HWC, torch CHW);
        sentences: one string or one per pair; processor: the checkpoint's processor (`AutoProcessor`).
        Returns one dict per pair: `{"label": True or False, "probabilities": {"False": p, "True": 1 - p}}`.
        """
        warn_if_dropout_is_on(self, "predict")
        single = isinstance(sentences, str)
        sentences = [sentences] if single else list(sentences)
        lefts = left_images if isinstance(left_images, (list, tuple)) else [left_images]
        rights = right_images if isinstance(right_images, (list, tuple)) else [right_images]
        if not len(lefts) == len(rights) == len(sentences):
            raise ValueError(
                f"Got {len(lefts)} left images, {len(rights)} right images and {len(sentences)} sentences; "
                "give one (left, right) pair per sentence."
            )
        inputs = processor(images=[[left, right] for left, right in zip(lefts, rights)], text=sentences)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        probabilities = self(**inputs).logits.float().softmax(dim=-1).cpu()
        names = [self.config.id2label[index] for index in range(probabilities.shape[1])]
        return [
            {
                "label": bool(row.argmax().item() == NLVR2_LABELS.index("True")),
                "probabilities": dict(zip(names, row.tolist())),
            }
            for row in probabilities
        ]

    # -- structured pruning ----------------------------------------------------------------------------------
    def structure_sizes(self, include_decoder: bool = False) -> dict[str, list[int]]:
        """As the backbone's, except `fusion_cross_heads`: one entry per twin pair."""
        sizes = super().structure_sizes(include_decoder)
        sizes["fusion_cross_heads"] = self.config.layout.unit_values(sizes["fusion_cross_heads"])
        return sizes

    def structure_unit_parameters(self, include_decoder: bool = False) -> dict[str, list[int]]:
        """As the backbone's, except that a `fusion_cross_heads` unit is a head of both twins: two query
        rows and output columns, and the key/value rows they share counted once."""
        units = super().structure_unit_parameters(include_decoder)
        text = self.config.text_config
        shared_key_value = 2 * text.head_dim * (text.encoder_hidden_size + 1)
        pair_units = self.config.layout.unit_values(units["fusion_cross_heads"])
        units["fusion_cross_heads"] = [2 * unit - shared_key_value for unit in pair_units]
        return units

    def prune(self, structure_masks: StructureMasks, pad_to_multiple_of: int = 1) -> None:
        """Physically removes every zero-masked head / neuron (see [`EfficientVLMModel.prune`]); a
        `fusion_cross_heads` mask prunes both twins of its pair, which keep sharing their keys and values.
        A bad mask raises before anything changes."""
        cross_head_masks = self._per_layer_cross_masks(structure_masks.get("fusion_cross_heads"))
        check_prunable_masks(structure_masks, self.structure_sizes(), type(self).__name__)
        masks = {**structure_masks, "fusion_cross_heads": cross_head_masks}
        self._own_config()
        self.efficientvlm.prune(masks, pad_to_multiple_of)
        self._share_twin_key_values()
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)


__all__ = [
    "NLVR2_LABELS",
    "EfficientVLMForVisualReasoning",
    "EfficientVLMVisualReasoningOutput",
    "init_nlvr2_from_pretraining",
    "twin_fusion_config",
]
