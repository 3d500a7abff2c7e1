"""EfficientVLM configuration: a vision sub-config, a text sub-config (text + fusion layers) and presets."""

from __future__ import annotations

import copy
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


def _check_per_layer(name: str, values: list[int] | None, num_layers: int, maximum: int) -> None:
    if values is None:
        return
    if len(values) != num_layers:
        raise ValueError(f"`{name}` has {len(values)} entries but the encoder has {num_layers} layers.")
    for index, value in enumerate(values):
        if not 0 <= value <= maximum:
            raise ValueError(f"`{name}[{index}]` is {value}; it must be between 0 and {maximum}.")


@strict
class EfficientVLMVisionConfig(PreTrainedConfig):
    r"""
    Configuration of the vision transformer (CLIP ViT style, pre-LN).

    `num_attention_heads_per_layer` and `intermediate_size_per_layer` hold the sizes of each layer after
    structured pruning; `None` means every layer has `num_attention_heads` heads and `intermediate_size`
    FFN neurons. The width of one head is always `hidden_size // num_attention_heads`.
    """

    model_type = "efficientvlm_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    num_attention_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"The vision hidden size ({self.hidden_size}) is not a multiple of the number of attention heads "
                f"({self.num_attention_heads})."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"The image size ({self.image_size}) is not a multiple of the patch size ({self.patch_size})."
            )
        _check_per_layer(
            "vision_config.num_attention_heads_per_layer",
            self.num_attention_heads_per_layer,
            self.num_hidden_layers,
            self.num_attention_heads,
        )
        _check_per_layer(
            "vision_config.intermediate_size_per_layer",
            self.intermediate_size_per_layer,
            self.num_hidden_layers,
            1 << 30,
        )
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_heads(self, index: int) -> int:
        """Number of self-attention heads of layer `index`."""
        if self.num_attention_heads_per_layer is None:
            return self.num_attention_heads
        return self.num_attention_heads_per_layer[index]

    def layer_intermediate_size(self, index: int) -> int:
        """Number of FFN neurons of layer `index`."""
        if self.intermediate_size_per_layer is None:
            return self.intermediate_size
        return self.intermediate_size_per_layer[index]


@strict
class EfficientVLMTextConfig(PreTrainedConfig):
    r"""
    Configuration of the BERT stack: `num_hidden_layers` text-only layers followed by `num_fusion_layers`
    fusion layers (self-attention, cross-attention to the image, FFN).

    Per-layer sizes after pruning: `num_attention_heads_per_layer` and `intermediate_size_per_layer` have
    one entry per layer of the whole stack (text layers first), `num_cross_attention_heads_per_layer` one
    entry per fusion layer. `encoder_hidden_size` is the width of the states the cross-attention reads
    (the vision width for the fusion layers).
    """

    model_type = "efficientvlm_text_model"
    base_config_key = "text_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 6
    num_fusion_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    encoder_hidden_size: int = 768
    pad_token_id: int | None = 0
    bos_token_id: int | None = 101
    eos_token_id: int | None = 102
    num_attention_heads_per_layer: list[int] | None = None
    num_cross_attention_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"The text hidden size ({self.hidden_size}) is not a multiple of the number of attention heads "
                f"({self.num_attention_heads})."
            )
        total = self.num_hidden_layers + self.num_fusion_layers
        _check_per_layer(
            "text_config.num_attention_heads_per_layer",
            self.num_attention_heads_per_layer,
            total,
            self.num_attention_heads,
        )
        _check_per_layer(
            "text_config.num_cross_attention_heads_per_layer",
            self.num_cross_attention_heads_per_layer,
            self.num_fusion_layers,
            self.num_attention_heads,
        )
        _check_per_layer("text_config.intermediate_size_per_layer", self.intermediate_size_per_layer, total, 1 << 30)
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_total_layers(self) -> int:
        return self.num_hidden_layers + self.num_fusion_layers

    def layer_heads(self, index: int) -> int:
        """Self-attention heads of layer `index` of the whole stack."""
        if self.num_attention_heads_per_layer is None:
            return self.num_attention_heads
        return self.num_attention_heads_per_layer[index]

    def layer_cross_heads(self, index: int) -> int:
        """Cross-attention heads of layer `index` of the whole stack (0 for text-only layers)."""
        if index < self.num_hidden_layers:
            return 0
        if self.num_cross_attention_heads_per_layer is None:
            return self.num_attention_heads
        return self.num_cross_attention_heads_per_layer[index - self.num_hidden_layers]

    def layer_intermediate_size(self, index: int) -> int:
        """FFN neurons of layer `index` of the whole stack."""
        if self.intermediate_size_per_layer is None:
            return self.intermediate_size
        return self.intermediate_size_per_layer[index]


_TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
_TINY_TEXT = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_fusion_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    encoder_hidden_size=32,
)

PRESETS: dict[str, dict[str, Any]] = {
    # X-VLM base: CLIP ViT-B/16 + BERT-base split into 6 text and 6 fusion layers (the teacher).
    "xvlm-base": dict(
        vision_config=dict(num_hidden_layers=12), text_config=dict(num_hidden_layers=6, num_fusion_layers=6)
    ),
    # The EfficientVLM student: half the depth in every modality, same widths.
    "efficientvlm-small": dict(
        vision_config=dict(num_hidden_layers=6), text_config=dict(num_hidden_layers=3, num_fusion_layers=3)
    ),
    # Test and demo sizes.
    "tiny": dict(vision_config=_TINY_VISION, text_config=_TINY_TEXT, embed_dim=16, max_text_length=32),
    "tiny-student": dict(
        vision_config={**_TINY_VISION, "num_hidden_layers": 1},
        text_config={**_TINY_TEXT, "num_hidden_layers": 1, "num_fusion_layers": 1},
        embed_dim=16,
        max_text_length=32,
    ),
}


@strict
class EfficientVLMConfig(PreTrainedConfig):
    r"""
    Configuration of an EfficientVLM / X-VLM model.

    Args:
        vision_config: the vision transformer ([`EfficientVLMVisionConfig`] or a dict).
        text_config: the text + fusion BERT stack ([`EfficientVLMTextConfig`] or a dict).
        embed_dim: width of the contrastive (ITC) embedding space.
        temperature: initial value of the learnable ITC temperature.
        max_text_length: longest text (in tokens) the processor produces by default.
        num_answer_decoder_layers: layers of the VQA answer decoder (defaults to the number of fusion layers).
        label_smoothing: label smoothing of the captioning loss (X-VLM fine-tunes with 0.1).
        twin_fusion_layers: NLVR2 layout: fusion layers come in pairs, the first attending to the left image,
            the second to the right (set by [`EfficientVLMForVisualReasoning`]).

    Example:

    ```python
    >>> config = EfficientVLMConfig.from_preset("efficientvlm-small")
    >>> config.vision_config.num_hidden_layers, config.text_config.num_fusion_layers
    (6, 3)
    ```
    """

    model_type = "efficientvlm"
    sub_configs_defaults = {"vision_config": EfficientVLMVisionConfig, "text_config": EfficientVLMTextConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    embed_dim: int = 256
    temperature: float = 0.07
    max_text_length: int = 40
    num_answer_decoder_layers: int | None = None
    label_smoothing: float = 0.0
    twin_fusion_layers: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.text_config.encoder_hidden_size != self.vision_config.hidden_size:
            self.text_config.encoder_hidden_size = self.vision_config.hidden_size
        if not 0 < self.temperature:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}.")
        if self.max_text_length > self.text_config.max_position_embeddings:
            raise ValueError(
                f"`max_text_length` ({self.max_text_length}) exceeds the position table "
                f"({self.text_config.max_position_embeddings})."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> EfficientVLMConfig:
        """Builds a named preset (`xvlm-base`, `efficientvlm-small`, `tiny`, `tiny-student`).

        `overrides` update top-level fields; `vision_config` / `text_config` overrides given as dicts are
        merged into the preset's sub-config.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        kwargs = copy.deepcopy(PRESETS[name])
        for key in ("vision_config", "text_config"):
            if isinstance(overrides.get(key), dict):
                kwargs[key] = {**kwargs.get(key, {}), **overrides.pop(key)}
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["EfficientVLMConfig", "EfficientVLMTextConfig", "EfficientVLMVisionConfig", "PRESETS"]
