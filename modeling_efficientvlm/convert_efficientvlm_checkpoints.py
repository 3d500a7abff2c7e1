"""Converters into this library's format.

* Official X-VLM / EfficientVLM `.pth` checkpoints (pre-training, retrieval, captioning, VQA) -> our models.
* Hugging Face CLIP vision + BERT checkpoints -> an X-VLM-style teacher to pre-train.

Usage::

    python -m modeling_efficientvlm.convert_efficientvlm_checkpoints xvlm --checkpoint model.pth --task retrieval \
        --output_dir converted/
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.utils import logging

from .configuration_efficientvlm import EfficientVLMConfig
from .loading_efficientvlm import read_torch_weights

logger = logging.get_logger(__name__)

# Each official task model keeps its modules under different prefixes; ours always name the backbone
# `efficientvlm` and the heads as in the model classes.
OFFICIAL_TASKS = ("pretraining", "retrieval", "captioning", "vqa")

_LAYER_RENAMES = [
    # BERT layer (text, fusion and decoder stacks)
    (r"attention\.self\.query\.", "attention.q_proj."),
    (r"attention\.self\.key\.", "attention.k_proj."),
    (r"attention\.self\.value\.", "attention.v_proj."),
    (r"attention\.output\.dense\.", "attention.out_proj."),
    (r"attention\.output\.LayerNorm\.", "attention_norm."),
    (r"crossattention\.self\.query\.", "crossattention.q_proj."),
    (r"crossattention\.self\.key\.", "crossattention.k_proj."),
    (r"crossattention\.self\.value\.", "crossattention.v_proj."),
    (r"crossattention\.output\.dense\.", "crossattention.out_proj."),
    (r"crossattention\.output\.LayerNorm\.", "crossattention_norm."),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.output\.LayerNorm\.", ".mlp_norm."),
]
_LM_HEAD_RENAMES = {
    "predictions.transform.dense.": "dense.",
    "predictions.transform.LayerNorm.": "LayerNorm.",
    "predictions.decoder.": "decoder.",
    "predictions.bias": "decoder.bias",
}


def _rename_lm_head(name: str) -> str:
    """BERT's `cls.predictions.*` names (without `cls.`) -> our `EfficientVLMLMHead` names."""
    for old, new in _LM_HEAD_RENAMES.items():
        if name.startswith(old):
            return new + name[len(old) :]
    raise ValueError(f"Unknown BERT LM-head parameter {name!r}.")


def _rename_bert(name: str) -> str:
    # `crossattention.output` must be handled before the generic `attention.output` rule.
    for pattern, replacement in sorted(_LAYER_RENAMES, key=lambda rule: "cross" not in rule[0]):
        new = re.sub(pattern, replacement, name)
        if new != name:
            return new
    return name


def _rename_vision(name: str) -> str:
    name = name.replace("vision_encoder.", "efficientvlm.vision_model.", 1)
    for old in ("class_embedding", "patch_embed.", "pos_embed."):
        name = name.replace(f"vision_model.{old}", f"vision_model.embeddings.{old}")
    return name.replace("vision_model.encoder.layers.", "vision_model.layers.")


# The official captioning and VQA models drop X-VLM's contrastive projections; ours keep them (freshly
# initialised), so the same backbone class serves every task.
_NOT_IN_GENERATIVE_CHECKPOINTS = ("efficientvlm.vision_proj.", "efficientvlm.text_proj.", "efficientvlm.temp")


def _text_stack_prefix(task: str) -> dict[str, str]:
    """Official prefix of each BERT stack -> our module prefix."""
    if task == "pretraining":
        return {"text_encoder.bert.": "efficientvlm.text_model.", "text_encoder.cls.": "mlm_head."}
    if task == "retrieval":
        return {"text_encoder.": "efficientvlm.text_model."}
    if task == "captioning":
        return {"text_decoder.bert.": "efficientvlm.text_model.", "text_decoder.cls.": "lm_head."}
    if task == "vqa":
        return {
            "text_encoder.": "efficientvlm.text_model.",
            "text_decoder.bert.": "answer_decoder.",
            "text_decoder.cls.": "answer_head.",
        }
    raise ValueError(f"Unknown task {task!r}; choose one of {OFFICIAL_TASKS}.")


