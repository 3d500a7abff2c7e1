"""EfficientVLM: X-VLM-style vision-language models, distilled and pruned (arXiv 2210.07795).

Importing the package registers every config, model and processor with the Auto classes; each class also
registers itself for remote code, so a saved folder loads with `trust_remote_code=True` anywhere.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForVisualQuestionAnswering,
)

from .configuration_efficientvlm import EfficientVLMConfig, EfficientVLMTextConfig, EfficientVLMVisionConfig
from .image_processing_efficientvlm import EfficientVLMImageProcessor
from .modeling_efficientvlm import (
    MASK_KEYS,
    EfficientVLMForPreTraining,
    EfficientVLMModel,
    EfficientVLMPreTrainedModel,
    EfficientVLMTextModel,
    EfficientVLMVisionModel,
    StructureMasks,
)
from .modeling_efficientvlm_captioning import EfficientVLMForConditionalGeneration
from .modeling_efficientvlm_nlvr2 import EfficientVLMForVisualReasoning, init_nlvr2_from_pretraining, twin_fusion_config
from .modeling_efficientvlm_retrieval import EfficientVLMForImageTextRetrieval
from .modeling_efficientvlm_vqa import EfficientVLMForQuestionAnswering
from .processing_efficientvlm import EfficientVLMProcessor

AutoConfig.register("efficientvlm", EfficientVLMConfig, exist_ok=True)
AutoModel.register(EfficientVLMConfig, EfficientVLMModel, exist_ok=True)
AutoModelForPreTraining.register(EfficientVLMConfig, EfficientVLMForPreTraining, exist_ok=True)
EfficientVLMConfig.register_for_auto_class()
EfficientVLMModel.register_for_auto_class("AutoModel")
EfficientVLMForPreTraining.register_for_auto_class("AutoModelForPreTraining")
AutoModelForVisualQuestionAnswering.register(EfficientVLMConfig, EfficientVLMForQuestionAnswering, exist_ok=True)
EfficientVLMForQuestionAnswering.register_for_auto_class("AutoModelForVisualQuestionAnswering")
AutoModelForImageTextToText.register(EfficientVLMConfig, EfficientVLMForConditionalGeneration, exist_ok=True)
EfficientVLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
# Retrieval (AutoModelForZeroShotImageClassification) and NLVR2 (AutoModelForSequenceClassification) register
# themselves in their modules.

__all__ = [
    "MASK_KEYS",
    "EfficientVLMConfig",
    "EfficientVLMForConditionalGeneration",
    "EfficientVLMForImageTextRetrieval",
    "EfficientVLMForPreTraining",
    "EfficientVLMForQuestionAnswering",
    "EfficientVLMForVisualReasoning",
    "EfficientVLMImageProcessor",
    "EfficientVLMModel",
    "EfficientVLMPreTrainedModel",
    "EfficientVLMProcessor",
    "EfficientVLMTextConfig",
    "EfficientVLMTextModel",
    "EfficientVLMVisionConfig",
    "EfficientVLMVisionModel",
    "StructureMasks",
    "init_nlvr2_from_pretraining",
    "twin_fusion_config",
]
