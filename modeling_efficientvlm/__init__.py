"""EfficientVLM: X-VLM-style vision-language models, distilled and pruned (arXiv 2210.07795)."""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from .configuration_efficientvlm import EfficientVLMConfig, EfficientVLMTextConfig, EfficientVLMVisionConfig
from .modeling_efficientvlm import (
    MASK_KEYS,
    EfficientVLMForPreTraining,
    EfficientVLMModel,
    EfficientVLMPreTrainedModel,
    EfficientVLMTextModel,
    EfficientVLMVisionModel,
)

AutoConfig.register("efficientvlm", EfficientVLMConfig, exist_ok=True)
AutoModel.register(EfficientVLMConfig, EfficientVLMModel, exist_ok=True)
AutoModelForPreTraining.register(EfficientVLMConfig, EfficientVLMForPreTraining, exist_ok=True)
# Saved folders carry the code and an `auto_map`, so they load with `trust_remote_code=True` anywhere.
EfficientVLMConfig.register_for_auto_class()
EfficientVLMModel.register_for_auto_class("AutoModel")
EfficientVLMForPreTraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "MASK_KEYS",
    "EfficientVLMConfig",
    "EfficientVLMForPreTraining",
    "EfficientVLMModel",
    "EfficientVLMPreTrainedModel",
    "EfficientVLMTextConfig",
    "EfficientVLMTextModel",
    "EfficientVLMVisionConfig",
    "EfficientVLMVisionModel",
]