def convert_official_state_dict(state_dict: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """Renames an official X-VLM / EfficientVLM state dict to this library's parameter names."""
    prefixes = _text_stack_prefix(task)
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.endswith("position_ids"):
            continue  # a buffer we rebuild
        if name.startswith("l0_module."):
            raise ValueError(
                f"{name!r}: this is a pruning-stage checkpoint (hard-concrete log-alphas beside the weights). Convert "
                "it with `efficientvlm convert`, which prunes it with its masks (in Python: "
                "`trainers.pruning.official.prune_official_state_dict`)."
            )
        if name.startswith("vision_encoder."):
            new = _rename_vision(name)
        elif name == "temp" or name.startswith(("vision_proj.", "text_proj.")):  # `temp`: the ITC temperature
            new = f"efficientvlm.{name}"
        elif name.startswith(("itm_head.", "bbox_head.")):
            new = name
        else:
            prefix = next((p for p in sorted(prefixes, key=len, reverse=True) if name.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"Parameter {name!r} is not part of an official {task} checkpoint.")
            rest = name[len(prefix) :]
            rename = _rename_lm_head if prefix.endswith("cls.") else _rename_bert
            new = prefixes[prefix] + rename(rest)
        if new in converted:
            continue  # `cls.predictions.bias` and `decoder.bias` are the same tensor
        converted[new] = tensor
    return converted


def infer_config(state_dict: dict[str, torch.Tensor], task: str, **overrides: Any) -> EfficientVLMConfig:
    """Reads the architecture of an official checkpoint from its tensor shapes (64-wide heads, as in ViT-B and
    BERT-base); a tensor it reads that is not there (another task's checkpoint, an incomplete one) is a ValueError
    naming it."""
    try:
        return _infer_config(state_dict, task, **overrides)
    except KeyError as error:
        raise ValueError(
            f"The checkpoint has no tensor {error.args[0]!r}, which an official {task} checkpoint holds: is it "
            "another task's checkpoint, or incomplete?"
        ) from error


def _infer_config(state_dict: dict[str, torch.Tensor], task: str, **overrides: Any) -> EfficientVLMConfig:
    text_prefix = {"pretraining": "text_encoder.bert.", "captioning": "text_decoder.bert."}.get(task, "text_encoder.")
    patch = state_dict["vision_encoder.patch_embed.weight"]
    positions = state_dict["vision_encoder.pos_embed.weight"].shape[0]
    vision_layers = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"vision_encoder\.encoder\.layers\.(\d+)\.", k))
    }
    text_layers = {
        int(m.group(1)) for k in state_dict if (m := re.match(re.escape(text_prefix) + r"encoder\.layer\.(\d+)\.", k))
    }
    fusion_layers = {
        int(m.group(1))
        for k in state_dict
        if (m := re.match(re.escape(text_prefix) + r"encoder\.layer\.(\d+)\.crossattention\.", k))
    }
    _check_layer_indices(vision_layers, "vision_encoder.encoder.layers")
    _check_layer_indices(text_layers, f"{text_prefix}encoder.layer")
    if fusion_layers and fusion_layers != set(range(len(text_layers) - len(fusion_layers), len(text_layers))):
        plain = sorted(set(range(min(fusion_layers), len(text_layers))) - fusion_layers)
        raise ValueError(
            f"{text_prefix}encoder.layer: layers {sorted(fusion_layers)} have cross-attention but {plain} after the "
            f"first of them do not (no `{text_prefix}encoder.layer.<i>.crossattention.*` tensors): the fusion layers "
            "are the last ones, so the checkpoint is incomplete."
        )
    if fusion_layers and len(fusion_layers) * 2 != len(text_layers):
        logger.warning(
            f"The checkpoint's BERT stack has {len(text_layers) - len(fusion_layers)} text and {len(fusion_layers)} "
            "fusion layers; official X-VLM / EfficientVLM models split it in half. If a layer's "
            "`crossattention.*` tensors are missing, the checkpoint is incomplete."
        )
    vision_hidden, text_hidden = patch.shape[0], state_dict[f"{text_prefix}embeddings.word_embeddings.weight"].shape[1]
    grid = round((positions - 1) ** 0.5)
    vision = dict(
        hidden_size=vision_hidden,
        num_attention_heads=vision_hidden // 64,
        intermediate_size=state_dict["vision_encoder.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(vision_layers),
        patch_size=patch.shape[-1],
        image_size=grid * patch.shape[-1],
    )
    text = dict(
        vocab_size=state_dict[f"{text_prefix}embeddings.word_embeddings.weight"].shape[0],
        hidden_size=text_hidden,
        num_attention_heads=text_hidden // 64,
        intermediate_size=state_dict[f"{text_prefix}encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=len(text_layers) - len(fusion_layers),
        num_fusion_layers=len(fusion_layers),
        max_position_embeddings=state_dict[f"{text_prefix}embeddings.position_embeddings.weight"].shape[0],
    )
    kwargs: dict[str, Any] = dict(vision_config=vision, text_config=text)
    if "vision_proj.weight" in state_dict:
        kwargs["embed_dim"] = state_dict["vision_proj.weight"].shape[0]
    if task == "vqa":
        decoder_layers = {
            int(m.group(1)) for k in state_dict if (m := re.match(r"text_decoder\.bert\.encoder\.layer\.(\d+)\.", k))
        }
        if not decoder_layers:
            raise KeyError("text_decoder.bert.encoder.layer.0.*")  # named by infer_config: another task's checkpoint
        _check_layer_indices(decoder_layers, "text_decoder.bert.encoder.layer")
        kwargs["num_answer_decoder_layers"] = len(decoder_layers)
    for key in ("vision_config", "text_config"):
        kwargs[key].update(overrides.pop(key, {}))
    kwargs.update(overrides)
    return EfficientVLMConfig(**kwargs)


def _check_layer_indices(indices: set[int], prefix: str) -> None:
    """Raises a `ValueError` naming the gap when the layers `prefix.<i>` of a checkpoint are not 0 .. n - 1 (a
    layer left out would otherwise shift every later one into its place)."""
    missing = sorted(set(range(max(indices, default=-1) + 1)) - indices)
    if missing:
        raise ValueError(
            f"The checkpoint has no tensors of {', '.join(f'{prefix}.{i}' for i in missing)} but has later layers "
            f"(up to {prefix}.{max(indices)}): it is incomplete."
        )


def load_official_checkpoint(
    path: str | Path, task: str, model_class: type[PreTrainedModel] | None = None, **overrides
):
    """Builds the task model for an official `.pth` checkpoint and loads its weights.

    Every tensor of the checkpoint must find its place, and every parameter of the model must be filled,
    except those the official model does not have (reported in the error otherwise).
    """
    return model_from_official_state_dict(read_official_state_dict(path), task, model_class, **overrides)


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in an official `.pth` file: the file's own dict, or the one under its `model` key (the
    official training scripts save the optimizer and config beside it), without a `module.` prefix shared by every
    name (saved from a DDP-wrapped model). Errors name the file."""
    checkpoint = read_torch_weights(path)
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} holds no state dict (a dict of tensors, or one under the key `model`).")
    # A model saved from inside DistributedDataParallel has every name under `module.`.
    if state_dict and all(name.startswith("module.") for name in state_dict):
        state_dict = {name[len("module.") :]: tensor for name, tensor in state_dict.items()}
    return state_dict


def _default_model_class(task: str) -> type[PreTrainedModel]:
    from .modeling_efficientvlm import EfficientVLMForPreTraining

    if task == "pretraining":
        return EfficientVLMForPreTraining
    if task == "retrieval":
        from .modeling_efficientvlm_retrieval import EfficientVLMForImageTextRetrieval

        return EfficientVLMForImageTextRetrieval
    if task == "captioning":
        from .modeling_efficientvlm_captioning import EfficientVLMForConditionalGeneration

        return EfficientVLMForConditionalGeneration
    if task == "vqa":
        from .modeling_efficientvlm_vqa import EfficientVLMForQuestionAnswering

        return EfficientVLMForQuestionAnswering
    raise ValueError(f"Unknown task {task!r}; choose one of {OFFICIAL_TASKS}.")


def model_from_official_state_dict(
    state_dict: dict[str, torch.Tensor],
    task: str,
    model_class: type[PreTrainedModel] | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """Official state dict -> our model with those weights (strict: nothing silently dropped)."""
    if task not in OFFICIAL_TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {OFFICIAL_TASKS}.")
    model_class = model_class or _default_model_class(task)
    config = infer_config(state_dict, task, **overrides)
    converted = convert_official_state_dict(state_dict, task)
    with torch.device("meta"):  # check every name and shape before paying for the real model
        expected = {name: tensor.shape for name, tensor in model_class(config).state_dict().items()}
    unexpected = sorted(set(converted) - set(expected))
    if unexpected:
        raise ValueError(f"Checkpoint tensors with no place in {model_class.__name__}: {unexpected[:10]}")
    for name, tensor in converted.items():
        if expected[name] != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(expected[name])}")
    tied = getattr(model_class, "_tied_weights_keys", None) or {}
    if config.tie_word_embeddings:
        for copy_name, source in tied.items():
            # The official models tie the LM decoder to the word embeddings; loading both would let whichever is
            # loaded last win, differently per task: the embeddings are kept, and a difference is named.
            if copy_name in converted and source in converted:
                difference = (converted[copy_name].float() - converted[source].float()).abs().max().item()
                if difference > 0:
                    logger.warning(
                        f"The checkpoint's LM decoder weight (our {copy_name}) differs from its word embeddings "
                        f"({source}) by up to {difference:.3g}; the model ties them, so the word embeddings are kept."
                    )
                del converted[copy_name]
    missing = set(expected) - set(converted) - set(tied)
    fresh = (
        {name for name in missing if name.startswith(_NOT_IN_GENERATIVE_CHECKPOINTS)}
        if task
        in (
            "captioning",
            "vqa",
        )
        else set()
    )
    if missing - fresh:
        raise ValueError(f"Model parameters the checkpoint does not provide: {sorted(missing - fresh)[:10]}")
    if fresh:
        # The official captioning / VQA models have no ITC projections: drawn from a fixed seed, so a conversion
        # always writes the same folder, and named, since the model's image / text features are then untrained.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = model_class(config)
        logger.warning(
            f"The official {task} checkpoint has no contrastive (ITC) projections ({', '.join(sorted(fresh))}): "
            "they are initialised at random (seed 0), so this model's get_image_features / get_text_features and "
            "ITC similarities are untrained. Its task head and encoders are the checkpoint's."
        )
    else:
        with no_init_weights():  # every weight is overwritten below
            model = model_class(config)
    model.load_state_dict(converted, strict=False)
    model.tie_weights()
    return model


# --------------------------------------------------------------------------------------------------------------
# Hugging Face CLIP vision + BERT -> X-VLM-style teacher
# --------------------------------------------------------------------------------------------------------------


def teacher_from_clip_and_bert(
    clip_vision: PreTrainedModel,
    bert: PreTrainedModel,
    num_text_layers: int | None = None,
    embed_dim: int = 256,
    **config_overrides: Any,
):
    """Initialises an `EfficientVLMForPreTraining` teacher from a CLIP vision tower and a BERT model, as X-VLM
    does: vision from CLIP, text layers from the first BERT layers, fusion layers' self-attention and FFN
    from the remaining BERT layers; cross-attention, projections and heads start fresh.

    `clip_vision`: a `CLIPVisionModel` (or `CLIPModel`, whose `vision_model` is used); `bert`: a `BertModel` or
    `BertForMaskedLM` (whose MLM head is copied too).
    """
    from .modeling_efficientvlm import EfficientVLMForPreTraining

    vision_tower = getattr(clip_vision, "vision_model", clip_vision)
    bert_model = getattr(bert, "bert", bert)
    vision_cfg, bert_cfg = vision_tower.config, bert_model.config
    total = bert_cfg.num_hidden_layers
    num_text = total // 2 if num_text_layers is None else num_text_layers
    if not 0 <= num_text <= total:
        raise ValueError(f"`num_text_layers` must be between 0 and {total}; got {num_text}.")
    if vision_cfg.hidden_act != "quick_gelu":
        config_overrides.setdefault("vision_config", {}).setdefault("hidden_act", vision_cfg.hidden_act)
    config = EfficientVLMConfig(
        vision_config={
            "hidden_size": vision_cfg.hidden_size,
            "intermediate_size": vision_cfg.intermediate_size,
            "num_hidden_layers": vision_cfg.num_hidden_layers,
            "num_attention_heads": vision_cfg.num_attention_heads,
            "image_size": vision_cfg.image_size,
            "patch_size": vision_cfg.patch_size,
            "layer_norm_eps": vision_cfg.layer_norm_eps,
            **config_overrides.pop("vision_config", {}),
        },
        text_config={
            "vocab_size": bert_cfg.vocab_size,
            "hidden_size": bert_cfg.hidden_size,
            "num_hidden_layers": num_text,
            "num_fusion_layers": total - num_text,
            "num_attention_heads": bert_cfg.num_attention_heads,
            "intermediate_size": bert_cfg.intermediate_size,
            "max_position_embeddings": bert_cfg.max_position_embeddings,
            "type_vocab_size": bert_cfg.type_vocab_size,
            "layer_norm_eps": bert_cfg.layer_norm_eps,
            "pad_token_id": bert_cfg.pad_token_id,
            **config_overrides.pop("text_config", {}),
        },
        embed_dim=embed_dim,
        **config_overrides,
    )
    teacher = EfficientVLMForPreTraining(config)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in vision_tower.state_dict().items():
        if name.endswith("position_ids"):
            continue
        name = name.replace("embeddings.patch_embedding.", "embeddings.patch_embed.")
        name = name.replace("embeddings.position_embedding.", "embeddings.pos_embed.")
        name = name.replace("encoder.layers.", "layers.")
        state[f"efficientvlm.vision_model.{name}"] = tensor
    for name, tensor in bert_model.state_dict().items():
        if name.endswith("position_ids") or name.startswith("pooler."):
            continue
        state[f"efficientvlm.text_model.{_rename_bert(name)}"] = tensor
    mlm = getattr(bert, "cls", None)
    if mlm is not None:
        for name, tensor in mlm.state_dict().items():
            state[f"mlm_head.{_rename_lm_head(name)}"] = tensor
    result = teacher.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"CLIP/BERT tensors with no place in the teacher: {result.unexpected_keys[:10]}")
    return teacher


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    official = sub.add_parser("xvlm", help="an official X-VLM / EfficientVLM .pth checkpoint")
    official.add_argument("--checkpoint", required=True, help="path of the .pth file")
    official.add_argument("--task", required=True, choices=OFFICIAL_TASKS)
    official.add_argument("--output_dir", required=True)
    hf = sub.add_parser("clip-bert", help="a Hugging Face CLIP vision model + BERT model -> teacher")
    hf.add_argument("--clip", required=True, help="CLIP (vision) model folder or Hub id")
    hf.add_argument("--bert", required=True, help="BERT model folder or Hub id")
    hf.add_argument("--num_text_layers", type=int, default=None)
    hf.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if args.source == "xvlm":
        model = load_official_checkpoint(args.checkpoint, args.task)
    else:
        from transformers import BertForMaskedLM, CLIPVisionModel

        model = teacher_from_clip_and_bert(
            CLIPVisionModel.from_pretrained(args.clip),
            BertForMaskedLM.from_pretrained(args.bert),
            num_text_layers=args.num_text_layers,
        )
    model.save_pretrained(args.output_dir)
    print(f"saved {type(model).__name__} to {args.output_dir}")


if __name__ == "__main__":
    main()
