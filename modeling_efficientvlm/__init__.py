"""EfficientVLM: X-VLM-style vision-language models, distilled and pruned (arXiv 2210.07795).

Importing the package registers every config, model and processor with the Auto classes, and registers each
for remote code (`register_for_auto_class`), so `save_pretrained` writes `auto_map` and copies the code: a saved
folder loads with `trust_remote_code=True` anywhere. Only this file registers: the files a folder ships define
classes only, so two folders with different code loaded in one process each keep their own classes.

Auto classes: `AutoModel` loads every saved model as its own class (`config.architectures` picks it here; the
folder's `auto_map` names it for remote code); `AutoModelForPreTraining`, `AutoModelForZeroShotImageClassification`
(retrieval), `AutoModelForVisualQuestionAnswering` (VQA), `AutoModelForImageTextToText` (captioning and VQA, for
the `image-text-to-text` pipeline) and `AutoModelForSequenceClassification` (NLVR2) load their task's model.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_efficientvlm import EfficientVLMConfig, EfficientVLMTextConfig, EfficientVLMVisionConfig
from .image_processing_efficientvlm import EfficientVLMImageProcessor
from .loading_efficientvlm import CheckpointMismatchError, CorruptCheckpointError
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
EfficientVLMConfig.register_for_auto_class()

# One config class serves every task, so an auto class that loads several of them gets a tuple: transformers
# picks the class named in `config.architectures` (the first one when none matches).
_AUTO_MODELS = {
    AutoModel: (
        EfficientVLMModel,
        EfficientVLMForPreTraining,
        EfficientVLMForImageTextRetrieval,
        EfficientVLMForQuestionAnswering,
        EfficientVLMForVisualReasoning,
        EfficientVLMForConditionalGeneration,
    ),
    AutoModelForPreTraining: EfficientVLMForPreTraining,
    # Transformers files BLIP-2's retrieval model under zero-shot image classification; no retrieval auto class exists.
    AutoModelForZeroShotImageClassification: EfficientVLMForImageTextRetrieval,
    AutoModelForVisualQuestionAnswering: EfficientVLMForQuestionAnswering,
    AutoModelForImageTextToText: (EfficientVLMForConditionalGeneration, EfficientVLMForQuestionAnswering),
    AutoModelForSequenceClassification: EfficientVLMForVisualReasoning,
}
for _auto_class, _model_classes in _AUTO_MODELS.items():
    _auto_class.register(EfficientVLMConfig, _model_classes, exist_ok=True)
# Each model is saved for its own auto class (copying its code), and `save_pretrained` writes its `auto_classes`.
for _model_class in (
    EfficientVLMModel,
    EfficientVLMForPreTraining,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForQuestionAnswering,
    EfficientVLMForConditionalGeneration,
    EfficientVLMForVisualReasoning,
):
    _model_class.register_for_auto_class(_model_class.auto_classes[0])

AutoImageProcessor.register(
    EfficientVLMConfig, image_processor_classes={"pil": EfficientVLMImageProcessor}, exist_ok=True
)
EfficientVLMImageProcessor.register_for_auto_class("AutoImageProcessor")
AutoProcessor.register(EfficientVLMConfig, EfficientVLMProcessor, exist_ok=True)
EfficientVLMProcessor.register_for_auto_class("AutoProcessor")
del _auto_class, _model_classes, _model_class

__all__ = [
    "MASK_KEYS",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
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
