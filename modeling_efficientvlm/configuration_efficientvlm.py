"""EfficientVLM configuration: a vision sub-config, a text sub-config (text + fusion layers) and presets."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

T = TypeVar("T")

# How the vision position embeddings start (`EfficientVLMVisionConfig.position_embedding_init`).
POSITION_EMBEDDING_INITS = ("normal", "sincos_2d")


@dataclass(frozen=True)
class TextStackLayout:
    r"""
    Which layer of the BERT stack does what: the one place that knows it.

    The stack (`text_model.encoder.layer`) holds `num_text_layers` text layers (self-attention, FFN) followed by
    `num_fusion_layers` fusion layers (self-attention, cross-attention to the image, FFN). A *stack index* is a
    position in the whole stack, a *fusion index* a position among the fusion layers. With
    `twin_fusion_layers` (NLVR2) the fusion layers come in (left image, right image) twin pairs, fusion layers
    `2p` and `2p + 1` forming pair `p`; distillation and cross-attention pruning count a pair as one *fusion
    unit*. Without twins a fusion unit is a fusion layer.

    Get it from a config: `config.layout` (an [`EfficientVLMConfig`], knows about twins) or
    `text_config.layout` (the BERT stack alone, which never has twins).
    """

    num_text_layers: int
    num_fusion_layers: int
    twin_fusion_layers: bool = False

    def __post_init__(self) -> None:
        if self.twin_fusion_layers and self.num_fusion_layers % 2:
            raise ValueError(
                "A config with `twin_fusion_layers=True` needs an even number of fusion layers; "
                f"got {self.num_fusion_layers}."
            )

    @classmethod
    def of(cls, config: Any) -> TextStackLayout:
        """The layout of an [`EfficientVLMConfig`] (twins included) or of an [`EfficientVLMTextConfig`]."""
        text = getattr(config, "text_config", config)
        return cls(text.num_hidden_layers, text.num_fusion_layers, has_twin_fusion_layers(config))

    @property
    def num_layers(self) -> int:
        return self.num_text_layers + self.num_fusion_layers

    @property
    def text_layers(self) -> range:
        """Stack indices of the text layers."""
        return range(0, self.num_text_layers)

    @property
    def fusion_layers(self) -> range:
        """Stack indices of the fusion layers."""
        return range(self.num_text_layers, self.num_layers)

    def is_fusion(self, index: int) -> bool:
        """Whether stack layer `index` is a fusion layer (it has cross-attention)."""
        return index >= self.num_text_layers

    def fusion_index(self, index: int) -> int:
        """Stack index of a fusion layer -> its fusion index."""
        if not self.is_fusion(index):
            raise ValueError(f"Layer {index} of the stack is a text layer, not a fusion layer.")
        return index - self.num_text_layers

    def stack_index(self, fusion_index: int) -> int:
        """Fusion index -> stack index."""
        return self.num_text_layers + fusion_index

    def split(self, values: Sequence[T]) -> tuple[list[T], list[T]]:
        """One value per stack layer -> (the text layers' values, the fusion layers' values)."""
        values = list(values)
        return values[: self.num_text_layers], values[self.num_text_layers :]

    @property
    def num_fusion_units(self) -> int:
        """Fusion layers, twin pairs counted once: the fusion depth distillation and pruning see."""
        return self.num_fusion_layers // 2 if self.twin_fusion_layers else self.num_fusion_layers

    @property
    def twin_pairs(self) -> list[tuple[int, int]]:
        """Stack indices of each (left image, right image) twin pair; empty without twins."""
        if not self.twin_fusion_layers:
            return []
        return [(i, i + 1) for i in range(self.num_text_layers, self.num_layers, 2)]

    def unit_values(self, values: Sequence[T]) -> list[T]:
        """One value per fusion layer -> one per fusion unit (a twin pair keeps its left layer's)."""
        return list(values)[0::2] if self.twin_fusion_layers else list(values)

    def layer_values(self, values: Sequence[T]) -> list[T]:
        """One value per fusion unit -> one per fusion layer (a twin pair's value for both twins)."""
        return [value for value in values for _ in range(2)] if self.twin_fusion_layers else list(values)

    def fusion_layer_mapping(self, unit_mapping: Sequence[int]) -> list[int]:
        """Teacher fusion index of each student fusion layer from a mapping between fusion units: with twins,
        student layer `2i + b` (b = 0 left, 1 right) maps to teacher layer `2 * unit_mapping[i] + b`."""
        if not self.twin_fusion_layers:
            return list(unit_mapping)
        return [2 * unit + side for unit in unit_mapping for side in (0, 1)]

    def stack_mapping(self, text_mapping: Sequence[int], fusion_unit_mapping: Sequence[int]) -> list[int]:
        """Stack index in this (teacher) layout of each layer of a student's whole stack, from the student's
        text mapping and fusion-unit mapping (both into this layout's text layers / fusion units)."""
        fusion = self.fusion_layer_mapping(fusion_unit_mapping)
        return list(text_mapping) + [self.stack_index(index) for index in fusion]


def has_twin_fusion_layers(config: Any) -> bool:
    """Whether the config's fusion layers come in (left image, right image) twin pairs (NLVR2)."""
    return bool(getattr(config, "twin_fusion_layers", False))


def stack_depths(config: Any) -> dict[str, int] | None:
    """Layers per stack (`{"vision": ..., "text": ..., "fusion": ...}`) of an [`EfficientVLMConfig`]; fusion
    layers that come in twin pairs (NLVR2) count once per pair. None for another kind of config."""
    vision, text = getattr(config, "vision_config", None), getattr(config, "text_config", None)
    if vision is None or text is None:
        return None
    layout = TextStackLayout.of(config)
    return {"vision": vision.num_hidden_layers, "text": layout.num_text_layers, "fusion": layout.num_fusion_units}


def _check_per_layer(
    name: str, values: list[int] | None, num_layers: int, maximum: int, stack: str = "the encoder"
) -> None:
    if values is None:
        return
    if len(values) != num_layers:
        raise ValueError(f"`{name}` has {len(values)} entries but {stack} has {num_layers} layers.")
    for index, value in enumerate(values):
        if not 0 <= value <= maximum:
            raise ValueError(f"`{name}[{index}]` is {value}; it must be between 0 and {maximum}.")


class _PerLayerSizes:
    """Per-layer sizes shared by the vision and the text configs (`None` lists mean "every layer full")."""

    def _check_head_width(self, name: str) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"The {name} hidden size ({self.hidden_size}) is not a multiple of the number of attention heads "
                f"({self.num_attention_heads})."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_heads(self, index: int) -> int:
        """Self-attention heads of layer `index`."""
        if self.num_attention_heads_per_layer is None:
            return self.num_attention_heads
        return self.num_attention_heads_per_layer[index]

    def layer_intermediate_size(self, index: int) -> int:
        """FFN neurons of layer `index`."""
        if self.intermediate_size_per_layer is None:
            return self.intermediate_size
        return self.intermediate_size_per_layer[index]


@strict
class EfficientVLMVisionConfig(_PerLayerSizes, PreTrainedConfig):
    r"""
    Configuration of the vision transformer (CLIP ViT style, pre-LN).

    `num_attention_heads_per_layer` and `intermediate_size_per_layer` hold the sizes of each layer after
    structured pruning; `None` means every layer has `num_attention_heads` heads and `intermediate_size`
    FFN neurons. The width of one head is always `hidden_size // num_attention_heads`.

    `position_embedding_init`: how the learned position embeddings start. `"normal"` (X-VLM, ViT): drawn like
    every weight, with std `initializer_range`; `"sincos_2d"`: the fixed 2-D sine-cosine embeddings of MAE and
    of Beyer et al.'s plain ViT baselines (half the channels code the row, half the column; values in [-1, 1]),
    then learned. From scratch the patch embeddings are ~25x larger than normal-drawn positions, and in a short
    run the positions barely move: the model cannot tell where anything is (the demo recipe's notes). Only the
    start differs: the parameter and the checkpoints are the same.

    `zero_init_residual`: at initialisation, zero the weights of the output projection of every vision layer's
    residual branches (attention `out_proj`, FFN `fc2`), so each layer starts as the identity (plus its LayerNorms)
    and the patch and position embeddings reach the output tokens intact; with a large `initializer_range`
    random layers drown the positions. Only affects freshly initialised weights.

    `output_position_embeddings`: add the position embeddings to the output tokens again (after the final
    LayerNorm), so what the fusion layers cross-attend to says where each token is, as DETR adds positions to its
    cross-attention keys. The layers otherwise let an object's content swamp its position: in the demo's model the
    fused [CLS] could not learn where a text's object is (box regression at chance) until the positions were added
    back, and then learnt it within 100 steps. Off in X-VLM and the official checkpoints.
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
    position_embedding_init: str = "normal"
    zero_init_residual: bool = False
    output_position_embeddings: bool = False
    num_attention_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self._check_head_width("vision")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"The image size ({self.image_size}) is not a multiple of the patch size ({self.patch_size})."
            )
        if self.position_embedding_init not in POSITION_EMBEDDING_INITS:
            raise ValueError(
                f"`vision_config.position_embedding_init` must be one of {POSITION_EMBEDDING_INITS}; got "
                f"{self.position_embedding_init!r}."
            )
        if self.position_embedding_init == "sincos_2d" and self.hidden_size % 4:
            raise ValueError(
                f"`vision_config.position_embedding_init='sincos_2d'` needs a `hidden_size` divisible by 4 (a sine "
                f"and a cosine per row and per column frequency); got {self.hidden_size}."
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


@strict
class EfficientVLMTextConfig(_PerLayerSizes, PreTrainedConfig):
    r"""
    Configuration of the BERT stack: `num_hidden_layers` text-only layers followed by `num_fusion_layers`
    fusion layers (self-attention, cross-attention to the image, FFN).

    Per-layer sizes after pruning: `num_attention_heads_per_layer` and `intermediate_size_per_layer` have
    one entry per layer of the whole stack (text layers first), `num_cross_attention_heads_per_layer` one
    entry per fusion layer. `encoder_hidden_size` is the width of the states the cross-attention reads
    (the vision width for the fusion layers).

    `fusion_zero_init_residual`: at initialisation, zero the weights of the output projection of every
    residual branch of the fusion layers (self-attention and cross-attention `out_proj`, FFN `fc2`), so each
    fusion layer starts as the identity (plus its LayerNorm) and the text reaches the fused [CLS] intact.
    With a large `initializer_range` (from scratch), random fusion layers wash the text out of the fused
    [CLS], and ITM / NLVR2 heads then see little of the sentence. Only affects freshly initialised weights.
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
    fusion_zero_init_residual: bool = False
    encoder_hidden_size: int = 768
    pad_token_id: int | None = 0
    bos_token_id: int | None = 101
    eos_token_id: int | None = 102
    num_attention_heads_per_layer: list[int] | None = None
    num_cross_attention_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self._check_head_width("text")
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
    def layout(self) -> TextStackLayout:
        """Which stack layer is a text or a fusion layer (a text config alone never has twin layers)."""
        return TextStackLayout(self.num_hidden_layers, self.num_fusion_layers)

    @property
    def num_total_layers(self) -> int:
        return self.layout.num_layers

    def layer_cross_heads(self, index: int) -> int:
        """Cross-attention heads of layer `index` of the whole stack (0 for text-only layers)."""
        layout = self.layout
        if not layout.is_fusion(index):
            return 0
        if self.num_cross_attention_heads_per_layer is None:
            return self.num_attention_heads
        return self.num_cross_attention_heads_per_layer[layout.fusion_index(index)]


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
        itc_temperature: initial value of the learnable temperature of the image-text contrastive (ITC) loss
            (called `temperature` before; a saved config with that key still loads).
        itm_random_negatives: share of the image-text matching (ITM) negatives drawn uniformly from the batch
            instead of in proportion to the ITC similarities (0, X-VLM's hard negatives only, fits a model with
            pre-trained encoders; a model trained from scratch needs some random ones for its ITM head to learn).
        itm_exclude_identical_texts: never draw as image i's ITM negative a text identical (same tokens) to image
            i's own text: generic captions that repeat across images ("a picture of two shapes") are true of both,
            and as negatives they teach the ITM head to answer "no match" to true matches (False: X-VLM's rule,
            only texts of the same image id are excluded).
        itm_caption_negatives: when a retrieval batch carries a caption negative per pair (`itm_negative_input_ids`,
            a text false of that image, e.g. its own caption with one attribute changed), the share of images whose
            ITM negative text is that caption negative instead of an in-batch text (0: never, as X-VLM).
        itm_negatives_per_pair: hard negatives drawn per image and per text for ITM (1: X-VLM's one negative text
            per image and one negative image per text; n > 1 gives the ITM head n times the negatives per step, at
            the cost of n times the negative pairs through the fusion layers).
        itc_local_gradient: under DDP, the ITC loss's gather passes back to each process only its own slice of the
            gradient, as X-VLM's `AllGather` does: the encoders then learn ITC at 1/N of the global batch's gradient
            with N processes (False: the global batch's, the same for any number of processes). For reproducing the
            official runs on N devices; no effect in one process.
        max_text_length: longest text (in tokens) the processor produces by default.
        num_answer_decoder_layers: layers of the VQA answer decoder (defaults to the number of fusion layers).
        answer_decoder_num_attention_heads_per_layer, answer_decoder_num_cross_attention_heads_per_layer,
        answer_decoder_intermediate_size_per_layer: the VQA answer decoder's self-attention heads, cross-attention
            heads and FFN neurons per layer after structured pruning (`prune_decoder`); `None`: every layer full.
        label_smoothing: label smoothing of the captioning loss (X-VLM fine-tunes with 0.1).
        head_learning_rate_multiplier: training: the learning rate of the task's freshly initialised head (NLVR2's
            classifier; pre-training's ITC projections and temperature, ITM and box heads) times this, as X-VLM's
            `lr_mult` multiplies its models' `init_params` (the official NLVR2 and pre-training configs: 2). The
            other task models have no such head (officially none either).
        twin_fusion_layers: NLVR2 layout: fusion layers come in pairs, the first attending to the left image,
            the second to the right (set by [`EfficientVLMForVisualReasoning`]).
        answer_candidates: VQA: the answer list the model ranks (X-VLM's k-test), saved with the checkpoint so
            `rank_answers` and `generate` need no other file; set with
            [`EfficientVLMForQuestionAnswering.set_answer_candidates`].
        answer_candidates_ids: their token ids, one list per answer, "[CLS] answer [SEP]" of the tokenizer saved
            with the model (so ranking needs no tokenizer).

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
    itc_temperature: float = 0.07
    itm_random_negatives: float = 0.0
    itm_exclude_identical_texts: bool = False
    itm_caption_negatives: float = 0.0
    itm_negatives_per_pair: int = 1
    itc_local_gradient: bool = False
    max_text_length: int = 40
    num_answer_decoder_layers: int | None = None
    answer_decoder_num_attention_heads_per_layer: list[int] | None = None
    answer_decoder_num_cross_attention_heads_per_layer: list[int] | None = None
    answer_decoder_intermediate_size_per_layer: list[int] | None = None
    label_smoothing: float = 0.0
    head_learning_rate_multiplier: float = 1.0
    twin_fusion_layers: bool = False
    answer_candidates: list[str] | None = None
    answer_candidates_ids: list[list[int]] | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        # Configs saved before the rename call the ITC temperature `temperature`.
        legacy_temperature = kwargs.pop("temperature", None)
        if legacy_temperature is not None:
            self.itc_temperature = legacy_temperature
        super().__post_init__(**kwargs)
        if self.text_config.encoder_hidden_size != self.vision_config.hidden_size:
            self.text_config.encoder_hidden_size = self.vision_config.hidden_size
        if not 0 < self.itc_temperature:
            raise ValueError(f"`itc_temperature` must be positive, got {self.itc_temperature}.")
        if not 0.0 <= self.itm_random_negatives <= 1.0:
            raise ValueError(f"`itm_random_negatives` must be in [0, 1], got {self.itm_random_negatives}.")
        if not 0.0 <= self.itm_caption_negatives <= 1.0:
            raise ValueError(f"`itm_caption_negatives` must be in [0, 1], got {self.itm_caption_negatives}.")
        if isinstance(self.itm_negatives_per_pair, bool) or not (
            isinstance(self.itm_negatives_per_pair, int) and self.itm_negatives_per_pair >= 1
        ):
            raise ValueError(f"`itm_negatives_per_pair` must be an integer >= 1, got {self.itm_negatives_per_pair!r}.")
        multiplier = self.head_learning_rate_multiplier
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier > 0:
            raise ValueError(f"`head_learning_rate_multiplier` must be a positive number, got {multiplier!r}.")
        TextStackLayout.of(self)  # raises for twin fusion layers of an odd number
        self._check_answer_candidates()
        self._check_answer_decoder_sizes()
        if self.max_text_length > self.text_config.max_position_embeddings:
            raise ValueError(
                f"`max_text_length` ({self.max_text_length}) exceeds the position table "
                f"({self.text_config.max_position_embeddings})."
            )

    def _check_answer_candidates(self) -> None:
        answers, ids = self.answer_candidates, self.answer_candidates_ids
        if answers is None and ids is None:
            return
        if answers is None or ids is None or len(answers) != len(ids) or not answers:
            raise ValueError(
                "`answer_candidates` and `answer_candidates_ids` go together: one non-empty list of answers and one "
                "list of token ids per answer (use `EfficientVLMForQuestionAnswering.set_answer_candidates`)."
            )
        if any(len(sequence) < 2 or sequence[0] != ids[0][0] for sequence in ids):
            raise ValueError("Every entry of `answer_candidates_ids` must be a start token, then the answer's tokens.")

    @property
    def answer_decoder_depth(self) -> int:
        """Layers of the VQA answer decoder: `num_answer_decoder_layers`, by default the number of fusion layers."""
        if self.num_answer_decoder_layers is None:
            return self.text_config.num_fusion_layers
        return self.num_answer_decoder_layers

    def _check_answer_decoder_sizes(self) -> None:
        text = self.text_config
        for name, maximum in (
            ("answer_decoder_num_attention_heads_per_layer", text.num_attention_heads),
            ("answer_decoder_num_cross_attention_heads_per_layer", text.num_attention_heads),
            ("answer_decoder_intermediate_size_per_layer", 1 << 30),
        ):
            _check_per_layer(name, getattr(self, name), self.answer_decoder_depth, maximum, "the answer decoder")

    @property
    def layout(self) -> TextStackLayout:
        """Which stack layer is a text or a fusion layer, and the NLVR2 twin pairs (see [`TextStackLayout`])."""
        return TextStackLayout.of(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> EfficientVLMConfig:
        """Builds a named preset (`xvlm-base`, `efficientvlm-small`, `tiny`, `tiny-student`).

        `overrides` update top-level fields; `vision_config` / `text_config` overrides given as dicts are
        merged into the preset's sub-config.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        overrides = copy.deepcopy(overrides)
        _check_overrides(overrides, cls().to_dict(), "")
        kwargs = copy.deepcopy(PRESETS[name])
        for key in ("vision_config", "text_config"):
            if isinstance(overrides.get(key), dict):
                kwargs[key] = {**kwargs.get(key, {}), **overrides.pop(key)}
        kwargs.update(overrides)
        return cls(**kwargs)


def _check_overrides(overrides: dict[str, Any], defaults: dict[str, Any], where: str) -> None:
    """Raises for an override of a field the config does not have (a typo would otherwise be stored unused) or of
    another type than the field's (a string for a size), naming it."""
    import difflib

    for key, value in overrides.items():
        name = f"{where}{key}"
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean '{where}{close[0]}'?" if close else "."
            raise ValueError(f"Config override {name!r}: the config has no such field{hint}")
        default = defaults[key]
        if isinstance(default, dict) and isinstance(value, dict) and key.endswith("_config"):
            _check_overrides(value, default, f"{name}.")
        elif isinstance(default, bool) or isinstance(value, bool):
            if default is not None and isinstance(default, bool) != isinstance(value, bool):
                raise ValueError(f"Config override {name!r}: expected {type(default).__name__}, got {value!r}.")
        elif isinstance(default, (int, float)) and not isinstance(value, (int, float)):
            raise ValueError(f"Config override {name!r}: expected a number, got {value!r}.")


__all__ = [
    "PRESETS",
    "EfficientVLMConfig",
    "EfficientVLMTextConfig",
    "EfficientVLMVisionConfig",
    "TextStackLayout",
    "has_twin_fusion_layers",
    "stack_depths",
]
